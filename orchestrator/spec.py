"""Sweep spec: YAML text -> validated, frozen :class:`SweepSpec`.

A spec names the model, the dataset, the baseline training (unless a checkpoint is
given), one or more pipelines of compression stages whose parameters may be lists (grid
axes), the evaluation targets and protocol, and optionally the store URL::

    name: quickstart
    seed: 0
    model:
      arch: vit_tiny_patch16_224
      kwargs: {img_size: 8, patch_size: 2, in_chans: 1, depth: 4, embed_dim: 96, num_heads: 3}
    dataset: {name: digits}
    train: {epochs: 30, lr: 0.002}
    pipelines:
      - name: structured
        stages:
          - prune: {method: structured, mode: all, ratio: [0.25, 0.5]}
          - quantize: {weights: int8, activations: [none, int8]}
    evaluate: {targets: [local], batch_size: 64, warmup_batches: 3, repeats: 3}

Everything is checked here, before anything runs or is written: unknown keys, wrong
types, out-of-range values, unknown stage kinds, unknown timm architectures, missing
files, grids that expand past ``limits.max_points``. Every problem raises
:class:`~orchestrator.errors.SpecError` with one line naming the field path and the fix.
Stage parameters are validated by the parameter models registered for each kind in
:mod:`workers.stages.registry`.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import math
import json
import re
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from orchestrator.carbon import CarbonConfig, CarbonDataError, parse_carbon_config
from orchestrator.errors import SpecError
from workers.stages.registry import PIPELINE_KINDS, EvaluateParams, TrainParams, get_kind

DEFAULT_MAX_POINTS = 1000

# -- raw (as written) models: pydantic checks structure and types ------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _ModelSection(_Strict):
    arch: str = Field(min_length=1)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    checkpoint: str | None = None
    pretrained: bool = False


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
    baseline: bool = True  # also evaluate the uncompressed model

    @field_validator("targets")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("targets must be unique")
        return v


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


# -- validated, frozen domain objects ----------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    arch: str
    kwargs: Mapping[str, Any]
    checkpoint: str | None  # absolute path
    pretrained: bool


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    path: str | None
    options: Mapping[str, Any]


@dataclass(frozen=True)
class StageTemplate:
    """One stage of a pipeline as written: its kind and, per parameter, the grid values.

    ``axes`` maps each parameter the user wrote to a tuple of values (one value = no
    axis). ``combinations()`` yields every validated, default-filled parameter dict.
    """

    kind: str
    axes: tuple[tuple[str, tuple[Any, ...]], ...]

    def combinations(self) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """(user-written params, full validated params) for every grid point."""
        names = [n for n, _ in self.axes]
        out = []
        for values in itertools.product(*(vals for _, vals in self.axes)):
            written = dict(zip(names, values))
            full = get_kind(self.kind).params(**written).model_dump(mode="json")
            out.append((written, full))
        return out


@dataclass(frozen=True)
class PipelineSpec:
    name: str
    stages: tuple[StageTemplate, ...]


@dataclass(frozen=True)
class EvaluateSpec:
    targets: tuple[str, ...]
    batch_size: int
    warmup_batches: int
    warmup_s: float
    repeats: int
    min_window_s: float
    idle_s: float
    baseline: bool

    def params_for(self, target: str) -> dict[str, Any]:
        return EvaluateParams(
            target=target,
            batch_size=self.batch_size,
            warmup_batches=self.warmup_batches,
            warmup_s=self.warmup_s,
            repeats=self.repeats,
            min_window_s=self.min_window_s,
            idle_s=self.idle_s,
        ).model_dump(mode="json")


@dataclass(frozen=True)
class SchedulingSpec:
    """The ``scheduling:`` section. ``policy`` None means: ``greedy-carbon`` when the spec
    has a ``carbon:`` section (``carbon-deadline`` when it also gives ``deadline_h``), else
    ``fifo``. ``flexible`` names extra stage kinds that may wait for a cleaner window
    (train, finetune and distill always may)."""

    policy: str | None = None
    deadline_h: float | None = None
    max_attempts: int = 3
    stage_timeout_h: float = 24.0
    flexible: tuple[str, ...] = ()


@dataclass(frozen=True)
class SweepSpec:
    name: str
    seed: int
    model: ModelSpec
    dataset: DatasetSpec
    train: Mapping[str, Any] | None  # validated TrainParams, defaults filled; None = use checkpoint
    pipelines: tuple[PipelineSpec, ...]
    evaluate: EvaluateSpec
    store_url: str | None
    max_points: int
    source_text: str  # the YAML as given (stored with the sweep)
    checkpoint_sha256: str | None = None
    carbon: CarbonConfig | None = None  # None: no carbon accounting (no section in the spec)
    # sha256 of every file a stage parameter names ("checkpoint:<path>" teachers), so
    # stage keys follow file content, not file names.
    file_sha256: Mapping[str, str] = field(default_factory=dict)
    scheduling: SchedulingSpec = field(default_factory=SchedulingSpec)

    @property
    def spec_hash(self) -> str:
        return hashlib.sha256(self.source_text.encode()).hexdigest()


# -- parsing -------------------------------------------------------------------------------


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


def _as_axis(value: Any) -> tuple[Any, ...]:
    if isinstance(value, list):
        return tuple(value)
    return (value,)


def _parse_stage(raw: Any, path: str, max_points: int) -> StageTemplate:
    if not isinstance(raw, dict) or len(raw) != 1:
        raise SpecError(
            f"{path}: a stage is a mapping with exactly one key, the stage kind "
            f"({', '.join(PIPELINE_KINDS)}), e.g. '- prune: {{method: structured, ratio: 0.5}}'"
        )
    (kind, params), = raw.items()
    if kind in ("train", "evaluate"):
        raise SpecError(f"{path}: {kind!r} is not a pipeline stage -- use the top-level '{kind}:' section; "
                        f"pipeline stages are: {', '.join(PIPELINE_KINDS)}")
    if kind not in PIPELINE_KINDS:
        raise SpecError(f"{path}: unknown stage kind {kind!r} -- use one of: {', '.join(PIPELINE_KINDS)}")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise SpecError(f"{path}.{kind}: parameters must be a mapping, e.g. '{kind}: {{...}}'")
    axes: list[tuple[str, tuple[Any, ...]]] = []
    param_model = get_kind(kind).params
    for name, value in params.items():
        if name not in param_model.model_fields:
            raise SpecError(
                f"{path}.{kind}.{name}: unknown parameter; {kind} takes: {', '.join(param_model.model_fields)}"
            )
        values = _as_axis(value)
        if not values:
            raise SpecError(f"{path}.{kind}.{name}: an empty list gives no grid points -- give at least one value")
        if len(set(map(_canonical, values))) != len(values):
            raise SpecError(f"{path}.{kind}.{name}: grid values repeat -- list each value once")
        axes.append((name, values))
    template = StageTemplate(kind=kind, axes=tuple(axes))
    # Refuse a huge grid before validating its combinations (that alone could take hours).
    combos = math.prod(len(vals) for _, vals in axes)
    if combos > max_points:
        raise SpecError(
            f"{path}.{kind}: this stage alone expands to {combos} grid points, over limits.max_points={max_points} -- "
            "shrink the grid or raise limits.max_points"
        )
    # Validate every value on its own axis first so the error names the exact element.
    for i, (name, values) in enumerate(axes):
        for j, v in enumerate(values):
            probe = {n: vals[0] for n, vals in axes}
            probe[name] = v
            try:
                param_model(**probe)
            except ValidationError as e:
                err = next((x for x in e.errors(include_url=False) if x["loc"][:1] == (name,)), None)
                if err is not None:
                    where = f"{path}.{kind}.{name}" + (f"[{j}]" if len(values) > 1 else "")
                    msg = err["msg"].removeprefix("Value error, ")
                    raise SpecError(f"{where}: {msg} (got {v!r})") from None
    # Then every combination (cross-field rules, e.g. mode only with structured).
    for written in itertools.product(*(vals for _, vals in axes)):
        combo = dict(zip((n for n, _ in axes), written))
        try:
            param_model(**combo)
        except ValidationError as e:
            err = e.errors(include_url=False)[0]
            msg = err["msg"].removeprefix("Value error, ")
            field = ".".join(str(p) for p in err["loc"])
            where = f"{path}.{kind}" + (f".{field}" if field else "")
            if err["type"] == "missing":
                raise SpecError(f"{where}: required parameter is missing -- add it") from None
            raise SpecError(f"{where}: {msg} (for {combo})") from None
    return template


_CHECKPOINT_PREFIX = "checkpoint:"


def _resolve_files(template: StageTemplate, path: str, base: Path, digests: dict[str, str]) -> StageTemplate:
    """Make every ``checkpoint:<path>`` parameter value absolute (relative to the spec's
    directory), check the file exists, and record its sha256 in *digests*."""
    axes = []
    for name, values in template.axes:
        resolved = []
        for j, v in enumerate(values):
            if isinstance(v, str) and v.startswith(_CHECKPOINT_PREFIX):
                file = (base / v[len(_CHECKPOINT_PREFIX):]).resolve()
                if not file.is_file():
                    where = f"{path}.{template.kind}.{name}" + (f"[{j}]" if len(values) > 1 else "")
                    raise SpecError(f"{where}: file not found: {file} -- give the path of a .safetensors or "
                                    "weights-only .pt file, relative to the spec")
                digests.setdefault(str(file), _sha256_file(file))
                v = f"{_CHECKPOINT_PREFIX}{file}"
            resolved.append(v)
        axes.append((name, tuple(resolved)))
    return replace(template, axes=tuple(axes))


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def _check_arch(arch: str) -> None:
    import timm  # lazy: imports torch

    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; similar: {', '.join(close)}" if close else ""
        raise SpecError(f"model.arch: unknown timm architecture {arch!r}{hint} -- see timm.list_models()")


def _check_checkpoint(path: str) -> None:
    """The checkpoint must load weights-only (never unpickling code); checked now, not on
    a worker after the cluster started."""
    from orchestrator.errors import ArtifactError
    from workers.models import ArtifactLoadError, check_checkpoint

    try:
        check_checkpoint(path)
    except ArtifactLoadError as e:
        raise ArtifactError(f"model.checkpoint: {e}") from None


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key repeated in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # unhashable key: SafeLoader reports it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (each key may appear once per mapping)", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        size = _expanded_size(node, {})
        if size > MAX_YAML_NODES:
            raise SpecError(f"spec expands to {size:,} YAML nodes through its aliases (&anchor / *alias), over "
                            f"{MAX_YAML_NODES:,} -- write the values out instead of nesting aliases")
        return self.construct_document(node)


MAX_YAML_NODES = 100_000  # a real spec has hundreds; an alias bomb has billions


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """Nodes *node* stands for once every alias is expanded (shared nodes counted each
    time they are referenced), computed without expanding anything."""
    key = id(node)
    if key in memo:
        return memo[key]
    memo[key] = 1  # a recursive alias counts once rather than looping
    if isinstance(node, yaml.MappingNode):
        total = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        total = 1 + sum(_expanded_size(v, memo) for v in node.value)
    else:
        total = 1
    memo[key] = min(total, 10 * MAX_YAML_NODES)
    return memo[key]


def parse_spec(text: str, *, base_dir: Path | str = ".", check_arch: bool = True) -> SweepSpec:
    """Parse and validate YAML *text*; relative paths resolve against *base_dir*."""
    base = Path(base_dir)
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "malformed YAML"
        context, cmark = getattr(e, "context", None), getattr(e, "context_mark", None)
        if context and cmark is not None and (mark is None or cmark.line != mark.line):
            problem += f" ({context} started at line {cmark.line + 1}, column {cmark.column + 1})"
        raise SpecError(f"spec is not valid YAML{where}: {' '.join(problem.split())} -- fix the syntax") from None
    if raw is None:
        raise SpecError("spec is empty -- it needs at least 'name', 'model' and 'dataset'; see examples/quickstart.yaml")
    if not isinstance(raw, dict):
        raise SpecError("spec must be a YAML mapping with at least 'name', 'model' and 'dataset' -- see examples/quickstart.yaml")
    try:
        f = _SpecFile.model_validate(raw)
    except ValidationError as e:
        raise _pydantic_error(e, model=_SpecFile) from None

    if not f.pipelines and not f.evaluate.baseline:
        raise SpecError("pipelines: no pipelines and evaluate.baseline is false -- nothing to run; add a pipeline")

    checkpoint = None
    checkpoint_sha = None
    if f.model.checkpoint is not None:
        cp = (base / f.model.checkpoint).resolve()
        if not cp.is_file():
            raise SpecError(f"model.checkpoint: file not found: {cp} -- give the path of a .safetensors or weights-only .pt file")
        checkpoint, checkpoint_sha = str(cp), _sha256_file(cp)
    if f.model.checkpoint is not None and f.model.pretrained:
        raise SpecError("model: give either 'checkpoint' or 'pretrained: true', not both")
    if check_arch:
        _check_arch(f.model.arch)
        if checkpoint is not None:
            _check_checkpoint(checkpoint)

    dataset_options = dict(f.dataset.options)
    if isinstance(dataset_options.get("root"), str):
        # Where the data will be (it need not exist to plan): relative to the spec.
        dataset_options["root"] = str((base / dataset_options["root"]).resolve())
    dataset_path = None
    if f.dataset.path is not None:
        dp = (base / f.dataset.path).resolve()
        if not dp.exists():
            raise SpecError(f"dataset.path: not found: {dp} -- put the dataset files there or fix the path")
        dataset_path = str(dp)

    train = None
    if f.train is not None:
        try:
            train = TrainParams(**f.train).model_dump(mode="json")
        except ValidationError as e:
            raise _pydantic_error(e, prefix="train", model=TrainParams) from None
        except TypeError:
            raise SpecError("train: must be a mapping of training parameters") from None
    elif checkpoint is None and not f.model.pretrained:
        raise SpecError(
            "train: required when the model has no 'checkpoint' or 'pretrained: true' -- "
            "add a 'train:' section (e.g. 'train: {epochs: 30}') or give model.checkpoint"
        )

    digests: dict[str, str] = {}
    names = [p.name for p in f.pipelines]
    for i, n in enumerate(names):
        if names.index(n) != i:
            raise SpecError(f"pipelines[{i}].name: {n!r} is used twice -- give each pipeline a unique name")
    pipelines = tuple(
        PipelineSpec(
            name=p.name,
            stages=tuple(
                _resolve_files(_parse_stage(s, f"pipelines[{i}].stages[{j}]", f.limits.max_points),
                               f"pipelines[{i}].stages[{j}]", base, digests)
                for j, s in enumerate(p.stages)
            ),
        )
        for i, p in enumerate(f.pipelines)
    )

    try:
        for t in f.evaluate.targets:
            EvaluateParams(target=t, batch_size=f.evaluate.batch_size,
                           warmup_batches=f.evaluate.warmup_batches, warmup_s=f.evaluate.warmup_s, repeats=f.evaluate.repeats,
                           min_window_s=f.evaluate.min_window_s, idle_s=f.evaluate.idle_s)
    except ValidationError as e:
        raise _pydantic_error(e, prefix="evaluate") from None

    carbon = None
    if f.carbon is not None:
        try:
            carbon = parse_carbon_config(f.carbon, base_dir=base)
        except CarbonDataError as e:
            msg = str(e)
            raise SpecError(msg if msg.startswith("carbon") else f"carbon: {msg}") from None

    sched = f.scheduling
    movable = ("train", *PIPELINE_KINDS)
    for i, kind in enumerate(sched.flexible):
        if kind not in movable:
            raise SpecError(f"scheduling.flexible[{i}]: {kind!r} cannot be flexible -- one of: {', '.join(movable)}")
    if sched.policy in ("greedy-carbon", "carbon-deadline") and carbon is None:
        raise SpecError(f"scheduling.policy: {sched.policy!r} needs carbon intensity data -- add a carbon: "
                        "section (e.g. carbon: {provider: static}) or use policy: fifo")
    if sched.policy == "carbon-deadline" and sched.deadline_h is None:
        raise SpecError("scheduling.deadline_h: policy 'carbon-deadline' needs a deadline -- give "
                        "deadline_h (hours from the sweep's start) or use policy: greedy-carbon")
    scheduling = SchedulingSpec(policy=sched.policy, deadline_h=sched.deadline_h, max_attempts=sched.max_attempts,
                                stage_timeout_h=sched.stage_timeout_h, flexible=tuple(sched.flexible))

    spec = SweepSpec(
        name=f.name,
        seed=f.seed,
        model=ModelSpec(arch=f.model.arch, kwargs=dict(f.model.kwargs), checkpoint=checkpoint, pretrained=f.model.pretrained),
        dataset=DatasetSpec(name=f.dataset.name, path=dataset_path, options=dataset_options),
        train=train,
        pipelines=pipelines,
        evaluate=EvaluateSpec(
            targets=tuple(f.evaluate.targets),
            batch_size=f.evaluate.batch_size,
            warmup_batches=f.evaluate.warmup_batches,
            warmup_s=f.evaluate.warmup_s,
            repeats=f.evaluate.repeats,
            min_window_s=f.evaluate.min_window_s,
            idle_s=f.evaluate.idle_s,
            baseline=f.evaluate.baseline,
        ),
        store_url=f.store,
        max_points=f.limits.max_points,
        source_text=text,
        checkpoint_sha256=checkpoint_sha,
        carbon=carbon,
        file_sha256=digests,
        scheduling=scheduling,
    )
    n = count_points(spec)
    if n > spec.max_points:
        raise SpecError(
            f"pipelines: the grid expands to {n} points, over limits.max_points={spec.max_points} -- "
            "shrink the grid or raise limits.max_points"
        )
    return spec


def count_points(spec: SweepSpec) -> int:
    """Number of (chain, target) points without expanding the grid."""
    chains = 1 if spec.evaluate.baseline else 0
    for p in spec.pipelines:
        n = 1
        for st in p.stages:
            for _, vals in st.axes:
                n *= len(vals)
        chains += n
    return chains * len(spec.evaluate.targets)


def load_spec(path: str | Path, *, check_arch: bool = True) -> SweepSpec:
    """Read and validate the spec file at *path*."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise SpecError(f"spec file not found: {p} -- check the path (e.g. examples/quickstart.yaml)") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as e:
        raise SpecError(f"cannot read spec file {p}: {e.__class__.__name__} -- give a readable YAML file") from None
    return parse_spec(text, base_dir=p.parent, check_arch=check_arch)
