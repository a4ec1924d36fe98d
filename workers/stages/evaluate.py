"""The ``evaluate`` stage: the evaluation protocol every comparison rests on.

1. Everything that is not inference happens before any timing: the artifact is loaded,
   the whole test split is moved to the device and cut into batches of ``batch_size``.
2. Idle power is sampled for ``idle_s`` seconds with the model loaded and nothing
   running (before the warm-up, whose tail of raised clocks would inflate it); 0 skips
   it, and net figures are then None.
3. Unmeasured warm-up: at least ``warmup_batches`` batches and at least ``warmup_s``
   seconds of them (allocator, caches, lazy kernel selection, and on shared VMs a CPU
   that takes seconds to reach its steady speed: measured here, 3 warm-up batches left
   the first windows ~30 % slower than later ones).
4. ``repeats`` times: one meter window around whole passes over the test split, as many
   as it takes for the window to last at least ``min_window_s`` (a 50 ms window would be
   mostly timer and scheduler noise), counting top-1 / top-5 on the device (no host sync
   inside a pass). Per-sample figures divide by the samples actually processed.

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

Inference runs under ``torch.no_grad()``, not ``torch.inference_mode()``: optimum-quanto's
int4 kernels fail on inference tensors. Accuracy on the synthetic dataset is refused: it
would be a meaningless number next to real ones.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, cast

import torch
from torch import nn

from workers.backends.base import Deployable, ThreadSettings, agreement, check_exact
from workers.data import load_dataset
from workers.meters import DOMAINS, Meter, make_meter
from workers.stages.registry import EvaluateParams
from workers.types import EnergyReading, EvalRepeat, StageOutput, StageTask, WorkerEnv

Batch = tuple[torch.Tensor, torch.Tensor]
DEPLOYABLES_DIR = ".deployables"  # under the artifact root: exported / compiled models, by content


def run(task: StageTask, env: WorkerEnv) -> StageOutput:
    """Evaluate the artifact ``task.parent_key`` on the test split of ``task.dataset``.

    Returns one :class:`EvalRepeat` per repeat (numbered from 0; its ``energy`` is the
    window's gross reading with the idle power) and metrics: the artifact's ``params``,
    ``macs``, ``size_bytes``, ``materialized`` and ``compression``; the protocol's
    ``samples``, ``min_window_s``, ``idle_s``, ``batch_size``, ``warmup_batches``,
    ``repeats``; over the repeats the mean and sample std (``*_std``; None for a single
    repeat) of ``top1``, ``top5``, ``time_per_sample_s`` and
    ``throughput_samples_per_s``, and ``time_per_sample_s_cv``; and the energy figures
    of :func:`_energy_metrics`.
    """
    params = EvaluateParams.model_validate(dict(task.params))
    torch.set_num_threads(env.num_threads)  # loading and data preparation; the backend sets its own
    model, manifest = _load_model(task, env.device)
    model.eval()
    # The test split converted to the model's input (size, channels) before any timing.
    splits = load_dataset(task.dataset, seed=task.seed, input_shape=tuple(manifest["input_shape"]))
    if splits.synthetic:
        raise ValueError(
            "refusing to report accuracy on the synthetic dataset (random labels); "
            "evaluate on a real dataset such as 'digits'"
        )

    images, labels = splits.test.tensors
    batches: list[Batch] = list(
        zip(images.to(env.device).split(params.batch_size), labels.to(env.device).split(params.batch_size))
    )
    top_k = min(5, splits.num_classes)
    deployable = _deploy(model, manifest, task, params, env, batches[0][0])
    checked = _check(model, manifest, deployable, batches[0][0])

    meter = make_meter(env.device)
    if params.idle_s > 0:
        meter.measure_idle(params.idle_s)
    with torch.no_grad():
        _warm_up(deployable, batches, params.warmup_batches, params.warmup_s, env.device)
        repeats = tuple(
            _measured_window(meter, deployable, batches, top_k, env.device, repeat, params.min_window_s)
            for repeat in range(params.repeats)
        )

    metrics = {**_artifact_metrics(manifest), **_protocol_metrics(params, repeats), **_energy_metrics(repeats, meter),
               "runtime": deployable.describe(), "deployable_size_bytes": deployable.size_bytes,
               "agreement": checked}
    deployable.close()
    return StageOutput(metrics=metrics, repeats=repeats)


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


def _measured_window(
    meter: Meter, model: Deployable, batches: list[Batch], top_k: int, device: str, repeat: int, min_window_s: float
) -> EvalRepeat:
    """One meter window around whole passes over every batch, until it lasts
    ``min_window_s``; accuracy counted on-device over every pass."""
    correct_top1 = torch.zeros((), dtype=torch.int64, device=device)
    correct_topk = torch.zeros((), dtype=torch.int64, device=device)
    passes = 0
    meter.begin()
    start = time.perf_counter()
    while True:
        for images, labels in batches:
            hits = model.run(images).topk(top_k, dim=1).indices == labels.unsqueeze(1)
            correct_top1 += hits[:, 0].sum()
            correct_topk += hits.any(dim=1).sum()
        passes += 1
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        if time.perf_counter() - start >= min_window_s:
            break
    energy = meter.end()

    samples = passes * sum(len(labels) for _, labels in batches)
    return EvalRepeat(
        repeat=repeat,
        samples=samples,
        top1=int(correct_top1) / samples,
        top5=int(correct_topk) / samples,
        duration_s=energy.duration_s,
        time_per_sample_s=energy.duration_s / samples,
        throughput_samples_per_s=samples / energy.duration_s,
        energy=energy,
    )


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
