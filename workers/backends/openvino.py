"""``openvino``: the model converted with ``openvino.convert_model`` (from the torch module,
dynamic batch) and compiled for the node's CPU.

Compiled like every runtime is pinned: ``INFERENCE_NUM_THREADS`` = the CPUs the worker
holds, ``PERFORMANCE_HINT=LATENCY``, ``NUM_STREAMS=1``. Precision is explicit, because
OpenVINO's default is not fp32 everywhere: ``fp32`` sets ``INFERENCE_PRECISION_HINT=f32``
(on CPUs with AMX OpenVINO would otherwise run bf16), ``bf16`` / ``fp16`` set ``bf16`` /
``f16`` (where the CPU has them: OpenVINO's ``OPTIMIZATION_CAPABILITIES``), and ``auto``
leaves the hint unset -- OpenVINO's own choice, recorded as it reports it. The IR is
saved with ``compress_to_fp16=False``: ``save_model`` would otherwise round the weights
to fp16. On an NVIDIA node OpenVINO runs on the node's CPU, and the deployable says so.
A model quantized by NNCF (``quantize: {engine: openvino}``) is loaded from its
artifact's payload.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from workers.backends.base import Backend, Deployable, ThreadSettings, model_files
from workers.backends.cache import files_size
from workers.backends.export import convert_openvino, save_openvino

MODEL_FILE = "model.xml"
_HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}  # "auto": no hint
_CAPABILITIES = {"bf16": "BF16", "fp16": "FP16"}


class OpenVinoDeployable(Deployable):
    def __init__(self, compiled: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self._output = compiled.output(0)

    def run(self, images: torch.Tensor) -> torch.Tensor:
        x = images.detach().to("cpu", torch.float32).contiguous().numpy()
        out = self.request.infer({0: x})[self._output]
        return torch.from_numpy(out.copy()).to(images.device)  # the request reuses its output buffer

    def close(self) -> None:
        self.request = self.compiled = None
        super().close()


class OpenVinoBackend(Backend):
    name = "openvino"

    def version(self) -> str:
        import openvino as ov

        return ov.get_version()

    def unsupported(self, device: str, precision: str) -> str | None:
        import openvino as ov

        if precision not in (*_HINTS, "auto"):
            return f"openvino runs fp32, bf16, fp16 or auto, not {precision}"
        needed = _CAPABILITIES.get(precision)
        if needed is not None:
            capabilities = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
            if needed not in capabilities:
                return f"OpenVINO reports no {needed} on this CPU (it has {', '.join(capabilities)})"
        return None

    def prepare(self, model: nn.Module, manifest: Mapping[str, Any], *, precision: str, device: str,
                threads: ThreadSettings, example: torch.Tensor, cache_dir: Path | None,
                artifact_dir: Path | None = None) -> Deployable:
        import openvino as ov

        self.require(device, precision)
        material = {"artifact": manifest.get("key") or manifest.get("sha256"), "runtime": self.name,
                    "runtime_version": self.version(), "torch": torch.__version__}  # one IR for every precision
        found = model_files(manifest, fmt="openvino", material=material, cache_dir=cache_dir,
                            artifact_dir=artifact_dir, export=lambda d: _convert(model, example, d))
        xml = next(f for f in found.files if f.name == MODEL_FILE)
        config: dict[str, Any] = {"INFERENCE_NUM_THREADS": threads.intra_op, "PERFORMANCE_HINT": "LATENCY",
                                  "NUM_STREAMS": 1}
        if precision in _HINTS:
            config["INFERENCE_PRECISION_HINT"] = _HINTS[precision]
        compiled = ov.Core().compile_model(str(xml), "CPU", config)
        applied = ThreadSettings(intra_op=int(compiled.get_property("INFERENCE_NUM_THREADS")), inter_op=1)
        settings = {"device": "CPU", "performance_hint": str(compiled.get_property("PERFORMANCE_HINT")),
                    "num_streams": int(compiled.get_property("NUM_STREAMS")),
                    "inference_precision": str(compiled.get_property("INFERENCE_PRECISION_HINT")),
                    "model": found.source}
        if device.startswith("cuda"):
            settings["device_note"] = "CPU of a GPU node"
        return OpenVinoDeployable(compiled, temporary=found.temporary, runtime=self.name,
                                  runtime_version=self.version(),
                                  precision=precision, device="cpu", size_bytes=files_size(list(found.files)),
                                  threads=applied, settings=settings)


def _convert(model: nn.Module, example: torch.Tensor, directory: Path) -> dict[str, Any]:
    cpu_model = model if next(model.parameters()).device.type == "cpu" else copy.deepcopy(model).cpu()
    files = save_openvino(convert_openvino(cpu_model, example.detach().cpu().float()), directory / MODEL_FILE)
    return {"files": [f.name for f in files]}
