"""The ``train`` stage: the sweep's baseline, trained from scratch, from a checkpoint or
from pretrained weights.

Cross-entropy (with optional label smoothing) in the shared loop of
:mod:`workers.training`: AdamW, a cosine schedule stepped once per epoch over all epochs
(after an optional linear warm-up), selection of the best epoch on the *validation*
split -- the test split is reserved for ``evaluate`` -- and per-epoch checkpoints from
which a killed run resumes. With ``model.checkpoint`` (or ``pretrained: true``) the
weights start from there, so ``train`` is then fine-tuning.

The model is fed the shape it is built for (:func:`workers.training.model_input_shape`);
data of another size or channel count is adapted per batch, and the artifact records
that input shape.

Determinism: the seed fixes the initial weights, the shuffling and any augmentation,
and the thread count is set from the worker env, so two runs with the same seed and
``num_threads`` on the same CPU produce identical weights. (On CUDA, kernels are not
bitwise deterministic.)
"""

from __future__ import annotations

import torch

from workers.checkpoints import discard_checkpoints
from workers.data import load_dataset
from workers.stages.registry import TrainParams
from workers.training import (
    CrossEntropy,
    check_model_takes,
    fit,
    model_input_shape,
    sum_readings,
)
from workers.types import StageOutput, StageTask, WorkerEnv


def run(task: StageTask, env: WorkerEnv) -> StageOutput:
    """Train ``task.model`` on ``task.dataset`` and save the best-validation weights.

    The model's class count is ``task.model.kwargs["num_classes"]`` when given, else the
    dataset's. Metrics (see :meth:`workers.training.FitResult.metrics`): ``epochs``,
    ``epochs_run``, ``stopped_early``, ``resumed_from_epoch``, ``best_epoch`` (1-based),
    ``best_val_top1`` and ``history``, one ``{epoch, lr, train_loss, val_top1, epoch_s,
    energy_j}`` per epoch (``lr`` is the rate the epoch trained with). The energy is that
    of the training loop (all epochs, validation included; not data loading, saving or
    checkpointing), epochs of an interrupted earlier attempt included.
    """
    from workers.modelio import save_artifact
    from workers.models import build_model

    if task.parent_key is not None:
        raise ValueError(f"train is a root stage and takes no parent artifact (got parent_key {task.parent_key!r})")
    params = TrainParams.model_validate(dict(task.params))
    torch.set_num_threads(env.num_threads)

    splits = load_dataset(task.dataset, seed=task.seed, val_fraction=params.val_fraction)
    num_classes = int(task.model.kwargs.get("num_classes", splits.num_classes))
    if num_classes < splits.num_classes:
        raise ValueError(
            f"the model has {num_classes} classes but dataset {splits.name!r} has {splits.num_classes}; "
            "remove num_classes from the model kwargs or raise it"
        )
    input_shape = model_input_shape(task.model, splits.input_shape)

    torch.manual_seed(task.seed)  # the initial weights
    model = build_model(task.model, num_classes)
    check_model_takes(model, input_shape, what=f"model {task.model.arch!r}")

    result = fit(
        model,
        splits,
        params,
        objective=CrossEntropy(params.label_smoothing),
        input_shape=input_shape,
        task=task,
        env=env,
    )
    model.load_state_dict(result.best_state)
    model.to("cpu").eval()
    artifact = save_artifact(
        model,
        root=task.artifact_root,
        key=task.key,
        model_ref=task.model,
        num_classes=num_classes,
        input_shape=input_shape,
        materialized=True,  # an uncompressed model: what runs is what is counted
        compression={"chain": []},
    )
    discard_checkpoints(task)
    return StageOutput(metrics=result.metrics(), artifact=artifact, energy=sum_readings(result.epoch_energy))
