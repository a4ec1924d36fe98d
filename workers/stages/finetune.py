"""The ``finetune`` stage: retrain the parent (typically a pruned model) with
cross-entropy alone.

It is the control ``distill`` is measured against -- the reference study retrained its
pruned ViT both ways -- so it runs the very same loop (:mod:`workers.training`) with the
same parameters, only without a teacher. The artifact keeps the parent's structure and
``materialized`` flag: a structurally pruned parent stays small, and an unstructured
one keeps its zeros (the pruned weights are held at zero while training).
"""

from __future__ import annotations

import torch

from workers.stages.registry import FinetuneParams
from workers.training import CrossEntropy, load_student, retrain_student
from workers.types import StageOutput, StageTask, WorkerEnv


def run(task: StageTask, env: WorkerEnv) -> StageOutput:
    """Fine-tune the parent artifact (or, for a root stage, ``task.model``) on
    ``task.dataset`` and save the best-validation weights.

    Metrics: those of :func:`workers.training.retrain_student` (``best_val_top1``,
    ``initial_val_top1`` before retraining, ``history``, ...). The energy is that of the
    training loop.
    """
    params = FinetuneParams.model_validate(dict(task.params))
    torch.set_num_threads(env.num_threads)
    student = load_student(task, params)
    return retrain_student(task, env, params, student, CrossEntropy(params.label_smoothing))
