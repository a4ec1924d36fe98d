"""Execution backends: the runtimes an evaluation runs a model on.

A backend turns an artifact's model into a *deployable* (export or compile, cached),
reports the deployable's real on-disk size, runs a batch, and says what this node
supports. Each runtime is one module (``torch.py``, ``onnxruntime.py``, ...) plus one
:class:`BackendSpec` registered here: the one place runtimes are named. The spec, the
planner and the reports read these declarations (torch-free); only the worker imports an
implementation.

A declaration says which artifact formats the runtime runs at which precisions
(``runs``: a ``torch`` model can be exported anywhere; an ``onnx`` model made by ONNX
Runtime quantization runs on ONNX Runtime only) and which precisions it supports per
device kind (``devices``): the planner pairs chains with runtimes from ``runs`` alone,
the run start checks ``devices`` and each node's own answer
(:meth:`~workers.backends.base.Backend.unsupported`) against the live nodes.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:
    from workers.backends.base import Backend

# "auto": the runtime's own choice (OpenVINO: bf16 on CPUs with AMX), recorded as chosen.
from workers.stages.registry import PRECISIONS  # noqa: E402  (the evaluate kind's parameter values)


@dataclass(frozen=True)
class BackendSpec:
    """What the coordinator may know about a runtime without importing it."""

    name: str
    impl: str  # "module:Class", a workers.backends.base.Backend subclass, imported on the worker
    package: str  # the distribution to install when it is missing ("onnxruntime", ...)
    module: str  # the import that tells whether it is installed
    runs: Mapping[str, tuple[str, ...]]  # artifact format -> the precisions it runs that format at
    devices: Mapping[str, tuple[str, ...]]  # device kind ("cpu", "cuda") -> the precisions it has there
    label: str = ""  # for people: "ONNX Runtime"
    # Distributions that provide the same module on some nodes (onnxruntime-gpu), by device kind.
    alternatives: Mapping[str, str] = field(default_factory=dict)
    # For people: the hardware a node needs for each precision not every node runs
    # ("bf16": "a CPU with AVX512-BF16 or AMX, ..."), named in the fix when none has it.
    hardware: Mapping[str, str] = field(default_factory=dict)

    def load(self) -> Backend:
        module, _, cls = self.impl.partition(":")
        return getattr(importlib.import_module(module), cls)()

    def installed(self) -> bool:
        return importlib.util.find_spec(self.module) is not None

    def install_hint(self, device_kind: str = "cpu") -> str:
        """The distribution a node of *device_kind* installs to get this runtime."""
        return self.alternatives.get(device_kind, self.package)

    def hardware_for(self, precision: str) -> str:
        """What a node needs to run this runtime at *precision*, for a message's fix."""
        return self.hardware.get(precision, f"a node that runs {self.name} at {precision}")

    def pairing(self, fmt: str | None, precision: str, device_kind: str | None = None) -> str | None:
        """Why this runtime cannot run a *fmt* artifact at *precision* (on *device_kind*
        when given; *fmt* None checks the device only), as one clause; None when it can."""
        if fmt is not None:
            if fmt not in self.runs:
                runners = ", ".join(name for name, b in BACKENDS.items() if fmt in b.runs) or "no runtime"
                return f"{_a(fmt)} model runs on {runners}, not on {self.name}"
            if precision not in self.runs[fmt]:
                return f"{self.name} runs {_a(fmt)} model at {', '.join(self.runs[fmt])}, not {precision}"
        if device_kind is not None and precision not in self.devices.get(device_kind, ()):
            have = ", ".join(self.devices.get(device_kind, ())) or "nothing"
            return f"{self.name} on {device_kind} runs {have}, not {precision}"
        return None


def _a(word: str) -> str:
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"


BACKENDS: dict[str, BackendSpec] = {}


def register_backend(spec: BackendSpec) -> BackendSpec:
    """Register (or replace) the runtime *spec*; returns it."""
    unknown = {p for precisions in (*spec.runs.values(), *spec.devices.values()) for p in precisions} - set(PRECISIONS)
    if unknown:
        raise ValueError(f"runtime {spec.name!r}: unknown precisions {sorted(unknown)}; use {', '.join(PRECISIONS)}")
    BACKENDS[spec.name] = spec
    return spec


def unregister_backend(name: str) -> None:
    """Forget *name* (tests that register a runtime of their own)."""
    BACKENDS.pop(name, None)


def get_backend(name: str) -> BackendSpec:
    try:
        return BACKENDS[name]
    except KeyError:
        raise KeyError(f"unknown runtime {name!r}; known runtimes: {', '.join(BACKENDS)}") from None


register_backend(BackendSpec(
    "torch", "workers.backends.torch:TorchBackend", package="torch", module="torch", label="PyTorch eager",
    runs={"torch": ("fp32", "bf16", "fp16"), "quanto": ("fp32",)},
    devices={"cpu": ("fp32", "bf16"), "cuda": ("fp32", "bf16", "fp16")},
    hardware={"bf16": "a CPU with AVX512-BF16 or AMX (e.g. Intel Sapphire Rapids, AMD Zen 4) or a "
                      "GPU with bf16 (NVIDIA Ampere or later)",
              "fp16": "a CUDA GPU"},
))
register_backend(BackendSpec(
    "onnxruntime", "workers.backends.onnxruntime:OnnxRuntimeBackend", package="onnxruntime",
    module="onnxruntime", label="ONNX Runtime", alternatives={"cuda": "onnxruntime-gpu"},
    runs={"torch": ("fp32", "fp16"), "onnx": ("fp32",)},
    devices={"cpu": ("fp32",), "cuda": ("fp32", "fp16")},
))
register_backend(BackendSpec(
    "openvino", "workers.backends.openvino:OpenVinoBackend", package="openvino", module="openvino",
    label="OpenVINO",
    runs={"torch": ("fp32", "bf16", "fp16", "auto"), "openvino": ("fp32", "auto")},
    # On an NVIDIA node OpenVINO runs on the node's CPU (the deployable says so).
    devices={"cpu": ("fp32", "bf16", "auto"), "cuda": ("fp32", "bf16", "auto")},
))
register_backend(BackendSpec(
    "tensorrt", "workers.backends.tensorrt:TensorRtBackend", package="tensorrt", module="tensorrt",
    label="TensorRT",
    # fp32 / fp16 engines from the torch model's ONNX form; int8 from explicit Q/DQ
    # (quantize: {engine: tensorrt}), run at the precision of its float parts.
    runs={"torch": ("fp32", "fp16"), "onnx-qdq": ("fp32",)},
    devices={"cuda": ("fp32", "fp16")},
    hardware={"fp32": "an NVIDIA GPU with TensorRT installed", "fp16": "an NVIDIA GPU with TensorRT installed"},
))
