"""Results, compare, Pareto and the HTML report of a sweep measured on several runtimes,
read from a real store filled here (faked evaluations, as tests/unit/test_store.py does):
the JSON keys, the best-runtime mark, a point's identity and the runtime names shown."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest

from orchestrator.report import (
    BEST_RULE,
    RESULT_FIELDS,
    build_comparison,
    build_pareto,
    build_report,
    render_comparison,
    render_pareto,
    render_results,
)
from orchestrator.report.plots import pareto_png, prune_series
from orchestrator.store import Store
from orchestrator.store.records import ResultRow, SweepRecord
from tests.cli import run_cli
from workers.types import ArtifactInfo, EnergyReading, EvalRepeat, StageResult

SID = "sw-runtimes0001"
PRUNE = {"method": "structured", "ratio": 0.5, "mode": "all"}
# model -> (point label, pipeline, chain)
MODELS = {"baseline": ("baseline", "baseline", ["k-train"]),
          "pruned": ("s: prune(method=structured, ratio=0.5, mode=all)", "s", ["k-train", "k-prune"])}
VERSIONS = {"torch": "2.6.0+cpu", "onnxruntime": "1.20.1", "openvino": "2025.1.0"}

# (model, target, runtime) -> (top1, ms per sample); None: the evaluation failed.
#  baseline on cpu-xeon: onnxruntime loses exactly 1 point and is faster than torch -> best;
#    openvino is faster still but loses 3 points -> not the best.
#  baseline on arm: onnxruntime is slower -> torch is the best.
#  pruned on cpu-xeon: no torch fp32 result -> no mark; pruned on arm: onnxruntime is best.
MEASURED: dict[tuple[str, str, str], tuple[float, float] | None] = {
    ("baseline", "cpu-xeon", "torch"): (0.80, 10.0),
    ("baseline", "cpu-xeon", "onnxruntime"): (0.79, 6.0),
    ("baseline", "cpu-xeon", "openvino"): (0.77, 4.0),
    ("baseline", "arm", "torch"): (0.80, 20.0),
    ("baseline", "arm", "onnxruntime"): (0.80, 25.0),
    ("pruned", "cpu-xeon", "torch"): None,
    ("pruned", "cpu-xeon", "onnxruntime"): (0.75, 5.0),
    ("pruned", "cpu-xeon", "openvino"): (0.75, 4.0),
    ("pruned", "arm", "torch"): (0.70, 15.0),
    ("pruned", "arm", "onnxruntime"): (0.71, 12.0),
}


def _evaluation(key: str, runtime: str, top1: float, ms: float) -> StageResult:
    repeats = tuple(EvalRepeat(repeat=i, samples=100, top1=top1, top5=0.95, duration_s=ms / 10,
                               time_per_sample_s=ms / 1e3, throughput_samples_per_s=1e3 / ms,
                               energy=EnergyReading(duration_s=ms / 10, cpu_energy_j=ms, cpu_source="rapl"))
                    for i in range(2))
    metrics = {"params": 1000, "macs": 10_000, "size_bytes": 4000, "materialized": True,
               "deployable_size_bytes": {"torch": 4000, "onnxruntime": 4400, "openvino": 2200}[runtime],
               "runtime": {"runtime": runtime, "runtime_version": VERSIONS[runtime], "precision": "fp32",
                           "device": "cpu", "threads": {"intra_op": 2, "inter_op": 1}, "settings": {}},
               "agreement": None if runtime == "torch" else {"top1_agreement": 0.99, "max_abs_diff": 1e-5,
                                                             "max_abs_logit": 8.0,
                                                             "reference": "the float parent (torch fp32)"}}
    return StageResult(key=key, kind="evaluate", status="succeeded", duration_s=1.0, node_id="node-x",
                       repeats=repeats, metrics=metrics)


def fill(store: Store, measured: dict[tuple[str, str, str], tuple[float, float] | None]) -> None:
    """A sweep of two models (baseline, structured 0.5) x the (target, runtime) of *measured*."""
    stages = [{"key": "k-train", "kind": "train", "params": {"epochs": 1}},
              {"key": "k-prune", "kind": "prune", "params": PRUNE, "parent_key": "k-train"}]
    points = []
    for (model, target, runtime), _ in measured.items():
        label, pipeline, chain = MODELS[model]
        key = f"k-e-{model}-{target}-{runtime}"
        params = {"target": target, **({"runtime": runtime, "precision": "fp32"} if runtime != "torch" else {})}
        stages.append({"key": key, "kind": "evaluate", "params": params, "parent_key": chain[-1], "target": target})
        points.append({"point_index": len(points), "label": label, "pipeline": pipeline, "stage_keys": chain,
                       "target": target, "eval_key": key})
    store.create_sweep(SID, "runtimes", "name: runtimes\n", "h", "/a", stages, points, naive_stage_count=len(stages))
    for key, kind in (("k-train", "train"), ("k-prune", "prune")):
        art = ArtifactInfo(key=key, path=f"/a/{key}", size_bytes=4000, sha256="0" * 64, materialized=True,
                           params=1000, macs=10_000)
        store.record_stage_result(SID, StageResult(key=key, kind=kind, status="succeeded", duration_s=1.0,
                                                   node_id="node-x", artifact=art))
    for (model, target, runtime), figures in measured.items():
        key = f"k-e-{model}-{target}-{runtime}"
        if figures is None:
            store.record_stage_result(SID, StageResult(key=key, kind="evaluate", status="failed", duration_s=1.0,
                                                       node_id="node-x", error="export failed"))
        else:
            store.record_stage_result(SID, _evaluation(key, runtime, *figures))


@pytest.fixture
def db(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'runtimes.db'}"
    with Store.open(url) as store:
        fill(store, MEASURED)
    return url


@pytest.fixture
def rows(db: str) -> Iterator[list[ResultRow]]:
    with Store.open(db) as store:
        yield store.results(SID)


def _torch_only_rows(tmp_path: Path) -> list[ResultRow]:
    with Store.open(f"sqlite:///{tmp_path / 'torch.db'}") as store:
        fill(store, {k: v for k, v in MEASURED.items() if k[2] == "torch"})
        return store.results(SID)


# ------------------------------------------------------------------ results


def test_results_json_rows_name_the_deployment(rows: list[ResultRow]) -> None:
    data = json.loads(render_results(rows, "json"))
    assert len(data) == len(MEASURED) and all(list(d) == list(RESULT_FIELDS) for d in data)
    at = RESULT_FIELDS.index("runtime")
    assert RESULT_FIELDS[at:at + 6] == ("runtime", "precision", "runtime_version", "threads", "deployable_size_bytes",
                                        "top1_agreement")
    ort = data[1]
    assert (ort["target"], ort["runtime"], ort["precision"], ort["runtime_version"]) == (
        "cpu-xeon", "onnxruntime", "fp32", "1.20.1")
    assert ort["threads"] == {"intra_op": 2, "inter_op": 1} and ort["deployable_size_bytes"] == 4400
    assert ort["top1_agreement"] == pytest.approx(0.99) and ort["top1"] == pytest.approx(0.79)
    torch = data[0]
    assert (torch["runtime"], torch["runtime_version"], torch["top1_agreement"]) == ("torch", "2.6.0+cpu", None)
    failed = data[5]
    assert (failed["status"], failed["runtime"], failed["precision"]) == ("failed", "torch", "fp32")
    assert failed["runtime_version"] is None and failed["threads"] is None


def test_results_table_and_csv_show_runtime_and_precision(rows: list[ResultRow], tmp_path: Path) -> None:
    lines = list(csv.DictReader(io.StringIO(render_results(rows, "csv"))))
    assert [(d["runtime"], d["precision"]) for d in lines[:3]] == [
        ("torch", "fp32"), ("onnxruntime", "fp32"), ("openvino", "fp32")]
    assert lines[1]["threads"] == "inter_op=1;intra_op=2" and lines[1]["runtime_version"] == "1.20.1"
    table = render_results(rows, "table")
    header = table.splitlines()[1]
    assert "runtime" in header and "onnxruntime fp32" in table and "openvino fp32" in table
    assert header.count("┃") == 14  # 13 columns, the failed point's row included
    assert {line.count("│") for line in table.splitlines() if line.startswith("│")} == {14}
    plain = render_results(_torch_only_rows(tmp_path), "table")  # a torch fp32 sweep reads as it did
    assert "runtime" not in plain.splitlines()[1] and "torch fp32" not in plain


# ------------------------------------------------------------------ compare


def test_compare_has_a_column_per_target_and_runtime_and_marks_the_best(rows: list[ResultRow]) -> None:
    c = build_comparison(rows)
    assert c.targets == ("cpu-xeon", "arm") and c.has_runtimes
    assert [col.name for col in c.columns] == ["cpu-xeon/torch", "cpu-xeon/onnxruntime", "cpu-xeon/openvino",
                                               "arm/torch", "arm/onnxruntime"]
    baseline, pruned = c.models
    # 0.79 is exactly 1 point below 0.80: it qualifies; openvino (3 points below) does not
    assert baseline.best == {"cpu-xeon": "cpu-xeon/onnxruntime", "arm": "arm/torch"}
    assert pruned.best == {"arm": "arm/onnxruntime"}  # no torch fp32 result on cpu-xeon: no mark there

    data = json.loads(render_comparison(c, "json"))
    assert data["columns"][1] == {"name": "cpu-xeon/onnxruntime", "target": "cpu-xeon", "runtime": "onnxruntime",
                                  "precision": "fp32"}
    assert data["best_rule"] == BEST_RULE and data["models"][0]["best"] == baseline.best
    cells = data["models"][0]["cells"]
    assert {name: cell["best"] for name, cell in cells.items()} == {
        "cpu-xeon/torch": False, "cpu-xeon/onnxruntime": True, "cpu-xeon/openvino": False, "arm/torch": True,
        "arm/onnxruntime": False}
    assert cells["cpu-xeon/openvino"]["runtime_version"] == "2025.1.0"
    assert cells["cpu-xeon/openvino"]["deployable_size_bytes"] == 2200

    table = render_comparison(c, "table")
    assert len(re.findall(r"★ best(?!:)", table)) == 3 and "cpu-xeon/onnxruntime" in table and "top-1 79.0 %" in table
    assert " ".join(BEST_RULE.split()[:6]) in " ".join(table.split())
    md = render_comparison(c, "markdown")
    assert md.count(" ★ |") == 3 and "| cpu-xeon/onnxruntime top1 % |" in md
    head = md.splitlines()[0]
    assert all(line.count(" | ") == head.count(" | ") for line in md.splitlines()[2:4])
    lines = list(csv.DictReader(io.StringIO(render_comparison(c, "csv"))))
    assert lines[0]["best@cpu-xeon/onnxruntime"] == "True" and lines[0]["threads@arm/torch"] == "inter_op=1;intra_op=2"
    assert lines[1]["status@cpu-xeon/torch"] == "failed"


def test_compare_of_a_torch_fp32_sweep_is_as_before(tmp_path: Path) -> None:
    c = build_comparison(_torch_only_rows(tmp_path))
    assert not c.has_runtimes and [col.name for col in c.columns] == list(c.targets) == ["cpu-xeon", "arm"]
    assert all(m.best == {} for m in c.models)  # one column per target: nothing to choose between
    table = render_comparison(c, "table")
    assert "★" not in table and "best" not in table and "top-1 80.0 %" not in table
    assert "| model | top1 % | cpu-xeon ms/sample | cpu-xeon mJ/sample |" in render_comparison(c, "markdown")


# ------------------------------------------------------------------ Pareto


def test_pareto_points_are_identified_by_runtime_and_precision(rows: list[ResultRow]) -> None:
    p = build_pareto(rows, x="time")
    xeon = p.fronts[0]
    identities = [(q.row.point, q.row.target, q.row.runtime, q.row.precision) for q in xeon.points]
    assert len(identities) == len(set(identities)) == 5  # the same model on three runtimes is three points
    # the baseline on each runtime is a trade-off of its own: all three are non-dominated
    assert [(q.row.point, q.row.runtime) for q in xeon.frontier] == [
        ("baseline", "openvino"), ("baseline", "onnxruntime"), ("baseline", "torch")]

    data = json.loads(render_pareto(p, "json"))
    point = data["targets"][0]["points"][0]
    assert (point["model"], point["runtime"], point["precision"], point["on_frontier"]) == (
        "baseline", "openvino", "fp32", True)
    lines = list(csv.reader(io.StringIO(render_pareto(p, "csv"))))
    assert lines[0][-4:-2] == ["runtime", "precision"] and lines[1][-4:-2] == ["openvino", "fp32"]
    assert lines[0][-2:] == ["time_per_sample_s_measured", "verdict_time"] and lines[1][-1] == ""
    table = render_pareto(p, "table")
    assert "runtime" in table and "onnxruntime fp32" in table
    assert "1 without figures (s: prune(method=structured, ratio=0.5, mode=all) [torch fp32])" in table
    md = render_pareto(p, "markdown")
    assert "| # | model | runtime | top-1 accuracy (%) | time / sample (ms) |" in md
    assert "| 0 | baseline | torch fp32 |" in md


def test_pareto_of_a_torch_fp32_sweep_names_no_runtime(tmp_path: Path) -> None:
    p = build_pareto(_torch_only_rows(tmp_path), x="time")
    assert not p.has_runtimes
    assert "runtime" not in render_pareto(p, "table") and "| # | model | top-1" in render_pareto(p, "markdown")


# ------------------------------------------------------------------ plots and HTML


def test_runtime_series_in_plots(rows: list[ResultRow]) -> None:
    series = prune_series(rows)
    assert set(series["arm"]) == {"structured/all [torch fp32]", "structured/all [onnxruntime fp32]"}
    # each runtime's curve starts at the baseline measured on that runtime
    assert [(p.ratio, p.row.runtime) for p in series["arm"]["structured/all [onnxruntime fp32]"]] == [
        (0.0, "onnxruntime"), (0.5, "onnxruntime")]
    p = build_pareto(rows, x="energy")
    assert pareto_png(p.fronts, p.x, p.y).startswith(b"\x89PNG")


def test_html_report_names_the_runtimes(rows: list[ResultRow]) -> None:
    t = datetime(2026, 12, 1, tzinfo=timezone.utc)
    sweep = SweepRecord(id=SID, name="runtimes", spec_text="name: runtimes\n", spec_hash="h", status="partial",
                        created_at=t, started_at=t, finished_at=t, artifact_root="/a", naive_stage_count=12,
                        unique_stage_count=12)
    page = build_report(sweep=sweep, rows=rows, stages=[], nodes=[], savings=None)
    for name in ("onnxruntime", "openvino", "1.20.1", "2025.1.0"):
        assert name in page
    assert "<th>cpu-xeon/onnxruntime</th>" in page and len(re.findall(r"★ best(?!:)", page)) == 3
    assert re.search(r'<table id="runtimes-table">.*?<tbody>(.*?)</tbody>', page, re.S).group(1).count("<tr>") == 5
    assert "one marker per runtime and precision" in page
    assert "<th>runtime</th>" in page  # the frontier tables
    assert page.count('src="data:image/png;base64,') == 2 + 2  # Pareto: energy, time; prune: top-1, energy


def test_cli_reads_a_runtime_sweep(db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["results", SID, "--db", db, "--format", "json"], capsys)
    assert code == 0 and json.loads(out)[2]["runtime"] == "openvino"
    code, out, _ = run_cli(["compare", SID, "--db", db, "--format", "json"], capsys)
    assert code == 0 and json.loads(out)["models"][1]["best"] == {"arm": "arm/onnxruntime"}
    code, out, _ = run_cli(["pareto", SID, "--db", db, "--x", "time", "--format", "json"], capsys)
    assert code == 0 and {q["runtime"] for q in json.loads(out)["targets"][1]["points"]} == {"torch", "onnxruntime"}
    code, out, _ = run_cli(["status", SID, "--db", db], capsys)
    assert code == 0 and "@ cpu-xeon onnxruntime fp32" in out
    report = tmp_path / "r.html"
    code, out, _ = run_cli(["report", SID, "--db", db, "--out", str(report)], capsys)
    assert code == 0 and "2 models x 5 target x runtime columns" in out and "onnxruntime" in report.read_text()
