"""The store: everything greensweep records about sweeps, stages, artifacts, measurements
and nodes, behind one class, :class:`Store`."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import cache
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, delete, func, insert, select, update
from sqlalchemy.orm import Session

from orchestrator.errors import UsageError
from orchestrator.store.models import (
    ATTEMPT_STATUSES,
    STAGE_STATUSES,
    SWEEP_STATUSES,
    ArtifactClaimModel,
    ArtifactModel,
    EnergyColumns,
    MeasurementModel,
    NodeModel,
    PlacementModel,
    PointModel,
    StageAttemptModel,
    StageModel,
    StageProgressModel,
    SweepModel,
    utcnow,
)
from orchestrator.store.records import (
    ArtifactRecord,
    AttemptRecord,
    EnergyRecord,
    MeasurementRecord,
    NodeRecord,
    PlacementRecord,
    ResultRow,
    StageRecord,
    SweepRecord,
)
from orchestrator.store.session import SessionScope, create_engine_for, default_db_url, sqlite_file
from workers.types import EnergyReading, StageResult

if TYPE_CHECKING:
    from orchestrator.carbon.base import Intensity

_TERMINAL_SWEEP_STATUSES = frozenset({"succeeded", "partial", "failed", "cancelled"})


class Store:
    """greensweep's record of sweeps: SQLite (embedded default) or PostgreSQL.

    **Who writes.** Only the coordinator writes; workers return :class:`StageResult`
    objects and never touch the store. Readers (CLI, reports) get frozen records, never
    ORM rows.

    **Transactions.** Every method is one transaction: it commits whole or not at all
    (``create_sweep`` writes a sweep with all its stages and points, or nothing). Database
    errors surface as :class:`~orchestrator.errors.StoreError` with a one-line message
    (passwords masked); a sweep or stage id that is not in the store raises
    :class:`~orchestrator.errors.UsageError`.

    **Idempotency.** ``record_stage_result`` may be replayed (a retried or resumed stage):
    the stage row is overwritten, the artifact row is upserted by key, and measurements
    are upserted on (sweep, stage key, repeat), so replaying never duplicates a row.
    ``mark_stage_reused``, ``mark_stage_skipped``, ``set_sweep_status`` and ``upsert_node``
    are idempotent too; ``mark_stage_running`` counts an attempt each time it is called;
    ``create_sweep`` is done once per sweep id.

    **Threads and processes.** A ``Store`` may be shared between threads (each call
    takes its own session and pooled connection). Several processes may open the same
    store: on SQLite writers queue on the write lock (WAL, busy timeout,
    ``BEGIN IMMEDIATE``) and readers never block.

    Open one with :meth:`Store.open`; close it (or use it as a context manager) to release
    its connections.
    """

    def __init__(self, engine: Engine, url: str) -> None:
        """Wrap an engine made by :func:`create_engine_for`; use :meth:`open` instead,
        which also checks the schema."""
        self._session = SessionScope(engine, url)

    @classmethod
    def open(cls, url: str | None = None, *, upgrade: bool = False, create: bool = True) -> Store:
        """Connect to the store at *url* (default :func:`default_db_url`) and check its
        schema.

        An empty database gets the schema created. A store at an older schema revision is
        migrated when *upgrade* is true and otherwise raises
        :class:`~orchestrator.errors.SchemaMismatchError` naming the exact
        ``greensweep db upgrade`` command; a store written by a newer greensweep always
        raises it. With *create* false (read-only use) an empty database is an error and
        is left untouched.
        """
        from orchestrator.store.migrations import empty_store_error, ensure_schema

        url = url or default_db_url()
        path = sqlite_file(url)
        if not create and path is not None and path.is_file() and path.stat().st_size == 0:
            raise empty_store_error(str(path))  # before connecting: even that writes a SQLite header
        engine = create_engine_for(url)
        try:
            ensure_schema(engine, url, upgrade=upgrade, create=create)
        except BaseException:
            engine.dispose()
            raise
        return cls(engine, url)

    @property
    def masked_url(self) -> str:
        """The store's URL with its password masked, for messages."""
        return self._session.masked_url

    def close(self) -> None:
        """Release the store's connections."""
        self._session.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- writes

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
        """Record a planned sweep (status ``pending``) with its stages and points, in one
        transaction: on any failure nothing is written.

        *stages* are in plan order (parents first), each with ``key``, ``kind``,
        ``params`` and optionally ``parent_key`` and ``target`` (evaluate stages). *points*
        each have ``point_index``, ``label``, ``pipeline``, ``stage_keys`` (root .. last
        compression stage), ``target`` and ``eval_key`` (a key among *stages*).
        """
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
        stage_rows = [
            {
                "sweep_id": sweep_id,
                "key": _field(stage, "key", "stage", position),
                "position": position,
                "kind": _field(stage, "kind", "stage", position),
                "params": dict(_field(stage, "params", "stage", position)),
                "parent_key": stage.get("parent_key"),
                "target": stage.get("target"),
                "status": "pending",
                "attempts": 0,
                "metrics": {},
            }
            for position, stage in enumerate(stages)
        ]
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
        """Move a sweep to *status*. ``running`` stamps ``started_at`` the first time and
        clears ``finished_at`` (a resumed sweep runs again); a terminal status
        (``succeeded``, ``partial``, ``failed``, ``cancelled``) stamps ``finished_at``;
        ``pending`` clears it."""
        if status not in SWEEP_STATUSES:
            raise ValueError(f"unknown sweep status {status!r}; one of: {', '.join(SWEEP_STATUSES)}")
        with self._session(write=True) as session:
            row = self._sweep_row(session, sweep_id)
            now = utcnow()
            row.status = status
            if status == "running":
                row.started_at = row.started_at or now
                row.finished_at = None
            elif status in _TERMINAL_SWEEP_STATUSES:
                row.finished_at = now
            else:
                row.finished_at = None

    def mark_stage_running(self, sweep_id: str, key: str, node_id: str) -> int:
        """A stage was dispatched to *node_id*: one more attempt (a ``stage_attempts`` row,
        status ``running``), timestamps restarted, the previous attempt's error cleared.
        Returns the attempt's number (from 1)."""
        return self.mark_stages_running(sweep_id, [(key, node_id)])[key]

    def mark_stages_running(self, sweep_id: str, dispatched: Sequence[tuple[str, str]]) -> dict[str, int]:
        """:meth:`mark_stage_running` for several ``(key, node_id)`` at once, in one
        transaction of a few bulk statements; returns each key's attempt number."""
        if not dispatched:
            return {}
        now = utcnow()
        keys = [k for k, _ in dispatched]
        with self._session(write=True) as session:
            counted = dict(session.execute(select(StageModel.key, StageModel.attempts).where(
                StageModel.sweep_id == sweep_id, StageModel.key.in_(keys))).all())
            for key in keys:
                if key not in counted:
                    self._stage_row(session, sweep_id, key)  # raises the one-line UsageError
            last = dict(session.execute(
                select(StageAttemptModel.stage_key, func.max(StageAttemptModel.attempt))
                .where(StageAttemptModel.sweep_id == sweep_id, StageAttemptModel.stage_key.in_(keys))
                .group_by(StageAttemptModel.stage_key)).all())
            out = {k: max(last.get(k) or 0, counted[k] or 0) + 1 for k in keys}
            session.execute(update(StageModel), [
                {"sweep_id": sweep_id, "key": k, "status": "running", "attempts": out[k], "node_id": node_id,
                 "started_at": now, "finished_at": None, "duration_s": None, "error": None, "traceback": None}
                for k, node_id in dispatched])
            session.execute(insert(StageAttemptModel), [
                {"sweep_id": sweep_id, "stage_key": k, "attempt": out[k], "node_id": node_id, "status": "running",
                 "started_at": now} for k, node_id in dispatched])
        return out

    def end_attempt(self, sweep_id: str, key: str, status: str, error: str | None = None,
                    *, back_to_pending: bool = False) -> None:
        """Close the stage's open attempt with *status* (``lost`` when its worker died,
        ``cancelled``...). With *back_to_pending* the stage itself returns to ``pending``
        (it will be retried); its result, if any comes later, is recorded once."""
        if status not in ATTEMPT_STATUSES or status == "running":
            raise ValueError(f"an attempt cannot end as {status!r}")
        with self._session(write=True) as session:
            self._close_attempts(session, sweep_id, [key], status, error)
            if back_to_pending:
                row = self._stage_row(session, sweep_id, key)
                row.status = "pending"
                row.error = _one_line(error)

    def attempts(self, sweep_id: str, key: str | None = None) -> list[AttemptRecord]:
        """The attempts at the sweep's stages (or one stage), in order."""
        q = select(StageAttemptModel).where(StageAttemptModel.sweep_id == sweep_id)
        if key is not None:
            q = q.where(StageAttemptModel.stage_key == key)
        with self._session(write=False) as session:
            rows = session.scalars(q.order_by(StageAttemptModel.stage_key, StageAttemptModel.attempt))
            return [AttemptRecord(sweep_id=r.sweep_id, stage_key=r.stage_key, attempt=r.attempt, node_id=r.node_id,
                                  status=r.status, started_at=r.started_at, finished_at=r.finished_at,
                                  error=r.error) for r in rows]

    @staticmethod
    def _close_attempts(session: Session, sweep_id: str, keys: Sequence[str], status: str,
                        error: str | None) -> None:
        if not keys:
            return
        for a in session.scalars(select(StageAttemptModel).where(
                StageAttemptModel.sweep_id == sweep_id, StageAttemptModel.stage_key.in_(list(keys)),
                StageAttemptModel.status == "running")):
            a.status = status
            a.finished_at = utcnow()
            a.error = _one_line(error)

    def mark_stage_reused(self, sweep_id: str, key: str) -> None:
        """The stage's artifact already exists (an earlier sweep or run made it); the
        stage does not run."""
        with self._session(write=True) as session:
            row = self._stage_row(session, sweep_id, key)
            row.status = "reused"
            row.finished_at = utcnow()
            row.error = None
            row.traceback = None

    def mark_stage_skipped(self, sweep_id: str, key: str, reason: str) -> None:
        """The stage will not run (e.g. its parent failed); *reason* is kept as its error."""
        with self._session(write=True) as session:
            row = self._stage_row(session, sweep_id, key)
            row.status = "skipped"
            row.finished_at = utcnow()
            row.error = _one_line(reason)

    def record_stage_result(self, sweep_id: str, result: StageResult) -> None:
        """Persist what a worker returned for stage ``result.key`` of *sweep_id*.

        Idempotent on (sweep, key): the stage row takes the result's status, metrics,
        error, duration, node and energy; its artifact is upserted by key (artifacts are
        global across sweeps; the first sweep to record one stays its creator); the
        stage's measurements become exactly one row per :class:`EvalRepeat`, keyed by
        (sweep, stage key, repeat). Carbon figures already accounted are kept.
        """
        self.record_stage_results(sweep_id, [result])

    def record_stage_results(self, sweep_id: str, results: Sequence[StageResult]) -> None:
        """:meth:`record_stage_result` for several results in one transaction (all or
        none), written with bulk statements: one stage-row UPDATE for all, one attempt
        UPDATE per outcome, one artifact upsert; measurements per evaluation."""
        if not results:
            return
        now = utcnow()
        keys = [r.key for r in results]
        with self._session(write=True) as session:
            kinds = dict(session.execute(select(StageModel.key, StageModel.kind).where(
                StageModel.sweep_id == sweep_id, StageModel.key.in_(keys))).all())
            for r in results:
                if r.key not in kinds:
                    self._stage_row(session, sweep_id, r.key)  # raises the one-line UsageError
                if kinds[r.key] != r.kind:
                    raise ValueError(f"result for stage {r.key!r} is a {r.kind!r} result; the stage is a "
                                     f"{kinds[r.key]!r}")
            ok = [r.key for r in results if r.status == "succeeded"]
            if ok:
                session.execute(update(StageAttemptModel).where(
                    StageAttemptModel.sweep_id == sweep_id, StageAttemptModel.stage_key.in_(ok),
                    StageAttemptModel.status == "running").values(status="succeeded", finished_at=now))
            for r in results:
                if r.status != "succeeded":
                    self._close_attempts(session, sweep_id, [r.key], "failed", r.error)
            session.execute(update(StageModel), [
                {"sweep_id": sweep_id, "key": r.key, "status": r.status, "metrics": dict(r.metrics),
                 "error": _one_line(r.error), "traceback": r.traceback, "node_id": r.node_id,
                 "duration_s": r.duration_s, "finished_at": now, **_energy_values(r.energy)}
                for r in results])
            artifacts = [
                {"key": r.artifact.key, "kind": r.kind, "path": r.artifact.path, "size_bytes": r.artifact.size_bytes,
                 "sha256": r.artifact.sha256, "materialized": r.artifact.materialized, "params": r.artifact.params,
                 "macs": r.artifact.macs, "compression": dict(r.artifact.compression), "created_at": now,
                 "created_by_sweep": sweep_id}
                for r in results if r.artifact is not None]
            for row in artifacts:  # one statement per artifact: rows of a multi-VALUES upsert must share keys
                _upsert(session, ArtifactModel, [row], ("key",), exclude=("created_at", "created_by_sweep"))
            bare = [r.key for r in results if not r.repeats]
            if bare:  # no repeats (now): none may remain from an earlier attempt
                session.execute(delete(MeasurementModel).where(
                    MeasurementModel.sweep_id == sweep_id, MeasurementModel.stage_key.in_(bare)))
            for r in results:
                if r.repeats:
                    self._record_repeats(session, sweep_id, r)

    def _record_repeats(self, session: Session, sweep_id: str, result: StageResult) -> None:
        numbers = [r.repeat for r in result.repeats]
        session.execute(
            delete(MeasurementModel).where(
                MeasurementModel.sweep_id == sweep_id,
                MeasurementModel.stage_key == result.key,
                MeasurementModel.repeat.not_in(numbers),
            )
        )
        measurement_rows = [
            {
                "sweep_id": sweep_id,
                "stage_key": result.key,
                "repeat": r.repeat,
                "samples": r.samples,
                "top1": r.top1,
                "top5": r.top5,
                "duration_s": r.duration_s,
                "time_per_sample_s": r.time_per_sample_s,
                "throughput_samples_per_s": r.throughput_samples_per_s,
                **_energy_values(r.energy),
            }
            for r in result.repeats
        ]
        _upsert(session, MeasurementModel, measurement_rows, ("sweep_id", "stage_key", "repeat"))

    def record_progress(self, sweep_id: str, key: str, entries: Sequence[Mapping[str, Any]]) -> None:
        """Persist progress reports of a running stage (e.g. one per training epoch).

        Each entry carries its ``step`` (``epoch`` is accepted as the step of a training
        epoch); idempotent on (sweep, key, step): a report seen twice stays one row.
        """
        rows = []
        for entry in entries:
            step = entry.get("step", entry.get("epoch"))
            if step is None:
                raise ValueError(f"progress entry for stage {key!r} has no 'step' or 'epoch': {dict(entry)}")
            rows.append({"sweep_id": sweep_id, "stage_key": key, "step": int(step),
                         "metrics": json.loads(json.dumps(dict(entry), default=str)), "recorded_at": utcnow()})
        if not rows:
            return
        with self._session(write=True) as session:
            self._stage_row(session, sweep_id, key)
            _upsert(session, StageProgressModel, rows, ("sweep_id", "stage_key", "step"))

    def progress(self, sweep_id: str, key: str) -> list[dict[str, Any]]:
        """The stage's progress reports in step order (each the dict the stage reported)."""
        with self._session(write=False) as session:
            rows = session.scalars(
                select(StageProgressModel)
                .where(StageProgressModel.sweep_id == sweep_id, StageProgressModel.stage_key == key)
                .order_by(StageProgressModel.step)
            )
            return [dict(r.metrics) for r in rows]

    def record_carbon(self, sweep_id: str, key: str, intensity: Intensity) -> None:
        """Account the carbon of stage *key* and of each of its measured repeats:
        grams = total energy (kWh) x the grid *intensity* of the node's region during the
        stage, storing the intensity, its source and kind beside every figure. Rows
        without an energy figure get the intensity but no grams (never a made-up 0 g)."""
        from orchestrator.carbon.base import carbon_g

        with self._session(write=True) as session:
            stage = self._stage_row(session, sweep_id, key)
            rows: list[EnergyColumns] = [stage, *session.scalars(
                select(MeasurementModel).where(MeasurementModel.sweep_id == sweep_id, MeasurementModel.stage_key == key)
            )]
            for row in rows:
                energy_j = _total_energy_j(row)
                row.carbon_g = None if energy_j is None else carbon_g(energy_j, intensity)
                row.intensity_g_per_kwh = intensity.g_co2_per_kwh
                row.intensity_source = intensity.source
                row.intensity_kind = intensity.kind

    # ------------------------------------------------- coordinator lifecycle

    def take_sweep(self, sweep_id: str, coordinator: str, *, stale_after_s: float,
                   gone: Callable[[str | None], bool] = lambda owner: False) -> None:
        """Make *coordinator* (``host:pid``) the one running *sweep_id*: status ``running``,
        a fresh heartbeat, the cancel flag cleared.

        Refused (:class:`UsageError`) while another coordinator's heartbeat is younger
        than *stale_after_s* and *gone* (owner) is false -- two coordinators never drive one
        sweep. One transaction
        (``BEGIN IMMEDIATE`` on SQLite, a row lock on PostgreSQL), so two concurrent
        ``resume`` calls cannot both win.
        """
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
        """The coordinator is alive: stamp the sweep's heartbeat and those of the artifact
        claims it holds. Returns True when a cancel was requested (``greensweep cancel``)."""
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
        """Ask the coordinator running *sweep_id* to stop. Returns what happened:
        ``requested`` (a live coordinator will stop it), ``cancelled`` (nobody was running
        it: it is marked cancelled now, its running stages and attempts closed), or
        ``already-<status>`` when the sweep had already ended (nothing changes)."""
        now = utcnow()
        with self._session(write=True) as session:
            row = self._sweep_row(session, sweep_id)
            if row.status in _TERMINAL_SWEEP_STATUSES:
                return f"already-{row.status}"
            alive = (row.status == "running" and row.heartbeat_at is not None
                     and (now - row.heartbeat_at).total_seconds() < stale_after_s and not gone(row.coordinator))
            if alive:
                row.cancel_requested = True
                return "requested"
            running = [st for st in session.scalars(select(StageModel).where(
                StageModel.sweep_id == sweep_id, StageModel.status == "running"))]
            self._close_attempts(session, sweep_id, [st.key for st in running], "cancelled", "sweep cancelled")
            for st in running:
                st.status = "pending"
            self._release_claims(session, sweep_id)
            row.status = "cancelled"
            row.cancel_requested = False
            row.finished_at = now
            return "cancelled"

    def release_sweep(self, sweep_id: str, status: str) -> None:
        """The coordinator is done with the sweep (any terminal status): its artifact
        claims are released and the heartbeat cleared."""
        if status not in _TERMINAL_SWEEP_STATUSES:
            raise ValueError(f"release_sweep needs a terminal status, not {status!r}")
        with self._session(write=True) as session:
            row = self._sweep_row(session, sweep_id)
            self._release_claims(session, sweep_id)
            row.status = status
            row.finished_at = utcnow()
            row.heartbeat_at = None
            row.cancel_requested = False

    def interrupted_stages(self, sweep_id: str) -> list[str]:
        """For ``resume``: stages left ``running`` by a dead coordinator go back to
        ``pending`` and their open attempts end as ``lost``. Returns their keys."""
        with self._session(write=True) as session:
            running = list(session.scalars(select(StageModel).where(
                StageModel.sweep_id == sweep_id, StageModel.status == "running")))
            keys = [st.key for st in running]
            self._close_attempts(session, sweep_id, keys, "lost", "the coordinator stopped while the stage ran")
            for st in running:
                st.status = "pending"
            return keys

    # ------------------------------------------------------- artifact claims

    def claim_artifact(self, key: str, sweep_id: str, *, stale_after_s: float) -> str | None:
        """Claim the right to build artifact *key* for *sweep_id*. Returns None when this
        sweep holds the claim (new, already its own, or taken over from a claim whose
        heartbeat is older than *stale_after_s*), else the id of the sweep building it."""
        now = utcnow()
        with self._session(write=True) as session:
            statement = _dialect_insert(session, ArtifactClaimModel).values(
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
        """Drop this sweep's claim on *key* (built, failed or abandoned)."""
        with self._session(write=True) as session:
            session.execute(delete(ArtifactClaimModel).where(
                ArtifactClaimModel.key == key, ArtifactClaimModel.sweep_id == sweep_id))

    @staticmethod
    def _release_claims(session: Session, sweep_id: str) -> None:
        session.execute(delete(ArtifactClaimModel).where(ArtifactClaimModel.sweep_id == sweep_id))

    # ------------------------------------------------------------ placements

    def record_placement(self, sweep_id: str, placement: Mapping[str, Any]) -> None:
        """Store the scheduler's decision for one stage (the columns of
        :class:`~orchestrator.store.records.PlacementRecord` except ``sweep_id`` and
        ``measured_carbon_g``); a later decision for the same stage replaces it."""
        row = {"sweep_id": sweep_id, "decided_at": utcnow(), **placement}
        with self._session(write=True) as session:
            _upsert(session, PlacementModel, [row], ("sweep_id", "stage_key"))

    def placements(self, sweep_id: str) -> list[PlacementRecord]:
        """The sweep's placement decisions, each with the carbon measured for the stage
        (None until accounted), in plan order. An evaluation has no stage-level energy:
        its figure is the sum of its measured repeats (the timed windows, not warm-up)."""
        with self._session(write=False) as session:
            repeats = dict(session.execute(
                select(MeasurementModel.stage_key, func.sum(MeasurementModel.carbon_g))
                .where(MeasurementModel.sweep_id == sweep_id, MeasurementModel.carbon_g.is_not(None))
                .group_by(MeasurementModel.stage_key)
            ).all())
            rows = session.execute(
                select(PlacementModel, StageModel.kind, StageModel.carbon_g, StageModel.status)
                .join(StageModel, (StageModel.sweep_id == PlacementModel.sweep_id)
                      & (StageModel.key == PlacementModel.stage_key))
                .where(PlacementModel.sweep_id == sweep_id)
                .order_by(StageModel.position)
            ).all()
            out = []
            for p, kind, carbon, status in rows:
                values = {c.name: getattr(p, c.name) for c in PlacementModel.__table__.columns}
                if carbon is None:
                    carbon = repeats.get(p.stage_key)
                out.append(PlacementRecord(**values, kind=kind, stage_status=status,
                                           measured_carbon_g=None if carbon is None else float(carbon)))
            return out

    def stage_durations(self, limit: int = 5000) -> list[tuple[str, str | None, float, float | None]]:
        """``(kind, node_type, duration_s, energy_j)`` of the most recent succeeded stages
        that ran on a known node: what the scheduler expects of a kind on a node type."""
        with self._session(write=False) as session:
            rows = session.execute(
                select(StageModel, NodeModel.node_type)
                .join(NodeModel, NodeModel.node_id == StageModel.node_id)
                .where(StageModel.status == "succeeded", StageModel.duration_s > 0)
                .order_by(StageModel.finished_at.desc())
                .limit(limit)
            ).all()
            return [(st.kind, node_type, st.duration_s, _total_energy_j(st)) for st, node_type in rows]

    def carbon_savings(self, sweep_id: str) -> dict[str, Any] | None:
        """What carbon-aware placement chose against the ``fifo`` counterfactual, as a
        JSON-able dict (``greensweep carbon savings``, the HTML report); None when the
        sweep recorded no placement decisions.

        ``expected_carbon_g`` and ``fifo_expected_carbon_g`` sum the scheduler's expected
        carbon of the placed stages with both decisions; ``measured_carbon_g`` sums what
        was accounted for the stages that ran (None when none was). The fifo figure is a
        counterfactual estimate: the stage did not run there."""
        placed = self.placements(sweep_id)
        if not placed:
            return None
        def total(values: list[float | None]) -> float | None:
            known = [v for v in values if v is not None]
            return sum(known) if known else None
        expected = total([p.expected_carbon_g for p in placed])
        fifo = total([p.fifo_expected_carbon_g for p in placed])
        measured = total([p.measured_carbon_g for p in placed])
        saved = (fifo - expected) if expected is not None and fifo is not None else None
        return {
            "sweep_id": sweep_id,
            "policy": placed[0].policy,
            "stages": [
                {"key": p.stage_key, "kind": p.kind, "status": p.stage_status, "node_id": p.node_id,
                 "node_type": p.node_type, "region": p.region, "start": p.start_at.isoformat(),
                 "expected_duration_s": p.expected_duration_s, "expected_energy_j": p.expected_energy_j,
                 "expected_intensity_g_per_kwh": p.expected_intensity_g_per_kwh,
                 "expected_carbon_g": p.expected_carbon_g, "measured_carbon_g": p.measured_carbon_g,
                 "estimate_source": p.estimate_source, "fifo_node_id": p.fifo_node_id,
                 "fifo_node_type": p.fifo_node_type, "fifo_region": p.fifo_region,
                 "fifo_start": p.fifo_start_at.isoformat(),
                 "fifo_expected_intensity_g_per_kwh": p.fifo_expected_intensity_g_per_kwh,
                 "fifo_expected_carbon_g": p.fifo_expected_carbon_g,
                 "moved": p.node_id != p.fifo_node_id or p.start_at != p.fifo_start_at}
                for p in placed
            ],
            "expected_carbon_g": expected,
            "fifo_expected_carbon_g": fifo,
            "measured_carbon_g": measured,
            "saved_expected_g": saved,
            "saved_expected_pct": (100.0 * saved / fifo) if saved is not None and fifo else None,
        }

    def upsert_node(
        self,
        node_id: str,
        node_type: str | None,
        region: str | None,
        hostname: str | None,
        hardware: Mapping[str, Any],
    ) -> None:
        """Record a Ray node as seen now (``first_seen`` stays the first time)."""
        now = utcnow()
        values = {
            "node_id": node_id,
            "node_type": node_type,
            "region": region,
            "hostname": hostname,
            "hardware": dict(hardware),
            "first_seen": now,
            "last_seen": now,
        }
        with self._session(write=True) as session:
            _upsert(session, NodeModel, [values], ("node_id",), exclude=("first_seen",))

    # ------------------------------------------------------------------ reads

    def get_sweep(self, sweep_id: str) -> SweepRecord | None:
        with self._session(write=False) as session:
            row = session.get(SweepModel, sweep_id)
            return None if row is None else _sweep_record(row)

    def list_sweeps(self, limit: int = 20) -> list[SweepRecord]:
        """The *limit* most recently created sweeps, newest first."""
        with self._session(write=False) as session:
            rows = session.scalars(
                select(SweepModel).order_by(SweepModel.created_at.desc(), SweepModel.id.desc()).limit(limit)
            )
            return [_sweep_record(r) for r in rows]

    def latest_sweep_id(self) -> str | None:
        """The id of the most recently created sweep; None when the store has none."""
        with self._session(write=False) as session:
            return session.scalar(
                select(SweepModel.id).order_by(SweepModel.created_at.desc(), SweepModel.id.desc()).limit(1)
            )

    def stages(self, sweep_id: str) -> list[StageRecord]:
        """The sweep's stages in plan order (parents before children)."""
        with self._session(write=False) as session:
            self._sweep_row(session, sweep_id)
            rows = session.scalars(
                select(StageModel).where(StageModel.sweep_id == sweep_id).order_by(StageModel.position)
            )
            return [_stage_record(r) for r in rows]

    def stage_counts(self, sweep_id: str) -> dict[str, int]:
        """How many of the sweep's stages are in each status: only statuses that occur,
        in :data:`STAGE_STATUSES` order (e.g. ``{"succeeded": 4, "reused": 5}``)."""
        with self._session(write=False) as session:
            self._sweep_row(session, sweep_id)
            query = (
                select(StageModel.status, func.count())
                .where(StageModel.sweep_id == sweep_id)
                .group_by(StageModel.status)
            )
            counts: dict[str, int] = dict(session.execute(query).all())
            return {status: counts[status] for status in STAGE_STATUSES if status in counts}

    def artifact(self, key: str) -> ArtifactRecord | None:
        with self._session(write=False) as session:
            row = session.get(ArtifactModel, key)
            return None if row is None else _artifact_record(row)

    def measurements(self, sweep_id: str, stage_key: str | None = None) -> list[MeasurementRecord]:
        """The sweep's measured evaluation repeats (of one stage when *stage_key* is given),
        ordered by stage key and repeat."""
        with self._session(write=False) as session:
            self._sweep_row(session, sweep_id)
            query = select(MeasurementModel).where(MeasurementModel.sweep_id == sweep_id)
            if stage_key is not None:
                query = query.where(MeasurementModel.stage_key == stage_key)
            rows = session.scalars(query.order_by(MeasurementModel.stage_key, MeasurementModel.repeat))
            return [_measurement_record(r) for r in rows]

    def nodes(self) -> list[NodeRecord]:
        """Every node the coordinator has seen, by node type then id."""
        with self._session(write=False) as session:
            rows = session.scalars(select(NodeModel).order_by(NodeModel.node_type, NodeModel.node_id))
            return [_node_record(r) for r in rows]

    def results(self, sweep_id: str) -> list[ResultRow]:
        """One row per sweep point, in point order: see :class:`ResultRow`.

        Means and standard deviations are computed here, in Python, from the measurement
        rows (portable across backends). A point whose evaluate stage was ``reused`` gets
        the repeats of the latest sweep in which that stage succeeded.
        """
        with self._session(write=False) as session:
            self._sweep_row(session, sweep_id)
            points = session.scalars(
                select(PointModel).where(PointModel.sweep_id == sweep_id).order_by(PointModel.point_index)
            ).all()
            stages = {s.key: s for s in session.scalars(select(StageModel).where(StageModel.sweep_id == sweep_id))}

            repeats: dict[str, list[MeasurementModel]] = defaultdict(list)
            for m in session.scalars(
                select(MeasurementModel).where(MeasurementModel.sweep_id == sweep_id).order_by(MeasurementModel.repeat)
            ):
                repeats[m.stage_key].append(m)

            # Reused evaluations were measured by an earlier sweep: find the latest one.
            measured_by: dict[str, StageModel] = {}
            reused = {p.eval_key for p in points if stages[p.eval_key].status == "reused"}
            if reused:
                earlier = session.scalars(
                    select(StageModel)
                    .where(
                        StageModel.key.in_(reused),
                        StageModel.status == "succeeded",
                        StageModel.sweep_id != sweep_id,
                    )
                    .order_by(StageModel.finished_at.desc())
                )
                for stage in earlier:
                    measured_by.setdefault(stage.key, stage)
                for key, stage in measured_by.items():
                    repeats[key] = list(
                        session.scalars(
                            select(MeasurementModel)
                            .where(MeasurementModel.sweep_id == stage.sweep_id, MeasurementModel.stage_key == key)
                            .order_by(MeasurementModel.repeat)
                        )
                    )

            model_keys = {p.stage_keys[-1] for p in points if p.stage_keys}
            artifacts = {
                a.key: a for a in session.scalars(select(ArtifactModel).where(ArtifactModel.key.in_(model_keys)))
            }

            rows = []
            for p in points:
                evaluation = stages[p.eval_key]
                if evaluation.status == "succeeded":
                    measured: StageModel | None = evaluation
                else:
                    measured = measured_by.get(p.eval_key)  # None unless reused
                artifact = artifacts.get(p.stage_keys[-1]) if p.stage_keys else None
                rows.append(
                    _result_row(
                        p,
                        stages,
                        evaluation,
                        measured,
                        repeats.get(p.eval_key, []) if measured is not None else [],
                        artifact,
                    )
                )
            return rows

    # --------------------------------------------------------------- helpers

    def _sweep_row(self, session: Session, sweep_id: str) -> SweepModel:
        row = session.get(SweepModel, sweep_id)
        if row is None:
            raise UsageError(f"no sweep {sweep_id!r} in the store at {self.masked_url}")
        return row

    def _stage_row(self, session: Session, sweep_id: str, key: str) -> StageModel:
        row = session.get(StageModel, (sweep_id, key))
        if row is None:
            self._sweep_row(session, sweep_id)
            raise UsageError(f"sweep {sweep_id!r} has no stage {key!r} in the store at {self.masked_url}")
        return row


# ------------------------------------------------------------------ writing


def _field(item: Mapping[str, Any], name: str, what: str, index: int) -> Any:
    try:
        return item[name]
    except KeyError:
        raise ValueError(f"{what} #{index} given to create_sweep lacks {name!r}") from None


def _one_line(text: str | None) -> str | None:
    if text is None:
        return None
    lines = [line.strip() for line in text.strip().splitlines()]
    return lines[0] if lines else ""


def _energy_values(energy: EnergyReading | None) -> dict[str, Any]:
    """The meter columns of :class:`EnergyColumns` (not the carbon ones) for a reading."""
    if energy is None:
        return dict.fromkeys(_METER_COLUMNS)
    return {
        "gpu_energy_j": energy.gpu_energy_j,
        "cpu_energy_j": energy.cpu_energy_j,
        "dram_energy_j": energy.dram_energy_j,
        "gpu_energy_source": energy.gpu_source,
        "cpu_energy_source": energy.cpu_source,
        "dram_energy_source": energy.dram_source,
        "gpu_idle_power_w": energy.gpu_idle_power_w,
        "cpu_idle_power_w": energy.cpu_idle_power_w,
        "dram_idle_power_w": energy.dram_idle_power_w,
    }


_METER_COLUMNS: tuple[str, ...] = tuple(_energy_values(EnergyReading(duration_s=0.0)))


def _dialect_insert(session: Session, model: type) -> Any:
    """``INSERT`` with ``ON CONFLICT`` support: the backend's own insert construct (the
    engine factory admits only SQLite and PostgreSQL)."""
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects import postgresql

        return postgresql.insert(model)
    from sqlalchemy.dialects import sqlite

    return sqlite.insert(model)


def _upsert(
    session: Session,
    model: type,
    rows: list[dict[str, Any]],
    key: tuple[str, ...],
    exclude: Iterable[str] = (),
) -> None:
    """INSERT *rows*, or on a conflict of *key* UPDATE the given columns (except *key*
    and *exclude*): ``ON CONFLICT DO UPDATE`` on both SQLite and PostgreSQL."""
    if not rows:
        return
    statement = _dialect_insert(session, model).values(rows)
    keep = set(key) | set(exclude)
    statement = statement.on_conflict_do_update(
        index_elements=list(key),
        set_={column: statement.excluded[column] for column in rows[0] if column not in keep},
    )
    session.execute(statement)


# ------------------------------------------------------------------ reading


def _energy_record(row: EnergyColumns) -> EnergyRecord | None:
    record = EnergyRecord(
        gpu_energy_j=row.gpu_energy_j,
        cpu_energy_j=row.cpu_energy_j,
        dram_energy_j=row.dram_energy_j,
        gpu_source=row.gpu_energy_source,
        cpu_source=row.cpu_energy_source,
        dram_source=row.dram_energy_source,
        gpu_idle_power_w=row.gpu_idle_power_w,
        cpu_idle_power_w=row.cpu_idle_power_w,
        dram_idle_power_w=row.dram_idle_power_w,
        carbon_g=row.carbon_g,
        intensity_g_per_kwh=row.intensity_g_per_kwh,
        intensity_source=row.intensity_source,
        intensity_kind=row.intensity_kind,
    )
    return None if all(v is None for v in vars(record).values()) else record


def _sweep_record(row: SweepModel) -> SweepRecord:
    return SweepRecord(
        id=row.id,
        name=row.name,
        spec_text=row.spec_text,
        spec_hash=row.spec_hash,
        status=row.status,
        created_at=row.created_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        artifact_root=row.artifact_root,
        naive_stage_count=row.naive_stage_count,
        unique_stage_count=row.unique_stage_count,
        spec_dir=row.spec_dir,
        options=dict(row.options or {}),
        heartbeat_at=row.heartbeat_at,
        coordinator=row.coordinator,
        cancel_requested=bool(row.cancel_requested),
    )


def _stage_record(row: StageModel) -> StageRecord:
    return StageRecord(
        sweep_id=row.sweep_id,
        key=row.key,
        kind=row.kind,
        params=dict(row.params),
        parent_key=row.parent_key,
        target=row.target,
        status=row.status,
        attempts=row.attempts,
        error=row.error,
        traceback=row.traceback,
        node_id=row.node_id,
        started_at=row.started_at,
        finished_at=row.finished_at,
        duration_s=row.duration_s,
        metrics=dict(row.metrics),
        energy=_energy_record(row),
    )


def _artifact_record(row: ArtifactModel) -> ArtifactRecord:
    return ArtifactRecord(
        key=row.key,
        kind=row.kind,
        path=row.path,
        size_bytes=row.size_bytes,
        sha256=row.sha256,
        materialized=row.materialized,
        params=row.params,
        macs=row.macs,
        compression=dict(row.compression),
        created_at=row.created_at,
        created_by_sweep=row.created_by_sweep,
    )


def _measurement_record(row: MeasurementModel) -> MeasurementRecord:
    return MeasurementRecord(
        sweep_id=row.sweep_id,
        stage_key=row.stage_key,
        repeat=row.repeat,
        samples=row.samples,
        top1=row.top1,
        top5=row.top5,
        duration_s=row.duration_s,
        time_per_sample_s=row.time_per_sample_s,
        throughput_samples_per_s=row.throughput_samples_per_s,
        energy=_energy_record(row),
    )


def _node_record(row: NodeModel) -> NodeRecord:
    return NodeRecord(
        node_id=row.node_id,
        node_type=row.node_type,
        region=row.region,
        hostname=row.hostname,
        hardware=dict(row.hardware),
        first_seen=row.first_seen,
        last_seen=row.last_seen,
    )


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _std(values: Sequence[float]) -> float | None:
    """Sample standard deviation; 0.0 for a single value, None for none."""
    if not values:
        return None
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _total_energy_j(row: EnergyColumns) -> float | None:
    parts = [v for v in (row.gpu_energy_j, row.cpu_energy_j, row.dram_energy_j) if v is not None]
    return sum(parts) if parts else None


def _net_energy_j(row: EnergyColumns) -> float | None:
    """Gross energy minus idle power x duration, over the domains that have both an
    energy figure and a sampled idle power; None when no domain has both."""
    duration_s = getattr(row, "duration_s", None)
    if duration_s is None:
        return None
    parts = []
    for domain in ("gpu", "cpu", "dram"):
        energy_j = getattr(row, f"{domain}_energy_j")
        idle_w = getattr(row, f"{domain}_idle_power_w")
        if energy_j is not None and idle_w is not None:
            parts.append(energy_j - idle_w * duration_s)
    return sum(parts) if parts else None


def _per_sample(measurements: Sequence[MeasurementModel], column: str) -> list[float]:
    values = [(getattr(m, column), m.samples) for m in measurements]
    return [v / n for v, n in values if v is not None and n > 0]


def _result_row(
    point: PointModel,
    stages: Mapping[str, StageModel],
    evaluation: StageModel,
    measured: StageModel | None,
    measurements: Sequence[MeasurementModel],
    artifact: ArtifactModel | None,
) -> ResultRow:
    top1 = [m.top1 for m in measurements]
    top5 = [m.top5 for m in measurements]
    time_per_sample = [m.time_per_sample_s for m in measurements]
    energy_per_sample = [
        total / m.samples for m in measurements if (total := _total_energy_j(m)) is not None and m.samples > 0
    ]
    first = measurements[0] if measurements else None
    sources: dict[str, str] = {}
    idle_w: dict[str, float] = {}
    if first is not None:
        for domain in ("gpu", "cpu", "dram"):
            source = getattr(first, f"{domain}_energy_source")
            if source is not None:
                sources[domain] = source
            idle = getattr(first, f"{domain}_idle_power_w")
            if idle is not None:
                idle_w[domain] = idle
    net_per_sample = [
        net / m.samples for m in measurements if (net := _net_energy_j(m)) is not None and m.samples > 0
    ]
    carbon_per_sample = _per_sample(measurements, "carbon_g")
    facts: Mapping[str, Any] = (
        {
            "params": artifact.params,
            "macs": artifact.macs,
            "size_bytes": artifact.size_bytes,
            "materialized": artifact.materialized,
        }
        if artifact is not None
        else (measured or evaluation).metrics  # what the evaluation saw of the model
    )
    return ResultRow(
        sweep_id=point.sweep_id,
        point_index=point.point_index,
        point=point.label,
        pipeline=point.pipeline,
        stage_keys=tuple(point.stage_keys),
        stages=tuple(stage_label(stages[k].kind, stages[k].params) if k in stages else k for k in point.stage_keys),
        target=point.target,
        eval_key=point.eval_key,
        status=evaluation.status,
        node_id=measured.node_id if measured is not None else evaluation.node_id,
        measured_in_sweep=measured.sweep_id if measured is not None else None,
        repeats=len(measurements),
        top1=_mean(top1),
        top1_std=_std(top1),
        top5=_mean(top5),
        top5_std=_std(top5),
        time_per_sample_s=_mean(time_per_sample),
        time_per_sample_s_std=_std(time_per_sample),
        throughput_samples_per_s=_mean([m.throughput_samples_per_s for m in measurements]),
        energy_per_sample_j=_mean(energy_per_sample),
        energy_per_sample_j_std=_std(energy_per_sample),
        net_energy_per_sample_j=_mean(net_per_sample),
        gpu_energy_per_sample_j=_mean(_per_sample(measurements, "gpu_energy_j")),
        cpu_energy_per_sample_j=_mean(_per_sample(measurements, "cpu_energy_j")),
        dram_energy_per_sample_j=_mean(_per_sample(measurements, "dram_energy_j")),
        energy_source=sources,
        idle_power_w=idle_w,
        carbon_g_per_sample=_mean(carbon_per_sample),
        carbon_g_per_sample_std=_std(carbon_per_sample),
        intensity_g_per_kwh=first.intensity_g_per_kwh if first is not None else None,
        intensity_source=first.intensity_source if first is not None else None,
        intensity_kind=first.intensity_kind if first is not None else None,
        params=facts.get("params"),
        macs=facts.get("macs"),
        size_bytes=facts.get("size_bytes"),
        materialized=facts.get("materialized"),
        stage_kinds=tuple(stages[k].kind if k in stages else "" for k in point.stage_keys),
        stage_params=tuple(dict(stages[k].params) if k in stages else {} for k in point.stage_keys),
    )


def stage_label(kind: str, params: Mapping[str, Any]) -> str:
    """A readable label for a stage, ``kind(name=value, ...)``, leaving out parameters at
    the defaults of the kind's registered parameter model."""
    defaults = _param_defaults(kind)
    shown = [f"{k}={_format(v)}" for k, v in params.items() if k not in defaults or defaults[k] != v]
    return f"{kind}({', '.join(shown)})"


@cache
def _param_defaults(kind: str) -> dict[str, Any]:
    from workers.stages.registry import STAGE_KINDS  # pydantic: imported only when labelling

    if kind not in STAGE_KINDS:
        return {}
    fields = STAGE_KINDS[kind].params.model_fields
    return {name: f.get_default(call_default_factory=True) for name, f in fields.items() if not f.is_required()}


def _format(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
