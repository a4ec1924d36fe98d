"""orchestrator.plan: content-addressed keys, shared prefixes, DAG shape, ``plan --json``."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.plan import Plan, build_plan, canonical_json, root_key, stage_key
from orchestrator.spec import SweepSpec, load_spec, parse_spec
from workers.stages.registry import get_kind, stage_label

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "tests" / "specs" / "good" / "prefixes.yaml"  # the first round's quickstart

# A small spec every variant below is derived from (check_arch=False: keys do not depend
# on timm, and this keeps the variants fast).
BASE = """name: base
seed: 0
model:
  arch: vit_tiny_patch16_224
  kwargs: {img_size: 8, patch_size: 2, in_chans: 1, depth: 1, embed_dim: 24, num_heads: 2}
dataset: {name: digits, options: {}}
train: {epochs: 2, lr: 0.002}
evaluate: {targets: [local], repeats: 3}
pipelines:  # last, so tests can append pipelines
  - name: pq
    stages:
      - prune: {method: structured, ratio: [0.25, 0.5]}
      - quantize: {weights: int8, activations: [none, int8]}
"""


def _plan(text: str = BASE, base_dir: Path | str = ".") -> Plan:
    return build_plan(parse_spec(text, base_dir=base_dir, check_arch=False))


def _keys(plan: Plan, kind: str | None = None) -> set[str]:
    return {s.key for s in plan.stages if kind is None or s.kind == kind}


def _fingerprint(plan: Plan) -> dict:
    return {
        "root": plan.root_key,
        "stages": [[s.key, s.kind, s.parent_key] for s in plan.stages],
        "points": [[p.pipeline, p.target, list(p.stage_keys), p.eval_key] for p in plan.points],
    }


@pytest.fixture(scope="module")
def qs_spec() -> SweepSpec:
    return load_spec(QUICKSTART)  # with the timm check: the quickstart must be fully valid


@pytest.fixture(scope="module")
def qs(qs_spec: SweepSpec) -> Plan:
    return build_plan(qs_spec)


# -- the key function ----------------------------------------------------------------------


def test_stage_key_is_sha256_of_parent_kind_and_canonical_params():
    params = {"b": [1, 2], "a": {"y": 0.5, "x": None}}
    expected = hashlib.sha256(b'parent\nprune\n{"a":{"x":null,"y":0.5},"b":[1,2]}').hexdigest()[:24]
    assert stage_key("parent", "prune", params) == expected
    assert stage_key("parent", "prune", {"a": {"x": None, "y": 0.5}, "b": [1, 2]}) == expected  # order-free
    assert canonical_json({"b": 1, "a": 2}) == '{"a":2,"b":1}'
    assert stage_key("other", "prune", params) != expected
    assert stage_key("parent", "quantize", params) != expected
    assert stage_key("parent", "prune", {**params, "b": [2, 1]}) != expected


def test_every_key_is_recomputable_from_its_parent(qs: Plan):
    for s in qs.stages:
        assert len(s.key) == 24 and all(c in "0123456789abcdef" for c in s.key)
        material = get_kind(s.kind).key_material(s.params, s.inputs)  # params less unkeyed defaults
        assert s.key == stage_key(s.parent_key or qs.root_key, s.kind, material)


# -- stability -----------------------------------------------------------------------------


def test_same_spec_gives_same_keys(qs_spec: SweepSpec, qs: Plan):
    again = build_plan(load_spec(QUICKSTART))
    assert _fingerprint(again) == _fingerprint(qs)
    assert again.to_json() == qs.to_json()
    assert build_plan(qs_spec).to_json() == qs.to_json()  # build_plan is pure


_CHILD = """
import json, sys
from orchestrator.plan import build_plan
from orchestrator.spec import load_spec
p = build_plan(load_spec(sys.argv[1], check_arch=False))
print(json.dumps({"root": p.root_key,
                  "stages": [[s.key, s.kind, s.parent_key] for s in p.stages],
                  "points": [[q.pipeline, q.target, list(q.stage_keys), q.eval_key] for q in p.points]}))
"""


def test_keys_are_stable_across_processes(qs: Plan):
    """Keys must not depend on the process (hash randomization, dict order, imports)."""
    procs = [
        subprocess.Popen([sys.executable, "-c", _CHILD, str(QUICKSTART)], cwd=REPO,
                         env={**os.environ, "PYTHONHASHSEED": seed},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for seed in ("1", "4242")
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert json.loads(out) == _fingerprint(qs)


def test_keys_ignore_spelling_that_does_not_change_meaning():
    base = _plan()
    same = [
        # defaults written out, kwargs reordered, flow vs block style, comments, names
        BASE.replace("{method: structured, ratio: [0.25, 0.5]}",
                     "{ratio: [0.25, 0.5], importance: l1, mode: all, method: structured}"),
        BASE.replace("kwargs: {img_size: 8, patch_size: 2, in_chans: 1, depth: 1, embed_dim: 24, num_heads: 2}",
                     "kwargs:\n    num_heads: 2\n    embed_dim: 24\n    depth: 1\n    in_chans: 1\n"
                     "    patch_size: 2\n    img_size: 8"),
        "# a comment\n" + BASE.replace("name: base", "name: renamed").replace("name: pq", "name: other-name"),
        BASE.replace("train: {epochs: 2, lr: 0.002}", "train: {epochs: 2, lr: 2.0e-3, weight_decay: 0.05}"),
        BASE.replace("evaluate: {targets: [local], repeats: 3}", "evaluate: {targets: [local], repeats: 3, cohort_size: 4}"),
        BASE.replace("dataset: {name: digits, options: {}}", "dataset: {name: digits}"),
    ]
    for text in same:
        other = _plan(text)
        assert [(s.key, s.parent_key) for s in other.stages] == [(s.key, s.parent_key) for s in base.stages], text


ROOT_CHANGES = {
    "seed": ("seed: 0", "seed: 1"),
    "model kwarg": ("depth: 1", "depth: 2"),
    "model arch": ("arch: vit_tiny_patch16_224", "arch: vit_small_patch16_224"),
    "pretrained": ("num_heads: 2}", "num_heads: 2}\n  pretrained: true"),
    "dataset name": ("{name: digits, options: {}}", "{name: synthetic, options: {}}"),
    "dataset options": ("{name: digits, options: {}}", "{name: digits, options: {classes: 5}}"),
}


@pytest.mark.parametrize("change", list(ROOT_CHANGES), ids=list(ROOT_CHANGES))
def test_keys_change_with_what_the_root_model_depends_on(change: str):
    old, new = ROOT_CHANGES[change]
    assert BASE.count(old) == 1
    base, other = _plan(), _plan(BASE.replace(old, new))
    assert other.root_key != base.root_key
    assert not _keys(base) & _keys(other), "every stage descends from the root"
    assert len(other.stages) == len(base.stages)


# BASE has 1 train, 2 prune, 4 quantize and 5 evaluate stages (baseline + 4 points).
# Each case: the edit, and how many stages of each kind the edited plan shares with BASE's.
PARAM_CHANGES = {
    "train-epochs": ("train: {epochs: 2, lr: 0.002}", "train: {epochs: 3, lr: 0.002}", (0, 0, 0, 0)),
    "train-lr": ("train: {epochs: 2, lr: 0.002}", "train: {epochs: 2, lr: 0.001}", (0, 0, 0, 0)),
    "prune-ratio": ("ratio: [0.25, 0.5]", "ratio: [0.25, 0.55]", (1, 1, 2, 1 + 2)),  # 0.25 is in both
    "prune-importance": ("{method: structured, ratio", "{method: structured, importance: l2, ratio", (1, 0, 0, 1)),
    "prune-mode": ("{method: structured, ratio", "{method: structured, mode: heads, ratio", (1, 0, 0, 1)),
    "quantize-weights": ("weights: int8", "weights: int4", (1, 2, 0, 1)),
    "quantize-calibration": ("activations: [none, int8]", "activations: [none, int8], calibration_batches: 4",
                             (1, 2, 0, 1)),
    "eval-repeats": ("repeats: 3", "repeats: 5", (1, 2, 4, 0)),
    "eval-batch-size": ("repeats: 3", "repeats: 3, batch_size: 32", (1, 2, 4, 0)),
    "eval-warmup": ("repeats: 3", "repeats: 3, warmup_batches: 0", (1, 2, 4, 0)),
    "eval-target": ("targets: [local]", "targets: [gpu]", (1, 2, 4, 0)),
}


@pytest.mark.parametrize("change", list(PARAM_CHANGES), ids=list(PARAM_CHANGES))
def test_keys_change_with_any_parameter(change: str):
    old, new, shared = PARAM_CHANGES[change]
    assert BASE.count(old) == 1
    base, other = _plan(), _plan(BASE.replace(old, new))
    assert other.root_key == base.root_key
    kinds = ("train", "prune", "quantize", "evaluate")
    assert tuple(len(_keys(base, k)) for k in kinds) == (1, 2, 4, 5)
    assert tuple(len(_keys(base, k) & _keys(other, k)) for k in kinds) == shared
    assert len(other.stages) == len(base.stages)


def test_checkpoint_keys_follow_content_not_path(tmp_path: Path):
    text = BASE.replace("train: {epochs: 2, lr: 0.002}\n", "").replace(
        "model:\n", "model:\n  checkpoint: w.safetensors\n")
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for d, content in ((a, b"weights-1"), (b, b"weights-1"), (c, b"weights-2")):
        d.mkdir()
        (d / "w.safetensors").write_bytes(content)
    pa, pb, pc = _plan(text, a), _plan(text, b), _plan(text, c)
    assert _fingerprint(pa) == _fingerprint(pb), "same bytes elsewhere: same keys (artifacts reused)"
    assert not _keys(pa) & _keys(pc), "other bytes: nothing shared"


def test_checkpoint_plan_has_no_train_and_roots_at_the_first_stage(tmp_path: Path):
    (tmp_path / "w.pt").write_bytes(b"w")
    text = BASE.replace("train: {epochs: 2, lr: 0.002}\n", "").replace("model:\n", "model:\n  checkpoint: w.pt\n")
    plan = _plan(text, tmp_path)
    assert not _keys(plan, "train")
    baseline, = [p for p in plan.points if p.pipeline == "baseline"]
    assert baseline.stage_keys == () and baseline.label == "baseline"
    ev = plan.stage(baseline.eval_key)
    assert ev.parent_key is None and ev.key == stage_key(plan.root_key, "evaluate",
                                                         get_kind("evaluate").key_material(ev.params, ev.inputs))
    for s in plan.stages:
        if s.kind == "prune":
            assert s.parent_key is None and s.key == stage_key(plan.root_key, "prune",
                                                               get_kind("prune").key_material(s.params, s.inputs))
            # unchanged by the parameters added since (n, m: left out of the key at their default)
            assert s.key == stage_key(plan.root_key, "prune", {k: v for k, v in s.params.items() if k not in ("n", "m")})
    assert (len(plan.points), len(plan.stages), plan.naive_stage_count) == (5, 2 + 4 + 5, 1 + 4 * 3)


def test_root_key_covers_model_data_and_seed(qs_spec: SweepSpec):
    assert root_key(qs_spec) == stage_key("root", "model", {
        "arch": "vit_tiny_patch16_224",
        "kwargs": dict(qs_spec.model.kwargs),
        "checkpoint_sha256": None,
        "pretrained": False,
        "dataset": {"name": "digits", "path": None, "options": {}},
        "seed": 0,
    })


# -- the quickstart's shape ----------------------------------------------------------------


def test_quickstart_counts(qs: Plan):
    assert len(qs.points) == 11
    assert len(qs.stages) == 22
    assert qs.naive_stage_count == 36
    assert Counter(s.kind for s in qs.stages) == {"train": 1, "prune": 4, "quantize": 6, "evaluate": 11}
    assert [p.index for p in qs.points] == list(range(11))
    assert Counter(p.pipeline for p in qs.points) == {
        "baseline": 1, "unstructured": 2, "structured": 2, "quantize": 2, "structured-int8": 4}
    assert qs.naive_stage_count == sum(len(p.stage_keys) + 1 for p in qs.points)


def test_quickstart_shares_prefixes(qs: Plan):
    train, = _keys(qs, "train")
    assert all(p.stage_keys[0] == train for p in qs.points), "the baseline is trained once for everything"

    def prune_keys(pipeline: str) -> set[str]:
        return {p.stage_keys[1] for p in qs.points if p.pipeline == pipeline}

    structured = prune_keys("structured")
    assert len(structured) == 2
    assert prune_keys("structured-int8") == structured, "structured prune stages shared by both pipelines"
    assert not prune_keys("unstructured") & structured
    for k in structured:
        s = qs.stage(k)
        assert s.kind == "prune" and s.params["method"] == "structured" and s.parent_key == train
    # quantize after train (pipeline `quantize`) differs from quantize after prune.
    q_train = {p.stage_keys[1] for p in qs.points if p.pipeline == "quantize"}
    q_prune = {p.stage_keys[2] for p in qs.points if p.pipeline == "structured-int8"}
    assert len(q_train) == 2 and len(q_prune) == 4 and not q_train & q_prune
    assert {qs.stage(k).parent_key for k in q_prune} == structured


def test_quickstart_labels(qs: Plan):
    labels = [p.label for p in qs.points]
    assert labels[0] == "baseline"
    assert "structured: prune(method=structured, ratio=0.3, mode=all)" in labels
    assert ("structured-int8: prune(method=structured, ratio=0.6, mode=all) > "
            "quantize(weights=int8, activations=int8)") in labels
    # quickstart writes `activations: [none, int8]`: the default is left out of the label
    assert "quantize: quantize(weights=int8)" in labels
    assert len(set(labels)) == len(labels)  # defaults left out, every point still reads apart
    assert all(p.stage_labels[0] == "train" for p in qs.points)
    # the plan labels a stage exactly as results and reports label the stored stage
    for s in qs.stages:
        if s.kind in ("prune", "quantize"):
            assert s.label == stage_label(s.kind, s.params)


def test_stage_label_is_params_minus_defaults():
    full = {"method": "structured", "ratio": 0.5, "mode": "all", "importance": "l1"}
    assert stage_label("prune", full) == "prune(method=structured, ratio=0.5, mode=all)"
    assert (stage_label("prune", {**full, "importance": "l2"})
            == "prune(method=structured, ratio=0.5, mode=all, importance=l2)")
    assert stage_label("finetune", {"epochs": 10, "amp": False, "patience": None}) == "finetune(amp=false)"
    assert stage_label("train", {"epochs": 30, "lr": 0.002}) == "train()"
    # a kind this greensweep does not know (an old store): every parameter, JSON values
    assert stage_label("qat", {"bits": 4, "layers": [1, 2], "on": True}) == "qat(bits=4, layers=[1,2], on=true)"


# -- DAG invariants ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def all_plans(qs: Plan) -> dict[str, Plan]:
    targets = BASE.replace("targets: [local]", "targets: [local, gpu, arm]")
    two = targets + "  - name: again\n    stages:\n      - prune: {method: structured, ratio: [0.5, 0.75]}\n"
    return {"base": _plan(), "targets": _plan(targets), "two-pipelines": _plan(two), "quickstart": qs}


@pytest.fixture(params=["base", "targets", "two-pipelines", "quickstart"])
def any_plan(request, all_plans: dict[str, Plan]) -> Plan:
    return all_plans[request.param]


def test_parents_precede_children(any_plan: Plan):
    position = {s.key: i for i, s in enumerate(any_plan.stages)}
    assert len(position) == len(any_plan.stages), "stages are unique"
    for i, s in enumerate(any_plan.stages):
        if s.parent_key is not None:
            assert position[s.parent_key] < i, s.label


def test_every_point_chain_is_connected(any_plan: Plan):
    keys = _keys(any_plan)
    for p in any_plan.points:
        parent = None
        for k in p.stage_keys:
            s = any_plan.stage(k)
            assert s.parent_key == parent and s.kind != "evaluate"
            parent = k
        ev = any_plan.stage(p.eval_key)
        assert ev.kind == "evaluate" and ev.parent_key == parent and ev.target == p.target
        assert ev.params["target"] == p.target
        assert set(p.stage_keys) | {p.eval_key} <= keys
        assert p.stage_labels == tuple(any_plan.stage(k).label for k in p.stage_keys)
    # Every stage is used by some point.
    used = {k for p in any_plan.points for k in (*p.stage_keys, p.eval_key)}
    assert used == keys


def test_evaluate_stage_for_every_chain_and_target(any_plan: Plan):
    chains = {p.stage_keys for p in any_plan.points}
    targets = {s.target for s in any_plan.stages if s.kind == "evaluate"}
    pairs = {(p.stage_keys, p.target): p.eval_key for p in any_plan.points}
    assert set(pairs) == {(c, t) for c in chains for t in targets}
    assert len(set(pairs.values())) == len(pairs) == len(_keys(any_plan, "evaluate"))
    for s in any_plan.stages:
        assert (s.target is not None) == (s.kind == "evaluate")


def test_targets_multiply_evaluate_stages_only():
    one = _plan()
    three = _plan(BASE.replace("targets: [local]", "targets: [local, gpu, arm]"))
    for kind in ("train", "prune", "quantize"):
        assert _keys(three, kind) == _keys(one, kind), kind
    assert len(_keys(one, "evaluate")) == 5 and len(_keys(three, "evaluate")) == 15
    assert _keys(one, "evaluate") < _keys(three, "evaluate"), "local evaluate keys unchanged"
    assert (len(one.points), len(three.points)) == (5, 15)
    assert three.naive_stage_count == 3 * one.naive_stage_count
    assert Counter(p.target for p in three.points) == {"local": 5, "gpu": 5, "arm": 5}


def test_targets_multiply_quickstart(qs_spec: SweepSpec, qs: Plan):
    text = qs_spec.source_text.replace("targets: [local]", "targets: [local, gpu-a100, rpi5]")
    plan = build_plan(parse_spec(text, check_arch=False))
    assert (len(plan.points), len(plan.stages), plan.naive_stage_count) == (33, 11 + 33, 3 * 36)
    assert {s.key for s in plan.stages if s.kind != "evaluate"} == {s.key for s in qs.stages if s.kind != "evaluate"}


def test_identical_pipelines_share_every_stage():
    dup = BASE + "  - name: copy\n    stages:\n      - prune: {method: structured, ratio: [0.25, 0.5]}\n" \
                 "      - quantize: {weights: int8, activations: [none, int8]}\n"
    base, plan = _plan(), _plan(dup)
    assert _keys(plan) == _keys(base)
    assert len(plan.points) == 9 and plan.naive_stage_count == 2 + 8 * 4


def test_no_baseline_point_when_baseline_is_false():
    plan = _plan(BASE.replace("repeats: 3}", "repeats: 3, baseline: false}"))
    assert all(p.pipeline != "baseline" for p in plan.points) and len(plan.points) == 4
    train, = _keys(plan, "train")
    assert not any(s.kind == "evaluate" and s.parent_key == train for s in plan.stages)


# -- children / descendants ----------------------------------------------------------------


def test_descendants(qs: Plan):
    train, = _keys(qs, "train")
    everything_else = _keys(qs) - {train}
    d = qs.descendants(train)
    assert len(d) == len(set(d)) == 21 and set(d) == everything_else

    by_label = {s.label: s.key for s in qs.stages if s.kind == "prune"}
    sp = by_label["prune(method=structured, ratio=0.3, mode=all)"]
    d = qs.descendants(sp)
    assert Counter(qs.stage(k).kind for k in d) == {"quantize": 2, "evaluate": 3}
    assert all(sp in (qs.stage(k).parent_key, qs.stage(qs.stage(k).parent_key).parent_key) for k in d)

    up = by_label["prune(method=unstructured, ratio=0.3)"]
    d = qs.descendants(up)
    assert len(d) == 1 and qs.stage(d[0]).kind == "evaluate"

    for p in qs.points:
        assert qs.descendants(p.eval_key) == []
    assert qs.descendants("not-a-key") == []


def test_children_partition_the_non_root_stages(qs: Plan):
    kids = qs.children()
    assert set(kids) == _keys(qs)
    flat = [k for ks in kids.values() for k in ks]
    assert sorted(flat) == sorted(s.key for s in qs.stages if s.parent_key is not None)
    for parent, ks in kids.items():
        assert all(qs.stage(k).parent_key == parent for k in ks)


# -- plan --json through the CLI -------------------------------------------------------------


def test_cli_plan_json(qs: Plan, tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main(["plan", str(QUICKSTART), "--json"])  # success returns normally (no SystemExit)
    out, err = capsys.readouterr()
    assert err == ""
    data = json.loads(out)
    assert (data["points"], data["unique_stages"], data["naive_stages"]) == (11, 22, 36)
    assert data["root_key"] == qs.root_key
    assert [s["key"] for s in data["stages"]] == [s.key for s in qs.stages]
    assert len(data["point_list"]) == 11 and data["point_list"][0]["label"] == "baseline"
    assert {s["kind"] for s in data["stages"]} == {"train", "prune", "quantize", "evaluate"}
    assert data == json.loads(json.dumps(qs.to_json()))
    assert list(tmp_path.iterdir()) == [], "plan writes nothing"


def test_cli_plan_text(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main(["plan", str(QUICKSTART)])
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert err == ""
    assert lines[0] == "sweep 'quickstart': 11 points, 22 unique stages (a per-point runner would execute 36)"
    assert lines[1] == "stages by kind: train 1, prune 4, quantize 6, evaluate 11"
    assert len(lines) == 2 + 11
    assert list(tmp_path.iterdir()) == []
