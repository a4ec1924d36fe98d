"""The store's lifecycle writes: creating a sweep, moving its status, which coordinator
owns it (heartbeat, cancel, release, resume) and which sweep builds each artifact.

Contract and docstrings: :class:`~orchestrator.store.base.BaseStore`. Ownership and claims
are decided inside one write transaction that locks the row (``BEGIN IMMEDIATE`` on
SQLite, ``SELECT ... FOR UPDATE`` on PostgreSQL), so two coordinators racing for a sweep
or an artifact cannot both win.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy import delete, insert, select

from orchestrator.errors import UsageError
from orchestrator.store.models import (
    SWEEP_STATUSES,
    ArtifactClaimModel,
    PointModel,
    StageModel,
    SweepModel,
    utcnow,
)
from orchestrator.store.rows import deployment_values
from orchestrator.store.sql import TERMINAL_SWEEP_STATUSES, SQLCore, close_attempts, dialect_insert, release_claims


class LifecycleMixin(SQLCore):
    """Sweeps, ownership, heartbeat, cancel and artifact claims (see :class:`BaseStore`)."""

    def create_sweep(
        self,
        sweep_id: str,
        name: str,
        spec_text: str,
        spec_hash: str,
        artifact_root: str,
        stages: Sequence[Mapping[str, Any]],
        points: Sequence[Mapping[str, Any]],
        naive_stage_count: int,
        spec_dir: str | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        now = utcnow()
        sweep_row = {
            "id": sweep_id,
            "name": name,
            "spec_text": spec_text,
            "spec_hash": spec_hash,
            "status": "pending",
            "created_at": now,
            "artifact_root": artifact_root,
            "naive_stage_count": naive_stage_count,
            "unique_stage_count": len(stages),
            "spec_dir": spec_dir,
            "options": dict(options or {}),
            "cancel_requested": False,
        }
        stage_rows = []
        for position, stage in enumerate(stages):
            params = dict(_field(stage, "params", "stage", position))
            stage_rows.append({
                "sweep_id": sweep_id,
                "key": _field(stage, "key", "stage", position),
                "position": position,
                "kind": _field(stage, "kind", "stage", position),
                "params": params,
                "parent_key": stage.get("parent_key"),
                "target": stage.get("target"),
                "status": "pending",
                "attempts": 0,
                "metrics": {},
                **deployment_values(stage.get("target"), params),
            })
        point_rows = [
            {
                "sweep_id": sweep_id,
                **{f: _field(point, f, "point", i) for f in ("point_index", "label", "pipeline", "target", "eval_key")},
                "stage_keys": list(_field(point, "stage_keys", "point", i)),
            }
            for i, point in enumerate(points)
        ]
        with self._session(write=True) as session:
            session.add(SweepModel(**sweep_row))
            session.flush()
            if stage_rows:
                session.execute(insert(StageModel), stage_rows)
            if point_rows:
                session.execute(insert(PointModel), point_rows)

    def set_sweep_status(self, sweep_id: str, status: str) -> None:
        if status not in SWEEP_STATUSES:
            raise ValueError(f"unknown sweep status {status!r}; one of: {', '.join(SWEEP_STATUSES)}")
        with self._session(write=True) as session:
            row = self._sweep_row(session, sweep_id)
            now = utcnow()
            row.status = status
            if status == "running":
                row.started_at = row.started_at or now
                row.finished_at = None
            elif status in TERMINAL_SWEEP_STATUSES:
                row.finished_at = now
            else:
                row.finished_at = None

    def take_sweep(self, sweep_id: str, coordinator: str, *, stale_after_s: float,
                   gone: Callable[[str | None], bool] = lambda owner: False) -> None:
        now = utcnow()
        with self._session(write=True) as session:
            row = session.scalars(select(SweepModel).where(SweepModel.id == sweep_id).with_for_update()).first()
            if row is None:
                raise UsageError(f"no sweep {sweep_id!r} in this store -- list sweeps with: greensweep status")
            if (row.coordinator and row.coordinator != coordinator and row.heartbeat_at is not None
                    and row.status == "running" and (now - row.heartbeat_at).total_seconds() < stale_after_s
                    and not gone(row.coordinator)):
                age = (now - row.heartbeat_at).total_seconds()
                raise UsageError(
                    f"sweep {sweep_id} is being run by coordinator {row.coordinator} (alive {age:.0f}s ago) -- "
                    f"wait for it, or stop it with: greensweep cancel {sweep_id}"
                )
            row.coordinator = coordinator
            row.heartbeat_at = now
            row.cancel_requested = False
            row.status = "running"
            row.started_at = row.started_at or now
            row.finished_at = None

    def heartbeat(self, sweep_id: str, claimed_keys: Sequence[str] = ()) -> bool:
        now = utcnow()
        with self._session(write=True) as session:
            row = self._sweep_row(session, sweep_id)
            row.heartbeat_at = now
            if claimed_keys:
                for claim in session.scalars(select(ArtifactClaimModel).where(
                        ArtifactClaimModel.key.in_(list(claimed_keys)), ArtifactClaimModel.sweep_id == sweep_id)):
                    claim.heartbeat_at = now
            return bool(row.cancel_requested)

    def request_cancel(self, sweep_id: str, *, stale_after_s: float,
                       gone: Callable[[str | None], bool] = lambda owner: False) -> str:
        now = utcnow()
        with self._session(write=True) as session:
            row = self._sweep_row(session, sweep_id)
            if row.status in TERMINAL_SWEEP_STATUSES:
                return f"already-{row.status}"
            alive = (row.status == "running" and row.heartbeat_at is not None
                     and (now - row.heartbeat_at).total_seconds() < stale_after_s and not gone(row.coordinator))
            if alive:
                row.cancel_requested = True
                return "requested"
            running = list(session.scalars(select(StageModel).where(
                StageModel.sweep_id == sweep_id, StageModel.status == "running")))
            close_attempts(session, sweep_id, [st.key for st in running], "cancelled", "sweep cancelled")
            for st in running:
                st.status = "pending"
            release_claims(session, sweep_id)
            row.status = "cancelled"
            row.cancel_requested = False
            row.finished_at = now
            return "cancelled"

    def release_sweep(self, sweep_id: str, status: str) -> None:
        if status not in TERMINAL_SWEEP_STATUSES:
            raise ValueError(f"release_sweep needs a terminal status, not {status!r}")
        with self._session(write=True) as session:
            row = self._sweep_row(session, sweep_id)
            release_claims(session, sweep_id)
            row.status = status
            row.finished_at = utcnow()
            row.heartbeat_at = None
            row.cancel_requested = False

    def interrupted_stages(self, sweep_id: str) -> list[str]:
        with self._session(write=True) as session:
            running = list(session.scalars(select(StageModel).where(
                StageModel.sweep_id == sweep_id, StageModel.status == "running")))
            keys = [st.key for st in running]
            close_attempts(session, sweep_id, keys, "lost", "the coordinator stopped while the stage ran")
            for st in running:
                st.status = "pending"
            return keys

    # ------------------------------------------------------- artifact claims

    def claim_artifact(self, key: str, sweep_id: str, *, stale_after_s: float) -> str | None:
        now = utcnow()
        with self._session(write=True) as session:
            statement = dialect_insert(session, ArtifactClaimModel).values(
                key=key, sweep_id=sweep_id, claimed_at=now, heartbeat_at=now).on_conflict_do_nothing(
                index_elements=["key"])
            session.execute(statement)
            claim = session.scalars(
                select(ArtifactClaimModel).where(ArtifactClaimModel.key == key).with_for_update()).one()
            if claim.sweep_id == sweep_id:
                claim.heartbeat_at = now
                return None
            if (now - claim.heartbeat_at).total_seconds() >= stale_after_s:
                claim.sweep_id, claim.claimed_at, claim.heartbeat_at = sweep_id, now, now
                return None
            return claim.sweep_id

    def release_artifact(self, key: str, sweep_id: str) -> None:
        with self._session(write=True) as session:
            session.execute(delete(ArtifactClaimModel).where(
                ArtifactClaimModel.key == key, ArtifactClaimModel.sweep_id == sweep_id))


def _field(item: Mapping[str, Any], name: str, what: str, index: int) -> Any:
    try:
        return item[name]
    except KeyError:
        raise ValueError(f"{what} #{index} given to create_sweep lacks {name!r}") from None
