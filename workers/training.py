"""The training loop shared by ``train``, ``finetune`` and ``distill``.

One loop, so the three stages differ only in their objective and where the model
comes from. Its rules, which the reference study's code got wrong and a product must
not:

- **Schedule, stepped once per epoch.** AdamW; epoch ``e`` (0-based) of ``E`` trains at
  :func:`lr_at_epoch`: ``warmup_epochs`` (W) linear warm-up epochs at ``lr * (e + 1) /
  (W + 1)``, then a cosine over the remaining ``E - W`` epochs, ``lr * (1 + cos(pi * (e -
  W) / (E - W))) / 2``. The horizon is the epochs that remain after warm-up, so the rate
  ends near zero at the last epoch whatever the batch count; with W = 0 this is the
  schedule the ``train`` stage always had. Per epoch (not per step) also makes the rate a
  function of the epoch alone, so a resumed run needs no scheduler state beyond it.
- **Selection on validation only.** After every epoch the model is scored on the
  validation split (carved from the training data by the sweep seed in
  :mod:`workers.data`); the best epoch's weights are the result (strictly better: ties
  keep the earlier epoch). ``patience`` stops after that many epochs without a new best.
  The test split is never looked at.
- **Seeded, and resumable bit for bit.** A fresh run seeds torch's global RNG (dropout,
  drop-path) and a CPU generator (shuffling, augmentation) from the sweep seed. After
  every epoch the whole state -- weights, optimizer moments, the RNG states, the best
  weights and the history -- is checkpointed under
  ``<artifact_root>/.checkpoints/<stage key>/epoch-NNNNN/``, atomically (a directory
  written aside, then renamed), in safetensors and JSON only (never pickle). A stage run
  again after a kill resumes after its last completed epoch and, on the same device and
  thread count, ends with the same weights as a run that was never interrupted.
  The stage deletes the checkpoints once its artifact is saved
  (:func:`discard_checkpoints`).
- **Gradient accumulation**: ``accumulate_steps`` micro-batches of ``batch_size`` form
  one optimizer step; each micro-batch's mean loss is weighted by its share of the
  step's samples, so the gradient equals that of one batch of all of them (a short last
  step included).
- **bf16 autocast** on CUDA when ``amp`` is on (no loss scaling is needed for bf16);
  elsewhere ``amp`` has no effect, so CPU results stay exact.
- **Augmentation** (``flip-crop``: random horizontal flip, then a random crop of the
  image zero-padded by 1/8 of its side -- zero is the normalized mean) runs on the
  native-resolution batch before it is resized to the model's input.
- Data stays at the dataset's resolution in memory; each batch is resized and converted
  to the model's ``input_shape`` on the device (:func:`workers.data.adapt_images`).

Progress: after each epoch is checkpointed, ``env.report_progress`` (when set) receives::

    {"stage_key": str, "kind": str, "epoch": int (1-based), "epochs": int (planned),
     "lr": float, "train_loss": float, "val_top1": float (fraction), "epoch_s": float,
     "energy_j": float | None, "best_epoch": int, "best_val_top1": float}

The same per-epoch figures (``epoch``, ``lr``, ``train_loss``, ``val_top1``,
``epoch_s``, ``energy_j``) make up the stage metrics' ``history``. ``epoch_s`` and
``energy_j`` cover training and validation of the epoch (one meter window), not
checkpointing.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Protocol, Sequence

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from workers.data import Splits, adapt_images, load_dataset
from workers.meters import make_meter
from workers.stages.registry import LoopParams
from workers.types import ArtifactInfo, EnergyReading, ModelRef, StageOutput, StageTask, WorkerEnv

if TYPE_CHECKING:
    from workers.models import ParentModel

__all__ = [
    "CHECKPOINTS_DIR",
    "CrossEntropy",
    "FitResult",
    "Objective",
    "Student",
    "check_model_takes",
    "checkpoint_dir",
    "discard_checkpoints",
    "fit",
    "flip_crop",
    "keep_zero_masks",
    "load_student",
    "lr_at_epoch",
    "model_input_shape",
    "predict_logits",
    "retrain_student",
    "sum_readings",
    "top1",
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
# Layers whose weights unstructured pruning zeroes (as workers.stages.prune).
_MASKABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# When epochs with different meters are summed, a domain's source is the least precise one.
_SOURCE_PRECISION = {"nvml-counter": 0, "rapl": 0, "nvml-power": 1, "estimate-tdp": 2, "none": 3}


class Objective(Protocol):
    """A training loss: the mean over one micro-batch.

    ``logits`` are the model's outputs for the batch, ``labels`` its labels,
    ``indices`` the samples' positions in the training split (on the CPU; for caches
    keyed by sample) and ``images`` the batch at the dataset's resolution after
    augmentation, on the device (for a teacher that needs its own input shape).
    """

    def __call__(
        self, logits: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, images: torch.Tensor
    ) -> torch.Tensor: ...


class CrossEntropy:
    """Cross-entropy with optional label smoothing, computed in float32."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        self.label_smoothing = label_smoothing

    def __call__(
        self, logits: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, images: torch.Tensor
    ) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)


# --------------------------------------------------------------------------- schedule, shapes


def lr_at_epoch(epoch: int, *, base_lr: float, epochs: int, warmup_epochs: int = 0) -> float:
    """The learning rate of 0-based ``epoch`` (see the module docstring for the formula)."""
    if not 0 <= warmup_epochs < epochs or not 0 <= epoch < epochs:
        raise ValueError(
            f"need 0 <= warmup_epochs < epochs and 0 <= epoch < epochs, got {warmup_epochs}, {epochs}, {epoch}"
        )
    if epoch < warmup_epochs:
        return base_lr * (epoch + 1) / (warmup_epochs + 1)
    return base_lr * (1 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs))) / 2


def model_input_shape(ref: ModelRef, data_shape: Sequence[int]) -> tuple[int, int, int]:
    """The (C, H, W) to feed ``ref``'s model when the data is ``data_shape``.

    Channels: ``in_chans`` from the kwargs, else the architecture's default. Size:
    ``img_size`` from the kwargs; else the architecture's default when it only takes a
    fixed size (timm's ``fixed_input_size``, e.g. ViTs without ``dynamic_img_size``);
    else the data's own size (a CNN runs at any size, and upsampling would only cost).
    """
    import timm

    cfg = timm.get_pretrained_cfg(ref.arch, allow_unregistered=True)
    default = tuple(cfg.input_size) if cfg is not None and cfg.input_size else (3, 224, 224)
    fixed = bool(cfg is not None and cfg.fixed_input_size) and not ref.kwargs.get("dynamic_img_size", False)
    channels = int(ref.kwargs.get("in_chans", default[0]))
    size = ref.kwargs.get("img_size")
    if size is not None:
        height, width = (int(size), int(size)) if isinstance(size, (int, float)) else (int(s) for s in size)
    elif fixed:
        height, width = int(default[1]), int(default[2])
    else:
        height, width = int(data_shape[1]), int(data_shape[2])
    return channels, height, width


def check_model_takes(model: nn.Module, input_shape: Sequence[int], *, what: str) -> None:
    """Fail before any training, with a one-line fix, when ``model`` cannot run on
    ``input_shape`` inputs (one zero sample is pushed through on the model's device)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), device=device))
    except (RuntimeError, AssertionError, ValueError) as e:
        from workers.models import first_line

        raise ValueError(
            f"{what} cannot take inputs of shape {tuple(input_shape)} ({first_line(e)}); "
            "set the model's in_chans / img_size kwargs to the shape it was built for"
        ) from e
    finally:
        model.train(was_training)


def keep_zero_masks(model: nn.Module, chain: Sequence[Mapping[str, Any]]) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """For a model whose compression chain has an unstructured prune: each masked weight
    with its keep-mask (True where the weight is non-zero), so retraining can keep the
    pruned weights at zero. Retraining without them would silently re-densify a model
    whose artifact still claims its sparsity. Empty when nothing was pruned that way."""
    if not any(step.get("kind") == "prune" and step.get("method") == "unstructured" for step in chain):
        return []
    masks = []
    for module in model.modules():
        if isinstance(module, _MASKABLE) and isinstance(module.weight, nn.Parameter):
            keep = module.weight.detach() != 0
            if not bool(keep.all()):
                masks.append((module.weight, keep))
    return masks


def flip_crop(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip, then a random crop of the zero-padded image (pad = side / 8,
    at least 1 px), per sample. Draws from ``generator`` (CPU), applies on ``images``' device."""
    count, _, height, width = images.shape
    pad_h, pad_w = max(1, height // 8), max(1, width // 8)
    flip = torch.rand(count, generator=generator) < 0.5
    dy = torch.randint(0, 2 * pad_h + 1, (count,), generator=generator)
    dx = torch.randint(0, 2 * pad_w + 1, (count,), generator=generator)
    device = images.device
    flipped = torch.where(flip.to(device).view(count, 1, 1, 1), images.flip(3), images)
    padded = F.pad(flipped, (pad_w, pad_w, pad_h, pad_h))
    rows = (dy.view(count, 1) + torch.arange(height)).to(device)
    cols = (dx.view(count, 1) + torch.arange(width)).to(device)
    batch = torch.arange(count, device=device).view(count, 1, 1)
    # advanced indices around a slice: the result is (N, H, W, C)
    return padded[batch, :, rows.view(count, height, 1), cols.view(count, 1, width)].permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------- evaluation helpers


def predict_logits(
    model: nn.Module,
    images: torch.Tensor,
    *,
    input_shape: Sequence[int],
    batch_size: int,
    device: torch.device,
    amp: bool,
) -> torch.Tensor:
    """``model``'s float32 logits for ``images`` (adapted per batch to ``input_shape``),
    on ``device``, in eval mode and without gradients."""
    model.eval()
    outputs = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = adapt_images(images[start : start + batch_size].to(device), input_shape)
            with _autocast(device, amp):
                outputs.append(model(batch).float())
    return torch.cat(outputs)


def top1(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    input_shape: Sequence[int],
    batch_size: int,
    device: torch.device,
    amp: bool,
) -> float:
    """Top-1 accuracy (a fraction in [0, 1]) of ``model`` on in-memory images."""
    logits = predict_logits(model, images, input_shape=input_shape, batch_size=batch_size, device=device, amp=amp)
    return int((logits.argmax(dim=1) == labels.to(device)).sum()) / len(labels)


def sum_readings(readings: Sequence[EnergyReading]) -> EnergyReading | None:
    """Several meter windows as one reading: durations and energies add up (a domain is
    None when any window lacks it), each domain keeps its least precise source, and the
    idle power is the first window's. None for no windows."""
    if not readings:
        return None
    first = readings[0]
    totals: dict[str, Any] = {}
    for domain in ("gpu", "cpu", "dram"):
        values = [getattr(r, f"{domain}_energy_j") for r in readings]
        total = None if any(v is None for v in values) else sum(values)
        sources = [getattr(r, f"{domain}_source") for r in readings]
        totals[f"{domain}_energy_j"] = total
        totals[f"{domain}_source"] = "none" if total is None else max(sources, key=_SOURCE_PRECISION.__getitem__)
        totals[f"{domain}_idle_power_w"] = getattr(first, f"{domain}_idle_power_w")
    return EnergyReading(duration_s=sum(r.duration_s for r in readings), **totals)


# --------------------------------------------------------------------------- the loop


@dataclass(frozen=True)
class FitResult:
    """What :func:`fit` hands back. ``best_state`` holds CPU tensors; ``epoch_energy``
    has one reading per completed epoch, those of an interrupted earlier run included."""

    best_state: dict[str, torch.Tensor]
    best_epoch: int  # 1-based
    best_val_top1: float
    history: list[dict[str, Any]]
    epoch_energy: list[EnergyReading]
    epochs: int  # planned
    resumed_from_epoch: int  # 0: started fresh

    @property
    def stopped_early(self) -> bool:
        return len(self.history) < self.epochs

    def metrics(self) -> dict[str, Any]:
        """The stage metrics every retraining stage reports."""
        return {
            "epochs": self.epochs,
            "epochs_run": len(self.history),
            "stopped_early": self.stopped_early,
            "resumed_from_epoch": self.resumed_from_epoch,
            "best_epoch": self.best_epoch,
            "best_val_top1": self.best_val_top1,
            "history": self.history,
        }


@dataclass
class _Progress:
    """The loop's state after ``epoch`` completed epochs (0: none)."""

    epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    best_val_top1: float = -1.0
    best_state: dict[str, torch.Tensor] | None = None
    energy: list[EnergyReading] = field(default_factory=list)


def fit(
    model: nn.Module,
    splits: Splits,
    params: LoopParams,
    *,
    objective: Objective,
    input_shape: Sequence[int],
    task: StageTask,
    env: WorkerEnv,
    keep_masks: Sequence[tuple[nn.Parameter, torch.Tensor]] = (),
) -> FitResult:
    """Train ``model`` (moved to ``env.device``) on ``splits.train`` and return the best
    validation epoch's weights with the history.

    Resumes from ``task``'s checkpoint when one of the same stage exists (see the
    module docstring). ``keep_masks`` (from :func:`keep_zero_masks`) are re-applied
    after every optimizer step. ``model`` ends in the state of the last epoch run;
    load ``best_state`` into it for the result.
    """
    device = torch.device(env.device)
    amp = params.amp and device.type == "cuda"
    model.to(device)
    keep_masks = [(param, keep.to(device)) for param, keep in keep_masks]
    optimizer = torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    generator = torch.Generator()
    store = _CheckpointStore(checkpoint_dir(task), _fingerprint(task))
    progress = store.load(model, optimizer, generator)
    resumed_from = progress.epoch if progress is not None else 0
    if progress is None:
        progress = _Progress()
        torch.manual_seed(task.seed)  # every device's generator
        generator.manual_seed(task.seed)

    train_images, train_labels = splits.train.tensors
    val_images, val_labels = splits.val.tensors
    meter = make_meter(env.device)
    for epoch in range(progress.epoch + 1, params.epochs + 1):
        if params.patience is not None and progress.epoch - progress.best_epoch >= params.patience:
            break
        lr = lr_at_epoch(epoch - 1, base_lr=params.lr, epochs=params.epochs, warmup_epochs=params.warmup_epochs)
        for group in optimizer.param_groups:
            group["lr"] = lr
        meter.begin()
        train_loss = _train_one_epoch(
            model, train_images, train_labels, params, objective, optimizer, generator,
            input_shape=input_shape, device=device, amp=amp, keep_masks=keep_masks,
        )
        val_top1 = top1(
            model, val_images, val_labels, input_shape=input_shape, batch_size=params.batch_size, device=device, amp=amp
        )
        reading = meter.end()

        if val_top1 > progress.best_val_top1:
            progress.best_val_top1, progress.best_epoch = val_top1, epoch
            progress.best_state = _cpu_copy(model.state_dict())
        progress.epoch = epoch
        progress.energy.append(reading)
        progress.history.append(
            {
                "epoch": epoch,
                "lr": lr,
                "train_loss": train_loss,
                "val_top1": val_top1,
                "epoch_s": reading.duration_s,
                "energy_j": reading.total_energy_j,
            }
        )
        store.save(progress, model, optimizer, generator)
        if env.report_progress is not None:
            env.report_progress(
                {
                    "stage_key": task.key,
                    "kind": task.kind,
                    **progress.history[-1],
                    "epochs": params.epochs,
                    "best_epoch": progress.best_epoch,
                    "best_val_top1": progress.best_val_top1,
                }
            )

    assert progress.best_state is not None  # at least one epoch ran: params.epochs >= 1
    return FitResult(
        best_state=progress.best_state,
        best_epoch=progress.best_epoch,
        best_val_top1=progress.best_val_top1,
        history=progress.history,
        epoch_energy=progress.energy,
        epochs=params.epochs,
        resumed_from_epoch=resumed_from,
    )


def _train_one_epoch(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    params: LoopParams,
    objective: Objective,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    *,
    input_shape: Sequence[int],
    device: torch.device,
    amp: bool,
    keep_masks: Sequence[tuple[nn.Parameter, torch.Tensor]],
) -> float:
    """One shuffled pass; returns the sample-weighted mean training loss."""
    model.train()
    micro_batches = torch.randperm(len(labels), generator=generator).split(params.batch_size)
    loss_sum = torch.zeros((), device=device)
    for start in range(0, len(micro_batches), params.accumulate_steps):
        step = micro_batches[start : start + params.accumulate_steps]
        step_samples = sum(len(idx) for idx in step)
        optimizer.zero_grad(set_to_none=True)
        for idx in step:
            batch = images[idx].to(device)
            batch_labels = labels[idx].to(device)
            if params.augment == "flip-crop":
                batch = flip_crop(batch, generator)
            with _autocast(device, amp):
                logits = model(adapt_images(batch, input_shape))
            loss = objective(logits, batch_labels, idx, batch)
            (loss * (len(idx) / step_samples)).backward()
            loss_sum += loss.detach() * len(idx)
        optimizer.step()
        if keep_masks:
            with torch.no_grad():
                for param, keep in keep_masks:
                    param.mul_(keep)
    return float(loss_sum) / len(labels)


def _autocast(device: torch.device, amp: bool) -> torch.autocast:
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp)


def _cpu_copy(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Independent, contiguous CPU copies (safetensors refuses shared storage)."""
    return {name: t.detach().to("cpu", copy=True).contiguous() for name, t in state.items()}


# --------------------------------------------------------------------------- checkpoints


def checkpoint_dir(task: StageTask) -> Path:
    """Where ``task``'s epoch checkpoints live: ``<artifact_root>/.checkpoints/<key>/``."""
    return Path(task.artifact_root) / CHECKPOINTS_DIR / task.key


def discard_checkpoints(task: StageTask) -> None:
    """Delete ``task``'s checkpoints; call once its artifact is saved."""
    shutil.rmtree(checkpoint_dir(task), ignore_errors=True)


def _fingerprint(task: StageTask) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the same stage, the same layout."""
    return {
        "format": CHECKPOINT_FORMAT,
        "key": task.key,
        "kind": task.kind,
        "parent_key": task.parent_key,
        "seed": task.seed,
        "params": json.loads(json.dumps(dict(task.params), sort_keys=True, default=str)),
    }


class _CheckpointStore:
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
      accuracy, per-epoch energy readings, the optimizer index.

    A directory is written under a temporary name and renamed into place, so the newest
    ``epoch-*`` directory is always complete; older ones are removed after the rename.
    """

    def __init__(self, directory: Path, fingerprint: Mapping[str, Any]) -> None:
        self.directory = directory
        self.fingerprint = dict(fingerprint)
        self._last: Path | None = None
        self._last_best_epoch = 0

    def load(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator
    ) -> _Progress | None:
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
        self._last, self._last_best_epoch = latest, int(state["best_epoch"])
        return _Progress(
            epoch=int(state["epoch"]),
            history=list(state["history"]),
            best_epoch=int(state["best_epoch"]),
            best_val_top1=float(state["best_val_top1"]),
            best_state=best,
            energy=[EnergyReading(**reading) for reading in state["energy"]],
        )

    def save(
        self, progress: _Progress, model: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator
    ) -> None:
        """Write the checkpoint of ``progress.epoch`` and drop the older ones."""
        assert progress.best_state is not None
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / f"{_EPOCH_PREFIX}{progress.epoch:05d}"
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.directory))
        try:
            _write_tensors(tmp / _MODEL_FILE, _cpu_copy(model.state_dict()))
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
            }
            _write_durably(tmp / _STATE_FILE, json.dumps(state, indent=1, sort_keys=True).encode())
            os.rename(tmp, final)
            _fsync_dir(self.directory)
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
    _write_durably(path, safetensors.torch.save(dict(tensors)))


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- retraining a parent


@dataclass(frozen=True)
class Student:
    """A parent model prepared for retraining (``finetune``, ``distill``)."""

    parent: "ParentModel"
    splits: Splits
    keep_masks: list[tuple[nn.Parameter, torch.Tensor]]


def load_student(task: StageTask, params: LoopParams) -> Student:
    """The parent of ``task`` and the dataset it is retrained on.

    The dataset is kept at its own resolution (the loop adapts batches to the parent's
    recorded input shape). Raises ``ValueError`` when the parent's class count differs
    from the dataset's.
    """
    from workers.models import load_parent

    parent = load_parent(task)
    splits = load_dataset(task.dataset, seed=task.seed, val_fraction=params.val_fraction)
    if parent.num_classes < splits.num_classes:
        raise ValueError(
            f"the model has {parent.num_classes} classes but dataset {splits.name!r} has {splits.num_classes}; "
            "retrain on the dataset the model was built for"
        )
    return Student(parent, splits, keep_zero_masks(parent.model, parent.chain))


def retrain_student(
    task: StageTask,
    env: WorkerEnv,
    params: LoopParams,
    student: Student,
    objective: Objective,
    *,
    setup_energy: Sequence[EnergyReading] = (),
    extra_metrics: Mapping[str, Any] | None = None,
) -> StageOutput:
    """Run :func:`fit` on ``student`` and save the best epoch as artifact ``task.key``.

    The artifact keeps the parent's structure and ``materialized`` flag, and its chain
    gains this stage. Metrics: those of :meth:`FitResult.metrics`, the parent's
    validation top-1 before retraining (``initial_val_top1``), and ``extra_metrics``.
    The energy is that of ``setup_energy`` (work the stage measured before the loop,
    e.g. caching teacher logits) plus every epoch's.
    """
    from workers.models import save_child

    model, shape = student.parent.model, student.parent.input_shape
    device = torch.device(env.device)
    model.to(device)
    val_images, val_labels = student.splits.val.tensors
    initial_val_top1 = top1(
        model, val_images, val_labels, input_shape=shape, batch_size=params.batch_size, device=device,
        amp=params.amp and device.type == "cuda",
    )
    result = fit(
        model, student.splits, params, objective=objective, input_shape=shape, task=task, env=env,
        keep_masks=student.keep_masks,
    )
    model.load_state_dict(result.best_state)
    model.to("cpu").eval()
    artifact: ArtifactInfo = save_child(
        model, task, student.parent, params.model_dump(mode="json"), materialized=student.parent.materialized
    )
    discard_checkpoints(task)
    return StageOutput(
        metrics={**result.metrics(), "initial_val_top1": initial_val_top1, **(extra_metrics or {})},
        artifact=artifact,
        energy=sum_readings([*setup_energy, *result.epoch_energy]),
    )
