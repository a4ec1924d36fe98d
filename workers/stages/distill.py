"""The ``distill`` stage: Hinton knowledge distillation into the parent (the student,
typically a pruned model) from a teacher (by default the sweep's unpruned baseline).

The loss, per batch::

    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, labels)

The KL term is computed in log space (``F.kl_div`` of two ``log_softmax`` with
``log_target=True``): the reference study's ``softmax(...).log()`` turns an underflowed
probability into ``log(0) = -inf`` and the loss into NaN on confident logits. ``T^2``
keeps the soft term's gradients on the scale of the hard term's as T changes.

**Teacher contract.** The spec says ``teacher: baseline`` (default), ``artifact:<key>``
or ``checkpoint:<path>``; the planner resolves ``baseline`` before dispatch, so the
worker accepts exactly ``artifact:<key>`` (an artifact under ``task.artifact_root``) and
``checkpoint:<absolute path>`` (``task.model``'s architecture with those weights).
The teacher must have the student's class count; it is fed its own input shape.

**Teacher logits are cached** when the data pipeline is deterministic
(``augment: none``): the teacher runs once over the training split before the first
epoch and every epoch reuses those logits, instead of a teacher forward per batch per
epoch. With augmentation each batch is a new view, so the teacher runs per batch on
the very view the student sees. The teacher runs in eval mode, without gradients, at
the student's mixed precision (:func:`workers.training.loop_autocast`: ``precision``,
or bf16 when ``amp`` is on CUDA).

The loop (schedule, selection on validation, checkpoints, resume) is
:mod:`workers.training`'s; the artifact keeps the parent's structure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from workers.data import adapt_images
from workers.meters import make_meter
from workers.stages.registry import DistillParams
from workers.training import (
    Autocast,
    Student,
    check_model_takes,
    load_student,
    loop_autocast,
    model_input_shape,
    predict_logits,
    retrain_student,
    top1,
)
from workers.types import EnergyReading, ModelRef, StageOutput, StageTask, WorkerEnv


def run(task: StageTask, env: WorkerEnv) -> StageOutput:
    """Distill ``task.params["teacher"]`` into the parent artifact and save the
    best-validation student.

    Metrics: those of :func:`workers.training.retrain_student` plus ``teacher`` (the
    resolved form), ``teacher_val_top1`` and ``teacher_logits_cached``. The energy
    covers caching the teacher's logits (when cached) and the training loop.
    """
    params = DistillParams.model_validate(dict(task.params))
    torch.set_num_threads(env.num_threads)
    student = load_student(task, params)
    objective, setup_energy, metrics = _prepare(task, env, params, student)
    return retrain_student(
        task, env, params, student, objective, setup_energy=setup_energy, extra_metrics=metrics
    )


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """The batch-mean distillation loss (module docstring), computed in float32."""
    student_logits, teacher_logits = student_logits.float(), teacher_logits.float()
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    kl = F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean")
    ce = F.cross_entropy(student_logits, labels, label_smoothing=label_smoothing)
    return alpha * temperature**2 * kl + (1 - alpha) * ce


class Distillation:
    """The :class:`workers.training.Objective` of ``distill``: teacher logits from a
    per-sample cache (``teacher_logits``, rows in training-split order) or, without one,
    from ``teacher`` run on the (augmented) batch adapted to ``teacher_shape``."""

    def __init__(
        self,
        *,
        alpha: float,
        temperature: float,
        label_smoothing: float,
        teacher_logits: torch.Tensor | None = None,
        teacher: nn.Module | None = None,
        teacher_shape: Sequence[int] | None = None,
        autocast: Autocast | None = None,
    ) -> None:
        if (teacher_logits is None) == (teacher is None) or (teacher is not None and teacher_shape is None):
            raise ValueError("give either cached teacher_logits, or a teacher with its teacher_shape")
        self.alpha = alpha
        self.temperature = temperature
        self.label_smoothing = label_smoothing
        self.teacher_logits = teacher_logits
        self.teacher = teacher
        self.teacher_shape = teacher_shape
        self.autocast = autocast

    def __call__(
        self, logits: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, images: torch.Tensor
    ) -> torch.Tensor:
        if self.teacher_logits is not None:
            teacher_logits = self.teacher_logits[indices.to(self.teacher_logits.device)]
        else:
            assert self.teacher is not None and self.teacher_shape is not None
            autocast = self.autocast or Autocast(images.device.type)
            with torch.no_grad(), autocast():
                teacher_logits = self.teacher(adapt_images(images, self.teacher_shape)).float()
        return kd_loss(
            logits, teacher_logits, labels,
            alpha=self.alpha, temperature=self.temperature, label_smoothing=self.label_smoothing,
        )


@dataclass(frozen=True)
class Teacher:
    model: nn.Module  # on the CPU, eval mode
    input_shape: tuple[int, int, int]
    source: str  # the resolved form: "artifact:<key>" or "checkpoint:<path>"


def load_teacher(task: StageTask, *, num_classes: int, data_shape: Sequence[int]) -> Teacher:
    """The teacher ``task.params["teacher"]`` names, in its resolved form.

    Raises ``ValueError`` for an unresolved ``baseline`` or any other form, and when the
    teacher's class count is not ``num_classes``; loading errors are
    :class:`workers.models.ArtifactLoadError`.
    """
    from workers.modelio import load_artifact
    from workers.models import build_model

    source = str(task.params.get("teacher", ""))
    form, _, value = source.partition(":")
    if form == "artifact" and value:
        model, manifest = load_artifact(task.artifact_root, value, device="cpu")
        shape = tuple(int(d) for d in manifest["input_shape"])
        teacher_classes = int(manifest["num_classes"])
    elif form == "checkpoint" and value:
        ref = ModelRef(task.model.arch, dict(task.model.kwargs), checkpoint=value, input_size=task.model.input_size)
        teacher_classes = int(ref.kwargs.get("num_classes", num_classes))
        shape = model_input_shape(ref, data_shape)
        model = build_model(ref, teacher_classes)
        check_model_takes(model, shape, what=f"teacher {source}")
    else:
        raise ValueError(
            f"distill got teacher {source!r}; the worker takes 'artifact:<key>' or 'checkpoint:<path>' "
            "(the planner resolves 'baseline' before dispatch, so an unresolved one is a planner bug)"
        )
    if teacher_classes != num_classes:
        raise ValueError(
            f"teacher {source} has {teacher_classes} classes but the student has {num_classes}; "
            "distill from a model trained on the same classes"
        )
    model.eval().requires_grad_(False)
    return Teacher(model, (int(shape[0]), int(shape[1]), int(shape[2])), source)


def _prepare(
    task: StageTask, env: WorkerEnv, params: DistillParams, student: Student
) -> tuple[Distillation, list[EnergyReading], dict[str, Any]]:
    """Load the teacher, score it on validation and, without augmentation, cache its
    training-split logits (measured). A cached teacher goes out of scope here, freeing
    its memory for the student's training."""
    teacher = load_teacher(task, num_classes=student.parent.num_classes, data_shape=student.splits.input_shape)
    device = torch.device(env.device)
    autocast = loop_autocast(params, device)
    teacher.model.to(device)
    val_images, val_labels = student.splits.val.tensors
    metrics: dict[str, Any] = {
        "teacher": teacher.source,
        "teacher_val_top1": top1(
            teacher.model, val_images, val_labels, input_shape=teacher.input_shape,
            batch_size=params.batch_size, device=device, autocast=autocast,
        ),
        "teacher_logits_cached": params.augment == "none",
    }
    common = {"alpha": params.alpha, "temperature": params.temperature, "label_smoothing": params.label_smoothing}
    if params.augment != "none":
        objective = Distillation(**common, teacher=teacher.model, teacher_shape=teacher.input_shape,
                                 autocast=autocast)
        return objective, [], metrics

    meter = make_meter(env.device)
    meter.begin()
    cached = predict_logits(
        teacher.model, student.splits.train.tensors[0], input_shape=teacher.input_shape,
        batch_size=params.batch_size, device=device, autocast=autocast,
    )
    reading = meter.end()
    return Distillation(**common, teacher_logits=cached), [reading], metrics
