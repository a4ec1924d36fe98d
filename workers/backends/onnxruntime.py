"""``onnxruntime``: the model exported to ONNX (torch's dynamo exporter, opset 18, dynamic
batch) and run by an ONNX Runtime ``InferenceSession``.

Sessions are pinned like every runtime: ``intra_op_num_threads`` = the CPUs the worker
holds, one inter-op thread, sequential execution, full graph optimization -- and the
intra-op threads' spinning off (``session.intra_op.allow_spinning=0``): spinning threads
keep burning CPU after every call and would inflate the energy figure. CPU nodes run the
``CPUExecutionProvider`` (package ``onnxruntime``); GPU nodes the ``CUDAExecutionProvider``
(package ``onnxruntime-gpu``: the two packages cannot be installed together), with
inputs and outputs bound in GPU memory. ``fp16``
(CUDA only) converts the exported model's weights and operations to float16 with fp32
inputs and outputs. A model quantized by ONNX Runtime (``quantize: {engine:
onnxruntime}``) is loaded from its artifact's payload, never exported again.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping, cast

import torch
from torch import nn

from workers.backends.base import Backend, Deployable, ThreadSettings, model_files
from workers.backends.cache import files_size
from workers.backends.export import INPUT_NAME, ONNX_OPSET, OUTPUT_NAME, export_onnx, to_fp16

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
    """On the CUDA provider, inputs and outputs stay on the GPU (I/O binding of the torch
    tensors' memory): a copy through host memory per batch would be timed as inference."""

    def __init__(self, session: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.session = session
        self._input_type = session.get_inputs()[0].type  # "tensor(float)" (fp16 models keep fp32 I/O)
        classes = session.get_outputs()[0].shape[-1]
        self._on_gpu = self.device.startswith("cuda") and "CUDAExecutionProvider" in session.get_providers() \
            and isinstance(classes, int)
        self._classes = classes if isinstance(classes, int) else None

    def run(self, images: torch.Tensor) -> torch.Tensor:
        if self._on_gpu:
            return self._run_bound(images)
        x = images.detach().to("cpu", torch.float32).contiguous().numpy()
        out = self.session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
        return torch.from_numpy(out).to(images.device)

    def _run_bound(self, images: torch.Tensor) -> torch.Tensor:
        import numpy as np

        x = images.detach().to(self.device, torch.float32).contiguous()
        out = torch.empty((x.shape[0], cast(int, self._classes)), dtype=torch.float32, device=x.device)
        index = x.device.index or 0
        binding = self.session.io_binding()
        binding.bind_input(INPUT_NAME, "cuda", index, np.float32, tuple(x.shape), x.data_ptr())
        binding.bind_output(OUTPUT_NAME, "cuda", index, np.float32, tuple(out.shape), out.data_ptr())
        self.session.run_with_iobinding(binding)  # returns once the provider's stream is done
        return out

    def close(self) -> None:
        self.session = None
        super().close()


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def version(self) -> str:
        import onnxruntime as ort

        return ort.__version__

    def _providers(self, device: str) -> list[Any]:
        if not device.startswith("cuda"):
            return ["CPUExecutionProvider"]
        index = torch.device(device).index or 0
        # fp32 means fp32: the CUDA provider would run fp32 matmuls as TF32 on Ampere and newer
        return [("CUDAExecutionProvider", {"device_id": index, "use_tf32": 0}), "CPUExecutionProvider"]

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

        self.require(device, precision)
        material = {"artifact": manifest.get("key") or manifest.get("sha256"), "runtime": self.name,
                    "precision": precision, "runtime_version": self.version(), "opset": ONNX_OPSET,
                    "torch": torch.__version__}
        found = model_files(manifest, fmt="onnx", material=material, cache_dir=cache_dir, artifact_dir=artifact_dir,
                            export=lambda d: _export(model, example, precision, d))
        path = next(f for f in found.files if f.name == MODEL_FILE)
        session = ort.InferenceSession(str(path), session_options(threads), providers=self._providers(device))
        options = session.get_session_options()
        applied = ThreadSettings(intra_op=options.intra_op_num_threads, inter_op=options.inter_op_num_threads)
        cuda_options = session.get_provider_options().get("CUDAExecutionProvider")
        settings = {"providers": session.get_providers(), "execution_mode": str(options.execution_mode),
                    **({"cuda_use_tf32": cuda_options.get("use_tf32")} if cuda_options else {}),
                    "graph_optimization_level": str(options.graph_optimization_level),
                    "intra_op_allow_spinning": options.get_session_config_entry("session.intra_op.allow_spinning"),
                    "opset": ONNX_OPSET, "model": found.source}
        return OnnxRuntimeDeployable(session, temporary=found.temporary, runtime=self.name,
                                     runtime_version=self.version(),
                                     precision=precision, device=device, size_bytes=files_size(list(found.files)),
                                     threads=applied, settings=settings)


def _export(model: nn.Module, example: torch.Tensor, precision: str, directory: Path) -> dict[str, Any]:
    """Write the model's ONNX form into *directory*; fp16: weights and operations in
    float16, inputs and outputs kept fp32."""
    cpu_model = model if next(model.parameters()).device.type == "cpu" else copy.deepcopy(model).cpu()
    files = export_onnx(cpu_model, example.detach().cpu().float(), directory / MODEL_FILE)
    if precision == "fp16":
        to_fp16(files[0])
    return {"files": [f.name for f in files]}
