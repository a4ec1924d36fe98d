"""The training loop shared by ``train``, ``finetune``, ``distill`` and ``qat``.

One loop, so the stages differ only in their objective and where the model comes from.
Its rules, which the reference study's code got wrong and a product must not:

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
  (:func:`workers.checkpoints.discard_checkpoints`; the layout is documented there).
- **Gradient accumulation**: ``accumulate_steps`` micro-batches of ``batch_size`` form
  one optimizer step; each micro-batch's mean loss is weighted by its share of the
  step's samples, so the gradient equals that of one batch of all of them (a short last
  step included).
- **Mixed precision** (``precision``, :func:`loop_autocast`): the forward passes of
  training and validation run under ``torch.autocast`` -- ``bf16`` on the CPU or CUDA,
  ``fp16`` on CUDA only, with a ``torch.amp.GradScaler`` scaling the loss (its state is
  checkpointed, so a resumed run scales as an unbroken one) -- while the weights, their
  gradients and the optimizer state stay fp32. At ``precision: fp32``, ``amp`` keeps its
  meaning: bf16 autocast on CUDA (no loss scaling is needed for bf16), no effect
  elsewhere, so CPU results stay exact. The precision used is in the metrics.
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

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from workers.checkpoints import CheckpointStore, Progress, checkpoint_dir, cpu_copy, discard_checkpoints, fingerprint
from workers.data import Splits, adapt_images, load_dataset
from workers.meters import make_meter
from workers.models import model_input_shape  # re-exported: the one rule for the input shape
from workers.stages.noop import hold_for_test
from workers.stages.registry import LoopParams
from workers.types import ArtifactInfo, EnergyReading, StageOutput, StageTask, WorkerEnv

if TYPE_CHECKING:
    from workers.modelio import ParentModel

__all__ = [
    "Autocast",
    "CrossEntropy",
    "FitResult",
    "Objective",
    "Student",
    "check_model_takes",
    "fit",
    "flip_crop",
    "keep_zero_masks",
    "load_student",
    "loop_autocast",
    "lr_at_epoch",
    "model_input_shape",
    "predict_logits",
    "retrain_student",
    "sum_readings",
    "top1",
]

log = logging.getLogger(__name__)

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
    """For a model whose compression chain has a stage whose zeros are its compression
    (its kind declares ``keeps_zeros``, e.g. an unstructured prune): each masked weight
    with its keep-mask (True where the weight is non-zero), so retraining can keep the
    pruned weights at zero. Retraining without them would silently re-densify a model
    whose artifact still claims its sparsity. Empty when nothing was pruned that way."""
    from workers.stages.registry import find_kind

    if not any(kind.keeps_zeros(step) for step in chain if (kind := find_kind(step.get("kind"))) is not None):
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


# --------------------------------------------------------------------------- mixed precision


_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Autocast:
    """The precision of the loop's forward passes on one device type: ``dtype`` None is
    plain fp32. Weights, gradients and optimizer state are fp32 whatever it is; fp16 also
    scales the loss (:attr:`grad_scaling`), since its gradients underflow otherwise."""

    device_type: str
    dtype: torch.dtype | None = None

    @property
    def precision(self) -> str:
        """``fp32``, ``bf16`` or ``fp16``: what the forward passes ran at."""
        return next((name for name, dtype in _AUTOCAST_DTYPES.items() if dtype == self.dtype), "fp32")

    @property
    def grad_scaling(self) -> bool:
        return self.dtype == torch.float16

    def __call__(self) -> torch.autocast:
        return torch.autocast(device_type=self.device_type, dtype=self.dtype or torch.bfloat16,
                              enabled=self.dtype is not None)

    def describe(self) -> dict[str, Any]:
        """For the stage metrics: the precision used and how (``autocast`` None: none)."""
        autocast = None if self.dtype is None else {
            "device_type": self.device_type, "dtype": str(self.dtype).removeprefix("torch."),
            "grad_scaling": self.grad_scaling,
        }
        return {"precision": self.precision, "autocast": autocast}


def loop_autocast(params: LoopParams, device: torch.device) -> Autocast:
    """The autocast of a loop with *params* on *device*: ``precision`` bf16 or fp16 as
    asked; at fp32, bf16 on CUDA when ``amp`` is on, else none.

    Raises ValueError for fp16 on a device that is not CUDA (placement and the run start
    keep such a stage off CPU-only nodes, so this is the last guard, not the check)."""
    if params.precision == "fp16" and device.type != "cuda":
        raise ValueError(f"precision fp16 trains on CUDA GPUs only (this stage runs on {device}) -- "
                         "use precision: bf16 or fp32, or run it on a GPU node")
    if params.precision != "fp32":
        return Autocast(device.type, _AUTOCAST_DTYPES[params.precision])
    return Autocast(device.type, torch.bfloat16 if params.amp and device.type == "cuda" else None)


def _grad_scaler(autocast: Autocast) -> torch.amp.GradScaler | None:
    return torch.amp.GradScaler(autocast.device_type) if autocast.grad_scaling else None


# --------------------------------------------------------------------------- evaluation helpers


def predict_logits(
    model: nn.Module,
    images: torch.Tensor,
    *,
    input_shape: Sequence[int],
    batch_size: int,
    device: torch.device,
    autocast: Autocast | None = None,
) -> torch.Tensor:
    """``model``'s float32 logits for ``images`` (adapted per batch to ``input_shape``),
    on ``device``, in eval mode and without gradients, under ``autocast`` (None: fp32)."""
    autocast = autocast or Autocast(device.type)
    model.eval()
    outputs = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = adapt_images(images[start : start + batch_size].to(device), input_shape)
            with autocast():
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
    autocast: Autocast | None = None,
) -> float:
    """Top-1 accuracy (a fraction in [0, 1]) of ``model`` on in-memory images."""
    logits = predict_logits(model, images, input_shape=input_shape, batch_size=batch_size, device=device,
                            autocast=autocast)
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
    autocast: Autocast  # the precision the forward passes ran at

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
            **self.autocast.describe(),
        }


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
    autocast = loop_autocast(params, device)
    model.to(device)
    keep_masks = [(param, keep.to(device)) for param, keep in keep_masks]
    optimizer = torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    scaler = _grad_scaler(autocast)
    generator = torch.Generator()
    store = CheckpointStore(checkpoint_dir(task), fingerprint(task))
    progress = store.load(model, optimizer, generator, scaler)
    resumed_from = progress.epoch if progress is not None else 0
    if progress is None:
        progress = Progress()
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
            input_shape=input_shape, device=device, autocast=autocast, scaler=scaler, keep_masks=keep_masks,
        )
        val_top1 = top1(
            model, val_images, val_labels, input_shape=input_shape, batch_size=params.batch_size, device=device,
            autocast=autocast,
        )
        reading = meter.end()

        if val_top1 > progress.best_val_top1:
            progress.best_val_top1, progress.best_epoch = val_top1, epoch
            progress.best_state = cpu_copy(model.state_dict())
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
        store.save(progress, model, optimizer, generator, scaler)
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
        hold_for_test(task.kind)  # tests only: waits while $GREENSWEEP_TEST_HOLD_DIR/<kind> exists

    assert progress.best_state is not None  # at least one epoch ran: params.epochs >= 1
    return FitResult(
        best_state=progress.best_state,
        best_epoch=progress.best_epoch,
        best_val_top1=progress.best_val_top1,
        history=progress.history,
        epoch_energy=progress.energy,
        epochs=params.epochs,
        resumed_from_epoch=resumed_from,
        autocast=autocast,
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
    autocast: Autocast,
    scaler: torch.amp.GradScaler | None,
    keep_masks: Sequence[tuple[nn.Parameter, torch.Tensor]],
) -> float:
    """One shuffled pass; returns the sample-weighted mean training loss. With a
    *scaler* (fp16) each micro-batch's loss is scaled before its backward pass and the
    step is the scaler's (skipped when the scaled gradients overflowed)."""
    model.train()
    micro_batches = list(torch.randperm(len(labels), generator=generator).split(params.batch_size))
    if len(micro_batches) > 1 and len(micro_batches[-1]) == 1 and _has_batch_norm(model):
        # batch norm cannot train on one sample: the last one joins the batch before it
        micro_batches[-2:] = [torch.cat(micro_batches[-2:])]
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
            with autocast():
                logits = model(adapt_images(batch, input_shape))
            loss = objective(logits, batch_labels, idx, batch)
            weighted = loss * (len(idx) / step_samples)
            (scaler.scale(weighted) if scaler is not None else weighted).backward()
            loss_sum += loss.detach() * len(idx)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if keep_masks:
            with torch.no_grad():
                for param, keep in keep_masks:
                    param.mul_(keep)
    return float(loss_sum) / len(labels)


def _has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


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
    from workers.modelio import load_parent

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
    from workers.modelio import save_child

    model, shape = student.parent.model, student.parent.input_shape
    device = torch.device(env.device)
    model.to(device)
    val_images, val_labels = student.splits.val.tensors
    initial_val_top1 = top1(
        model, val_images, val_labels, input_shape=shape, batch_size=params.batch_size, device=device,
        autocast=loop_autocast(params, device),
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
