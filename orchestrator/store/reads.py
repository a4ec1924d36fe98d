"""The store's queries. Each returns frozen records (:mod:`orchestrator.store.records`),
mapped from rows inside the session by :mod:`orchestrator.store.rows`; none computes a
statistic (that is :mod:`orchestrator.report`'s). Contract and docstrings:
:class:`~orchestrator.store.base.BaseStore`.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from sqlalchemy import func, select

from orchestrator.store.models import (
    STAGE_STATUSES,
    ArtifactModel,
    CohortModel,
    MeasurementModel,
    NodeModel,
    PlacementModel,
    PointModel,
    StageAttemptModel,
    StageModel,
    StageProgressModel,
    SweepModel,
)
from orchestrator.store.records import (
    ArtifactRecord,
    AttemptRecord,
    CohortRecord,
    MeasurementRecord,
    NodeRecord,
    PlacementRecord,
    PointRecord,
    StageRecord,
    SweepRecord,
)
from orchestrator.store.rows import (
    artifact_record,
    attempt_record,
    cohort_record,
    measurement_record,
    node_record,
    placement_record,
    stage_record,
    sweep_record,
    total_energy_j,
)
from orchestrator.store.sql import SQLCore


class ReadsMixin(SQLCore):
    """Queries returning records."""

    def get_sweep(self, sweep_id: str) -> SweepRecord | None:
        with self._session(write=False) as session:
            row = session.get(SweepModel, sweep_id)
            return None if row is None else sweep_record(row)

    def list_sweeps(self, limit: int = 20) -> list[SweepRecord]:
        with self._session(write=False) as session:
            rows = session.scalars(
                select(SweepModel).order_by(SweepModel.created_at.desc(), SweepModel.id.desc()).limit(limit)
            )
            return [sweep_record(r) for r in rows]

    def latest_sweep_id(self) -> str | None:
        with self._session(write=False) as session:
            return session.scalar(
                select(SweepModel.id).order_by(SweepModel.created_at.desc(), SweepModel.id.desc()).limit(1)
            )

    def stages(self, sweep_id: str) -> list[StageRecord]:
        with self._session(write=False) as session:
            self._sweep_row(session, sweep_id)
            rows = session.scalars(
                select(StageModel).where(StageModel.sweep_id == sweep_id).order_by(StageModel.position)
            )
            return [stage_record(r) for r in rows]

    def stage_counts(self, sweep_id: str) -> dict[str, int]:
        with self._session(write=False) as session:
            self._sweep_row(session, sweep_id)
            query = (
                select(StageModel.status, func.count())
                .where(StageModel.sweep_id == sweep_id)
                .group_by(StageModel.status)
            )
            counts: dict[str, int] = dict(session.execute(query).all())
            return {status: counts[status] for status in STAGE_STATUSES if status in counts}

    def attempts(self, sweep_id: str, key: str | None = None) -> list[AttemptRecord]:
        q = select(StageAttemptModel).where(StageAttemptModel.sweep_id == sweep_id)
        if key is not None:
            q = q.where(StageAttemptModel.stage_key == key)
        with self._session(write=False) as session:
            rows = session.scalars(q.order_by(StageAttemptModel.stage_key, StageAttemptModel.attempt))
            return [attempt_record(r) for r in rows]

    def progress(self, sweep_id: str, key: str) -> list[dict[str, Any]]:
        with self._session(write=False) as session:
            rows = session.scalars(
                select(StageProgressModel)
                .where(StageProgressModel.sweep_id == sweep_id, StageProgressModel.stage_key == key)
                .order_by(StageProgressModel.step)
            )
            return [dict(r.metrics) for r in rows]

    def artifact(self, key: str) -> ArtifactRecord | None:
        with self._session(write=False) as session:
            row = session.get(ArtifactModel, key)
            return None if row is None else artifact_record(row)

    def measurements(self, sweep_id: str, stage_key: str | None = None) -> list[MeasurementRecord]:
        with self._session(write=False) as session:
            self._sweep_row(session, sweep_id)
            query = select(MeasurementModel).where(MeasurementModel.sweep_id == sweep_id)
            if stage_key is not None:
                query = query.where(MeasurementModel.stage_key == stage_key)
            rows = session.scalars(query.order_by(MeasurementModel.stage_key, MeasurementModel.repeat))
            return [measurement_record(r) for r in rows]

    def cohorts(self, sweep_id: str) -> list[CohortRecord]:
        with self._session(write=False) as session:
            self._sweep_row(session, sweep_id)
            rows = session.scalars(select(CohortModel).where(CohortModel.sweep_id == sweep_id)
                                   .order_by(CohortModel.created_at, CohortModel.id))
            return [cohort_record(r) for r in rows]

    def nodes(self) -> list[NodeRecord]:
        with self._session(write=False) as session:
            rows = session.scalars(select(NodeModel).order_by(NodeModel.node_type, NodeModel.node_id))
            return [node_record(r) for r in rows]

    def placements(self, sweep_id: str) -> list[PlacementRecord]:
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
            return [placement_record(p, kind, status, repeats.get(p.stage_key) if carbon is None else carbon)
                    for p, kind, carbon, status in rows]

    def stage_durations(self, limit: int = 5000) -> list[tuple[str, str | None, float, float | None]]:
        with self._session(write=False) as session:
            rows = session.execute(
                select(StageModel, NodeModel.node_type)
                .join(NodeModel, NodeModel.node_id == StageModel.node_id)
                .where(StageModel.status == "succeeded", StageModel.duration_s > 0)
                .order_by(StageModel.finished_at.desc())
                .limit(limit)
            ).all()
            return [(st.kind, node_type, st.duration_s, total_energy_j(st)) for st, node_type in rows]

    def points(self, sweep_id: str) -> list[PointRecord]:
        with self._session(write=False) as session:
            self._sweep_row(session, sweep_id)
            points = session.scalars(
                select(PointModel).where(PointModel.sweep_id == sweep_id).order_by(PointModel.point_index)
            ).all()
            stages = {s.key: stage_record(s)
                      for s in session.scalars(select(StageModel).where(StageModel.sweep_id == sweep_id))}

            repeats: dict[str, list[MeasurementRecord]] = defaultdict(list)
            for m in session.scalars(
                select(MeasurementModel).where(MeasurementModel.sweep_id == sweep_id).order_by(MeasurementModel.repeat)
            ):
                repeats[m.stage_key].append(measurement_record(m))

            # Reused evaluations were measured by an earlier sweep: find the latest one.
            measured_by: dict[str, StageRecord] = {}
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
                    if stage.key not in measured_by:
                        measured_by[stage.key] = stage_record(stage)
                for key, measured in measured_by.items():
                    repeats[key] = [measurement_record(m) for m in session.scalars(
                        select(MeasurementModel)
                        .where(MeasurementModel.sweep_id == measured.sweep_id, MeasurementModel.stage_key == key)
                        .order_by(MeasurementModel.repeat)
                    )]

            model_keys = {p.stage_keys[-1] for p in points if p.stage_keys}
            artifacts = {a.key: artifact_record(a)
                         for a in session.scalars(select(ArtifactModel).where(ArtifactModel.key.in_(model_keys)))}

            out = []
            for p in points:
                evaluation = stages[p.eval_key]
                measured = evaluation if evaluation.status == "succeeded" else measured_by.get(p.eval_key)
                out.append(PointRecord(
                    sweep_id=p.sweep_id,
                    point_index=p.point_index,
                    label=p.label,
                    pipeline=p.pipeline,
                    stage_keys=tuple(p.stage_keys),
                    chain=tuple(stages.get(k) for k in p.stage_keys),
                    target=p.target,
                    eval_key=p.eval_key,
                    evaluation=evaluation,
                    measured=measured,
                    measurements=tuple(repeats.get(p.eval_key, ())) if measured is not None else (),
                    artifact=artifacts.get(p.stage_keys[-1]) if p.stage_keys else None,
                ))
            return out
