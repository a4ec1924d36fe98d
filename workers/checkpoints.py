"""Epoch checkpoints of the training loop (:mod:`workers.training`).

After every epoch the loop's whole state -- weights, optimizer moments, the RNG states,
the best weights and the history -- is written under
``<artifact_root>/.checkpoints/<stage key>/epoch-NNNNN/``: a directory written aside,
then renamed, so the newest ``epoch-*`` directory is always complete. Only safetensors
and JSON are written (never pickle). A checkpoint is resumed only by the same stage
(:func:`fingerprint`: key, kind, parent, seed, params, layout version); any other, or
an unreadable one, is discarded and the stage starts afresh.

The stage deletes its checkpoints once its artifact is saved (:func:`discard_checkpoints`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import safetensors.torch
import torch
from torch import nn

from workers.types import EnergyReading, StageTask
from workers.util import fsync_dir, write_durably

__all__ = [
    "CHECKPOINTS_DIR",
    "CHECKPOINT_FORMAT",
    "CheckpointStore",
    "Progress",
    "checkpoint_dir",
    "cpu_copy",
    "discard_checkpoints",
    "fingerprint",
]

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = ".checkpoints"
# Version of the checkpoint layout; a checkpoint of another version is discarded, not read.
CHECKPOINT_FORMAT = 1
_MODEL_FILE = "model.safetensors"
_BEST_FILE = "best.safetensors"
_OPTIMIZER_FILE = "optimizer.safetensors"
_RNG_FILE = "rng.safetensors"
_STATE_FILE = "state.json"
_EPOCH_PREFIX = "epoch-"


@dataclass
class Progress:
    """The loop's state after ``epoch`` completed epochs (0: none)."""

    epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    best_val_top1: float = -1.0
    best_state: dict[str, torch.Tensor] | None = None
    energy: list[EnergyReading] = field(default_factory=list)



def cpu_copy(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Independent, contiguous CPU copies (safetensors refuses shared storage)."""
    return {name: t.detach().to("cpu", copy=True).contiguous() for name, t in state.items()}


def checkpoint_dir(task: StageTask) -> Path:
    """Where ``task``'s epoch checkpoints live: ``<artifact_root>/.checkpoints/<key>/``."""
    return Path(task.artifact_root) / CHECKPOINTS_DIR / task.key


def discard_checkpoints(task: StageTask) -> None:
    """Delete ``task``'s checkpoints; call once its artifact is saved."""
    shutil.rmtree(checkpoint_dir(task), ignore_errors=True)


def fingerprint(task: StageTask) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the same stage, the same layout."""
    return {
        "format": CHECKPOINT_FORMAT,
        "key": task.key,
        "kind": task.kind,
        "parent_key": task.parent_key,
        "seed": task.seed,
        "params": json.loads(json.dumps(dict(task.params), sort_keys=True, default=str)),
    }


class CheckpointStore:
    """One stage's epoch checkpoints: ``epoch-NNNNN/`` directories holding

    - ``model.safetensors`` -- the weights after the epoch;
    - ``best.safetensors`` -- the best epoch's weights (hard-linked from the previous
      checkpoint while the best does not change);
    - ``optimizer.safetensors`` -- every tensor of the optimizer state, flattened as
      ``state.<param index>.<name>``; the rest of the state (non-tensor values, the
      param groups) is in ``state.json``'s ``optimizer`` index;
    - ``rng.safetensors`` -- torch's CPU RNG, each CUDA device's, and the loop's
      shuffle/augmentation generator;
    - ``state.json`` -- the fingerprint, completed epochs, history, best epoch and
      accuracy, per-epoch energy readings, the optimizer index and, for fp16 training,
      the gradient scaler's state (its scale and growth tracker: plain numbers).

    A directory is written under a temporary name and renamed into place, so the newest
    ``epoch-*`` directory is always complete; older ones are removed after the rename.
    """

    def __init__(self, directory: Path, fingerprint: Mapping[str, Any]) -> None:
        self.directory = directory
        self.fingerprint = dict(fingerprint)
        self._last: Path | None = None
        self._last_best_epoch = 0

    def load(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator,
        scaler: torch.amp.GradScaler | None = None,
    ) -> Progress | None:
        """Restore the newest checkpoint into the arguments; None (and no change) when
        there is none, or when it belongs to another stage or layout (it is discarded)."""
        latest = self._latest()
        if latest is None:
            return None
        try:
            state = json.loads((latest / _STATE_FILE).read_text())
            if state.get("fingerprint") != self.fingerprint:
                log.warning("checkpoint %s belongs to another run of this key; starting afresh", latest)
                shutil.rmtree(self.directory, ignore_errors=True)
                return None
            weights = safetensors.torch.load_file(latest / _MODEL_FILE)
            best = safetensors.torch.load_file(latest / _BEST_FILE)
            optimizer_tensors = safetensors.torch.load_file(latest / _OPTIMIZER_FILE)
            rng = safetensors.torch.load_file(latest / _RNG_FILE)
        except (OSError, ValueError, KeyError, RuntimeError) as e:  # unreadable: safer to start again
            log.warning("checkpoint %s is unreadable (%s); starting afresh", latest, e)
            shutil.rmtree(self.directory, ignore_errors=True)
            return None

        model.load_state_dict(weights, strict=True)
        optimizer.load_state_dict(_unflatten_optimizer(optimizer_tensors, state["optimizer"], optimizer))
        torch.set_rng_state(rng["torch_cpu"])
        cuda_states = [rng[f"cuda.{i}"] for i in range(state["cuda_devices"])]
        if cuda_states and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda_states):
            torch.cuda.set_rng_state_all(cuda_states)
        generator.set_state(rng["generator"])
        if scaler is not None and state.get("grad_scaler"):
            scaler.load_state_dict(state["grad_scaler"])
        self._last, self._last_best_epoch = latest, int(state["best_epoch"])
        return Progress(
            epoch=int(state["epoch"]),
            history=list(state["history"]),
            best_epoch=int(state["best_epoch"]),
            best_val_top1=float(state["best_val_top1"]),
            best_state=best,
            energy=[EnergyReading(**reading) for reading in state["energy"]],
        )

    def save(
        self, progress: Progress, model: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator,
        scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        """Write the checkpoint of ``progress.epoch`` and drop the older ones."""
        assert progress.best_state is not None
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / f"{_EPOCH_PREFIX}{progress.epoch:05d}"
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.directory))
        try:
            _write_tensors(tmp / _MODEL_FILE, cpu_copy(model.state_dict()))
            if not self._link_previous_best(progress.best_epoch, tmp / _BEST_FILE):
                _write_tensors(tmp / _BEST_FILE, progress.best_state)
            optimizer_tensors, optimizer_index = _flatten_optimizer(optimizer.state_dict())
            _write_tensors(tmp / _OPTIMIZER_FILE, optimizer_tensors)
            cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
            rng = {"torch_cpu": torch.get_rng_state(), "generator": generator.get_state()}
            rng.update({f"cuda.{i}": s for i, s in enumerate(cuda_states)})
            _write_tensors(tmp / _RNG_FILE, rng)
            state = {
                "fingerprint": self.fingerprint,
                "epoch": progress.epoch,
                "history": progress.history,
                "best_epoch": progress.best_epoch,
                "best_val_top1": progress.best_val_top1,
                "energy": [reading.to_dict() for reading in progress.energy],
                "optimizer": optimizer_index,
                "cuda_devices": len(cuda_states),
                "grad_scaler": scaler.state_dict() if scaler is not None else None,
            }
            write_durably(tmp / _STATE_FILE, json.dumps(state, indent=1, sort_keys=True).encode())
            os.rename(tmp, final)
            fsync_dir(self.directory)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        for old in self.directory.glob(f"{_EPOCH_PREFIX}*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
        self._last, self._last_best_epoch = final, progress.best_epoch

    def _latest(self) -> Path | None:
        epochs = sorted(p for p in self.directory.glob(f"{_EPOCH_PREFIX}*") if p.is_dir())
        return epochs[-1] if epochs else None

    def _link_previous_best(self, best_epoch: int, target: Path) -> bool:
        """Hard-link the previous checkpoint's best weights when they are still the best."""
        if self._last is None or self._last_best_epoch != best_epoch:
            return False
        try:
            os.link(self._last / _BEST_FILE, target)
        except OSError:  # a file system without hard links: write a copy instead
            return False
        return True


def _flatten_optimizer(state_dict: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer state dict as (tensors for safetensors, a JSON-able index)."""
    tensors: dict[str, torch.Tensor] = {}
    index: dict[str, Any] = {}
    for param_id, param_state in state_dict["state"].items():
        entry: dict[str, Any] = {}
        for name, value in param_state.items():
            if isinstance(value, torch.Tensor):
                key = f"state.{param_id}.{name}"
                tensors[key] = value.detach().to("cpu", copy=True).contiguous()
                entry[name] = {"tensor": key}
            else:
                entry[name] = {"value": value}
        index[str(param_id)] = entry
    return tensors, {"state": index, "param_groups": list(state_dict["param_groups"])}


def _unflatten_optimizer(
    tensors: Mapping[str, torch.Tensor], index: Mapping[str, Any], optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """The state dict :func:`_flatten_optimizer` took apart; JSON lists become tuples again
    where the live optimizer holds tuples (AdamW's ``betas``)."""
    state = {
        int(param_id): {
            name: tensors[spec["tensor"]] if "tensor" in spec else spec["value"] for name, spec in entry.items()
        }
        for param_id, entry in index["state"].items()
    }
    template = optimizer.state_dict()["param_groups"]
    groups = [
        {k: tuple(v) if isinstance(v, list) and isinstance(live.get(k), tuple) else v for k, v in group.items()}
        for group, live in zip(index["param_groups"], template)
    ]
    return {"state": state, "param_groups": groups}


def _write_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    write_durably(path, safetensors.torch.save(dict(tensors)))

