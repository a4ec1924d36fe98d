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
from typing import TYPE_CHECKING, Any, Callable, Mapping

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
                 threads: ThreadSettings, settings: Mapping[str, Any] | None = None,
                 sparsity: Mapping[str, Any] | None = None, temporary: Path | None = None) -> None:
        self.runtime, self.runtime_version = runtime, runtime_version
        self.precision, self.device = precision, device
        self.size_bytes = size_bytes  # what the deployable occupies on disk, as saved
        self.threads = threads
        self.settings = dict(settings or {})  # runtime options as applied (recorded, never guessed)
        # What this runtime did with the artifact's n:m pattern (a workers.sparsity record:
        # materialized on sparse kernels or not, and why), from a runtime that can run it;
        # None: it runs whatever it got on dense kernels (the evaluation records that).
        self.sparsity = dict(sparsity) if sparsity is not None else None
        self._temporary = temporary  # a directory of exported files this deployable removes when closed

    @abstractmethod
    def run(self, images: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of *images* (on :attr:`device`), as a torch tensor there."""

    def close(self) -> None:
        """Release what the deployable holds (sessions, temporary files); idempotent.
        A subclass drops its runtime's handles, then calls this."""
        if self._temporary is not None:
            import shutil

            shutil.rmtree(self._temporary, ignore_errors=True)
            self._temporary = None

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

    def require(self, device: str, precision: str) -> None:
        """Raise ValueError with :meth:`unsupported`'s reason, if there is one."""
        reason = self.unsupported(device, precision)
        if reason is not None:
            raise ValueError(reason)

    @abstractmethod
    def prepare(self, model: nn.Module, manifest: Mapping[str, Any], *, precision: str, device: str,
                threads: ThreadSettings, example: torch.Tensor, cache_dir: Path | None,
                artifact_dir: Path | None = None) -> Deployable:
        """A deployable of *model* (the artifact's torch module, in eval mode, with its
        *manifest*); *example* is a batch of real inputs (for export and checks);
        *cache_dir* is where exported or compiled forms are kept, content-addressed
        (:mod:`workers.backends.cache`; None: a temporary directory the deployable removes
        when closed). An artifact whose manifest has a ``deploy`` payload of a format
        this runtime runs natively (a runtime-quantized model) is loaded from
        *artifact_dir* instead; *model* is then its float parent."""


@dataclass(frozen=True)
class ModelFiles:
    """Where a runtime's model files came from: the artifact's own payload, or an export
    (now, or earlier from the cache); *temporary*: a directory to remove on close."""

    files: tuple[Path, ...]
    source: str  # "quantized payload" | "exported now" | "exported earlier (cache)"
    temporary: Path | None = None


def model_files(manifest: Mapping[str, Any], *, fmt: str, material: Mapping[str, Any],
                export: Callable[[Path], Mapping[str, Any]], cache_dir: Path | None,
                artifact_dir: Path | None) -> ModelFiles:
    """The files a runtime loads: the artifact's *fmt* payload when it has one (a model
    the runtime's quantizer made), else *export*-ed from the torch model into the
    content-addressed cache (:mod:`workers.backends.cache`) keyed by *material*; *export*
    returns ``{"files": [names]}``. Without *cache_dir* the export goes to a temporary
    directory."""
    from workers.backends.cache import cached, entry_facts

    native = native_files(manifest, artifact_dir, fmt)
    if native is not None:
        return ModelFiles(tuple(native.values()), "quantized payload")
    cache_dir, temporary = cache_or_temporary(cache_dir, fmt)
    directory, built = cached(cache_dir, material, export)
    files = tuple(directory / name for name in entry_facts(directory)["files"])
    return ModelFiles(files, "exported now" if built else "exported earlier (cache)", temporary)


def cache_or_temporary(cache_dir: Path | None, what: str) -> tuple[Path, Path | None]:
    """Where to build a deployable: *cache_dir*, or without one a new temporary directory
    (returned second too, for the deployable to remove when closed)."""
    if cache_dir is not None:
        return cache_dir, None
    import tempfile

    temporary = Path(tempfile.mkdtemp(prefix=f"greensweep-{what}-"))
    return temporary, temporary


def native_files(manifest: Mapping[str, Any], artifact_dir: Path | None, fmt: str) -> dict[str, Path] | None:
    """The files of the artifact's ``deploy`` payload when it is of format *fmt* (a model a
    runtime's own quantizer made), each checked against its sha256; None when the
    artifact has no such payload. Raises ValueError naming a missing or changed file."""
    deploy = manifest.get("deploy")
    if not deploy or deploy.get("format") != fmt:
        return None
    if artifact_dir is None:
        raise ValueError(f"the {fmt} model of artifact {manifest.get('key')} has no directory to load it from")
    from workers.util import sha256_file

    files = {}
    for name, digest in dict(deploy["files"]).items():
        path = artifact_dir / name
        if not path.is_file() or sha256_file(path) != digest:
            raise ValueError(f"{path} is missing or fails its checksum -- delete {artifact_dir} and re-run the "
                             "stage that built it")
        files[name] = path
    return files


def agreement(reference: torch.Tensor, logits: torch.Tensor) -> dict[str, float]:
    """How *logits* agree with *reference* logits of the same batch: ``max_abs_diff``,
    ``max_abs_logit`` (of the reference) and ``top1_agreement`` (the fraction of samples
    whose arg-max class is the same)."""
    reference, logits = reference.detach().float().cpu(), logits.detach().float().cpu()
    return {
        "max_abs_diff": float((reference - logits).abs().max()),
        "max_abs_logit": float(reference.abs().max()),
        "top1_agreement": float((reference.argmax(dim=1) == logits.argmax(dim=1)).float().mean()),
    }


def exact_tolerance(max_abs_logit: float) -> float:
    """What an fp32 deployable may differ from torch fp32 by: ``1e-4 + 1e-3 * max |logit|``
    (kernel order and fused operations, not a different computation)."""
    return 1e-4 + 1e-3 * max_abs_logit


def check_exact(found: Mapping[str, float], what: str) -> None:
    """Raise ValueError, one line, unless *found* (:func:`agreement`) is within
    :func:`exact_tolerance` and agrees on every top-1: an fp32 deployable computes the
    same function as the torch model, or its figures are not comparable."""
    tolerance = exact_tolerance(found["max_abs_logit"])
    if found["max_abs_diff"] > tolerance or found["top1_agreement"] < 1.0:
        raise ValueError(
            f"{what} disagrees with the torch model on a fixed batch: max |logit difference| "
            f"{found['max_abs_diff']:.3g} (tolerance {tolerance:.3g}), top-1 agreement "
            f"{100 * found['top1_agreement']:.1f} % -- the export changed the model; evaluate it on another runtime"
        )
