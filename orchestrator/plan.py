"""Spec -> DAG of stages with content-addressed keys.

A stage's key is ``sha256(parent key, kind, canonical params)``; the root's "parent key"
is a hash of everything the first stage's output depends on (model architecture and
kwargs, checkpoint content, dataset, seed). Two sweep points that share a prefix (same
prune ratio, different quantization) therefore share those stage nodes, and the prefix
runs once. Artifacts are stored under the same key, so a later sweep reuses them.

Evaluate stages are added for every (chain, target, runtime, precision) combination whose
runtime can run the chain's model at that precision (the chain's artifact format against
the formats each backend declares; the rest are listed as ``unpaired``, not errors unless
nothing is left). Their key includes the target, the runtime, the precision and the
protocol -- runtime and precision only when they are not the torch / fp32 defaults, so the
keys of stores written before there were runtimes stay valid.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from orchestrator.errors import SpecError
from orchestrator.gate import Gate
from orchestrator.spec import SweepSpec
from workers.backends import BACKENDS, get_backend
from workers.util import canonical_json
from workers.stages.registry import (
    ARTIFACT_PREFIX,
    CHECKPOINT_PREFIX,
    StageInputs,
    get_kind,
    kind_with_role,
    stage_label,
)

KEY_HEX_CHARS = 24  # 96 bits: collisions are not a practical concern for sweeps


def stage_key(parent_key: str, kind: str, params: Mapping[str, Any]) -> str:
    payload = f"{parent_key}\n{kind}\n{canonical_json(params)}"
    return hashlib.sha256(payload.encode()).hexdigest()[:KEY_HEX_CHARS]


def root_key(spec: SweepSpec) -> str:
    """Hash of what the root model depends on: architecture, weights source, data, seed,
    and ``model.input_size`` -- only when the spec gives it, so the keys of specs without
    it (and their stored artifacts) are what they were."""
    material: dict[str, Any] = {
        "arch": spec.model.arch,
        "kwargs": dict(spec.model.kwargs),
        "checkpoint_sha256": spec.checkpoint_sha256,
        "pretrained": spec.model.pretrained,
        "dataset": {"name": spec.dataset.name, "path": spec.dataset.path, "options": dict(spec.dataset.options)},
        "seed": spec.seed,
    }
    if spec.model.input_size is not None:
        material["input_size"] = list(spec.model.input_size)
    return stage_key("root", "model", material)


@dataclass(frozen=True)
class PlannedStage:
    key: str
    kind: str
    params: Mapping[str, Any]  # validated, defaults filled
    parent_key: str | None  # None: built from the spec's model (root stage)
    label: str  # registry.stage_label, e.g. "prune(method=structured, ratio=0.5, mode=all)"
    target: str | None = None  # evaluate stages: the node type they are pinned to
    # What the stage reads besides its parent (a teacher artifact, spec-named files with
    # their digests), from its kind's declaration: what the coordinator ships.
    inputs: StageInputs = field(default_factory=StageInputs)
    # A conditional stage (``when:``): the condition and the evaluations that decide it
    # (also in ``inputs.evaluations``, which the coordinator waits for); not in the key.
    gate: Gate | None = None


@dataclass(frozen=True)
class PlannedPoint:
    index: int
    label: str  # e.g. "structured: prune(method=structured, ratio=0.5, mode=all) > quantize(weights=int8)"
    pipeline: str
    stage_keys: tuple[str, ...]  # root-first chain of model-producing stages
    stage_labels: tuple[str, ...]
    target: str
    eval_key: str
    runtime: str = "torch"
    precision: str = "fp32"


@dataclass(frozen=True)
class Unpaired:
    """A (chain, target, runtime, precision) combination of the grid that is not a
    point: the runtime cannot run the chain's model at that precision."""

    label: str  # the chain's point label
    target: str
    runtime: str
    precision: str
    reason: str


@dataclass(frozen=True)
class Plan:
    root_key: str
    stages: tuple[PlannedStage, ...]  # unique, parents before children
    points: tuple[PlannedPoint, ...]
    naive_stage_count: int  # stages a per-point runner (one chain per point) would execute
    unpaired: tuple[Unpaired, ...] = ()  # grid combinations a runtime cannot run, and why
    # per target, the reference every cohort on it measures: the uncompressed model on torch
    # at fp32 -- a stage of the plan when it is a point, else measured only for the ratios
    references: Mapping[str, PlannedStage] = field(default_factory=dict)
    _by_key: Mapping[str, PlannedStage] = field(default_factory=dict, repr=False, compare=False)

    def stage(self, key: str) -> PlannedStage:
        return self._by_key[key]

    def has_stage(self, key: str) -> bool:
        return key in self._by_key

    def children(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {s.key: [] for s in self.stages}
        for s in self.stages:
            if s.parent_key is not None and s.parent_key in out:
                out[s.parent_key].append(s.key)
        return out

    def descendants(self, key: str) -> list[str]:
        kids = self.children()
        out, todo = [], list(kids.get(key, []))
        while todo:
            k = todo.pop()
            out.append(k)
            todo.extend(kids.get(k, []))
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "root_key": self.root_key,
            "points": len(self.points),
            "unique_stages": len(self.stages),
            "naive_stages": self.naive_stage_count,
            "stages": [
                {"key": s.key, "kind": s.kind, "label": s.label, "parent_key": s.parent_key,
                 "target": s.target, "params": dict(s.params),
                 "reads": {"artifacts": list(s.inputs.artifacts), "files": [path for path, _ in s.inputs.files],
                           "evaluations": list(s.inputs.evaluations)},
                 **({"when": s.gate.to_json()} if s.gate is not None else {})}
                for s in self.stages
            ],
            "point_list": [
                {"index": p.index, "label": p.label, "pipeline": p.pipeline, "target": p.target,
                 "runtime": p.runtime, "precision": p.precision,
                 "stages": list(p.stage_labels), "stage_keys": list(p.stage_keys), "eval_key": p.eval_key}
                for p in self.points
            ],
            "unpaired": [{"label": u.label, "target": u.target, "runtime": u.runtime, "precision": u.precision,
                          "reason": u.reason} for u in self.unpaired],
        }


def _baseline_ref(spec: SweepSpec, train_key: str | None) -> str | None:
    """What a ``baseline`` reference means in this sweep: its trained baseline, else the
    checkpoint it starts from, else nothing (a pretrained model with no train section)."""
    if train_key is not None:
        return f"{ARTIFACT_PREFIX}{train_key}"
    if spec.model.checkpoint is not None:
        return f"{CHECKPOINT_PREFIX}{spec.model.checkpoint}"
    return None


def _resolve(spec: SweepSpec, kind: str, params: dict[str, Any], baseline: str | None,
             label: str) -> tuple[dict[str, Any], StageInputs, dict[str, Any]]:
    """The stage's params with its references resolved, what it reads, and its key
    material -- all from the kind's declaration."""
    sk = get_kind(kind)
    try:
        resolved = sk.resolve(params, baseline)
    except ValueError as e:
        raise SpecError(
            f"{label}: {e} -- add a 'train:' section (e.g. fine-tune the pretrained model) or name it as "
            "'checkpoint:<file>' or 'artifact:<key>'"
        ) from None
    files = dict(spec.file_sha256)
    if spec.model.checkpoint is not None and spec.checkpoint_sha256 is not None:
        files.setdefault(spec.model.checkpoint, spec.checkpoint_sha256)
    inputs = sk.inputs(resolved, files)
    return resolved, inputs, sk.key_material(resolved, inputs)


def _root_inputs(spec: SweepSpec) -> StageInputs:
    """A root stage (no parent) builds from the spec's model: its checkpoint travels with it."""
    if spec.model.checkpoint is not None and spec.checkpoint_sha256 is not None:
        return StageInputs(files=((spec.model.checkpoint, spec.checkpoint_sha256),))
    return StageInputs()


def _with_root(inputs: StageInputs, root: StageInputs) -> StageInputs:
    return replace(inputs, files=tuple(dict((*root.files, *inputs.files)).items()))


def build_plan(spec: SweepSpec) -> Plan:
    """Expand the spec's grids into a deduplicated DAG. Pure: no I/O, no Ray."""
    rkey = root_key(spec)
    stages: dict[str, PlannedStage] = {}
    points: list[PlannedPoint] = []
    naive = 0

    def add(stage: PlannedStage) -> None:
        stages.setdefault(stage.key, stage)

    root_inputs = _root_inputs(spec)
    # The chain's root: the baseline training, or none (first stage builds from the checkpoint).
    base_chain: list[PlannedStage] = []
    train_key: str | None = None
    if spec.train is not None:
        kind = kind_with_role("baseline").name
        material = get_kind(kind).key_material(spec.train, StageInputs())  # params less unkeyed defaults
        train = PlannedStage(stage_key(rkey, kind, material), kind, dict(spec.train), None, kind,
                             inputs=root_inputs)
        add(train)
        base_chain.append(train)
        train_key = train.key
    baseline = _baseline_ref(spec, train_key)

    chains: list[tuple[str, list[PlannedStage]]] = []
    if spec.evaluate.baseline:
        chains.append(("baseline", list(base_chain)))
    # conditional stages: key -> (condition, pipeline, the chain up to its parent); a stage
    # planned both with and without a condition runs unconditionally
    gated: dict[str, tuple[Mapping[str, float], str, list[PlannedStage]]] = {}
    ungated: set[str] = set()
    for pipeline in spec.pipelines:
        partial: list[list[PlannedStage]] = [list(base_chain)]
        for template in pipeline.stages:
            grown = []
            for chain in partial:
                parent = chain[-1].key if chain else rkey
                for _written, full in template.combinations():
                    label = stage_label(template.kind, full)  # validated params, references not yet resolved
                    full, inputs, key_material = _resolve(spec, template.kind, full, baseline,
                                                          f"pipeline {pipeline.name}: {label}")
                    st = PlannedStage(
                        stage_key(parent, template.kind, key_material), template.kind, full,
                        chain[-1].key if chain else None, label,
                        inputs=inputs if chain else _with_root(inputs, root_inputs),
                    )
                    add(st)
                    if template.when is None:
                        ungated.add(st.key)
                    elif gated.setdefault(st.key, (template.when, pipeline.name, chain))[0] != template.when:
                        raise SpecError(f"pipeline {pipeline.name}: {label} is planned with two different 'when:' "
                                        "conditions -- give it one")
                    grown.append(chain + [stages[st.key]])
            partial = grown
        chains.extend((pipeline.name, c) for c in partial)
    for key in ungated:
        gated.pop(key, None)
    # a condition compares with the float parent: make sure that model is measured too
    for _when, pipeline_name, chain in gated.values():
        if not any([s.key for s in c] == [s.key for s in chain] for _, c in chains):
            chains.append((pipeline_name, list(chain)))

    evaluate = get_kind(kind_with_role("evaluation").name)
    unpaired: list[Unpaired] = []
    for pipeline_name, chain in chains:
        fmt = chain_format(pipeline_name, chain)
        labels = tuple(s.label for s in chain)
        compress = [s.label for s in chain if get_kind(s.kind).role == "pipeline"]
        label = "baseline" if not compress else f"{pipeline_name}: " + " > ".join(compress)
        reasons = []
        for target, runtime, precision in evaluation_grid(spec):
            reason = get_backend(runtime).pairing(fmt, precision)
            if reason is not None:
                unpaired.append(Unpaired(label, target, runtime, precision, reason))
                reasons.append(f"{runtime} at {precision}: {reason}")
                continue
            params = spec.evaluate.params_for(target, runtime, precision)
            # An empty chain (checkpoint or pretrained model, no train) evaluates the root as loaded.
            parent = chain[-1].key if chain else None
            ev = PlannedStage(
                stage_key(parent or rkey, evaluate.name, evaluate.key_material(params, StageInputs())),
                evaluate.name, params, parent, evaluation_label(evaluate.name, target, runtime, precision), target,
                inputs=StageInputs() if chain else root_inputs,
            )
            add(ev)
            points.append(PlannedPoint(
                index=len(points), label=label, pipeline=pipeline_name,
                stage_keys=tuple(s.key for s in chain), stage_labels=labels,
                target=target, eval_key=ev.key, runtime=runtime, precision=precision,
            ))
            naive += len(chain) + 1
        if len(reasons) == len(evaluation_grid(spec)):
            runs = ", ".join(name for name, b in BACKENDS.items() if fmt in b.runs) or "none"
            raise SpecError(f"evaluate.runtimes: nothing can measure {label} ({'; '.join(sorted(set(reasons)))}) "
                            f"-- its {fmt} model runs on: {runs}; add one to evaluate.runtimes or change the pipeline")

    for key, (when, pipeline_name, _chain) in gated.items():
        stages[key] = _gated(spec, stages, stages[key], when, pipeline_name)
    references = {target: _reference(spec, evaluate.name, target, base_chain, rkey, root_inputs)
                  for target in spec.evaluate.targets}
    ordered = tuple(stages.values())  # insertion order is parent-before-child
    return Plan(root_key=rkey, stages=ordered, points=tuple(points), naive_stage_count=naive,
                unpaired=tuple(unpaired), references=references, _by_key=dict(stages))


def _gated(spec: SweepSpec, stages: Mapping[str, PlannedStage], st: PlannedStage, when: Mapping[str, float],
           pipeline: str) -> PlannedStage:
    """*st* with its gate: the sibling its kind names on the same parent, and the two
    evaluations (the sibling's and the float parent's, on the first target at fp32, on the
    first runtime that runs the sibling's model) that decide it."""
    kind = get_kind(st.kind)
    assert kind.sibling is not None  # register_kind: conditions need a sibling
    sibling_kind, wanted = kind.sibling(st.params)
    where = f"pipeline {pipeline}: {st.label} when"
    written = ", ".join(f"{k}: {v}" for k, v in wanted.items())
    siblings = [s for s in stages.values() if s.kind == sibling_kind and s.parent_key == st.parent_key
                and all(s.params.get(k) == v for k, v in wanted.items())]
    if not siblings:
        raise SpecError(f"{where}: no post-training sibling to compare with -- add a pipeline that ends in "
                        f"'{sibling_kind}: {{{written}}}' on the same parent as {st.label}, or remove 'when:'")
    # the sibling closest to the stage's own settings (calibration) when there are several
    sibling = max(siblings, key=lambda s: sum(s.params.get(k) == v for k, v in st.params.items()))
    target = spec.evaluate.targets[0]
    if "fp32" not in spec.evaluate.precisions:
        raise SpecError(f"{where}: the condition is measured at fp32 -- add fp32 to evaluate.precision")
    fmt = get_kind(sibling.kind).artifact_format(sibling.params)
    runtime = next((r for r in spec.evaluate.runtimes if get_backend(r).pairing(fmt, "fp32") is None), None)
    if runtime is None:
        raise SpecError(f"{where}: nothing in evaluate.runtimes runs {sibling.label}'s {fmt} model -- add one")

    def evaluation_of(parent: str | None) -> PlannedStage | None:
        return next((s for s in stages.values() if get_kind(s.kind).role == "evaluation" and s.parent_key == parent
                     and s.target == target and s.params.get("runtime") == runtime
                     and s.params.get("precision") == "fp32"), None)

    sibling_eval, parent_eval = evaluation_of(sibling.key), evaluation_of(st.parent_key)
    if sibling_eval is None:
        raise SpecError(f"{where}: {sibling.label} is not measured (a stage follows it in every pipeline) -- add a "
                        "pipeline that ends in it")
    assert parent_eval is not None  # build_plan measures every gated stage's float parent
    gate = Gate(condition=next(iter(when)), threshold=next(iter(when.values())), sibling_key=sibling.key,
                sibling_label=sibling.label, sibling_eval=sibling_eval.key, parent_eval=parent_eval.key,
                where=f"{target} on {runtime} fp32")
    return replace(st, gate=gate, inputs=replace(st.inputs, evaluations=(parent_eval.key, sibling_eval.key)))


def _reference(spec: SweepSpec, kind: str, target: str, base_chain: list[PlannedStage], rkey: str,
               root_inputs: StageInputs) -> PlannedStage:
    """The evaluation of the uncompressed model on *target* on torch at fp32: the baseline
    point's own stage when the sweep has that point (same key), else the same stage unplanned."""
    sk = get_kind(kind)
    params = spec.evaluate.params_for(target, "torch", "fp32")
    parent = base_chain[-1].key if base_chain else None
    return PlannedStage(stage_key(parent or rkey, kind, sk.key_material(params, StageInputs())), kind, params,
                        parent, evaluation_label(kind, target, "torch", "fp32"), target,
                        inputs=StageInputs() if base_chain else root_inputs)


def evaluation_grid(spec: SweepSpec) -> list[tuple[str, str, str]]:
    """Every (target, runtime, precision) the spec asks each model to be measured on."""
    ev = spec.evaluate
    return [(t, r, p) for t in ev.targets for r in ev.runtimes for p in ev.precisions]


def evaluation_label(kind: str, target: str, runtime: str, precision: str) -> str:
    """``evaluate(local)`` for torch at fp32 (the labels of stores written before there
    were runtimes), else ``evaluate(local, openvino)`` or ``evaluate(local, torch, bf16)``."""
    shown = [target] + ([runtime] if (runtime, precision) != ("torch", "fp32") else [])
    if precision != "fp32":
        shown.append(precision)
    return f"{kind}({', '.join(shown)})"


def chain_format(pipeline: str, chain: list[PlannedStage]) -> str:
    """The artifact format a chain ends in (``torch`` for an empty chain or the root),
    after checking that each stage can start from its parent's format."""
    fmt, parent = "torch", None
    for st in chain:
        kind = get_kind(st.kind)
        if fmt not in kind.consumes:
            raise SpecError(
                f"pipeline {pipeline}: {st.label} cannot start from the {fmt} model {parent} makes -- put "
                f"{parent} last in the pipeline"
            )
        if kind.produces_artifact:
            fmt, parent = kind.artifact_format(st.params), st.label
    return fmt
