"""``onnxruntime``: the model exported to ONNX (torch's dynamo exporter, opset 18, dynamic
batch) and run by an ONNX Runtime ``InferenceSession``.

Sessions are pinned like every runtime: ``intra_op_num_threads`` = the CPUs the worker
holds, one inter-op thread, sequential execution, full graph optimization -- and the
intra-op threads' spinning off (``session.intra_op.allow_spinning=0``): spinning threads
keep burning CPU after every call and would inflate the energy figure. CPU nodes run the
``CPUExecutionProvider`` (package ``onnxruntime``); GPU nodes the ``CUDAExecutionProvider``
(package ``onnxruntime-gpu``: the two packages cannot be installed together). ``fp16``
(CUDA only) converts the exported model's weights and operations to float16 with fp32
inputs and outputs. A model quantized by ONNX Runtime (``quantize: {engine:
onnxruntime}``) is loaded from its artifact's payload, never exported again.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from workers.backends.base import Backend, Deployable, ThreadSettings, model_files
from workers.backends.cache import files_size
from workers.backends.export import INPUT_NAME, ONNX_OPSET, OUTPUT_NAME, export_onnx

MODEL_FILE = "model.onnx"


def session_options(threads: ThreadSettings) -> Any:
    """The pinned session options (see the module docstring)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads.intra_op
    so.inter_op_num_threads = threads.inter_op
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return so


class OnnxRuntimeDeployable(Deployable):
    def __init__(self, session: Any, temporary: Path | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.session = session
        self._temporary = temporary
        self._input_type = session.get_inputs()[0].type  # "tensor(float)" (fp16 models keep fp32 I/O)

    def run(self, images: torch.Tensor) -> torch.Tensor:
        x = images.detach().to("cpu", torch.float32).contiguous().numpy()
        out = self.session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
        return torch.from_numpy(out).to(images.device)

    def close(self) -> None:
        self.session = None
        if self._temporary is not None:
            shutil.rmtree(self._temporary, ignore_errors=True)
            self._temporary = None


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def version(self) -> str:
        import onnxruntime as ort

        return ort.__version__

    def _providers(self, device: str) -> list[str]:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.startswith("cuda") else [
            "CPUExecutionProvider"]

    def unsupported(self, device: str, precision: str) -> str | None:
        import onnxruntime as ort

        if device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                return "ONNX Runtime has no CUDA provider here -- install onnxruntime-gpu instead of onnxruntime"
            return None if precision in ("fp32", "fp16") else f"onnxruntime runs fp32 and fp16, not {precision}"
        return None if precision == "fp32" else f"onnxruntime on CPU runs fp32 (and int8 models), not {precision}"

    def prepare(self, model: nn.Module, manifest: Mapping[str, Any], *, precision: str, device: str,
                threads: ThreadSettings, example: torch.Tensor, cache_dir: Path | None,
                artifact_dir: Path | None = None) -> Deployable:
        import onnxruntime as ort

        reason = self.unsupported(device, precision)
        if reason is not None:
            raise ValueError(reason)
        material = {"artifact": manifest.get("key") or manifest.get("sha256"), "runtime": self.name,
                    "precision": precision, "runtime_version": self.version(), "opset": ONNX_OPSET,
                    "torch": torch.__version__}
        found = model_files(manifest, fmt="onnx", material=material, cache_dir=cache_dir, artifact_dir=artifact_dir,
                            export=lambda d: _export(model, example, precision, d))
        path = next(f for f in found.files if f.name == MODEL_FILE)
        session = ort.InferenceSession(str(path), session_options(threads), providers=self._providers(device))
        options = session.get_session_options()
        applied = ThreadSettings(intra_op=options.intra_op_num_threads, inter_op=options.inter_op_num_threads)
        settings = {"providers": session.get_providers(), "execution_mode": str(options.execution_mode),
                    "graph_optimization_level": str(options.graph_optimization_level),
                    "intra_op_allow_spinning": options.get_session_config_entry("session.intra_op.allow_spinning"),
                    "opset": ONNX_OPSET, "model": found.source}
        return OnnxRuntimeDeployable(session, found.temporary, runtime=self.name, runtime_version=self.version(),
                                     precision=precision, device=device, size_bytes=files_size(list(found.files)),
                                     threads=applied, settings=settings)


def _export(model: nn.Module, example: torch.Tensor, precision: str, directory: Path) -> dict[str, Any]:
    """Write the model's ONNX form into *directory*; fp16: weights and operations in
    float16, inputs and outputs kept fp32."""
    cpu_model = model if next(model.parameters()).device.type == "cpu" else copy.deepcopy(model).cpu()
    files = export_onnx(cpu_model, example.detach().cpu().float(), directory / MODEL_FILE)
    if precision == "fp16":
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        half = convert_float_to_float16(onnx.load(str(files[0])), keep_io_types=True)
        onnx.save(half, str(files[0]))
    return {"files": [f.name for f in files]}
