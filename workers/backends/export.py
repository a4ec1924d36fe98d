"""Turning a torch model into the files other runtimes load: ONNX and OpenVINO IR.

Both exports keep the batch axis dynamic (the last batch of a test split is short) and
fix every other axis to one sample's (C, H, W). They are shared by the runtimes
(:mod:`workers.backends.onnxruntime`, :mod:`workers.backends.openvino`) and by the
runtime-native quantization engines, so a model is exported one way everywhere.

An architecture a runtime cannot export fails with :class:`ExportError`, one line that
names the operator when the exporter says which.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from workers.util import first_line

ONNX_OPSET = 18  # the dynamo exporter's floor; every ONNX runtime here loads it
INPUT_NAME, OUTPUT_NAME = "images", "logits"
MAX_BATCH = 65_536  # EvaluateParams.batch_size's bound


class ExportError(ValueError):
    """The model cannot be exported for a runtime (an unsupported operator, a dynamic
    control flow the exporter cannot trace)."""


def _operator(message: str) -> str | None:
    """The operator an exporter complains about, when its message names one."""
    m = re.search(r"\b(aten::[\w.]+|aten\.[\w.]+|[\w.]+\.default)\b", message)
    return m.group(1) if m else None


def _export_error(what: str, model: nn.Module, e: BaseException) -> ExportError:
    op = _operator(str(e))
    detail = f"operator {op} is not supported" if op else first_line(e, limit=300)
    return ExportError(f"cannot export {type(model).__name__} to {what}: {detail} -- evaluate it with another runtime "
                       "(e.g. runtimes: [torch])")


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> list[Path]:
    """Export *model* (eval mode, on the CPU) to ONNX at *path* with the dynamo exporter,
    opset :data:`ONNX_OPSET`, a dynamic batch axis, input ``images`` and output
    ``logits``. Returns the files written: *path*, plus its external-data file when the
    exporter wrote one (weights over 2 GiB)."""
    model = model.eval()
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    try:
        with torch.no_grad():
            program = torch.onnx.export(model, (example,), dynamo=True, opset_version=ONNX_OPSET,
                                        dynamic_shapes=({0: batch},), input_names=[INPUT_NAME],
                                        output_names=[OUTPUT_NAME], verbose=False)
        program.save(str(path))
    except Exception as e:  # the exporter raises many types (torch._dynamo, onnxscript, export errors)
        raise _export_error("ONNX", model, e) from None
    data = path.with_name(path.name + ".data")
    return [path, data] if data.is_file() else [path]


def to_fp16(path: Path) -> None:
    """Rewrite the ONNX model at *path* with float16 weights and operations and float32
    inputs and outputs (Cast nodes at the edges; ONNX Runtime's ``convert_float_to_float16``
    with ``keep_io_types``)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save(convert_float_to_float16(onnx.load(str(path)), keep_io_types=True), str(path))


def convert_openvino(model: nn.Module, example: torch.Tensor) -> object:
    """*model* converted to an OpenVINO ``ov.Model`` (from the torch module directly)
    with a dynamic batch axis and the other axes of *example*."""
    import openvino as ov

    model = model.eval()
    try:
        with torch.no_grad():
            converted = ov.convert_model(model, example_input=example)
        converted.reshape({converted.inputs[0]: ov.PartialShape([-1, *example.shape[1:]])})
    except Exception as e:  # OpenVINO's frontends raise their own (OpConversionFailure, ...)
        raise _export_error("OpenVINO", model, e) from None
    return converted


def save_openvino(converted: object, path: Path) -> list[Path]:
    """Write an ``ov.Model`` as IR (``path`` = the .xml, its .bin beside it) with weights
    as they are: ``save_model`` would round them to FP16 by default."""
    import openvino as ov

    ov.save_model(converted, str(path), compress_to_fp16=False)
    return [path, path.with_suffix(".bin")]
