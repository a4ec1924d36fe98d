"""Runtime-native post-training quantization: ONNX Runtime and OpenVINO (NNCF).

The float parent is exported (:mod:`workers.backends.export`, the same export the
runtimes use) and quantized by the runtime's own tooling, calibrated on train batches
(never the test split):

- ``onnxruntime``: ``quant_pre_process`` (graph optimization and shape inference; the
  dynamo export carries its shapes, so symbolic shape inference is skipped), then
  ``quantize_static`` -- QDQ format, uint8 activations and int8 weights (ONNX Runtime's
  recommended U8S8 on x86), ``per_channel`` as asked -- or ``quantize_dynamic`` (int8
  weights; activations quantized at run time, so no calibration).
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
                         per_channel: bool, batch_size: int, directory: Path) -> dict[str, Any]:
    """Quantize *model* with ONNX Runtime into ``directory/model.onnx`` (*example*: a batch
    to export with; *calibration*: the images static quantization calibrates on); the
    deploy description."""
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

            quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=per_channel)
            settings = {"mode": "static", "format": "QDQ", "activation_type": "QUInt8", "weight_type": "QInt8",
                        "per_channel": per_channel, "calibration_method": "MinMax"}
    return {"format": "onnx", "engine": "onnxruntime", "files": {"model.onnx": out},
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
