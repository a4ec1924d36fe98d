"""Mapping between ORM rows and what crosses the store's border.

Outbound, ORM rows become the frozen records of :mod:`orchestrator.store.records`
(readers never see a row); inbound, a worker's :class:`~workers.types.EnergyReading`
becomes the meter columns of :class:`~orchestrator.store.models.EnergyColumns`, an
evaluation's params and result metrics its runtime columns (runtime, precision, runtime
version) of :class:`~orchestrator.store.models.StageModel`, and the ``cohort`` its
metrics describe a :class:`~orchestrator.store.models.CohortModel` row. Nothing here opens a session
or computes a statistic: aggregation is :mod:`orchestrator.report.aggregate`'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from orchestrator.store.models import (
    ArtifactModel,
    CohortModel,
    EnergyColumns,
    MeasurementModel,
    NodeModel,
    PlacementModel,
    StageAttemptModel,
    StageModel,
    SweepModel,
)
from orchestrator.store.records import (
    DEFAULT_PRECISION,
    DEFAULT_RUNTIME,
    ArtifactRecord,
    AttemptRecord,
    CohortRecord,
    EnergyRecord,
    MeasurementRecord,
    NodeRecord,
    PlacementRecord,
    StageRecord,
    SweepRecord,
)
from workers.types import EnergyReading, StageResult
from workers.util import first_line as _first_line

# ----------------------------------------------------------------- inbound


def energy_values(energy: EnergyReading | None) -> dict[str, Any]:
    """The meter columns of :class:`EnergyColumns` (not the carbon ones) for a reading;
    all None when the stage reported no reading (never a made-up 0 J)."""
    if energy is None:
        return dict.fromkeys(METER_COLUMNS)
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


METER_COLUMNS: tuple[str, ...] = tuple(energy_values(EnergyReading(duration_s=0.0)))


def deployment_values(target: str | None, params: Mapping[str, Any]) -> dict[str, str | None]:
    """The ``runtime`` and ``precision`` columns of a planned stage: an evaluation (the
    stages with a target) runs on its params' runtime at their precision, torch / fp32 when
    they name none; other stages have neither."""
    if target is None:
        return {"runtime": None, "precision": None}
    return {"runtime": str(params.get("runtime") or DEFAULT_RUNTIME),
            "precision": str(params.get("precision") or DEFAULT_PRECISION)}


def runtime_version(metrics: Mapping[str, Any]) -> str | None:
    """The version of the runtime a result's metrics say measured it
    (``metrics["runtime"]["runtime_version"]``); None for results that ran none."""
    described = metrics.get("runtime")
    version = described.get("runtime_version") if isinstance(described, Mapping) else None
    return None if version is None else str(version)


# What a result's ``metrics["cohort"]`` must name: the cohort cannot be recorded without them.
COHORT_REQUIRED: tuple[str, ...] = ("id", "target", "seed", "rounds", "size", "reference_key")


def cohort_values(result: StageResult) -> dict[str, Any] | None:
    """The ``cohorts`` row described by ``result.metrics["cohort"]`` (without ``sweep_id``
    and ``created_at``); None for a result measured outside a cohort.

    Raises ValueError, naming the stage and the field, when the description lacks a
    field in :data:`COHORT_REQUIRED` or holds a value of the wrong type: a cohort that
    cannot be traced is not recorded as one. The node defaults to the result's."""
    described = result.metrics.get("cohort")
    if described is None:
        return None
    where = f"result for stage {result.key!r} has metrics['cohort']"
    if not isinstance(described, Mapping):
        raise ValueError(f"{where} of type {type(described).__name__}; expected a dict")
    missing = [k for k in COHORT_REQUIRED if described.get(k) is None]
    if missing:
        raise ValueError(f"{where} without {', '.join(missing)}")
    try:
        return {
            "id": str(described["id"]),
            "node_id": str(described.get("node_id") or result.node_id),
            "target": str(described["target"]),
            "seed": int(described["seed"]),
            "rounds": int(described["rounds"]),
            "size": int(described["size"]),
            "reference_key": str(described["reference_key"]),
            "reference_shown": bool(described.get("reference_shown", True)),
            "protocol": dict(described.get("protocol") or {}),
            "noise_floor_cv": None if described.get("noise_floor_cv") is None else float(described["noise_floor_cv"]),
            "reference": dict(described.get("reference") or {}),
        }
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where} with a malformed field: {e}") from None


def first_line(text: str | None) -> str | None:
    """The first non-blank line of an error text, stripped: stage errors are stored as
    one line (the traceback has its own column)."""
    return None if text is None else _first_line(text)


def total_energy_j(row: EnergyColumns) -> float | None:
    """A row's energy over the domains that have a figure; None when none has one (the
    carbon accounting then stores no grams rather than 0 g)."""
    parts = [v for v in (row.gpu_energy_j, row.cpu_energy_j, row.dram_energy_j) if v is not None]
    return sum(parts) if parts else None


# ---------------------------------------------------------------- outbound


def energy_record(row: EnergyColumns) -> EnergyRecord | None:
    """The row's energy and carbon columns; None when every one is empty."""
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


def sweep_record(row: SweepModel) -> SweepRecord:
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


def stage_record(row: StageModel) -> StageRecord:
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
        energy=energy_record(row),
        runtime=row.runtime,
        precision=row.precision,
        runtime_version=row.runtime_version,
        cohort_id=row.cohort_id,
    )


def attempt_record(row: StageAttemptModel) -> AttemptRecord:
    return AttemptRecord(
        sweep_id=row.sweep_id,
        stage_key=row.stage_key,
        attempt=row.attempt,
        node_id=row.node_id,
        status=row.status,
        started_at=row.started_at,
        finished_at=row.finished_at,
        error=row.error,
    )


def artifact_record(row: ArtifactModel) -> ArtifactRecord:
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


def measurement_record(row: MeasurementModel) -> MeasurementRecord:
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
        energy=energy_record(row),
        cohort_id=row.cohort_id,
        position=row.position,
    )


def cohort_record(row: CohortModel) -> CohortRecord:
    return CohortRecord(
        sweep_id=row.sweep_id,
        id=row.id,
        node_id=row.node_id,
        target=row.target,
        seed=row.seed,
        rounds=row.rounds,
        size=row.size,
        reference_key=row.reference_key,
        reference_shown=bool(row.reference_shown),
        protocol=dict(row.protocol or {}),
        noise_floor_cv=row.noise_floor_cv,
        reference=dict(row.reference or {}),
        created_at=row.created_at,
    )


def node_record(row: NodeModel) -> NodeRecord:
    return NodeRecord(
        node_id=row.node_id,
        node_type=row.node_type,
        region=row.region,
        hostname=row.hostname,
        hardware=dict(row.hardware),
        first_seen=row.first_seen,
        last_seen=row.last_seen,
    )


def placement_record(row: PlacementModel, kind: str, stage_status: str,
                     measured_carbon_g: float | None) -> PlacementRecord:
    """A placement row joined with its stage's kind, status and accounted carbon."""
    values = {c.name: getattr(row, c.name) for c in PlacementModel.__table__.columns}
    return PlacementRecord(**values, kind=kind, stage_status=stage_status,
                           measured_carbon_g=None if measured_carbon_g is None else float(measured_carbon_g))
