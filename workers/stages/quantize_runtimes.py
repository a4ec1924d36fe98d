"""Runtime-native post-training quantization: ONNX Runtime and OpenVINO (NNCF).

The float parent is exported (:mod:`workers.backends.export`, the same export the
runtimes use) and quantized by the runtime's own tooling, calibrated on train batches
(never the test split):

- ``onnxruntime``: ``quant_pre_process`` (graph optimization and shape inference; the
  dynamo export carries its shapes, so symbolic shape inference is skipped), then
  ``quantize_static`` -- QDQ format, uint8 activations and int8 weights (ONNX Runtime's
  recommended U8S8 on x86), ``per_channel`` as asked -- or ``quantize_dynamic`` (int8
  weights; activations quantized at run time, so no calibration).
- ``tensorrt``: the same static QDQ quantization in the form TensorRT builds int8 engines
  from -- int8 activations and weights, both symmetric (zero points 0), biases in float,
  ``per_channel`` as asked; ONNX Runtime calibrates it on the CPU, TensorRT builds it on a GPU.
- ``openvino``: ``nncf.quantize`` of the converted model (``ModelType.TRANSFORMER`` for a
  model with attention, which keeps the accuracy-critical softmax/layer-norm paths in
  float), saved as IR without fp16 compression.

The result is a *runtime artifact*: the float parent's torch files (so an evaluation can
check the runtime's model against its parent) plus the runtime's model as the artifact's
``deploy`` payload, which only that runtime runs.
"""

from __future__ import annotations

import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workers.backends.export import INPUT_NAME, convert_openvino, export_onnx, save_openvino


def quantize_onnxruntime(model: nn.Module, example: torch.Tensor, calibration: torch.Tensor | None, *, mode: str,
                         per_channel: bool, batch_size: int, directory: Path, for_tensorrt: bool = False) -> dict[str, Any]:
    """Quantize *model* with ONNX Runtime into ``directory/model.onnx`` (*example*: a batch
    to export with; *calibration*: the images static quantization calibrates on); the
    deploy description. *for_tensorrt*: symmetric int8 Q/DQ (format ``onnx-qdq``)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="greensweep-ortq-") as scratch:
        float_path, prepared = Path(scratch) / "float.onnx", Path(scratch) / "prepared.onnx"
        export_onnx(model, example, float_path)
        quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
        out = directory / "model.onnx"
        if mode == "dynamic":
            quantize_dynamic(str(prepared), str(out), weight_type=QuantType.QInt8, per_channel=per_channel)
            settings = {"mode": "dynamic", "weight_type": "QInt8", "per_channel": per_channel}
        else:
            assert calibration is not None  # static quantization calibrates
            batches = [{INPUT_NAME: b.numpy()} for b in calibration.split(batch_size)]

            class Reader(CalibrationDataReader):
                def __init__(self) -> None:
                    self._it = iter(batches)

                def get_next(self) -> dict[str, Any] | None:
                    return next(self._it, None)

            activations = QuantType.QInt8 if for_tensorrt else QuantType.QUInt8
            # TensorRT's Q/DQ: int8, zero points 0, biases left in float (it has no int32 DequantizeLinear)
            symmetric = {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False} \
                if for_tensorrt else {}
            quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ,
                            activation_type=activations, weight_type=QuantType.QInt8, per_channel=per_channel,
                            extra_options=symmetric)
            settings = {"mode": "static", "format": "QDQ", "activation_type": activations.name,
                        "weight_type": "QInt8", "per_channel": per_channel, "calibration_method": "MinMax",
                        "symmetric": for_tensorrt}
    fmt, engine = ("onnx-qdq", "tensorrt") if for_tensorrt else ("onnx", "onnxruntime")
    return {"format": fmt, "engine": engine, "files": {"model.onnx": out},
            "settings": {**settings, "onnxruntime": _version("onnxruntime", "onnxruntime-gpu")}}


def quantize_openvino(model: nn.Module, calibration: torch.Tensor, *, batch_size: int,
                      directory: Path) -> dict[str, Any]:
    """Quantize *model* with NNCF into ``directory/model.xml`` (+ ``.bin``); the deploy description."""
    import nncf

    converted = convert_openvino(model, calibration[:batch_size])
    model_type = nncf.ModelType.TRANSFORMER if has_attention(model) else None
    dataset = nncf.Dataset([b.numpy() for b in calibration.split(batch_size)])
    quantized = nncf.quantize(converted, dataset, subset_size=len(calibration), model_type=model_type)
    xml, binary = save_openvino(quantized, directory / "model.xml")
    return {"format": "openvino", "engine": "openvino", "files": {"model.xml": xml, "model.bin": binary},
            "settings": {"nncf": nncf.__version__, "model_type": "transformer" if model_type else "default",
                         "subset_size": len(calibration), "preset": "performance (symmetric)"}}


def has_attention(model: nn.Module) -> bool:
    """Whether *model* has attention blocks (timm's ``Attention`` or ``nn.MultiheadAttention``)."""
    return any(isinstance(m, nn.MultiheadAttention) or type(m).__name__.endswith("Attention") for m in model.modules())


def _version(*dists: str) -> str | None:
    for dist in dists:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


# --------------------------------------------------------------------------- quantization-aware training


def _reference_fake_quant() -> str:
    """Make NNCF's fake quantization run on plain torch ops, without ``torch.compile``.

    NNCF otherwise compiles a C++ extension on first use (a minute and more on a 2-core
    node, guarded by lock files a killed worker leaves behind, after which every later
    worker hangs) and, failing that, wraps its reference ops in ``torch.compile``, which
    recompiles for every tensor rank. Its reference functions are the same arithmetic
    (NNCF's own fallback), so a stage never waits on a compiler. Returns what ran, for the
    manifest."""
    from nncf.torch.quantization.extensions import QuantizedFunctionsCPU, QuantizedFunctionsCUDA
    from nncf.torch.quantization.reference import ReferenceQuantizedFunctions

    for wrapper in (ReferenceQuantizedFunctions.Quantize_forward, ReferenceQuantizedFunctions.Quantize_backward):
        wrapper._compiled_func = wrapper._func  # the CompilationWrapper, made a plain call
    for namespace in (QuantizedFunctionsCPU, QuantizedFunctionsCUDA):
        namespace._loaded_namespace = ReferenceQuantizedFunctions
    return "nncf reference fake-quantize (torch ops, not compiled)"


def prepare_qat(model: nn.Module, calibration: torch.Tensor, *, batch_size: int) -> tuple[nn.Module, dict[str, Any]]:
    """*model* with NNCF's fake quantizers inserted (int8 weights per channel, int8
    activations, symmetric: OpenVINO's ``performance`` preset) and initialised by
    post-training calibration on *calibration* -- the model QAT trains, its quantizer
    scales trainable. The quantizers are hooks on *model* itself. Returns it and the
    settings recorded in the manifest."""
    import nncf

    kernels = _reference_fake_quant()
    model_type = nncf.ModelType.TRANSFORMER if has_attention(model) else None
    dataset = nncf.Dataset(list(calibration.split(batch_size)))
    quantized = nncf.quantize(model.eval(), dataset, subset_size=len(calibration), model_type=model_type)
    return quantized, {"nncf": nncf.__version__, "model_type": "transformer" if model_type else "default",
                       "subset_size": len(calibration), "preset": "performance (symmetric)",
                       "fake_quantize": kernels, "quantizers": count_quantizers(quantized)}


def count_quantizers(model: nn.Module) -> int:
    """How many NNCF fake quantizers *model* carries (0: a plain float model)."""
    from nncf.torch.quantization.layers import BaseQuantizer

    return sum(isinstance(m, BaseQuantizer) for m in model.modules())


def export_qat(quantized: nn.Module, example: torch.Tensor, directory: Path,
               settings: dict[str, Any]) -> dict[str, Any]:
    """The trained fake-quantized model as OpenVINO IR in ``directory/model.xml``: its
    quantizers become ``FakeQuantize`` nodes, which OpenVINO's CPU plugin executes as int8
    kernels. The deploy description, as :func:`quantize_openvino` makes it."""
    xml, binary = save_openvino(convert_openvino(quantized, example), directory / "model.xml")
    return {"format": "openvino", "engine": "openvino", "files": {"model.xml": xml, "model.bin": binary},
            "settings": {**settings, "trained": "quantization-aware"}}


def float_weights(quantized: nn.Module) -> dict[str, torch.Tensor]:
    """The state of *quantized* without NNCF's quantizer hooks: the float weights QAT
    trained, which load into the parent's architecture."""
    return {k: v for k, v in quantized.state_dict().items() if not k.startswith("__nncf_hooks.")}
