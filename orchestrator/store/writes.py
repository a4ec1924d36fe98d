"""The coordinator's writes about a running sweep: stage status and attempts, stage
results (artifacts, measurements, the cohorts that measured them), progress, carbon,
placement decisions and nodes.

Contract and docstrings: :class:`~orchestrator.store.base.BaseStore`. Batched calls
(``mark_stages_running``, ``record_stage_results``) issue a few bulk statements, so a
batch of dispatches or results costs a few round trips rather than one per stage.
"""

from __future__ import annotations

import json
from datetime import datetime
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.orm import Session

from orchestrator.store.models import (
    ATTEMPT_STATUSES,
    ArtifactModel,
    CohortModel,
    EnergyColumns,
    MeasurementModel,
    NodeModel,
    PlacementModel,
    StageAttemptModel,
    StageModel,
    StageProgressModel,
    utcnow,
)
from orchestrator.store.rows import cohort_values, energy_values, first_line, runtime_version, total_energy_j
from orchestrator.store.sql import SQLCore, close_attempts, dialect_insert, upsert
from workers.types import StageResult

if TYPE_CHECKING:
    from orchestrator.carbon.base import Intensity


class WritesMixin(SQLCore):
    """Stage status, attempts, results, progress, carbon, placements, nodes."""

    def mark_stages_running(self, sweep_id: str, dispatched: Sequence[tuple[str, str]]) -> dict[str, int]:
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
            # attempts are numbered past both counters: the stage's and its attempt rows'
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
        if status not in ATTEMPT_STATUSES or status == "running":
            raise ValueError(f"an attempt cannot end as {status!r}")
        with self._session(write=True) as session:
            close_attempts(session, sweep_id, [key], status, error)
            if back_to_pending:
                row = self._stage_row(session, sweep_id, key)
                row.status = "pending"
                row.error = first_line(error)

    def mark_stage_reused(self, sweep_id: str, key: str) -> None:
        with self._session(write=True) as session:
            row = self._stage_row(session, sweep_id, key)
            row.status = "reused"
            row.finished_at = utcnow()
            row.error = None
            row.traceback = None

    def mark_stage_skipped(self, sweep_id: str, key: str, reason: str,
                           metrics: Mapping[str, Any] | None = None) -> None:
        with self._session(write=True) as session:
            row = self._stage_row(session, sweep_id, key)
            row.status = "skipped"
            row.finished_at = utcnow()
            row.error = first_line(reason)
            if metrics is not None:
                row.metrics = dict(metrics)

    def record_stage_results(self, sweep_id: str, results: Sequence[StageResult]) -> None:
        # One stage-row UPDATE for all results, one attempt UPDATE per outcome, one artifact
        # upsert per artifact, one insert of the cohorts not yet recorded; measurements per
        # evaluation.
        if not results:
            return
        now = utcnow()
        keys = [r.key for r in results]
        cohorts = {r.key: cohort_values(r) for r in results}  # a malformed one raises before any write
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
                    close_attempts(session, sweep_id, [r.key], "failed", r.error)
            session.execute(update(StageModel), [
                {"sweep_id": sweep_id, "key": r.key, "status": r.status, "metrics": dict(r.metrics),
                 "error": first_line(r.error), "traceback": r.traceback, "node_id": r.node_id,
                 "duration_s": r.duration_s, "finished_at": now, "runtime_version": runtime_version(r.metrics),
                 "cohort_id": _cohort_id(cohorts[r.key]), **energy_values(r.energy)}
                for r in results])
            _record_cohorts(session, sweep_id, [c for c in cohorts.values() if c is not None], now)
            artifacts = [
                {"key": r.artifact.key, "kind": r.kind, "path": r.artifact.path, "size_bytes": r.artifact.size_bytes,
                 "sha256": r.artifact.sha256, "materialized": r.artifact.materialized, "params": r.artifact.params,
                 "macs": r.artifact.macs, "compression": dict(r.artifact.compression), "created_at": now,
                 "created_by_sweep": sweep_id}
                for r in results if r.artifact is not None]
            for row in artifacts:  # one statement per artifact: rows of a multi-VALUES upsert must share keys
                upsert(session, ArtifactModel, [row], ("key",), exclude=("created_at", "created_by_sweep"))
            bare = [r.key for r in results if not r.repeats]
            if bare:  # no repeats (now): none may remain from an earlier attempt
                session.execute(delete(MeasurementModel).where(
                    MeasurementModel.sweep_id == sweep_id, MeasurementModel.stage_key.in_(bare)))
            for r in results:
                if r.repeats:
                    _record_repeats(session, sweep_id, r, _cohort_id(cohorts[r.key]))

    def record_progress(self, sweep_id: str, key: str, entries: Sequence[Mapping[str, Any]]) -> None:
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
            upsert(session, StageProgressModel, rows, ("sweep_id", "stage_key", "step"))

    def record_carbon(self, sweep_id: str, key: str, intensity: Intensity) -> None:
        from orchestrator.carbon.base import carbon_g

        with self._session(write=True) as session:
            stage = self._stage_row(session, sweep_id, key)
            rows: list[EnergyColumns] = [stage, *session.scalars(
                select(MeasurementModel).where(MeasurementModel.sweep_id == sweep_id, MeasurementModel.stage_key == key)
            )]
            for row in rows:
                energy_j = total_energy_j(row)
                row.carbon_g = None if energy_j is None else carbon_g(energy_j, intensity)
                row.intensity_g_per_kwh = intensity.g_co2_per_kwh
                row.intensity_source = intensity.source
                row.intensity_kind = intensity.kind

    def record_placement(self, sweep_id: str, placement: Mapping[str, Any]) -> None:
        row = {"sweep_id": sweep_id, "decided_at": utcnow(), **placement}
        with self._session(write=True) as session:
            upsert(session, PlacementModel, [row], ("sweep_id", "stage_key"))

    def upsert_node(
        self,
        node_id: str,
        node_type: str | None,
        region: str | None,
        hostname: str | None,
        hardware: Mapping[str, Any],
    ) -> None:
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
            upsert(session, NodeModel, [values], ("node_id",), exclude=("first_seen",))


def _cohort_id(cohort: Mapping[str, Any] | None) -> str | None:
    return None if cohort is None else cohort["id"]


def _record_cohorts(session: Session, sweep_id: str, cohorts: Sequence[Mapping[str, Any]], now: datetime) -> None:
    """Insert the cohorts not yet in the store, each once: members of one cohort arrive in
    one batch or in several, and a replayed result names a cohort already recorded -- the
    first description written stays (``ON CONFLICT DO NOTHING``)."""
    rows = list({c["id"]: {"sweep_id": sweep_id, **c, "created_at": now} for c in cohorts}.values())
    if rows:
        session.execute(dialect_insert(session, CohortModel).values(rows)
                        .on_conflict_do_nothing(index_elements=["sweep_id", "id"]))


def _record_repeats(session: Session, sweep_id: str, result: StageResult, cohort_id: str | None) -> None:
    """Make the stage's measurement rows exactly the result's repeats: drop numbers no
    longer reported (an earlier attempt measured more), upsert the others. A repeat
    measured in a cohort is a round of *cohort_id*, at its ``position`` in that round."""
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
            "cohort_id": cohort_id,
            "position": getattr(r, "position", None),  # EvalRepeat.position arrives with cohorts
            **energy_values(r.energy),
        }
        for r in result.repeats
    ]
    upsert(session, MeasurementModel, measurement_rows, ("sweep_id", "stage_key", "repeat"))
