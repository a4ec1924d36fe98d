"""``torch``: PyTorch eager execution, the reference every other runtime is compared to.

The deployable is the artifact's module itself, so its on-disk size is the artifact's
serialized weights (``manifest["size_bytes"]``). ``bf16`` / ``fp16`` run the fp32 module
under ``torch.autocast`` (matmuls and convolutions in the low precision, reductions in
fp32) and return fp32 logits. Threads: ``torch.set_num_threads``; the inter-op pool cannot
be resized once torch ran parallel work, so it is recorded as torch reports it.

An artifact whose chain made a 2:4 pattern (semi-structured pruning) runs on torch's
semi-structured sparse kernels where they exist -- a CUDA GPU of compute capability 8.0 or
newer, at fp16 / bf16 -- as a copy whose fitting layers hold sparse weights
(:func:`workers.sparsity.materialize`; the artifact's module stays the dense reference);
elsewhere on dense kernels. Either way the deployable's ``sparsity`` says which, and why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from workers.backends.base import Backend, Deployable, ThreadSettings
from workers.sparsity import materialize, plan_for

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# CPU features that make bf16 / fp16 matmuls native (else oneDNN emulates them, slower than fp32).
_CPU_FLAGS = {"bf16": ("avx512_bf16", "amx_bf16"), "fp16": ("avx512_fp16", "amx_fp16")}


class TorchDeployable(Deployable):
    def __init__(self, model: nn.Module, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model = model
        self._dtype = _DTYPES.get(self.precision)
        self._device_type = torch.device(self.device).type

    def run(self, images: torch.Tensor) -> torch.Tensor:
        if self._dtype is None:
            return self.model(images)
        with torch.autocast(self._device_type, dtype=self._dtype):
            return self.model(images).float()


class TorchBackend(Backend):
    name = "torch"

    def version(self) -> str:
        return torch.__version__

    def unsupported(self, device: str, precision: str) -> str | None:
        if device.startswith("cuda"):
            if not torch.cuda.is_available():
                return f"no CUDA device on this node (asked {device})"
            if precision == "bf16" and not torch.cuda.is_bf16_supported():
                return "this GPU has no bf16 support"
            return None
        if precision == "fp16":
            return "torch runs fp16 on CUDA devices only"
        if precision == "bf16":
            from workers.hardware import cpu_flags

            if not cpu_flags() & set(_CPU_FLAGS["bf16"]):
                return "this CPU has neither AVX512-BF16 nor AMX (bf16 would be emulated, slower than fp32)"
        return None

    def prepare(self, model: nn.Module, manifest: Mapping[str, Any], *, precision: str, device: str,
                threads: ThreadSettings, example: torch.Tensor, cache_dir: Path | None,
                artifact_dir: Path | None = None) -> Deployable:
        self.require(device, precision)
        torch.set_num_threads(threads.intra_op)
        applied = ThreadSettings(intra_op=torch.get_num_threads(), inter_op=torch.get_num_interop_threads())
        settings = {"mode": "eager"} if precision not in _DTYPES else {"mode": "eager", "autocast": precision}
        model = model.to(device).eval()
        record = None
        plan = plan_for(model, manifest)
        if plan is not None:
            model, record = materialize(model, plan, device=device, precision=precision, example=example,
                                        quantized=bool(manifest.get("quantized")))
        return TorchDeployable(model, runtime=self.name, runtime_version=self.version(),
                               precision=precision, device=device, size_bytes=int(manifest["size_bytes"]),
                               threads=applied, settings=settings, sparsity=record)
