"""Facts about the node a stage ran on, read from the node itself.

The cluster file says what a node type *should* be; these facts say what it *was*, and
every stage result carries them, so a cross-hardware comparison can be checked against
the machine that produced it. Collecting them must never fail a stage: a fact that
cannot be read is ``None``.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import socket
from typing import Any, Callable, TypeVar

_T = TypeVar("_T")


def describe_node() -> dict[str, Any]:
    """Return a JSON-able description of this node; quick, and never raises.

    Keys: ``hostname``, ``cpu_model``, ``cpu_count_logical``, ``memory_total_bytes``,
    ``os``, ``machine`` (architecture), ``python``, ``torch``, ``timm``, ``cuda`` (the
    CUDA version torch was built with) and ``gpus``: a list of ``{"index", "name",
    "memory_total_bytes"}``, empty when CUDA is unavailable; ``cpu_flags``: the ISA
    extensions that decide low-precision speed (:data:`SPEED_FLAGS` the CPU has);
    ``runtimes``: each registered runtime's installed version (None: not installed). Any
    fact that cannot be read is ``None``.
    """
    return {
        "hostname": _fact(socket.gethostname),
        "cpu_model": _fact(cpu_model),
        "cpu_count_logical": _fact(os.cpu_count),
        "memory_total_bytes": _fact(_memory_total_bytes),
        "os": _fact(platform.platform),
        "machine": _fact(platform.machine),
        "python": _fact(platform.python_version),
        "torch": _fact(lambda: importlib.metadata.version("torch")),
        "timm": _fact(lambda: importlib.metadata.version("timm")),
        "cuda": _fact(_cuda_version),
        "gpus": _fact(_gpus),
        "cpu_flags": _fact(lambda: sorted(cpu_flags() & SPEED_FLAGS)),
        "runtimes": _fact(runtime_versions),
    }


# ISA extensions that change which precision is fast on a CPU: int8 dot products (VNNI),
# bf16 (AVX512-BF16, AMX), fp16 (AVX512-FP16, AMX-FP16).
SPEED_FLAGS = frozenset({"avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16",
                         "amx_tile", "amx_bf16", "amx_int8", "amx_fp16"})


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo lists them (empty where it cannot be read)."""
    try:
        with open(cpuinfo, encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def runtime_precisions(device: str) -> dict[str, dict[str, str | None]]:
    """For each installed runtime, each precision it declares for *device*'s kind, and why
    this node cannot run it (None: it can) -- the backend's own check (CPU features,
    OpenVINO's capabilities, CUDA providers), so a sweep that asks for a precision a node
    lacks stops before anything runs. A runtime that fails to load gives its error for
    every precision."""
    from workers.backends import BACKENDS

    kind = "cuda" if device.startswith("cuda") else "cpu"
    out: dict[str, dict[str, str | None]] = {}
    for name, spec in BACKENDS.items():
        if not spec.installed():
            continue
        try:
            backend = spec.load()
            out[name] = {p: backend.unsupported(device, p) for p in spec.devices.get(kind, ())}
        except Exception as e:  # a broken install costs that runtime only
            from workers.util import first_line

            out[name] = {p: f"{name} does not load: {first_line(e, limit=200)}" for p in spec.devices.get(kind, ())}
    return out


def runtime_versions() -> dict[str, str | None]:
    """Each registered runtime's installed version, without importing it (None: absent)."""
    from workers.backends import BACKENDS

    out: dict[str, str | None] = {}
    for name, spec in BACKENDS.items():
        version = None
        for dist in (spec.package, *spec.alternatives.values()):
            try:
                version = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
        out[name] = version
    return out


def _fact(read: Callable[[], _T]) -> _T | None:
    """``read()``, or None when it fails or yields nothing.

    The broad catch is the point: a missing or odd fact (no /proc, no driver, a broken
    CUDA install) must cost only that fact, never the stage.
    """
    try:
        value = read()
    except Exception:
        return None
    return value if value not in ("", None) else None


def cpu_model() -> str | None:
    """The CPU's model name from /proc/cpuinfo (else ``platform.processor()``), or None."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    return value.strip() or None
    except OSError:
        pass
    return platform.processor() or None


def cpu_facts() -> dict[str, object]:
    """What a benchmark records of the CPU it ran on: model, the speed-relevant flags
    (:data:`SPEED_FLAGS`), logical CPUs and the Python version."""
    return {"model": cpu_model(), "flags": sorted(cpu_flags() & SPEED_FLAGS), "logical_cpus": os.cpu_count(),
            "python": platform.python_version()}


def _memory_total_bytes() -> int:
    try:
        with open("/proc/meminfo", encoding="utf-8") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024  # the file says kB and means KiB
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _cuda_version() -> str | None:
    import torch

    return torch.version.cuda


def _gpus() -> list[dict[str, Any]]:
    import torch

    if not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        gpus.append({"index": index, "name": props.name, "memory_total_bytes": int(props.total_memory)})
    return gpus
