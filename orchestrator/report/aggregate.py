"""Sweep points -> result rows: the statistics of ``greensweep results``.

The store hands over each point's raw records (:class:`PointRecord`: the evaluate stage,
its measured repeats, the chain's stages and the model's artifact); this module computes
what :class:`ResultRow` reports over the repeats -- means and sample standard deviations
of accuracy, time, energy and carbon per sample, gross and net of idle power, per energy
domain. Pure: no store, no I/O, so every backend gets the same numbers.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from orchestrator.store.records import DEFAULT_PRECISION, DEFAULT_RUNTIME, MeasurementRecord, PointRecord, ResultRow

DOMAINS: tuple[str, ...] = ("gpu", "cpu", "dram")

Figure = Callable[[MeasurementRecord], "float | None"]  # one number of a repeat, None when it has none


def result_rows(points: Iterable[PointRecord]) -> list[ResultRow]:
    """:func:`result_row` of each point, in the given (point) order."""
    return [result_row(p) for p in points]


def result_row(point: PointRecord) -> ResultRow:
    """The point's numbers over its measured repeats (``point.measurements``; empty unless
    the evaluation succeeded or was reused, which leaves every metric None).

    Model facts (params, MACs, on-disk bytes, materialized) come from the last compression
    stage's artifact, else from what the evaluation itself saw of the model (its metrics);
    a model with an n:m pattern is materialized or not as the evaluation ran it (its
    metrics' ``sparsity``: sparse kernels on one node, dense on another).
    Energy sources, idle power and the grid intensity are the first repeat's: one cohort
    measures every repeat of a point alike. The runtime and precision are the evaluation's
    (torch / fp32 for a stage that has none); its runtime's version, threads, deployable
    size and top-1 agreement are what the measuring evaluation recorded, and so are its
    paired ratios, intervals and verdicts against its cohort's reference (its metrics'
    ``paired``) and that reference's figures (its metrics' ``cohort``): all None for an
    evaluation measured before cohorts.
    """
    from workers.stages.registry import stage_label  # pydantic: not imported by `import orchestrator.report`

    ms = point.measurements
    top1 = [m.top1 for m in ms]
    top5 = [m.top5 for m in ms]
    time_per_sample = [m.time_per_sample_s for m in ms]
    energy_per_sample = per_sample(ms, total_energy_j)
    carbon_per_sample = per_sample(ms, lambda m: m.energy.carbon_g if m.energy else None)
    first = ms[0].energy if ms else None
    sources: dict[str, str] = {}
    idle_w: dict[str, float] = {}
    if first is not None:
        for domain in DOMAINS:
            source = getattr(first, f"{domain}_source")
            if source is not None:
                sources[domain] = source
            idle = getattr(first, f"{domain}_idle_power_w")
            if idle is not None:
                idle_w[domain] = idle
    seen = (point.measured or point.evaluation).metrics  # what the evaluation saw of the model
    facts: Mapping[str, Any] = (
        {"params": point.artifact.params, "macs": point.artifact.macs, "size_bytes": point.artifact.size_bytes,
         "materialized": point.artifact.materialized}
        if point.artifact is not None
        else seen
    )
    sparsity = _mapping(seen.get("sparsity"))  # how this evaluation ran an n:m pattern, if the model has one
    materialized = sparsity.get("materialized")
    if not isinstance(materialized, bool):
        materialized = facts.get("materialized")
    ran = _mapping(seen.get("runtime"))
    agreement = _mapping(seen.get("agreement"))
    threads = ran.get("threads")
    measured = point.measured.metrics if point.measured is not None else {}
    paired = _mapping(measured.get("paired"))
    cohort = _mapping(measured.get("cohort"))
    reference = _mapping(cohort.get("reference"))
    follows = paired.get("energy_follows_time")
    return ResultRow(
        sweep_id=point.sweep_id,
        point_index=point.point_index,
        point=point.label,
        pipeline=point.pipeline,
        stage_keys=point.stage_keys,
        stages=tuple(stage_label(s.kind, s.params) if s is not None else k
                     for k, s in zip(point.stage_keys, point.chain)),
        target=point.target,
        eval_key=point.eval_key,
        status=point.evaluation.status,
        node_id=point.measured.node_id if point.measured is not None else point.evaluation.node_id,
        measured_in_sweep=point.measured.sweep_id if point.measured is not None else None,
        repeats=len(ms),
        top1=mean(top1),
        top1_std=std(top1),
        top5=mean(top5),
        top5_std=std(top5),
        time_per_sample_s=mean(time_per_sample),
        time_per_sample_s_std=std(time_per_sample),
        throughput_samples_per_s=mean([m.throughput_samples_per_s for m in ms]),
        energy_per_sample_j=mean(energy_per_sample),
        energy_per_sample_j_std=std(energy_per_sample),
        net_energy_per_sample_j=mean(per_sample(ms, net_energy_j)),
        gpu_energy_per_sample_j=mean(per_sample(ms, _domain_energy("gpu"))),
        cpu_energy_per_sample_j=mean(per_sample(ms, _domain_energy("cpu"))),
        dram_energy_per_sample_j=mean(per_sample(ms, _domain_energy("dram"))),
        energy_source=sources,
        idle_power_w=idle_w,
        carbon_g_per_sample=mean(carbon_per_sample),
        carbon_g_per_sample_std=std(carbon_per_sample),
        intensity_g_per_kwh=first.intensity_g_per_kwh if first is not None else None,
        intensity_source=first.intensity_source if first is not None else None,
        intensity_kind=first.intensity_kind if first is not None else None,
        params=facts.get("params"),
        macs=facts.get("macs"),
        size_bytes=facts.get("size_bytes"),
        materialized=materialized,
        runtime=point.evaluation.runtime or DEFAULT_RUNTIME,
        precision=point.evaluation.precision or DEFAULT_PRECISION,
        runtime_version=point.measured.runtime_version if point.measured is not None else None,
        threads=dict(threads) if isinstance(threads, Mapping) else None,
        deployable_size_bytes=seen.get("deployable_size_bytes"),
        top1_agreement=agreement.get("top1_agreement"),
        **{name: _number(paired.get(name)) for name in PAIRED_RATIOS},
        **{name: _word(paired.get(name)) for name in PAIRED_VERDICTS},
        sparsity=dict(sparsity) if sparsity else None,
        stage_kinds=tuple(s.kind if s is not None else "" for s in point.chain),
        stage_params=tuple(dict(s.params) if s is not None else {} for s in point.chain),
        cohort_id=_word(cohort.get("id")),
        reference_key=_word(cohort.get("reference_key")),
        reference_top1=_number(reference.get("top1")),
        reference_time_per_sample_s=_mean_of(reference.get("time_per_sample_s")),
        reference_energy_per_sample_j=_mean_of(reference.get("energy_per_sample_j")),
        energy_follows_time=follows if isinstance(follows, bool) else None,
        time_ratio_cv=_number(paired.get("time_ratio_cv")),
        decision=next((str(gate["reason"]) for s in point.chain if s is not None
                       and isinstance(gate := s.metrics.get("gate"), Mapping) and "reason" in gate), None),
    )


# The result fields copied from an evaluation's ``metrics["paired"]`` (same names).
PAIRED_RATIOS: tuple[str, ...] = (
    "time_ratio_vs_baseline", "time_ratio_ci_low", "time_ratio_ci_high",
    "energy_ratio_vs_baseline", "energy_ratio_ci_low", "energy_ratio_ci_high",
)
PAIRED_VERDICTS: tuple[str, ...] = ("verdict_time", "verdict_energy", "verdict_top1")


def _number(value: Any) -> float | None:
    """A recorded figure as a float; None when absent or not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _word(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _mean_of(values: Any) -> float | None:
    """The mean of a recorded per-round list; None when absent or not all numbers."""
    if not isinstance(values, (list, tuple)) or not values:
        return None
    numbers = [_number(v) for v in values]
    return None if any(n is None for n in numbers) else statistics.fmean(numbers)  # type: ignore[arg-type]


def _mapping(value: Any) -> Mapping[str, Any]:
    """A metrics entry that is a dict, else an empty one (an evaluation that recorded none)."""
    return value if isinstance(value, Mapping) else {}


def mean(values: Sequence[float]) -> float | None:
    """Arithmetic mean; None for no values."""
    return statistics.fmean(values) if values else None


def std(values: Sequence[float]) -> float | None:
    """Sample standard deviation; 0.0 for a single value, None for none."""
    if not values:
        return None
    return statistics.stdev(values) if len(values) > 1 else 0.0


def per_sample(measurements: Sequence[MeasurementRecord], figure: Figure) -> list[float]:
    """``figure(m) / m.samples`` of each repeat that has the figure and any samples."""
    out = []
    for m in measurements:
        value = figure(m)
        if value is not None and m.samples > 0:
            out.append(value / m.samples)
    return out


def total_energy_j(m: MeasurementRecord) -> float | None:
    """Gross energy of a repeat: every domain with a figure, idle included."""
    return m.energy.total_energy_j if m.energy is not None else None


def net_energy_j(m: MeasurementRecord) -> float | None:
    """Gross energy minus idle power x duration, over the domains that have both an
    energy figure and a sampled idle power; None when no domain has both."""
    if m.energy is None or m.duration_s is None:
        return None
    parts = []
    for domain in DOMAINS:
        energy_j = getattr(m.energy, f"{domain}_energy_j")
        idle_w = getattr(m.energy, f"{domain}_idle_power_w")
        if energy_j is not None and idle_w is not None:
            parts.append(energy_j - idle_w * m.duration_s)
    return sum(parts) if parts else None


def _domain_energy(domain: str) -> Figure:
    return lambda m: getattr(m.energy, f"{domain}_energy_j") if m.energy is not None else None
