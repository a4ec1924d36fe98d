"""The backend contract (after optimum-benchmark's ``Backend``: load, then forward).

A :class:`Backend` prepares a :class:`Deployable` from a model artifact on one device at
one precision; the evaluation protocol only ever calls :meth:`Deployable.run` inside its
meter windows, so every runtime is timed and metered alike. Thread counts are set by the
same :class:`ThreadSettings` for every runtime (``torch.set_num_threads`` reaches no
other runtime) and recorded with each measurement.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass(frozen=True)
class ThreadSettings:
    """Threads one inference call may use: intra-op = the CPUs the worker holds, one
    inter-op thread (sequential execution), equal for every runtime."""

    intra_op: int
    inter_op: int = 1

    def __post_init__(self) -> None:
        if self.intra_op < 1 or self.inter_op < 1:
            raise ValueError(f"thread counts must be at least 1 (got intra_op={self.intra_op}, inter_op={self.inter_op})")


class Deployable(ABC):
    """A model prepared for one runtime, device and precision."""

    def __init__(self, *, runtime: str, runtime_version: str, precision: str, device: str, size_bytes: int,
                 threads: ThreadSettings, settings: Mapping[str, Any] | None = None) -> None:
        self.runtime, self.runtime_version = runtime, runtime_version
        self.precision, self.device = precision, device
        self.size_bytes = size_bytes  # what the deployable occupies on disk, as saved
        self.threads = threads
        self.settings = dict(settings or {})  # runtime options as applied (recorded, never guessed)

    @abstractmethod
    def run(self, images: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of *images* (on :attr:`device`), as a torch tensor there."""

    def describe(self) -> dict[str, Any]:
        """What a measurement records about how it ran."""
        return {"runtime": self.runtime, "runtime_version": self.runtime_version, "precision": self.precision,
                "device": self.device, "threads": asdict(self.threads), "settings": dict(self.settings)}


class Backend(ABC):
    """One runtime. Stateless: :meth:`prepare` does the work and returns a deployable."""

    name: str = ""

    @abstractmethod
    def version(self) -> str:
        """The runtime's version (recorded with every measurement, not part of keys)."""

    @abstractmethod
    def unsupported(self, device: str, precision: str) -> str | None:
        """Why this node cannot run *precision* on *device*, or None when it can."""

    @abstractmethod
    def prepare(self, model: nn.Module, manifest: Mapping[str, Any], *, precision: str, device: str,
                threads: ThreadSettings, example: torch.Tensor, cache_dir: Path | None) -> Deployable:
        """A deployable of *model* (the artifact's torch module, in eval mode, with its
        *manifest*); *example* is a batch of real inputs (for export and checks);
        *cache_dir* is where an exported or compiled form is kept, content-addressed by
        the caller (None: keep nothing)."""
