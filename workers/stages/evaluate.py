"""The ``evaluate`` stage: the evaluation protocol every comparison rests on.

1. Everything that is not inference happens before any timing: the artifact is loaded,
   the whole test split is moved to the device and cut into batches of ``batch_size``.
2. ``warmup_batches`` unmeasured batches (allocator, caches, lazy kernel selection).
3. ``repeats`` times: one meter window around whole passes over the test split, as many
   as it takes for the window to last at least ``min_window_s`` (a 50 ms window would be
   mostly timer and scheduler noise), counting top-1 / top-5 on the device (no host sync
   inside a pass). Per-sample figures divide by the samples actually processed.

Inference runs under ``torch.no_grad()``, not ``torch.inference_mode()``: optimum-quanto's
int4 kernels fail on inference tensors. Accuracy on the synthetic dataset is refused: it
would be a meaningless number next to real ones.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import nn

from workers.data import check_input_shape, load_dataset
from workers.meters import make_meter
from workers.stages.registry import EvaluateParams
from workers.types import EvalRepeat, StageOutput, StageTask, WorkerEnv

Batch = tuple[torch.Tensor, torch.Tensor]


def run(task: StageTask, env: WorkerEnv) -> StageOutput:
    """Evaluate the artifact ``task.parent_key`` on the test split of ``task.dataset``.

    Returns one :class:`EvalRepeat` per repeat (numbered from 0) and metrics: the
    artifact's ``params``, ``macs``, ``size_bytes``, ``materialized`` and
    ``compression``; the protocol's ``samples``, ``batch_size``, ``warmup_batches``,
    ``repeats``; and over the repeats the mean and sample std (``*_std``; None for a
    single repeat) of ``top1``, ``top5``, ``time_per_sample_s`` and
    ``throughput_samples_per_s``.
    """
    params = EvaluateParams.model_validate(dict(task.params))
    splits = load_dataset(task.dataset, seed=task.seed)
    if splits.synthetic:
        raise ValueError(
            "refusing to report accuracy on the synthetic dataset (random labels); "
            "evaluate on a real dataset such as 'digits'"
        )
    torch.set_num_threads(env.num_threads)
    model, manifest = _load_model(task, env.device)
    check_input_shape(splits, manifest["input_shape"])
    model.eval()

    images, labels = splits.test.tensors
    batches: list[Batch] = list(
        zip(images.to(env.device).split(params.batch_size), labels.to(env.device).split(params.batch_size))
    )
    top_k = min(5, splits.num_classes)

    with torch.no_grad():
        for i in range(params.warmup_batches):
            model(batches[i % len(batches)][0])
        repeats = tuple(
            _measured_window(model, batches, top_k, env.device, repeat, params.min_window_s)
            for repeat in range(params.repeats)
        )

    return StageOutput(metrics={**_artifact_metrics(manifest), **_protocol_metrics(params, repeats)}, repeats=repeats)


def _load_model(task: StageTask, device: str) -> tuple[nn.Module, dict[str, Any]]:
    """The artifact to evaluate, or -- for a checkpoint or pretrained model evaluated as
    given (no stage before it) -- the root model, with the same manifest facts."""
    from workers.models import count_macs, load_artifact, load_parent

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
    model: nn.Module, batches: list[Batch], top_k: int, device: str, repeat: int, min_window_s: float
) -> EvalRepeat:
    """One meter window around whole passes over every batch, until it lasts
    ``min_window_s``; accuracy counted on-device over every pass."""
    correct_top1 = torch.zeros((), dtype=torch.int64, device=device)
    correct_topk = torch.zeros((), dtype=torch.int64, device=device)
    passes = 0
    meter = make_meter(device)
    meter.begin()
    start = time.perf_counter()
    while True:
        for images, labels in batches:
            hits = model(images).topk(top_k, dim=1).indices == labels.unsqueeze(1)
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
    """How it was measured, and mean / sample std over the repeats of each figure."""
    metrics: dict[str, Any] = {
        "samples": repeats[0].samples,
        "min_window_s": params.min_window_s,
        "batch_size": params.batch_size,
        "warmup_batches": params.warmup_batches,
        "repeats": len(repeats),
    }
    for name in ("top1", "top5", "time_per_sample_s", "throughput_samples_per_s"):
        values = [getattr(r, name) for r in repeats]
        metrics[name] = statistics.fmean(values)
        metrics[f"{name}_std"] = statistics.stdev(values) if len(values) > 1 else None
    return metrics
