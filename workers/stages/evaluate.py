"""The ``evaluate`` stage: the evaluation protocol every comparison rests on.

1. Everything that is not inference happens before any timing: the artifact is loaded,
   the whole test split is moved to the device and cut into batches of ``batch_size``.
2. Idle power is sampled for ``idle_s`` seconds with the models loaded and nothing
   running (before the warm-up, whose tail of raised clocks would inflate it); 0 skips
   it, and net figures are then None.
3. Unmeasured warm-up per model: at least ``warmup_batches`` batches and at least
   ``warmup_s`` seconds of them (allocator, caches, lazy kernel selection, and on shared
   VMs a CPU that takes seconds to reach its steady speed: measured here, 3 warm-up
   batches left the first windows ~30 % slower than later ones).
4. ``repeats`` rounds of meter windows, each around whole passes over the test split, as
   many as it takes for the window to last at least ``min_window_s`` (one 50 ms window
   alone would be mostly timer and scheduler noise), counting top-1 / top-5 on the device
   (no host sync inside a pass). Per-sample figures divide by the samples actually processed.

Models of one node are measured together in a **cohort** (:func:`run_cohort`): in every
round each model gets one window, in a seeded random order, and the reference -- the
uncompressed model on torch at fp32 -- is in every cohort; so slow drift of the machine
lands on all models alike, and each model gets a paired ratio to the reference with a 95 %
interval and a verdict (:mod:`workers.stats`), and a paired McNemar test of its top-1.
On CPU (``interleave: auto`` or ``slices``) a round's windows are **interleaved**: each is
the sum of slices of whole passes lasting at least ``slice_s`` (50 ms), the models taking
turns slice by slice until each has ``min_window_s``, and each round's ratio to the
reference is paired turn by turn (:func:`workers.stats.turn_ratio`: the trimmed mean of the
per-turn slice ratios), so neither drift over seconds nor a burst of another process on
one slice lands on one model. On a shared 2-vCPU VM this took the round-to-round CV of the
paired time ratio from 10-13 % (contiguous 1 s windows) to 2.1-3.9 % (docs/BENCHMARKS.md).
On CUDA (``auto``) windows stay contiguous: NVML's energy counter is too coarse to split
among 50 ms slices.

Energy is reported per domain (gpu, cpu, dram) gross and net of idle power
(``net = gross - idle_power_w * duration_s``; it may come out slightly negative when the
work draws no more than idle), with the source of every figure and the meter's own
account of which sensors it used and why it skipped the others. Over the repeats each
time and energy figure gets its mean, sample std and coefficient of variation (std /
mean), so a reader can tell a difference between models from run-to-run noise.

The model runs on the runtime and at the precision the task names (``runtime``,
``precision``; :mod:`workers.backends`), prepared before any timing. Before the idle
baseline, the deployable is checked against the torch model on the first batch: an fp32
deployable of a float model must agree within ``1e-4 + 1e-3 * max |logit|`` and on every
top-1 (else the stage fails, naming the difference); reduced-precision and quantized
deployables report their agreement. Accuracy is always counted on the runtime itself.
A model whose chain made a 2:4 pattern records per evaluation whether this run
materialized it on sparse kernels (``metrics["sparsity"]``, :mod:`workers.sparsity`).

Inference runs under ``torch.no_grad()``, not ``torch.inference_mode()``: optimum-quanto's
int4 kernels fail on inference tensors. Accuracy on the synthetic dataset is refused: it
would be a meaningless number next to real ones.
"""

from __future__ import annotations

import gc
import os
import random
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence, cast

import torch
from torch import nn

from workers.backends.base import Deployable, ThreadSettings, agreement, check_exact
from workers.data import load_dataset
from workers.meters import DOMAINS, Meter, make_meter
from workers.stages.registry import EvaluateParams
from workers.stats import (
    RatioEstimate,
    identity_estimate,
    mcnemar,
    outlier_rounds,
    pack_correct,
    ratio_estimate,
    turn_ratio,
)
from workers.training import sum_readings
from workers.types import Cohort, EnergyReading, EvalRepeat, StageOutput, StageTask, WorkerEnv

Batch = tuple[torch.Tensor, torch.Tensor]
DEPLOYABLES_DIR = ".deployables"  # under the artifact root: exported / compiled models, by content
TIMER = "time.perf_counter_ns"


def run(task: StageTask, env: WorkerEnv) -> StageOutput:
    """Evaluate the artifact ``task.parent_key`` on the test split of ``task.dataset``, alone
    (no cohort: no reference, no paired figures) -- see :func:`run_cohort`."""
    out = run_cohort([task], env)[0]
    if isinstance(out, BaseException):
        raise out
    return out


@dataclass
class _Member:
    """One model of a cohort: its task, what was prepared for it, and its windows."""

    task: StageTask
    shown: bool  # its result is returned (False: the reference, measured only for the ratios)
    params: EvaluateParams = field(init=False)
    manifest: dict[str, Any] = field(default_factory=dict)
    deployable: Deployable | None = None
    checked: dict[str, Any] = field(default_factory=dict)
    sparsity: dict[str, Any] | None = None  # how the run treated the model's n:m pattern (None: it has none)
    batches: list[Batch] = field(default_factory=list)
    top_k: int = 1
    correct: list[bool] = field(default_factory=list)  # top-1 per test sample, one unmeasured pass
    windows: list[EvalRepeat] = field(default_factory=list)
    # per round, the member's slices by turn: (time per sample, energy per sample or None);
    # empty for a round of contiguous windows
    turns: list[dict[int, tuple[float, float | None]]] = field(default_factory=list)
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self.params = EvaluateParams.model_validate(dict(self.task.params))


def run_cohort(tasks: Sequence[StageTask], env: WorkerEnv) -> list[StageOutput | BaseException]:
    """Measure *tasks* (evaluations of one node) together; one output per task, in order,
    or the exception that stopped that task's model (the others go on).

    1. Everything that is not inference first: each artifact loaded, the test split moved
       to the device once per input shape and cut into batches, each model prepared by its
       runtime and checked against its torch model; the worker pinned to its CPUs where
       the OS allows it.
    2. Idle power sampled once, for the cohort, before any warm-up.
    3. Each model warmed up (``warmup_batches`` and ``warmup_s``) and run once over the test
       split to record which samples it gets right (for the paired accuracy test).
    4. ``repeats`` rounds: in each, every model gets one window, in an order drawn from the
       cohort's seed, with the garbage collector off inside windows and ``perf_counter_ns``
       timers -- interleaved slices (:func:`_sliced_round`) or, with ``interleave:
       windows`` and by default on CUDA, contiguous windows each after a short unmeasured
       re-warm of ``warmup_batches`` batches (:func:`_windowed_round`).
    5. Per model, besides the absolute figures of :func:`_protocol_metrics` and
       :func:`_energy_metrics`: the cohort (``metrics["cohort"]``: its id, seed, protocol,
       noise floor and the reference's rounds) and the paired figures against the
       reference (``metrics["paired"]``, :func:`_paired_metrics`). Outliers are kept.

    Without a cohort (one task, ``task.cohort`` None) it is the same protocol on one model,
    with no reference and no paired figures. A failure of the reference fails them all.
    """
    cohort = tasks[0].cohort
    if any(t.cohort != cohort for t in tasks):
        raise ValueError("the tasks of one cohort call carry different cohorts")
    members = [_Member(t, True) for t in tasks]
    reference: _Member | None = None
    if cohort is not None:
        reference = next((m for m in members if m.task.key == cohort.reference.key), None)
        if reference is None:
            reference = _Member(cohort.reference, False)
            members.insert(0, reference)
    torch.set_num_threads(env.num_threads)  # loading and data preparation; the backends set their own
    pinned = _pin_cpus(env.num_threads)
    try:
        _prepare(members, env)
        if reference is not None and reference.error is not None:
            return [reference.error] * len(tasks)
        live = [m for m in members if m.error is None]
        if not live:
            return [cast(BaseException, m.error) for m in members if m.shown]
        protocol = (reference or live[0]).params
        meter = make_meter(env.device)
        if protocol.idle_s > 0:
            meter.measure_idle(protocol.idle_s)
        with torch.no_grad():
            for m in live:
                _warm_up(cast(Deployable, m.deployable), m.batches, m.params.warmup_batches, m.params.warmup_s,
                         env.device)
                m.correct = _correct(cast(Deployable, m.deployable), m.batches)
            seed = cohort.seed if cohort else 0
            sliced = interleave_mode(protocol, env.device) == "slices"
            turns = random.Random(f"{seed}:slices")  # the turns within a round; _rounds draws the rounds
            for round_no, ordered in enumerate(_rounds(live, protocol.repeats, seed)):
                if sliced:
                    _sliced_round(meter, ordered, round_no, protocol.slice_s, turns, env.device)
                else:
                    _windowed_round(meter, ordered, round_no, env.device)
        cohort_facts = _cohort_metrics(cohort, reference, live, protocol, pinned, env) if cohort else None
        out: list[StageOutput | BaseException] = []
        for m in members:
            if not m.shown:
                continue
            if m.error is not None:
                out.append(m.error)
                continue
            out.append(_output(m, meter, reference, cohort_facts))
        return out
    finally:
        for m in members:
            if m.deployable is not None:
                m.deployable.close()
        _unpin(pinned)


def _prepare(members: list[_Member], env: WorkerEnv) -> None:
    """Load, convert, prepare and check each member's model; a failure is kept on the member."""
    splits_by: dict[tuple[Any, ...], tuple[list[Batch], int]] = {}
    for m in members:
        try:
            model, m.manifest = _load_model(m.task, env.device)
            model.eval()
            shape = tuple(m.manifest["input_shape"])
            key = (repr(m.task.dataset), m.task.seed, shape, m.params.batch_size)
            if key not in splits_by:
                # The test split converted to the model's input (size, channels) before any timing.
                splits = load_dataset(m.task.dataset, seed=m.task.seed, input_shape=shape)
                if splits.synthetic:
                    raise ValueError(
                        "refusing to report accuracy on the synthetic dataset (random labels); "
                        "evaluate on a real dataset such as 'digits'"
                    )
                images, labels = splits.test.tensors
                splits_by[key] = (list(zip(images.to(env.device).split(m.params.batch_size),
                                           labels.to(env.device).split(m.params.batch_size))),
                                  min(5, splits.num_classes))
            m.batches, m.top_k = splits_by[key]
            m.deployable = _deploy(model, m.manifest, m.task, m.params, env, m.batches[0][0])
            m.checked = _check(model, m.manifest, m.deployable, m.batches[0][0])
            m.sparsity = _sparsity(model, m.manifest, m.deployable)
        except Exception as e:  # noqa: BLE001 - this model's failure, reported as its stage's
            m.error = e
            if m.deployable is not None:
                m.deployable.close()
                m.deployable = None


def _rounds(members: list[_Member], repeats: int, seed: int) -> list[list[_Member]]:
    """The order of the windows: per round, every member once, shuffled by a generator
    seeded once for the cohort (so the orders differ between rounds and repeat between runs)."""
    rng = random.Random(seed)
    rounds = []
    for _ in range(repeats):
        ordered = list(members)
        rng.shuffle(ordered)
        rounds.append(ordered)
    return rounds


def _pin_cpus(threads: int) -> tuple[set[int], set[int]] | None:
    """Pin this process to *threads* of the CPUs it may use, for the cohort (so the OS does
    not move it between windows); None where the OS has no affinity call. Returns the
    (previous, pinned) sets. Threads the runtimes start afterwards inherit it."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    try:
        allowed = os.sched_getaffinity(0)
        pinned = set(sorted(allowed)[:max(1, threads)])
        os.sched_setaffinity(0, pinned)
    except OSError:
        return None
    return allowed, pinned


def _unpin(pinned: tuple[set[int], set[int]] | None) -> None:
    if pinned is not None:
        try:
            os.sched_setaffinity(0, pinned[0])
        except OSError:
            pass


def _correct(model: Deployable, batches: list[Batch]) -> list[bool]:
    """Which test samples *model* gets right (top-1), in the split's order: one pass, unmeasured."""
    out: list[bool] = []
    for images, labels in batches:
        out += (model.run(images).argmax(dim=1) == labels).tolist()
    return out


def _output(m: _Member, meter: Meter, reference: _Member | None, cohort_facts: dict[str, Any] | None) -> StageOutput:
    repeats = tuple(m.windows)
    metrics = {**_artifact_metrics(m.manifest), **_protocol_metrics(m.params, repeats),
               **_energy_metrics(repeats, meter), "runtime": cast(Deployable, m.deployable).describe(),
               "deployable_size_bytes": cast(Deployable, m.deployable).size_bytes, "agreement": m.checked,
               "correct_top1": pack_correct(m.correct)}
    if m.sparsity is not None:
        metrics["sparsity"] = m.sparsity
    if reference is not None and cohort_facts is not None:
        metrics["cohort"] = cohort_facts
        metrics["paired"] = _paired_metrics(m, reference, repeats)
    return StageOutput(metrics=metrics, repeats=repeats)


def _paired_metrics(m: _Member, reference: _Member, repeats: tuple[EvalRepeat, ...]) -> dict[str, Any]:
    """The model against the reference, round by round: the median ratio of time (and
    energy) per sample with its 95 % interval and verdict (:mod:`workers.stats`), and
    McNemar's test of top-1 on the same test samples."""
    is_ref = m is reference
    time_ratios = _round_ratios(m, reference, 0)
    time_est = identity_estimate(len(repeats)) if is_ref else ratio_estimate(cast(list[float], time_ratios))
    energy_ratios = _round_ratios(m, reference, 1)
    energy_est: RatioEstimate | None = None
    if energy_ratios is not None:
        energy_est = identity_estimate(len(repeats)) if is_ref else ratio_estimate(energy_ratios)
    test = mcnemar(reference.correct, m.correct)
    sources = [s for s in (getattr(cast(EnergyReading, r.energy), f"{d}_source") for r in repeats for d in DOMAINS)
               if s and s != "none"]
    return {
        "time_ratio_vs_baseline": time_est.ratio, "time_ratio_ci_low": time_est.low,
        "time_ratio_ci_high": time_est.high, "verdict_time": time_est.verdict(), "time_ratio_cv": time_est.cv,
        "energy_ratio_vs_baseline": energy_est.ratio if energy_est else None,
        "energy_ratio_ci_low": energy_est.low if energy_est else None,
        "energy_ratio_ci_high": energy_est.high if energy_est else None,
        "verdict_energy": energy_est.verdict(("cheaper", "costlier")) if energy_est else None,
        "energy_ratio_cv": energy_est.cv if energy_est else None,
        "energy_follows_time": bool(sources) and all(s.startswith("estimate") for s in sources),
        "verdict_top1": "same" if is_ref else test.verdict, "top1_mcnemar_p": test.p,
        "top1_discordant": [test.b, test.c], "rounds": len(repeats),
        "outlier_rounds": [] if is_ref else outlier_rounds(cast(list[float], time_ratios)),  # kept, named
        "pairing": "turns" if any(m.turns) else "rounds",
    }


def _round_ratios(m: _Member, reference: _Member, figure: int) -> list[float] | None:
    """Per round, the member's time (*figure* 0) or energy (1) per sample over the
    reference's: turn by turn where the round was interleaved in slices
    (:func:`workers.stats.turn_ratio`, over the turns both ran), else the ratio of the two
    windows. None when an energy figure is missing."""
    out = []
    for r, (mine, theirs) in enumerate(zip(m.windows, reference.windows)):
        common = sorted(set(m.turns[r]) & set(reference.turns[r]))
        pairs = [(m.turns[r][t][figure], reference.turns[r][t][figure]) for t in common]
        if pairs and all(a is not None and b is not None for a, b in pairs):
            out.append(turn_ratio([cast(float, a) for a, _ in pairs], [cast(float, b) for _, b in pairs]))
            continue
        if figure == 0:
            out.append(mine.time_per_sample_s / theirs.time_per_sample_s)
            continue
        window = _energies((mine, theirs))
        if window is None:
            return None
        out.append(window[0] / window[1])
    return out


def _energies(repeats: tuple[EvalRepeat, ...]) -> list[float] | None:
    """Gross energy per sample of each window; None when a window has no energy figure."""
    values = [_energy_per_sample(cast(EnergyReading, r.energy), r.samples) for r in repeats]
    return None if any(v is None for v in values) else cast(list[float], values)


def _energy_per_sample(reading: EnergyReading, samples: int) -> float | None:
    """Gross energy per sample of one meter window; None without a (positive) figure."""
    energy = reading.total_energy_j
    return energy / samples if energy is not None and energy > 0 else None


def _cohort_metrics(cohort: Cohort, reference: _Member | None, live: list[_Member], protocol: EvaluateParams,
                    pinned: tuple[set[int], set[int]] | None, env: WorkerEnv) -> dict[str, Any]:
    """What the cohort was and how it was measured: stored with each of its results."""
    ref = cast(_Member, reference)
    times = [r.time_per_sample_s for r in ref.windows]
    energies = _energies(tuple(ref.windows))
    noise = statistics.stdev(times) / statistics.fmean(times) if len(times) > 1 else None
    sliced = interleave_mode(protocol, env.device) == "slices"
    return {
        "id": cohort.id, "seed": cohort.seed, "rounds": protocol.repeats, "size": len(live),
        "node_id": env.node_id, "target": protocol.target, "reference_key": ref.task.key,
        "reference_shown": cohort.reference_shown, "noise_floor_cv": noise,
        "protocol": {
            "order": "seeded-random", "repeats": protocol.repeats, "min_window_s": protocol.min_window_s,
            "warmup_batches": protocol.warmup_batches, "warmup_s": protocol.warmup_s, "idle_s": protocol.idle_s,
            "batch_size": protocol.batch_size, "timer": TIMER, "gc_disabled_in_windows": True,
            "interleave": "slices" if sliced else "windows", "slice_s": protocol.slice_s if sliced else None,
            # slices follow one another with no re-warm: each starts after another model's
            "rewarm_batches_per_window": 0 if sliced else protocol.warmup_batches,
            "slices_per_window": {m.task.key: [len(t) or 1 for t in m.turns] for m in live},
            "affinity": sorted(pinned[1]) if pinned else None, "threads": env.num_threads,
            # > 0: the worker yields the CPU to every other process (Ray's default for its
            # workers is 15; greensweep's clusters set 0, `ray start` needs RAY_worker_niceness=0)
            "niceness": os.nice(0) if hasattr(os, "nice") else None,
            "members": [m.task.key for m in live],
        },
        "reference": {"time_per_sample_s": times, "energy_per_sample_j": energies,
                      "top1": statistics.fmean(r.top1 for r in ref.windows)},
    }


def artifact_format(manifest: dict[str, Any]) -> str:
    """The format of an artifact as its manifest describes it (see StageKind.artifact_format)."""
    deploy = manifest.get("deploy")
    if deploy:
        return str(deploy["format"])
    return "quanto" if manifest.get("quantized") else "torch"


def _deploy(model: nn.Module, manifest: dict[str, Any], task: StageTask, params: EvaluateParams, env: WorkerEnv,
            example: torch.Tensor) -> Deployable:
    """The model prepared by the task's runtime at its precision, with the worker's CPUs
    as its intra-op threads; exported forms are cached by content under the artifact root."""
    from pathlib import Path

    from workers.artifacts import artifact_dir
    from workers.backends import get_backend

    spec = get_backend(params.runtime)
    if not spec.installed():
        raise ValueError(f"runtime {params.runtime} is not installed on this node -- pip install {spec.package}")
    reason = spec.pairing(artifact_format(manifest), params.precision)
    if reason is not None:
        raise ValueError(reason)
    backend = spec.load()
    why = backend.unsupported(env.device, params.precision)
    if why is not None:
        raise ValueError(f"{params.runtime} cannot run {params.precision} here: {why}")
    keyed = task.parent_key is not None
    return backend.prepare(model, manifest, precision=params.precision, device=env.device,
                           threads=ThreadSettings(intra_op=env.num_threads), example=example,
                           cache_dir=Path(task.artifact_root) / DEPLOYABLES_DIR if keyed else None,
                           artifact_dir=artifact_dir(task.artifact_root, task.parent_key) if keyed else None)


def _check(model: nn.Module, manifest: dict[str, Any], deployable: Deployable, images: torch.Tensor) -> dict[str, Any]:
    """The deployable's agreement with the torch model on *images*; an fp32 deployable of
    a float torch model must match it (:func:`~workers.backends.base.check_exact`)."""
    fmt = artifact_format(manifest)
    with torch.no_grad():
        reference = model(images).float()
        got = deployable.run(images).float()
    found = agreement(reference, got)
    if fmt == "torch" and deployable.precision == "fp32":
        check_exact(found, f"{deployable.runtime} fp32")
    # A runtime artifact carries its float parent's torch weights; a quanto artifact is
    # its own torch model (its float parent is not on this node).
    reference_name = "the float parent (torch fp32)" if fmt != "quanto" else "the quanto model (torch)"
    return {**found, "reference": reference_name}


def _sparsity(model: nn.Module, manifest: dict[str, Any], deployable: Deployable) -> dict[str, Any] | None:
    """What this evaluation ran of the model's n:m pattern (:mod:`workers.sparsity`): the
    runtime's own record when it can run sparse kernels, else dense kernels on the zeros
    (simulated); None when the chain made no such pattern."""
    if deployable.sparsity is not None:
        return deployable.sparsity
    from workers.sparsity import plan_for

    plan = plan_for(model, manifest)
    return None if plan is None else plan.record(False, f"{deployable.runtime}: dense kernels")


def _warm_up(model: Deployable, batches: list[Batch], min_batches: int, min_s: float, device: str) -> None:
    """Run batches, unmeasured, until both at least *min_batches* ran and *min_s* passed."""
    start, done = time.perf_counter(), 0
    while done < min_batches or time.perf_counter() - start < min_s:
        model.run(batches[done % len(batches)][0])
        done += 1
        if device.startswith("cuda") and done % len(batches) == 0:
            torch.cuda.synchronize(device)


def _load_model(task: StageTask, device: str) -> tuple[nn.Module, dict[str, Any]]:
    """The artifact to evaluate, or -- for a checkpoint or pretrained model evaluated as
    given (no stage before it) -- the root model, with the same manifest facts."""
    from workers.modelio import load_artifact, load_parent
    from workers.models import count_macs

    if task.parent_key is not None:
        return load_artifact(task.artifact_root, task.parent_key, device=device)
    root = load_parent(task)
    manifest = {
        "params": sum(p.numel() for p in root.model.parameters()),
        "macs": count_macs(root.model, root.input_shape),
        "size_bytes": root.size_bytes,
        "materialized": True,
        "compression": {"chain": []},
        "input_shape": list(root.input_shape),
    }
    return root.model.to(device), manifest


def interleave_mode(params: EvaluateParams, device: str) -> str:
    """``slices`` or ``windows``: how the models of a cohort share each round on *device*
    (``auto``: windows on CUDA, where NVML's energy counter is too coarse for slices)."""
    if params.interleave != "auto":
        return params.interleave
    return "windows" if device.startswith("cuda") else "slices"


@dataclass
class _Tally:
    """One model's window of one round, as it accumulates: samples, hits and energy."""

    samples: int = 0
    top1: int = 0
    topk: int = 0
    readings: list[EnergyReading] = field(default_factory=list)

    @property
    def duration_s(self) -> float:
        return sum(r.duration_s for r in self.readings)

    def repeat(self, round_no: int, position: int | None) -> EvalRepeat:
        energy = cast(EnergyReading, sum_readings(self.readings))
        return EvalRepeat(
            repeat=round_no,
            samples=self.samples,
            top1=self.top1 / self.samples,
            top5=self.topk / self.samples,
            duration_s=energy.duration_s,
            time_per_sample_s=energy.duration_s / self.samples,
            throughput_samples_per_s=self.samples / energy.duration_s,
            energy=energy,
            position=position,
        )


@contextmanager
def _gc_off() -> Iterator[None]:
    """The garbage collector off (a collection would land on whichever model is being timed)."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _timed_passes(meter: Meter, model: Deployable, batches: list[Batch], top_k: int, device: str, min_s: float,
                  tally: _Tally) -> None:
    """One meter window around whole passes over every batch, until it lasts *min_s*
    (at least one pass); accuracy counted on-device, no host sync inside a pass; added
    to *tally*. The meter's window, timed on the same clock, is the measured time."""
    correct_top1 = torch.zeros((), dtype=torch.int64, device=device)
    correct_topk = torch.zeros((), dtype=torch.int64, device=device)
    passes = 0
    min_ns = int(min_s * 1e9)
    meter.begin()
    start = time.perf_counter_ns()
    while True:
        for images, labels in batches:
            hits = model.run(images).topk(top_k, dim=1).indices == labels.unsqueeze(1)
            correct_top1 += hits[:, 0].sum()
            correct_topk += hits.any(dim=1).sum()
        passes += 1
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        if time.perf_counter_ns() - start >= min_ns:
            break
    tally.readings.append(meter.end())
    tally.samples += passes * sum(len(labels) for _, labels in batches)
    tally.top1 += int(correct_top1)
    tally.topk += int(correct_topk)


def _windowed_round(meter: Meter, ordered: list[_Member], round_no: int, device: str) -> None:
    """A round of contiguous windows: each member in turn, after a short unmeasured
    re-warm of ``warmup_batches`` batches, gets one window of ``min_window_s``."""
    for position, m in enumerate(ordered):
        deployable = cast(Deployable, m.deployable)
        _warm_up(deployable, m.batches, m.params.warmup_batches, 0.0, device)
        tally = _Tally()
        with _gc_off():
            _timed_passes(meter, deployable, m.batches, m.top_k, device, m.params.min_window_s, tally)
        m.windows.append(tally.repeat(round_no, position))
        m.turns.append({})


def _sliced_round(meter: Meter, ordered: list[_Member], round_no: int, slice_s: float, turns: random.Random,
                  device: str) -> None:
    """A round of interleaved slices: in turns, every member whose window is still shorter
    than its ``min_window_s`` runs one slice (whole passes lasting at least *slice_s*, or
    ``min_window_s`` if shorter), the first turn in the round's order and each later one
    shuffled by *turns*; a member's window is the sum of its slices. The garbage collector
    stays off for the round. ``position`` is the member's place in the first turn."""
    tallies = [_Tally() for _ in ordered]
    by_turn: list[dict[int, tuple[float, float | None]]] = [{} for _ in ordered]
    pending = list(range(len(ordered)))
    turn = 0
    with _gc_off():
        while pending:
            for i in pending:
                m, tally = ordered[i], tallies[i]
                before = tally.samples
                _timed_passes(meter, cast(Deployable, m.deployable), m.batches, m.top_k, device,
                              min(slice_s, m.params.min_window_s), tally)
                samples, reading = tally.samples - before, tally.readings[-1]
                by_turn[i][turn] = (reading.duration_s / samples, _energy_per_sample(reading, samples))
            pending = [i for i in pending if tallies[i].duration_s < ordered[i].params.min_window_s]
            turns.shuffle(pending)
            turn += 1
    for position, (m, tally) in enumerate(zip(ordered, tallies)):
        m.windows.append(tally.repeat(round_no, position))
        m.turns.append(by_turn[position])


def _artifact_metrics(manifest: dict[str, Any]) -> dict[str, Any]:
    """What the evaluated model is: size and cost figures from its manifest."""
    return {
        "params": manifest["params"],
        "macs": manifest["macs"],
        "size_bytes": manifest["size_bytes"],
        "materialized": manifest["materialized"],
        "compression": manifest["compression"],
    }


def _protocol_metrics(params: EvaluateParams, repeats: tuple[EvalRepeat, ...]) -> dict[str, Any]:
    """How it was measured, and mean / sample std over the repeats of each figure (and
    the coefficient of variation of time per sample)."""
    metrics: dict[str, Any] = {
        "samples": repeats[0].samples,
        "min_window_s": params.min_window_s,
        "idle_s": params.idle_s,
        "batch_size": params.batch_size,
        "warmup_batches": params.warmup_batches,
        "warmup_s": params.warmup_s,
        "repeats": len(repeats),
    }
    for name in ("top1", "top5", "throughput_samples_per_s"):
        values = [getattr(r, name) for r in repeats]
        metrics[name] = statistics.fmean(values)
        metrics[f"{name}_std"] = statistics.stdev(values) if len(values) > 1 else None
    metrics.update(_spread("time_per_sample_s", [r.time_per_sample_s for r in repeats]))
    return metrics


def _energy_metrics(repeats: tuple[EvalRepeat, ...], meter: Meter) -> dict[str, Any]:
    """Energy per sample over the repeats, gross and net of idle power.

    ``energy_per_sample_j`` (all domains with a figure, gross), ``net_energy_per_sample_j``
    and per domain ``{gpu,cpu,dram}_energy_per_sample_j`` and
    ``{gpu,cpu,dram}_net_energy_per_sample_j``, each with ``_std`` and ``_cv``; None
    where the domain has no figure (or, for net, no idle power was sampled).
    ``idle_power_w`` and ``energy_source`` are per-domain dicts; ``meter`` is the
    meter's :meth:`~workers.meters.base.Meter.describe` (sources and skip reasons).
    """
    readings = [cast(EnergyReading, r.energy) for r in repeats]  # _measured_window always sets it
    gross = {d: [_domain_energy_j(e, d) for e in readings] for d in DOMAINS}
    net = {
        d: [_net_j(g, _idle_power_w(e, d), e.duration_s) for g, e in zip(gross[d], readings)] for d in DOMAINS
    }
    samples = [r.samples for r in repeats]
    metrics: dict[str, Any] = {}
    metrics.update(_spread("energy_per_sample_j", _per_sample([e.total_energy_j for e in readings], samples)))
    metrics.update(_spread("net_energy_per_sample_j", _per_sample(_sum_domains(net), samples)))
    for d in DOMAINS:
        metrics.update(_spread(f"{d}_energy_per_sample_j", _per_sample(gross[d], samples)))
        metrics.update(_spread(f"{d}_net_energy_per_sample_j", _per_sample(net[d], samples)))
    first = readings[0]
    metrics["idle_power_w"] = {d: _idle_power_w(first, d) for d in DOMAINS}
    metrics["energy_source"] = {d: getattr(first, f"{d}_source") for d in DOMAINS}
    metrics["meter"] = meter.describe()
    return metrics


def _domain_energy_j(reading: EnergyReading, domain: str) -> float | None:
    return getattr(reading, f"{domain}_energy_j")


def _idle_power_w(reading: EnergyReading, domain: str) -> float | None:
    return getattr(reading, f"{domain}_idle_power_w")


def _net_j(gross_j: float | None, idle_power_w: float | None, duration_s: float) -> float | None:
    return None if gross_j is None or idle_power_w is None else gross_j - idle_power_w * duration_s


def _sum_domains(per_domain: dict[str, list[float | None]]) -> list[float | None]:
    """Per repeat, the sum over the domains that have a figure; None when none has."""
    sums: list[float | None] = []
    for values in zip(*per_domain.values()):
        present = [v for v in values if v is not None]
        sums.append(sum(present) if present else None)
    return sums


def _per_sample(energies_j: list[float | None], samples: list[int]) -> list[float | None]:
    return [None if e is None else e / n for e, n in zip(energies_j, samples)]


def _spread(name: str, values: list[float | None]) -> dict[str, float | None]:
    """``name``: the mean; ``name_std``: sample std (None for one value); ``name_cv``:
    std / mean (None without a std or with a zero mean). All None if any value is."""
    if not values or any(v is None for v in values):
        return {name: None, f"{name}_std": None, f"{name}_cv": None}
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else None
    cv = std / abs(mean) if std is not None and mean != 0 else None
    return {name: mean, f"{name}_std": std, f"{name}_cv": cv}
