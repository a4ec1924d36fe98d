"""Execution backends: the runtimes an evaluation runs a model on.

A backend turns an artifact's model into a *deployable* (export or compile, cached),
reports the deployable's real on-disk size, runs a batch, and says what this node
supports. Each runtime is one module (``torch.py``, ...) plus one :class:`BackendSpec`
registered here: the one place runtimes are named. The spec, the planner and the reports
read these declarations (torch-free); only the worker imports an implementation.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from workers.backends.base import Backend


@dataclass(frozen=True)
class BackendSpec:
    """What the coordinator may know about a runtime without importing it."""

    name: str
    impl: str  # "module:Class", a workers.backends.base.Backend subclass, imported on the worker
    formats: tuple[str, ...]  # artifact formats it runs (see StageKind.artifact_format)
    precisions: tuple[str, ...]  # precisions it can run at (a node may support fewer)
    package: str  # the distribution to install when it is missing ("torch", "onnxruntime", ...)
    module: str  # the import that tells whether it is installed

    def load(self) -> Backend:
        module, _, cls = self.impl.partition(":")
        return getattr(importlib.import_module(module), cls)()

    def installed(self) -> bool:
        return importlib.util.find_spec(self.module) is not None


BACKENDS: dict[str, BackendSpec] = {}


def register_backend(spec: BackendSpec) -> BackendSpec:
    """Register (or replace) the runtime *spec*; returns it."""
    BACKENDS[spec.name] = spec
    return spec


def get_backend(name: str) -> BackendSpec:
    try:
        return BACKENDS[name]
    except KeyError:
        raise KeyError(f"unknown runtime {name!r}; known runtimes: {', '.join(BACKENDS)}") from None


register_backend(BackendSpec("torch", "workers.backends.torch:TorchBackend", formats=("torch",),
                             precisions=("fp32",), package="torch", module="torch"))
