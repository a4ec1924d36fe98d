"""A 2:4 model in results, compare and the prune curves, read from a real store filled
here (faked evaluations): whether it was materialized is each evaluation's own record
(sparse kernels on the GPU at fp16, dense kernels on the CPU), not its artifact's flag."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import replace
from pathlib import Path

import pytest

from orchestrator.report import RESULT_FIELDS, build_comparison, render_comparison, render_results
from orchestrator.report.plots import prune_series
from orchestrator.store import Store
from orchestrator.store.records import ResultRow
from workers.stages.registry import PruneParams
from workers.types import ArtifactInfo, EnergyReading, EvalRepeat, StageResult

SID = "sw-sparse0001"
SEMI = PruneParams(method="semi-structured").model_dump(mode="json")  # ratio None, n 2, m 4
LABEL = "s: prune(method=semi-structured, mode=all, n=2, m=4)"
LAYERS = ["blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "blocks.0.attn.qkv"]
CPU_RECORD = {"pattern": "2:4", "materialized": False, "reason": "CPU: dense kernels", "kernels": None,
              "sparse_layers": LAYERS, "dense_layers": [{"name": "head", "why": "the classifier (always dense)"}]}
GPU_RECORD = {"pattern": "2:4", "materialized": True, "reason": "cusparselt fp16 sparse kernels on NVIDIA A100",
              "kernels": "cusparselt", "sparse_layers": LAYERS[:2],
              "dense_layers": [{"name": "head", "why": "the classifier (always dense)"},
                               {"name": "blocks.0.attn.qkv", "why": "shape (120, 40) is not a multiple of (16, 16)"}]}
# (model, target, precision) -> the evaluation's sparsity record (None: no pattern)
EVALUATIONS = {("baseline", "cpu", "fp32"): None, ("baseline", "gpu", "fp16"): None,
               ("sparse", "cpu", "fp32"): CPU_RECORD, ("sparse", "gpu", "fp16"): GPU_RECORD}


def _evaluation(key: str, precision: str, record: dict | None) -> StageResult:
    repeats = tuple(EvalRepeat(repeat=i, samples=100, top1=0.9, top5=0.99, duration_s=0.1, time_per_sample_s=1e-3,
                               throughput_samples_per_s=1e3,
                               energy=EnergyReading(duration_s=0.1, cpu_energy_j=1.0, cpu_source="rapl"))
                    for i in range(2))
    metrics = {"params": 1000, "macs": 10_000, "size_bytes": 4000, "materialized": False,
               "runtime": {"runtime": "torch", "runtime_version": "2.14", "precision": precision, "device": "cpu",
                           "threads": {"intra_op": 1, "inter_op": 1}, "settings": {}},
               **({"sparsity": record} if record is not None else {})}
    return StageResult(key=key, kind="evaluate", status="succeeded", duration_s=1.0, node_id="node-x",
                       repeats=repeats, metrics=metrics)


@pytest.fixture
def rows(tmp_path: Path) -> list[ResultRow]:
    stages = [{"key": "k-train", "kind": "train", "params": {"epochs": 1}},
              {"key": "k-semi", "kind": "prune", "params": SEMI, "parent_key": "k-train"}]
    points = []
    for model, target, precision in EVALUATIONS:
        chain = ["k-train"] if model == "baseline" else ["k-train", "k-semi"]
        key = f"k-e-{model}-{target}"
        stages.append({"key": key, "kind": "evaluate", "params": {"target": target, "precision": precision},
                       "parent_key": chain[-1], "target": target})
        points.append({"point_index": len(points), "label": "baseline" if model == "baseline" else LABEL,
                       "pipeline": "baseline" if model == "baseline" else "s", "stage_keys": chain, "target": target,
                       "eval_key": key})
    with Store.open(f"sqlite:///{tmp_path / 's.db'}") as store:
        store.create_sweep(SID, "sparse", "name: sparse\n", "h", "/a", stages, points, naive_stage_count=len(stages))
        for key, kind, materialized in (("k-train", "train", True), ("k-semi", "prune", False)):
            art = ArtifactInfo(key=key, path=f"/a/{key}", size_bytes=4000, sha256="0" * 64, materialized=materialized,
                               params=1000, macs=10_000)
            store.record_stage_result(SID, StageResult(key=key, kind=kind, status="succeeded", duration_s=1.0,
                                                       node_id="node-x", artifact=art))
        for (model, target, precision), record in EVALUATIONS.items():
            store.record_stage_result(SID, _evaluation(f"k-e-{model}-{target}", precision, record))
        return store.results(SID)


def test_each_evaluation_says_whether_it_ran_the_pattern_on_sparse_kernels(rows):
    by = {(r.point, r.target): r for r in rows}
    assert by[(LABEL, "cpu")].materialized is False and by[(LABEL, "cpu")].sparsity == CPU_RECORD
    assert by[(LABEL, "gpu")].materialized is True and by[(LABEL, "gpu")].sparsity == GPU_RECORD
    assert by[("baseline", "gpu")].materialized is True and by[("baseline", "gpu")].sparsity is None
    data = json.loads(render_results(rows, "json"))
    assert RESULT_FIELDS[-1] == "sparsity" and all(list(d) == list(RESULT_FIELDS) for d in data)
    assert [d["sparsity"] for d in data] == [None, None, CPU_RECORD, GPU_RECORD]
    table = render_results(rows, "table")
    assert "simulated 2:4" in table and "materialized 2:4 (2/4 layers)" in table
    assert "2:4: the model's semi-structured zeros; materialized = this evaluation ran them" in table
    lines = list(csv.DictReader(io.StringIO(render_results(rows, "csv"))))
    assert [json.loads(d["sparsity"]) if d["sparsity"] else None for d in lines] == [None, None, CPU_RECORD, GPU_RECORD]


def test_results_without_a_pattern_have_no_sparsity_note(rows):
    plain = [r for r in rows if r.sparsity is None]
    assert "2:4" not in render_results(plain, "table")


def test_compare_names_the_columns_where_the_pattern_was_materialized(rows):
    c = build_comparison(rows)
    sparse = next(m for m in c.models if m.label == LABEL)
    assert sparse.materialized is None  # the columns differ
    assert sparse.compression == "simulated 2:4 on cpu/fp32; materialized 2:4 (2/4 layers) on gpu/fp16"
    data = json.loads(render_comparison(c, "json"))
    model = next(m for m in data["models"] if m["model"] == LABEL)
    assert model["materialized"] is None
    assert {name: (cell["materialized"], cell["sparsity"]) for name, cell in model["cells"].items()} == {
        "cpu/fp32": (False, CPU_RECORD), "gpu/fp16": (True, GPU_RECORD)}
    baseline = next(m for m in data["models"] if m["model"] == "baseline")
    assert baseline["materialized"] is True and baseline["compression"] == "none"
    for fmt in ("markdown", "csv"):
        assert sparse.compression in render_comparison(c, fmt), fmt
    table = render_comparison(c, "table")  # the last column, wrapped over the row's lines
    column = " ".join(cell for line in table.splitlines() if line.startswith("│")
                      if (cell := line.split("│")[-2].strip()))
    assert sparse.compression in column


def test_a_prune_stage_without_a_ratio_is_no_point_of_the_prune_curves(rows):
    assert SEMI["ratio"] is None and any(r.stage_params[-1] == SEMI for r in rows)
    assert prune_series(rows) == {}  # the baseline alone is no series; the 2:4 points have no ratio
    keyed = {k: v for k, v in SEMI.items() if k != "ratio"}  # stored without it (an unkeyed default)
    assert prune_series([replace(r, stage_params=(*r.stage_params[:-1], keyed)) if r.point == LABEL else r
                         for r in rows]) == {}
