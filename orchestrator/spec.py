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

The work is split by concern: :mod:`orchestrator.spec_yaml` reads the YAML (duplicate
keys, alias bombs and nesting refused), :mod:`orchestrator.spec_file` holds the pydantic
models of the file as written and turns their errors into one line, this module builds
the frozen domain objects, and :mod:`orchestrator.spec_checks` runs the checks that
import torch (lazily: ``import orchestrator.spec`` stays torch-free).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from pydantic import ValidationError

from orchestrator.carbon import CarbonConfig, CarbonDataError, parse_carbon_config
from orchestrator.errors import SpecError
from orchestrator.spec_file import _pydantic_error, _SpecFile
from orchestrator.spec_checks import check_checkpoint, check_environment, check_timm_arch
from orchestrator.spec_yaml import load_yaml
from workers.stages.registry import STAGE_KINDS, EvaluateParams, TrainParams, find_kind, get_kind, pipeline_kinds
from workers.util import canonical_json, sha256_file

DEFAULT_ARTIFACTS = "./.greensweep/artifacts"  # as orchestrator.cli; GREENSWEEP_ARTIFACTS overrides


# -- validated, frozen domain objects ----------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    arch: str
    kwargs: Mapping[str, Any]
    checkpoint: str | None  # absolute path
    pretrained: bool
    input_size: tuple[int, int, int] | None = None  # model.input_size (C, H, W); None: as before


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
    # ``when:`` -- the stage runs only if this condition holds (orchestrator/gate.py); not
    # a grid axis and not part of the stage key
    when: Mapping[str, float] | None = None

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
    interleave: str = EvaluateParams.model_fields["interleave"].default
    slice_s: float = EvaluateParams.model_fields["slice_s"].default
    runtimes: tuple[str, ...] = ("torch",)
    precisions: tuple[str, ...] = ("fp32",)
    # most evaluations measured together (besides the reference); not part of any key
    cohort_size: int = 8

    def params_for(self, target: str, runtime: str = "torch", precision: str = "fp32") -> dict[str, Any]:
        return EvaluateParams(
            target=target,
            runtime=runtime,
            precision=precision,  # type: ignore[arg-type]  # checked by _EvaluateSection
            batch_size=self.batch_size,
            warmup_batches=self.warmup_batches,
            warmup_s=self.warmup_s,
            repeats=self.repeats,
            min_window_s=self.min_window_s,
            idle_s=self.idle_s,
            interleave=self.interleave,  # type: ignore[arg-type]  # checked by _EvaluateSection
            slice_s=self.slice_s,
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


def _as_axis(value: Any) -> tuple[Any, ...]:
    if isinstance(value, list):
        return tuple(value)
    return (value,)


def _parse_stage(raw: Any, path: str, max_points: int) -> StageTemplate:
    when_raw = raw.get("when") if isinstance(raw, dict) else None
    body = {k: v for k, v in raw.items() if k != "when"} if isinstance(raw, dict) else raw
    if not isinstance(body, dict) or len(body) != 1:
        raise SpecError(
            f"{path}: a stage is a mapping with exactly one key, the stage kind "
            f"({', '.join(pipeline_kinds())}), e.g. '- prune: {{method: structured, ratio: 0.5}}' "
            "(and, on a conditional stage, 'when:')"
        )
    (kind, params), = body.items()
    known = find_kind(kind)
    if known is not None and not known.hidden and known.role != "pipeline":
        section = "train" if known.role == "baseline" else "evaluate"  # the spec sections of these roles
        raise SpecError(f"{path}: {kind!r} is not a pipeline stage -- use the top-level '{section}:' section; "
                        f"pipeline stages are: {', '.join(pipeline_kinds())}")
    if kind not in pipeline_kinds():
        raise SpecError(f"{path}: unknown stage kind {kind!r} -- use one of: {', '.join(pipeline_kinds())}")
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
        if len(set(map(canonical_json, values))) != len(values):
            raise SpecError(f"{path}.{kind}.{name}: grid values repeat -- list each value once")
        axes.append((name, values))
    when = None
    if isinstance(raw, dict) and "when" in raw:
        from orchestrator.gate import parse_when

        when = parse_when(when_raw, f"{path}.{kind}", get_kind(kind).conditions)
    template = StageTemplate(kind=kind, axes=tuple(axes), when=when)
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
                digests.setdefault(str(file), sha256_file(file))
                v = f"{_CHECKPOINT_PREFIX}{file}"
            resolved.append(v)
        axes.append((name, tuple(resolved)))
    return replace(template, axes=tuple(axes))


def parse_spec(text: str, *, base_dir: Path | str = ".", check_arch: bool = True,
               artifact_root: Path | str | None = None) -> SweepSpec:
    """Parse and validate YAML *text*; relative paths resolve against *base_dir*.

    With *check_arch* (the default) the checks that read more than the text run too
    (:func:`orchestrator.spec_checks.check_environment`: timm, the model on the meta device, the dataset's
    headers, teacher artifacts under *artifact_root*, default ``$GREENSWEEP_ARTIFACTS``
    else ``./.greensweep/artifacts``); tests and benchmarks that plan imaginary models
    turn them off.
    """
    base = Path(base_dir)
    raw = load_yaml(text)
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
        checkpoint, checkpoint_sha = str(cp), sha256_file(cp)
    if f.model.checkpoint is not None and f.model.pretrained:
        raise SpecError("model: give either 'checkpoint' or 'pretrained: true', not both")
    input_size = None if f.model.input_size is None else tuple(f.model.input_size)
    if input_size is not None:
        _check_input_size_kwargs(input_size, f.model.kwargs)
    if check_arch:
        check_timm_arch(f.model.arch)
        if checkpoint is not None:
            check_checkpoint(checkpoint)

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
                           min_window_s=f.evaluate.min_window_s, idle_s=f.evaluate.idle_s,
                           interleave=f.evaluate.interleave, slice_s=f.evaluate.slice_s)
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
    movable = tuple(k for k, sk in STAGE_KINDS.items() if sk.role != "evaluation" and not sk.hidden)
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
        model=ModelSpec(arch=f.model.arch, kwargs=dict(f.model.kwargs), checkpoint=checkpoint,
                        pretrained=f.model.pretrained, input_size=input_size),
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
            interleave=f.evaluate.interleave,
            slice_s=f.evaluate.slice_s,
            runtimes=tuple(f.evaluate.runtimes),
            precisions=tuple(f.evaluate.precision),
            cohort_size=f.evaluate.cohort_size,
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
    if check_arch:
        root = artifact_root if artifact_root is not None else os.environ.get("GREENSWEEP_ARTIFACTS", DEFAULT_ARTIFACTS)
        check_environment(spec, Path(root).resolve())
    return spec


def _check_input_size_kwargs(input_size: tuple[int, ...], kwargs: Mapping[str, Any]) -> None:
    """``model.input_size`` sets ``in_chans`` and (for fixed-size architectures)
    ``img_size``; kwargs that say otherwise would build a model for another input."""
    channels, height, width = input_size
    if "in_chans" in kwargs and kwargs["in_chans"] != channels:
        raise SpecError(f"model.kwargs.in_chans: {kwargs['in_chans']!r} disagrees with model.input_size "
                        f"{list(input_size)} -- remove in_chans (input_size sets it) or make them agree")
    if "img_size" in kwargs:
        size = kwargs["img_size"]
        given = [size, size] if isinstance(size, int) and not isinstance(size, bool) else size
        if not isinstance(given, (list, tuple)) or list(given) != [height, width]:
            raise SpecError(f"model.kwargs.img_size: {size!r} disagrees with model.input_size {list(input_size)} "
                            "-- remove img_size (input_size sets it) or make them agree")


def count_points(spec: SweepSpec) -> int:
    """Number of (chain, target, runtime, precision) combinations without expanding the
    grid: an upper bound of the points (the planner drops the combinations a runtime
    cannot run)."""
    chains = 1 if spec.evaluate.baseline else 0
    for p in spec.pipelines:
        n = 1
        for st in p.stages:
            for _, vals in st.axes:
                n *= len(vals)
        chains += n
    return chains * len(spec.evaluate.targets) * len(spec.evaluate.runtimes) * len(spec.evaluate.precisions)


def load_spec(path: str | Path, *, check_arch: bool = True, artifact_root: Path | str | None = None) -> SweepSpec:
    """Read and validate the spec file at *path*."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise SpecError(f"spec file not found: {p} -- check the path (e.g. examples/quickstart.yaml)") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as e:
        raise SpecError(f"cannot read spec file {p}: {e.__class__.__name__} -- give a readable YAML file") from None
    return parse_spec(text, base_dir=p.parent, check_arch=check_arch, artifact_root=artifact_root)
