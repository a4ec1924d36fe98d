"""The spec file as written: pydantic models of its sections, and their errors as one line.

:func:`orchestrator.spec.parse_spec` validates the YAML mapping against :class:`_SpecFile`
(structure and types; unknown keys are refused) before it builds the frozen domain
objects. :func:`_pydantic_error` turns pydantic's report into the one-line
:class:`~orchestrator.errors.SpecError` users see: the field path, what is wrong, and
the fix -- never a pydantic class name or URL.
"""

from __future__ import annotations

import re
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from orchestrator.errors import SpecError
from workers.stages.registry import PRECISIONS, EvaluateParams

DEFAULT_MAX_POINTS = 1000
MAX_INPUT_SIDE = 8192

# -- raw (as written) models: pydantic checks structure and types ------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _ModelSection(_Strict):
    arch: str = Field(min_length=1)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    checkpoint: str | None = None
    pretrained: bool = False
    input_size: list[int] | None = None  # [C, H, W] the images are converted to

    @field_validator("input_size")
    @classmethod
    def _chw(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (len(v) != 3 or not all(1 <= d <= MAX_INPUT_SIDE for d in v) or v[0] > 64):
            raise ValueError(f"must be [C, H, W]: three positive integers (C at most 64, H and W at most "
                             f"{MAX_INPUT_SIDE}), e.g. [3, 32, 32]")
        return v


class _DatasetSection(_Strict):
    name: str = Field(min_length=1)
    path: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)


class _PipelineSection(_Strict):
    name: str
    stages: list[Any] = Field(min_length=1)  # each checked by _parse_stage (clearer messages)

    @field_validator("name")
    @classmethod
    def _name_chars(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", v):
            raise ValueError("use only letters, digits, '_', '.' and '-', starting with a letter or digit")
        return v


class _EvaluateSection(_Strict):
    targets: list[str] = Field(default_factory=lambda: ["local"], min_length=1)
    batch_size: int = EvaluateParams.model_fields["batch_size"].default
    warmup_batches: int = EvaluateParams.model_fields["warmup_batches"].default
    warmup_s: float = EvaluateParams.model_fields["warmup_s"].default
    repeats: int = EvaluateParams.model_fields["repeats"].default
    min_window_s: float = EvaluateParams.model_fields["min_window_s"].default
    idle_s: float = EvaluateParams.model_fields["idle_s"].default
    interleave: Literal["auto", "slices", "windows"] = EvaluateParams.model_fields["interleave"].default
    slice_s: float = EvaluateParams.model_fields["slice_s"].default
    baseline: bool = True  # also evaluate the uncompressed model
    # Evaluations of a node measured together, in interleaved rounds, with the reference
    # (the uncompressed model on torch fp32) in every cohort; more form further cohorts.
    cohort_size: int = Field(8, ge=1, le=64)
    # Grid axes of evaluation: every model on every (target, runtime, precision) it can run on.
    runtimes: list[str] | str = Field(default_factory=lambda: ["torch"])
    precision: list[str] | str = Field(default_factory=lambda: ["fp32"])

    @field_validator("targets")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("targets must be unique")
        return v

    @field_validator("runtimes", "precision")
    @classmethod
    def _axis(cls, v: list[str] | str) -> list[str]:
        values = [v] if isinstance(v, str) else list(v)
        if not values:
            raise ValueError("give at least one value")
        if len(set(values)) != len(values):
            raise ValueError("values must be unique")
        return values

    @field_validator("precision")
    @classmethod
    def _known_precisions(cls, v: list[str]) -> list[str]:
        return _known("precision", v, PRECISIONS)

    @field_validator("runtimes")
    @classmethod
    def _known_runtimes(cls, v: list[str]) -> list[str]:
        from workers.backends import BACKENDS

        return _known("runtime", v, tuple(BACKENDS))


def _known(what: str, values: list[str], known: tuple[str, ...]) -> list[str]:
    for value in values:
        if value not in known:
            raise ValueError(f"unknown {what} {value!r}; use {', '.join(known)}")
    return values


class _LimitsSection(_Strict):
    max_points: int = Field(DEFAULT_MAX_POINTS, ge=1)


class _SchedulingSection(_Strict):
    policy: Literal["fifo", "greedy-carbon", "carbon-deadline"] | None = None
    deadline_h: float | None = Field(None, gt=0, le=24 * 365)
    max_attempts: int = Field(3, ge=1, le=100)
    stage_timeout_h: float = Field(24.0, gt=0, le=24 * 30)
    flexible: list[str] = Field(default_factory=list)


class _SpecFile(_Strict):
    name: str = Field(min_length=1, max_length=200)
    seed: int = 0
    model: _ModelSection
    dataset: _DatasetSection
    train: dict[str, Any] | None = None
    pipelines: list[_PipelineSection] = Field(default_factory=list)
    evaluate: _EvaluateSection = Field(default_factory=_EvaluateSection)
    store: str | None = None
    carbon: Any = None  # validated by orchestrator.carbon.parse_carbon_config
    limits: _LimitsSection = Field(default_factory=_LimitsSection)
    scheduling: _SchedulingSection = Field(default_factory=_SchedulingSection)


# -- pydantic errors as one line ---------------------------------------------------------


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _model_at(model: type[BaseModel] | None, loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that validates the mapping at *loc* under *model* (None if unknown)."""
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        model = next((a for a in (field.annotation, *typing.get_args(field.annotation))
                      if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return model


def _pydantic_error(e: ValidationError, prefix: str = "", model: type[BaseModel] | None = None) -> SpecError:
    errors = e.errors(include_url=False)
    # A misspelled key shows up as "unknown key" plus "required field missing"; the
    # unknown key is the cause, so report it first.
    err = next((x for x in errors if x["type"] == "extra_forbidden"), errors[0])
    path = _loc(tuple(p for p in (prefix,) if p) + tuple(err["loc"]))
    kind = err["type"]
    if kind == "extra_forbidden":
        allowed = ""
        parent = _model_at(model, tuple(err["loc"][:-1]))
        if parent is not None:
            allowed = f"; allowed keys: {', '.join(parent.model_fields)}"
        return SpecError(f"{path}: unknown key{allowed} -- remove it or fix its spelling")
    if kind == "missing":
        return SpecError(f"{path}: required field is missing -- add it")
    if kind == "model_type":  # pydantic's message names our private section class
        last = err["loc"][-1] if err["loc"] else prefix
        example = f", e.g. '{last}: {{...}}'" if isinstance(last, str) and last else ""
        return SpecError(f"{path}: must be a mapping of keys to values{example}")
    if kind == "too_short":
        return SpecError(f"{path}: must not be empty -- give at least one item")
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    got = err.get("input")
    shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
    return SpecError(f"{path}: {msg}{shown}")
