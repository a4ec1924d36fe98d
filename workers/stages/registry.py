"""The one place stage kinds are registered.

Each kind names its parameter model (pydantic, validated at spec time on the
coordinator, torch-free), the function that runs it on a worker (imported lazily, so the
CLI never imports torch to validate a spec), whether it produces a model artifact, and
whether it is *flexible* (may be placed on any capable node) or pinned to a target.

Nothing else in the code base switches on kind names: the spec, the planner and the
coordinator look kinds up here.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoopParams(_Params):
    """What every stage that runs the shared training loop (``workers.training``) takes.

    AdamW; the learning rate is set once per epoch: ``warmup_epochs`` linear warm-up
    epochs, then a cosine decay over the remaining epochs. The best *validation* epoch's
    weights are kept; ``patience`` stops after that many epochs without a new best.
    ``accumulate_steps`` micro-batches of ``batch_size`` make one optimizer step.
    ``augment`` (random flip + padded crop) is off by default. ``amp`` is bf16 autocast,
    effective on CUDA only. ``val_fraction`` carves the validation split from the
    training data by the sweep seed; keep it equal across a sweep's stages so a student
    is never selected on samples its teacher trained on.
    """

    epochs: int = Field(10, ge=1, le=10_000)
    lr: float = Field(1e-4, gt=0, le=10)
    weight_decay: float = Field(0.05, ge=0, le=10)
    batch_size: int = Field(64, ge=1, le=65_536)
    val_fraction: float = Field(0.1, gt=0, lt=0.5)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    warmup_epochs: int = Field(0, ge=0, le=10_000)
    augment: Literal["none", "flip-crop"] = "none"
    accumulate_steps: int = Field(1, ge=1, le=1_024)
    patience: int | None = Field(None, ge=1, le=10_000)
    amp: bool = True

    @model_validator(mode="after")
    def _warmup_leaves_epochs(self) -> "LoopParams":
        if self.warmup_epochs >= self.epochs:
            raise ValueError(
                f"warmup_epochs ({self.warmup_epochs}) must be less than epochs ({self.epochs}); "
                "lower warmup_epochs or raise epochs"
            )
        return self


class TrainParams(LoopParams):
    """Baseline training from scratch (or from a checkpoint / pretrained weights): CE.

    The loop options beyond its original six fields (``warmup_epochs``, ``augment``,
    ``accumulate_steps``, ``patience``, ``amp``) default to the behaviour it had before.
    """

    epochs: int = Field(30, ge=1, le=10_000)
    lr: float = Field(2e-3, gt=0, le=10)


class FinetuneParams(LoopParams):
    """Retrain the parent (typically a pruned model) with cross-entropy only: the control
    that ``distill`` is compared against. The parent's structure is kept."""


# "artifact:<stage key>" or "checkpoint:<path>"; "baseline" is resolved by the planner.
_TEACHER_FORM = re.compile(r"baseline|artifact:[0-9a-f]+|checkpoint:.+")


class DistillParams(LoopParams):
    """Hinton knowledge distillation into the parent (the student, typically pruned):
    ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, labels)``.

    ``teacher`` is ``baseline`` (the sweep's unpruned model, resolved by the planner),
    ``artifact:<key>`` (any artifact under the artifact root) or ``checkpoint:<path>``
    (the spec's architecture with those weights). Defaults follow the reference study
    (alpha 0.25, T 4).
    """

    alpha: float = Field(0.25, ge=0, le=1)
    temperature: float = Field(4.0, gt=0, le=1_000)
    teacher: str = "baseline"

    @field_validator("teacher")
    @classmethod
    def _teacher_form(cls, v: str) -> str:
        if not _TEACHER_FORM.fullmatch(v):
            raise ValueError(
                "teacher must be 'baseline', 'artifact:<hex key>' or 'checkpoint:<path to .safetensors/.pt>'"
            )
        return v


class PruneParams(_Params):
    """``unstructured``: L1 magnitude masks made permanent (simulated: same dense FLOPs).

    ``structured``: torch-pruning DepGraph, physically removing channels/heads
    (materialized). ``mode`` applies to structured pruning only:
    ``all`` every prunable layer but the classifier; ``keep-attention`` leaves attention
    blocks and the classifier untouched (MLPs/convs only); ``heads`` removes whole
    attention heads.
    """

    method: Literal["unstructured", "structured"]
    ratio: float = Field(gt=0, lt=1)
    mode: Literal["all", "keep-attention", "heads"] | None = None
    importance: Literal["l1", "l2"] = "l1"

    @model_validator(mode="after")
    def _mode_matches_method(self) -> "PruneParams":
        if self.method == "unstructured" and self.mode is not None:
            raise ValueError("'mode' applies to structured pruning only; remove it or use method: structured")
        if self.method == "structured" and self.mode is None:
            object.__setattr__(self, "mode", "all")
        return self


class QuantizeParams(_Params):
    """optimum-quanto quantization; activations are calibrated on train batches."""

    weights: Literal["int8", "float8", "int4"]
    activations: Literal["none", "int8", "float8"] = "none"
    calibration_batches: int = Field(8, ge=1, le=10_000)
    batch_size: int = Field(64, ge=1, le=65_536)


class EvaluateParams(_Params):
    """The evaluation protocol: unmeasured warm-up, the whole test split, N repeats."""

    target: str = "local"
    batch_size: int = Field(64, ge=1, le=65_536)
    warmup_batches: int = Field(3, ge=0, le=10_000)
    # ... and at least this long: a CPU on a shared VM takes seconds to reach steady speed.
    warmup_s: float = Field(3.0, ge=0, le=3_600)
    repeats: int = Field(3, ge=1, le=1_000)
    # Each repeat's window covers whole passes over the test split until it lasts this
    # long, so timer granularity and scheduler noise stay small against the window.
    min_window_s: float = Field(5.0, ge=0, le=3_600)
    # Idle power is sampled for this long before the first window, so net energy (gross
    # minus idle power x duration) can be reported next to gross; 0 skips it (net: None).
    idle_s: float = Field(2.0, ge=0, le=600)


class NoopParams(_Params):
    """A stage that does nothing and returns at once: it measures what the machinery
    itself costs per stage (``benchmarks/overhead.py``). ``index`` only tells otherwise
    identical stages apart, so each gets its own key; ``sleep_s`` makes it take that long
    (tests of timeouts and queueing)."""

    index: int = Field(0, ge=0)
    sleep_s: float = Field(0.0, ge=0, le=3600)


@dataclass(frozen=True)
class StageKind:
    name: str
    params: type[_Params]
    # "module:function", imported on the worker; called as
    # ``run(task: StageTask, env: WorkerEnv) -> StageOutput``.
    runner: str
    produces_artifact: bool
    flexible: bool  # may run on any capable node (False: pinned to params.target)
    # Internal kinds (benchmarks, tests) that a sweep spec may not name: the spec's kind
    # lookup goes through PIPELINE_KINDS, which leaves them out.
    hidden: bool = False

    def load_runner(self) -> Callable[..., Any]:
        module, _, func = self.runner.partition(":")
        return getattr(importlib.import_module(module), func)


STAGE_KINDS: dict[str, StageKind] = {
    k.name: k
    for k in (
        StageKind("train", TrainParams, "workers.stages.train:run", True, True),
        StageKind("prune", PruneParams, "workers.stages.prune:run", True, True),
        StageKind("quantize", QuantizeParams, "workers.stages.quantize:run", True, True),
        StageKind("finetune", FinetuneParams, "workers.stages.finetune:run", True, True),
        StageKind("distill", DistillParams, "workers.stages.distill:run", True, True),
        StageKind("evaluate", EvaluateParams, "workers.stages.evaluate:run", False, False),
        StageKind("noop", NoopParams, "workers.stages.noop:run", produces_artifact=False, flexible=True, hidden=True),
    )
}

# Kinds a user may place inside a pipeline (train is the sweep's baseline; evaluate is
# added by the planner for every target; hidden kinds are not for specs).
PIPELINE_KINDS: tuple[str, ...] = tuple(
    k for k, kind in STAGE_KINDS.items() if k not in ("train", "evaluate") and not kind.hidden
)


def get_kind(name: str) -> StageKind:
    try:
        return STAGE_KINDS[name]
    except KeyError:
        known = ", ".join(k for k, kind in STAGE_KINDS.items() if not kind.hidden)
        raise KeyError(f"unknown stage kind {name!r}; known kinds: {known}") from None
