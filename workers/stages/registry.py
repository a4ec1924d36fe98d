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
from dataclasses import dataclass
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TrainParams(_Params):
    """Baseline training from scratch (or from a checkpoint): CE + AdamW + cosine per epoch."""

    epochs: int = Field(30, ge=1, le=10_000)
    lr: float = Field(2e-3, gt=0, le=10)
    weight_decay: float = Field(0.05, ge=0, le=10)
    batch_size: int = Field(64, ge=1, le=65_536)
    val_fraction: float = Field(0.1, gt=0, lt=0.5)
    label_smoothing: float = Field(0.0, ge=0, lt=1)


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
    repeats: int = Field(3, ge=1, le=1_000)
    # Each repeat's window covers whole passes over the test split until it lasts this
    # long, so timer granularity and scheduler noise stay small against the window.
    min_window_s: float = Field(5.0, ge=0, le=3_600)


@dataclass(frozen=True)
class StageKind:
    name: str
    params: type[_Params]
    # "module:function", imported on the worker; called as
    # ``run(task: StageTask, env: WorkerEnv) -> StageOutput``.
    runner: str
    produces_artifact: bool
    flexible: bool  # may run on any capable node (False: pinned to params.target)

    def load_runner(self) -> Callable[..., Any]:
        module, _, func = self.runner.partition(":")
        return getattr(importlib.import_module(module), func)


STAGE_KINDS: dict[str, StageKind] = {
    k.name: k
    for k in (
        StageKind("train", TrainParams, "workers.stages.train:run", True, True),
        StageKind("prune", PruneParams, "workers.stages.prune:run", True, True),
        StageKind("quantize", QuantizeParams, "workers.stages.quantize:run", True, True),
        StageKind("evaluate", EvaluateParams, "workers.stages.evaluate:run", False, False),
    )
}

# Kinds a user may place inside a pipeline (train is the sweep's baseline; evaluate is
# added by the planner for every target).
PIPELINE_KINDS: tuple[str, ...] = tuple(k for k in STAGE_KINDS if k not in ("train", "evaluate"))


def get_kind(name: str) -> StageKind:
    try:
        return STAGE_KINDS[name]
    except KeyError:
        raise KeyError(f"unknown stage kind {name!r}; known kinds: {', '.join(STAGE_KINDS)}") from None
