"""``torch``: PyTorch eager execution, the reference every other runtime is compared to.

The deployable is the artifact's module itself, so its on-disk size is the artifact's
serialized weights (``manifest["size_bytes"]``). Threads: ``torch.set_num_threads``;
the inter-op pool cannot be resized once torch ran parallel work, so it is recorded as
torch reports it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from workers.backends.base import Backend, Deployable, ThreadSettings


class TorchDeployable(Deployable):
    def __init__(self, model: nn.Module, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model = model

    def run(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)


class TorchBackend(Backend):
    name = "torch"

    def version(self) -> str:
        return torch.__version__

    def unsupported(self, device: str, precision: str) -> str | None:
        if precision != "fp32":
            return f"torch eager runs fp32 only in this greensweep (asked {precision})"
        if device.startswith("cuda") and not torch.cuda.is_available():
            return f"no CUDA device on this node (asked {device})"
        return None

    def prepare(self, model: nn.Module, manifest: Mapping[str, Any], *, precision: str, device: str,
                threads: ThreadSettings, example: torch.Tensor, cache_dir: Path | None) -> Deployable:
        reason = self.unsupported(device, precision)
        if reason is not None:
            raise ValueError(reason)
        torch.set_num_threads(threads.intra_op)
        applied = ThreadSettings(intra_op=torch.get_num_threads(), inter_op=torch.get_num_interop_threads())
        return TorchDeployable(model.to(device).eval(), runtime=self.name, runtime_version=self.version(),
                               precision=precision, device=device, size_bytes=int(manifest["size_bytes"]),
                               threads=applied, settings={"mode": "eager"})
