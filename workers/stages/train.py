"""The ``train`` stage: the sweep's baseline, trained from scratch (or a checkpoint).

Cross-entropy (with optional label smoothing), AdamW, and a cosine learning-rate
schedule stepped **once per epoch with T_max = epochs**, so the rate reaches its minimum
exactly at the last epoch (the reference paper's code stepped it differently; its
schedule is not reproduced). After every epoch the model is scored on the *validation*
split -- the test split is reserved for ``evaluate`` -- and the best epoch's weights are
the artifact.

Determinism: the seed fixes the initial weights and the shuffling, and the thread count
is set from the worker env, so two runs with the same seed and ``num_threads`` on the
same CPU produce identical weights. (On CUDA, kernels are not bitwise deterministic.)
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from workers.data import Splits, load_dataset
from workers.meters import make_meter
from workers.stages.registry import TrainParams
from workers.types import StageOutput, StageTask, WorkerEnv


def run(task: StageTask, env: WorkerEnv) -> StageOutput:
    """Train ``task.model`` on ``task.dataset`` and save the best-validation weights.

    The model's class count is ``task.model.kwargs["num_classes"]`` when given, else the
    dataset's. Metrics: ``epochs``, ``best_epoch`` (1-based), ``best_val_top1`` and
    ``history``, one ``{epoch, lr, train_loss, val_top1, epoch_s}`` per epoch (``lr`` is
    the rate the epoch trained with). The energy is that of the training loop (all
    epochs, validation included; not data loading or saving).
    """
    from workers.models import build_model, save_artifact

    if task.parent_key is not None:
        raise ValueError(f"train is a root stage and takes no parent artifact (got parent_key {task.parent_key!r})")
    params = TrainParams.model_validate(dict(task.params))
    torch.set_num_threads(env.num_threads)
    device = torch.device(env.device)

    splits = load_dataset(task.dataset, seed=task.seed, val_fraction=params.val_fraction)
    num_classes = int(task.model.kwargs.get("num_classes", splits.num_classes))
    if num_classes < splits.num_classes:
        raise ValueError(
            f"the model has {num_classes} classes but dataset {splits.name!r} has {splits.num_classes}; "
            "remove num_classes from the model kwargs or raise it"
        )

    torch.manual_seed(task.seed)  # the initial weights
    model = build_model(task.model, num_classes)
    _check_model_takes(model, splits, arch=task.model.arch)
    model.to(device)

    loader = DataLoader(
        splits.train,
        batch_size=params.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(task.seed),
    )
    criterion = nn.CrossEntropyLoss(label_smoothing=params.label_smoothing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=params.epochs)

    history: list[dict[str, Any]] = []
    best_val_top1 = -1.0
    best_epoch = 0
    best_state: dict[str, torch.Tensor] = {}
    meter = make_meter(env.device)
    meter.begin()
    for epoch in range(1, params.epochs + 1):
        start_s = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        train_loss = _train_one_epoch(model, loader, criterion, optimizer, device)
        scheduler.step()
        val_top1 = _top1(model, splits.val, params.batch_size, device)
        history.append(
            {
                "epoch": epoch,
                "lr": lr,
                "train_loss": train_loss,
                "val_top1": val_top1,
                "epoch_s": time.perf_counter() - start_s,
            }
        )
        if val_top1 > best_val_top1:  # strict: ties keep the earlier, less-trained epoch
            best_val_top1, best_epoch = val_top1, epoch
            best_state = copy.deepcopy(model.state_dict())
    energy = meter.end()

    model.load_state_dict(best_state)
    model.to("cpu").eval()
    artifact = save_artifact(
        model,
        root=task.artifact_root,
        key=task.key,
        model_ref=task.model,
        num_classes=num_classes,
        input_shape=splits.input_shape,
        materialized=True,  # an uncompressed model: what runs is what is counted
        compression={"chain": []},
    )
    return StageOutput(
        metrics={
            "epochs": params.epochs,
            "best_epoch": best_epoch,
            "best_val_top1": best_val_top1,
            "history": history,
        },
        artifact=artifact,
        energy=energy,
    )


def _check_model_takes(model: nn.Module, splits: Splits, *, arch: str) -> None:
    """Fail before training, with a one-line fix, when the model cannot take the data.

    A freshly built timm model does not reliably advertise the input size it was built
    for (``pretrained_cfg`` keeps the default), so one sample is pushed through instead.
    """
    sample = splits.train.tensors[0][:1]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(sample)
    except (RuntimeError, AssertionError, ValueError) as e:
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(
            f"model {arch!r} cannot take dataset {splits.name!r} inputs of shape {splits.input_shape} "
            f"({first_line}); build it for that shape (e.g. in_chans={splits.input_shape[0]}, "
            f"img_size={splits.input_shape[1]}) -- resizing is not supported yet"
        ) from e
    finally:
        model.train(was_training)


def _train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
) -> float:
    """One pass over ``loader``; returns the sample-weighted mean training loss."""
    model.train()
    loss_sum = torch.zeros((), device=device)
    samples = 0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(images), labels)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * labels.numel()
        samples += labels.numel()
    return float(loss_sum) / samples


def _top1(model: nn.Module, split: TensorDataset, batch_size: int, device: torch.device) -> float:
    """Top-1 accuracy (a fraction in [0, 1]) of ``model`` on an in-memory split."""
    model.eval()
    images, labels = split.tensors
    correct = torch.zeros((), dtype=torch.int64, device=device)
    with torch.no_grad():
        for start in range(0, len(labels), batch_size):
            batch_labels = labels[start : start + batch_size].to(device)
            logits = model(images[start : start + batch_size].to(device))
            correct += (logits.argmax(dim=1) == batch_labels).sum()
    return int(correct) / len(labels)

