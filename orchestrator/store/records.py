"""Frozen records the store hands to readers (CLI, reports, the coordinator on resume).

Readers never see ORM rows: a record is a snapshot, detached from any session, safe to
keep, pass between threads and compare. JSON columns come back as plain ``dict``/``list``
values (the dataclass is frozen, its JSON payload is a copy owned by the caller).
Units live in field names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

# What an evaluation that names no runtime or precision runs on: torch eager at fp32, the
# defaults of the evaluate stage's params and the only way evaluations ran before runtimes
# existed (migration 0004 backfills old stores with them).
DEFAULT_RUNTIME = "torch"
DEFAULT_PRECISION = "fp32"


@dataclass(frozen=True)
class EnergyRecord:
    """Energy of one meter window and the carbon accounted for it.

    ``*_source`` is how a domain's figure was obtained (``nvml-counter``, ``nvml-power``,
    ``rapl``, ``estimate-tdp``, ``none``); a domain without a sensor has ``None`` energy.
    Carbon fields are ``None`` until carbon accounting has filled them.
    """

    gpu_energy_j: float | None
    cpu_energy_j: float | None
    dram_energy_j: float | None
    gpu_source: str | None
    cpu_source: str | None
    dram_source: str | None
    gpu_idle_power_w: float | None
    cpu_idle_power_w: float | None
    dram_idle_power_w: float | None
    carbon_g: float | None
    intensity_g_per_kwh: float | None
    intensity_source: str | None
    intensity_kind: str | None

    @property
    def total_energy_j(self) -> float | None:
        """Sum of the domains that have a figure; None when no domain has one."""
        parts = [v for v in (self.gpu_energy_j, self.cpu_energy_j, self.dram_energy_j) if v is not None]
        return sum(parts) if parts else None


@dataclass(frozen=True)
class SweepRecord:
    id: str
    name: str
    spec_text: str
    spec_hash: str
    status: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    artifact_root: str
    naive_stage_count: int
    unique_stage_count: int
    spec_dir: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    heartbeat_at: datetime | None = None
    coordinator: str | None = None
    cancel_requested: bool = False


@dataclass(frozen=True)
class AttemptRecord:
    """One attempt at a stage (``stage_attempts``): ``status`` is running, succeeded,
    failed, lost (worker, node or coordinator died mid-stage) or cancelled."""

    sweep_id: str
    stage_key: str
    attempt: int
    node_id: str | None
    status: str
    started_at: datetime
    finished_at: datetime | None
    error: str | None


@dataclass(frozen=True)
class PlacementRecord:
    """A placement decision and its ``fifo`` counterfactual (``placements``), with the
    carbon accounted for the stage once it ran (``measured_carbon_g``)."""

    sweep_id: str
    stage_key: str
    kind: str
    stage_status: str
    policy: str
    decided_at: datetime
    node_id: str
    node_type: str | None
    region: str | None
    start_at: datetime
    expected_duration_s: float
    expected_energy_j: float
    expected_intensity_g_per_kwh: float | None
    expected_carbon_g: float | None
    estimate_source: str
    fifo_node_id: str
    fifo_node_type: str | None
    fifo_region: str | None
    fifo_start_at: datetime
    fifo_expected_energy_j: float
    fifo_expected_intensity_g_per_kwh: float | None
    fifo_expected_carbon_g: float | None
    measured_carbon_g: float | None


@dataclass(frozen=True)
class StageRecord:
    sweep_id: str
    key: str
    kind: str
    params: dict[str, Any]
    parent_key: str | None
    target: str | None
    status: str
    attempts: int
    error: str | None
    traceback: str | None
    node_id: str | None
    started_at: datetime | None
    finished_at: datetime | None
    duration_s: float | None
    metrics: dict[str, Any]
    energy: EnergyRecord | None  # None when the stage reported no meter reading
    # evaluate stages only (None for the others): the runtime and precision planned, and the
    # version of the runtime that measured it (None until its result is recorded)
    runtime: str | None = None
    precision: str | None = None
    runtime_version: str | None = None
    cohort_id: str | None = None  # the cohort that measured it (None: not measured in one)


@dataclass(frozen=True)
class ArtifactRecord:
    key: str
    kind: str
    path: str
    size_bytes: int
    sha256: str
    materialized: bool
    params: int
    macs: int
    compression: dict[str, Any]
    created_at: datetime
    created_by_sweep: str | None


@dataclass(frozen=True)
class MeasurementRecord:
    """One measured evaluation repeat."""

    sweep_id: str
    stage_key: str
    repeat: int
    samples: int
    top1: float
    top5: float
    duration_s: float
    time_per_sample_s: float
    throughput_samples_per_s: float
    energy: EnergyRecord | None  # None when the repeat had no meter reading
    # measured in a cohort: ``repeat`` is the round, ``position`` its 0-based place in that
    # round's seeded order (both None for repeats measured before cohorts)
    cohort_id: str | None = None
    position: int | None = None


@dataclass(frozen=True)
class CohortRecord:
    """One cohort (``cohorts``): evaluations of one target node measured together in
    interleaved rounds, the reference (the uncompressed model on torch fp32) among them.

    ``size`` counts the members, the reference included; ``reference_shown`` is false
    when the reference was measured only to pair with (then it is no sweep point).
    ``noise_floor_cv`` is the round-to-round coefficient of variation of the reference's
    time per sample (None under 2 rounds); ``reference`` holds its per-round figures
    (``time_per_sample_s``, ``energy_per_sample_j`` or None) and its ``top1``;
    ``protocol`` every setting the rounds ran under."""

    sweep_id: str
    id: str
    node_id: str | None
    target: str
    seed: int
    rounds: int
    size: int
    reference_key: str
    reference_shown: bool
    protocol: dict[str, Any]
    noise_floor_cv: float | None
    reference: dict[str, Any]
    created_at: datetime


@dataclass(frozen=True)
class NodeRecord:
    node_id: str
    node_type: str | None
    region: str | None
    hostname: str | None
    hardware: dict[str, Any]
    first_seen: datetime
    last_seen: datetime


@dataclass(frozen=True)
class PointRecord:
    """One sweep point as stored, with the raw records its result is computed from
    (:func:`orchestrator.report.aggregate.result_row` turns it into a :class:`ResultRow`).

    ``measured`` is the evaluate stage whose repeats ``measurements`` are: this sweep's
    when it succeeded, the latest earlier sweep's that succeeded when this one ``reused``
    it, else None (and ``measurements`` is empty). ``artifact`` is the last compression
    stage's artifact, None for an empty chain or one not recorded.
    """

    sweep_id: str
    point_index: int
    label: str
    pipeline: str
    stage_keys: tuple[str, ...]  # root .. last compression stage
    chain: tuple[StageRecord | None, ...]  # the stages of stage_keys (None: not in this sweep)
    target: str
    eval_key: str
    evaluation: StageRecord
    measured: StageRecord | None
    measurements: tuple[MeasurementRecord, ...]
    artifact: ArtifactRecord | None


@dataclass(frozen=True)
class ResultRow:
    """One sweep point -- a compression chain evaluated on one target by one runtime at
    one precision -- with its numbers.

    Means and standard deviations are over the evaluation repeats (sample std; 0.0 for a
    single repeat). Metric fields are ``None`` unless the evaluate stage ``succeeded`` (or
    was ``reused``: its repeats then come from the sweep that measured them,
    ``measured_in_sweep``). Energy and carbon are per sample and gross (idle power not
    subtracted; ``net_energy_per_sample_j`` subtracts it); a per-domain figure is ``None``
    when that domain had no sensor, and ``energy_source`` says where each domain's figure
    came from (``estimate-tdp`` is an estimate, not a measurement). Model facts (params,
    MACs, on-disk bytes, materialized) describe the last compression stage's artifact --
    but for a model with an n:m pattern ``materialized`` is the evaluation's own record
    (``sparsity``: sparse kernels on one node, dense on another);
    ``deployable_size_bytes`` is what the runtime's exported or compiled form of it occupies.
    ``runtime_version``, ``threads`` (``{"intra_op", "inter_op"}``), the deployable's size
    and ``top1_agreement`` (the share of samples whose top-1 matched the reference model
    on the check batch; None when not checked) are those the measuring evaluation recorded.
    A point measured in a cohort has its time and energy as paired ratios to the cohort's
    reference (the uncompressed model on torch fp32, "baseline" in the field names) with
    their 95 % intervals and verdicts, and ``verdict_top1`` from a McNemar test against the
    reference on the same samples; all None for a point measured before cohorts.
    Computed from a :class:`PointRecord` by :mod:`orchestrator.report.aggregate`.
    """

    sweep_id: str
    point_index: int
    point: str  # the plan's label, e.g. "s: prune(method=structured, ratio=0.5, mode=all) > quantize(weights=int8)"
    pipeline: str
    stage_keys: tuple[str, ...]  # root .. last compression stage
    stages: tuple[str, ...]  # the same chain as workers.stages.registry.stage_label labels
    target: str
    eval_key: str
    status: str  # status of the evaluate stage
    node_id: str | None  # node the evaluation ran on
    measured_in_sweep: str | None
    repeats: int
    top1: float | None
    top1_std: float | None
    top5: float | None
    top5_std: float | None
    time_per_sample_s: float | None
    time_per_sample_s_std: float | None
    throughput_samples_per_s: float | None
    energy_per_sample_j: float | None  # gross: every domain with a figure, idle included
    energy_per_sample_j_std: float | None
    net_energy_per_sample_j: float | None  # gross minus idle power x window, where idle was sampled
    gpu_energy_per_sample_j: float | None
    cpu_energy_per_sample_j: float | None
    dram_energy_per_sample_j: float | None
    energy_source: dict[str, str]  # domain ("gpu", "cpu", "dram") -> source
    idle_power_w: dict[str, float]  # domain -> idle power sampled before the windows
    carbon_g_per_sample: float | None
    intensity_g_per_kwh: float | None  # the grid intensity the carbon figure used
    intensity_source: str | None
    intensity_kind: str | None  # average | marginal | forecast
    params: int | None
    macs: int | None
    size_bytes: int | None
    materialized: bool | None
    # How the point was deployed (defaults: a point of a store from before runtimes).
    runtime: str = DEFAULT_RUNTIME
    precision: str = DEFAULT_PRECISION
    runtime_version: str | None = None
    threads: dict[str, int] | None = None
    deployable_size_bytes: int | None = None
    top1_agreement: float | None = None
    # Paired with the target's reference in a cohort (all None: measured before cohorts).
    time_ratio_vs_baseline: float | None = None  # median over rounds of time / the reference's
    time_ratio_ci_low: float | None = None  # its 95 % interval
    time_ratio_ci_high: float | None = None
    verdict_time: str | None = None  # faster | slower | same
    energy_ratio_vs_baseline: float | None = None
    energy_ratio_ci_low: float | None = None
    energy_ratio_ci_high: float | None = None
    verdict_energy: str | None = None  # cheaper | costlier | same; None without an energy figure
    verdict_top1: str | None = None  # better | worse | same: exact McNemar test on the same samples
    # How the evaluation ran the model's n:m pattern (workers.sparsity: pattern, materialized,
    # reason, sparse_layers, dense_layers); None when its chain made none.
    sparsity: dict[str, Any] | None = None
    # Not in ``results --format json`` (RESULT_FIELDS is a stable contract); used by reports.
    carbon_g_per_sample_std: float | None = None
    stage_kinds: tuple[str, ...] = ()  # kinds of ``stage_keys``, e.g. ("train", "prune")
    stage_params: tuple[dict[str, Any], ...] = ()  # their stored (canonical) parameters
    cohort_id: str | None = None  # the cohort that measured the point
    reference_key: str | None = None  # the evaluate stage of that cohort's reference
    reference_top1: float | None = None  # the reference's top-1 on the same test samples
    reference_time_per_sample_s: float | None = None  # its mean over the cohort's rounds
    reference_energy_per_sample_j: float | None = None
    energy_follows_time: bool | None = None  # the energy figure is an estimate proportional to time
    time_ratio_cv: float | None = None  # round-to-round CV of the paired time ratio
    # A conditional stage of the chain (``when:``): what its gate decided and why, e.g.
    # "not needed: PTQ lost 0.3 points <= 1.0" (the point is then not measured)
    decision: str | None = None
