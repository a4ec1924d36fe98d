"""The ``quantize`` stage: optimum-quanto weights (and optionally activations), frozen.

Weights become int8, float8 (e4m3) or int4 tensors (``freeze``), so the artifact stores
real low-bit weights and is *materialized* in size. Whether inference also runs on
low-bit kernels depends on the device and the mode, and is measured rather than
assumed: after freezing, one forward pass runs under the torch profiler and the
matmul / convolution / quanto ops it dispatched are written to the manifest
(``extra.kernels``). On a CPU with torch >= 2.6, linears with int8 weights and int8
activations run ``aten::_int_mm`` (an integer GEMM); every other combination (all
weight-only modes, float8 activations, int4 weights) dequantizes the weights at run time
and multiplies in float; quanto has no quantized convolution kernel, so quantized convs
always dequantize.

With quantized activations the model is calibrated (``Calibration(momentum=0.9)``,
streamline on) on ``calibration_batches`` batches of shuffled **train** data -- never
the test split. Modules that quanto would replace although their class changes the
base ``forward`` (timm's channels-first ``LayerNorm2d`` in ConvNeXt, ``Conv2dSame``) are
left in float: quanto's replacement would run the plain base ``forward`` and silently
compute something else. Their names are recorded in the manifest.

Everything runs under ``torch.no_grad()``, not ``torch.inference_mode()``: quanto's
int4 weights fail on inference tensors.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import nn

from workers.meters import make_meter
from workers.stages.registry import QatParams, QuantizeParams
from workers.types import StageOutput, StageTask, WorkerEnv

# QuantizeParams names -> optimum-quanto qtype names.
_QTYPES = {"int8": "qint8", "float8": "qfloat8", "int4": "qint4"}
# Profiler op names that show which kernels ran: quanto's own ops, GEMMs, convolutions.
_KERNEL_OPS = (
    "aten::_int_mm",
    "aten::_weight_int8pack_mm",
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::convolution",
)


def run(task: StageTask, env: WorkerEnv) -> StageOutput:
    """Quantize the parent artifact (or, for a root stage, ``task.model``) and save it.

    Metrics: ``size_bytes_before`` / ``size_bytes_after`` (weights on disk),
    ``calibration_samples`` (0 for weight-only), ``float_modules`` (how many modules were
    left in float, see the module docstring). The energy is that of quantization and
    calibration, not of loading, data preparation or saving.
    """
    from workers.modelio import load_parent

    params = QuantizeParams.model_validate(dict(task.params))
    torch.set_num_threads(env.num_threads)
    parent = load_parent(task)
    if params.engine != "quanto":
        return _run_runtime_engine(task, env, params, parent)
    from optimum.quanto import freeze, quantize

    from workers.modelio import save_child

    model = parent.model.to(env.device)
    activations = _QTYPES.get(params.activations)  # None for "none"
    images = calibration_images(task, params, parent.input_shape) if activations else None
    float_modules = modules_quanto_would_break(model)

    meter = make_meter(env.device)
    meter.begin()
    quantize(model, weights=_QTYPES[params.weights], activations=activations, exclude=float_modules or None)
    if images is not None:
        calibrate(model, images, params.batch_size, env.device)
    freeze(model)
    energy = meter.end()

    kernels = kernel_report(model, parent.input_shape, env.device)
    model.to("cpu")
    artifact = save_child(
        model, task, parent, params.model_dump(),
        materialized=True,  # the weights are stored in low-bit form
        extra={"kernels": kernels, "float_modules": float_modules},
    )
    return StageOutput(
        metrics={
            "size_bytes_before": parent.size_bytes,
            "size_bytes_after": artifact.size_bytes,
            "calibration_samples": 0 if images is None else len(images),
            "float_modules": len(float_modules),
        },
        artifact=artifact,
        energy=energy,
    )


def _run_runtime_engine(task: StageTask, env: WorkerEnv, params: QuantizeParams, parent: Any) -> StageOutput:
    """Quantize with the runtime's own tooling (:mod:`workers.stages.quantize_runtimes`):
    the artifact keeps the float parent's torch files and carries the runtime's model."""
    import tempfile
    from pathlib import Path

    from workers.modelio import save_child
    from workers.stages.quantize_runtimes import quantize_onnxruntime, quantize_openvino

    model = parent.model.to("cpu").eval()  # the runtimes' exporters trace on the CPU
    static = params.mode == "static"
    calibration = calibration_images(task, params, parent.input_shape) if static else None
    example = calibration[: params.batch_size] if calibration is not None else torch.zeros(2, *parent.input_shape)
    with tempfile.TemporaryDirectory(prefix="greensweep-quantize-") as scratch:
        meter = make_meter(env.device)
        meter.begin()
        if params.engine in ("onnxruntime", "tensorrt"):
            deploy = quantize_onnxruntime(model, example, calibration, mode=params.mode, per_channel=params.per_channel,
                                          batch_size=params.batch_size, directory=Path(scratch),
                                          for_tensorrt=params.engine == "tensorrt")
        else:
            assert calibration is not None  # openvino is static only (QuantizeParams)
            deploy = quantize_openvino(model, calibration, batch_size=params.batch_size, directory=Path(scratch))
        energy = meter.end()
        artifact = save_child(model, task, parent, params.model_dump(), materialized=True,
                              extra={"float_parent": task.parent_key}, deploy=deploy)
    return StageOutput(
        metrics={
            "size_bytes_before": parent.size_bytes,
            "size_bytes_after": artifact.size_bytes,
            "calibration_samples": 0 if calibration is None else len(calibration),
            "engine": params.engine,
            "float_modules": 0,
        },
        artifact=artifact,
        energy=energy,
    )


def calibrate(model: nn.Module, images: torch.Tensor, batch_size: int, device: str) -> None:
    """Run ``images`` through ``model`` in batches under quanto's ``Calibration``, which
    sets each quantized module's activation scales (and, with streamline, switches off
    output quantization nobody downstream can consume)."""
    from optimum.quanto import Calibration

    model.eval()
    with torch.no_grad(), Calibration(momentum=0.9):
        for batch in images.split(batch_size):
            model(batch.to(device))


def modules_quanto_would_break(model: nn.Module) -> list[str]:
    """Names of modules quanto would replace with a module running a different ``forward``.

    quanto swaps every ``nn.Linear`` / ``nn.Conv2d`` / ``nn.LayerNorm`` -- subclasses
    included -- for its own module, whose ``forward`` is the base class's. That is wrong
    for subclasses with their own ``forward`` (timm's ``LayerNorm2d`` normalizes over
    channels of NCHW input), except timm's ``LayerNorm``, whose ``forward`` is plain
    ``layer_norm`` (with an optional fused kernel).
    """
    from timm.layers import LayerNorm as TimmLayerNorm

    bases = (nn.Linear, nn.Conv2d, nn.LayerNorm)
    equivalent = {TimmLayerNorm}
    names = []
    for name, module in model.named_modules():
        base = next((b for b in bases if isinstance(module, b)), None)
        if base is None or type(module) in equivalent or type(module).forward is base.forward:
            continue
        names.append(name)
    return names


def kernel_report(model: nn.Module, input_shape: tuple[int, ...], device: str) -> dict[str, Any]:
    """Which kernels one forward pass of ``model`` (one sample) dispatched on ``device``.

    ``ops`` counts quanto's ops and the GEMM / convolution ATen ops the profiler saw;
    ``int_gemm`` is whether an integer GEMM ran (else quantized weights were
    dequantized and multiplied in float). This describes ``device`` only: another device
    (e.g. CUDA, with other kernels and shape conditions) may dispatch differently.
    """
    from torch.profiler import ProfilerActivity, profile

    sample = torch.zeros((1, *input_shape), device=device)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(sample)
    counts: Counter[str] = Counter()
    for event in prof.key_averages():
        if event.key.startswith("quanto::") or event.key in _KERNEL_OPS:
            counts[event.key] += event.count
    int_gemm = counts["aten::_int_mm"] > 0
    return {
        "device": str(torch.device(device)),
        "torch": torch.__version__,
        "ops": dict(sorted(counts.items())),
        "int_gemm": int_gemm,
        "linear": "integer GEMM (aten::_int_mm)" if int_gemm else "weights dequantized at run time; float GEMM",
    }


def calibration_images(task: StageTask, params: "QuantizeParams | QatParams", input_shape: tuple[int, ...]) -> torch.Tensor:
    """Up to ``calibration_batches * batch_size`` train images, shuffled by the sweep seed,
    converted to the model's input (only these: a whole train split at 224x224 would not
    fit in memory)."""
    from workers.data import adapt_images, load_dataset

    splits = load_dataset(task.dataset, seed=task.seed)
    images = splits.train.tensors[0]
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(task.seed))
    return adapt_images(images[order[: params.calibration_batches * params.batch_size]], input_shape)
