"""Reports on hand-built data: the Pareto frontier, the cross-hardware comparison, the
prune-ratio series, the placement section and the HTML page (no store, no Ray)."""

from __future__ import annotations

import csv
import io
import json
import random
import re
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from orchestrator.errors import UsageError
from orchestrator.report import (
    NO_PLACEMENT,
    build_comparison,
    build_pareto,
    build_report,
    pareto_mask,
    placement_section,
    placement_summary,
    render_comparison,
    render_pareto,
    render_results,
)
from orchestrator.report.plots import prune_series, short_label
from orchestrator.report.aggregate import result_row
from orchestrator.report.savings import carbon_savings
from orchestrator.store.records import (
    EnergyRecord,
    MeasurementRecord,
    NodeRecord,
    PlacementRecord,
    PointRecord,
    ResultRow,
    StageRecord,
    SweepRecord,
)
from tests.cli import run_cli as _call
from workers.stages.registry import stage_label

# ------------------------------------------------------------------ hand-built data

TRAIN = ("k-train", "train", {"epochs": 3}, "train(epochs=3)")


def _prune(method: str, ratio: float, mode: str | None = None) -> tuple[str, str, dict[str, Any], str]:
    params = {"method": method, "ratio": ratio, **({"mode": mode} if mode else {})}
    label = stage_label("prune", params)  # e.g. "prune(method=structured, ratio=0.3, mode=all)"
    return f"k-{method}-{mode}-{ratio}", "prune", params, label


QUANT = ("k-q8", "quantize", {"weights": "int8"}, "quantize(weights=int8)")


def row(index: int, chain: list[tuple[str, str, dict[str, Any], str]], target: str = "gpu-a100", *,
        pipeline: str = "p", top1: float | None = 0.8, energy_j: float | None = 1e-3, time_s: float | None = 1e-4,
        carbon_g: float | None = None, status: str = "succeeded", node_id: str | None = "n1",
        materialized: bool | None = True, params: int | None = 1000, source: str = "estimate-tdp") -> ResultRow:
    """A result row; *chain* is the compression chain after nothing or a train stage."""
    compress = [label for _, kind, _, label in chain if kind != "train"]
    measured = status == "succeeded"
    return ResultRow(
        sweep_id="sw-test", point_index=index,
        point="baseline" if not compress else f"{pipeline}: " + " > ".join(compress),
        pipeline=pipeline, stage_keys=tuple(k for k, *_ in chain), stages=tuple(lab for *_, lab in chain),
        target=target, eval_key=f"e-{index}", status=status, node_id=node_id,
        measured_in_sweep="sw-test" if measured else None, repeats=3 if measured else 0,
        top1=top1 if measured else None, top1_std=0.01 if measured else None,
        top5=min(1.0, top1 + 0.1) if measured and top1 is not None else None, top5_std=0.0 if measured else None,
        time_per_sample_s=time_s if measured else None, time_per_sample_s_std=1e-6 if measured else None,
        throughput_samples_per_s=1 / time_s if measured and time_s else None,
        energy_per_sample_j=energy_j if measured else None, energy_per_sample_j_std=1e-5 if measured else None,
        net_energy_per_sample_j=None, gpu_energy_per_sample_j=None,
        cpu_energy_per_sample_j=energy_j if measured else None, dram_energy_per_sample_j=None,
        energy_source={"cpu": source, "gpu": "none"} if measured else {}, idle_power_w={},
        carbon_g_per_sample=carbon_g if measured else None,
        carbon_g_per_sample_std=(carbon_g / 10 if carbon_g else None) if measured else None,
        intensity_g_per_kwh=56.0 if carbon_g else None, intensity_source="static:FR" if carbon_g else None,
        intensity_kind="average" if carbon_g else None,
        params=params, macs=10 * params if params else None, size_bytes=4 * params if params else None,
        materialized=materialized, stage_kinds=tuple(kind for _, kind, _, _ in chain),
        stage_params=tuple(p for _, _, p, _ in chain),
    )


def node(node_id: str, node_type: str, hostname: str, region: str = "FR") -> NodeRecord:
    t = datetime(2024, 1, 1, tzinfo=timezone.utc)
    return NodeRecord(node_id=node_id, node_type=node_type, region=region, hostname=hostname,
                      hardware={"hostname": hostname, "cpu_model": "Test CPU", "cpu_count_logical": 4,
                                "memory_total_bytes": 8 * 1024**3, "gpus": []},
                      first_seen=t, last_seen=t)


# ------------------------------------------------------------------ Pareto


def _naive_mask(xs: list[float], ys: list[float]) -> list[bool]:
    """The definition, O(n^2): dominated iff another point is <= on x, >= on y, one strict."""
    return [not any(xs[j] <= xs[i] and ys[j] >= ys[i] and (xs[j] < xs[i] or ys[j] > ys[i])
                    for j in range(len(xs)) if j != i) for i in range(len(xs))]


@pytest.mark.parametrize(
    "points, expected",
    [
        ([], []),
        ([(1.0, 0.5)], [True]),  # a single point is its own frontier
        ([(1.0, 0.9), (2.0, 0.8), (3.0, 0.5)], [True, False, False]),  # all dominated by the first
        ([(1.0, 0.9), (1.0, 0.9), (2.0, 0.8)], [True, True, False]),  # exact ties are both kept
        ([(1.0, 0.9), (1.0, 0.8)], [True, False]),  # same cost, less accurate
        ([(1.0, 0.9), (2.0, 0.9)], [True, False]),  # same accuracy, costlier
        ([(1.0, 0.5), (2.0, 0.7), (3.0, 0.9), (2.5, 0.6)], [True, True, True, False]),  # a trade-off curve
        ([(3.0, 0.9), (1.0, 0.5), (2.0, 0.7), (2.0, 0.7)], [True, True, True, True]),  # order does not matter
    ],
)
def test_pareto_mask_hand_built(points: list[tuple[float, float]], expected: list[bool]) -> None:
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    assert pareto_mask(xs, ys) == expected
    assert _naive_mask(xs, ys) == expected


def test_pareto_mask_matches_the_definition_on_random_points() -> None:
    rng = random.Random(7)
    for n in (2, 5, 30, 200):
        for _ in range(20):
            # coarse grids make ties in x, in y and in both common
            xs = [float(rng.randint(0, 8)) for _ in range(n)]
            ys = [rng.randint(0, 8) / 8 for _ in range(n)]
            assert pareto_mask(xs, ys) == _naive_mask(xs, ys)


def test_pareto_mask_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="2 x values but 1 y values"):
        pareto_mask([1.0, 2.0], [0.5])


def _two_target_rows() -> list[ResultRow]:
    s3, s6 = _prune("structured", 0.3, "all"), _prune("structured", 0.6, "all")
    u5 = _prune("unstructured", 0.5)
    rows = []
    for t, speed in (("gpu-a100", 1.0), ("cpu-xeon", 20.0)):
        base = len(rows)
        rows += [
            row(base + 0, [TRAIN], t, top1=0.90, energy_j=3e-3 * speed, carbon_g=3e-7 * speed),
            row(base + 1, [TRAIN, u5], t, pipeline="unstructured", top1=0.88, energy_j=3e-3 * speed,
                carbon_g=3e-7 * speed, materialized=False),
            row(base + 2, [TRAIN, s3], t, pipeline="structured", top1=0.85, energy_j=2e-3 * speed,
                carbon_g=2e-7 * speed, params=700),
            row(base + 3, [TRAIN, s6], t, pipeline="structured", top1=0.70, energy_j=2.5e-3 * speed,
                carbon_g=2.5e-7 * speed, params=400),
        ]
    rows.append(row(8, [TRAIN, s6, QUANT], "cpu-xeon", pipeline="s-int8", status="failed", params=400))
    return rows


def test_build_pareto_per_target() -> None:
    p = build_pareto(_two_target_rows(), x="energy", y="top1")
    assert [f.target for f in p.fronts] == ["gpu-a100", "cpu-xeon"]
    for f in p.fronts:
        # baseline (best accuracy) and structured 0.3 (cheapest) are the frontier; unstructured
        # costs the same as the baseline for less accuracy; structured 0.6 is costlier than 0.3
        assert [q.row.point for q in f.frontier] == ["structured: prune(method=structured, ratio=0.3, mode=all)",
                                                     "baseline"]
        assert len(f.points) == 4
    xeon = p.fronts[1]
    assert [r.status for r in xeon.without_metrics] == ["failed"]
    only = build_pareto(_two_target_rows(), x="carbon", target="cpu-xeon")
    assert [f.target for f in only.fronts] == ["cpu-xeon"]


def test_build_pareto_errors_are_one_line_usage_errors() -> None:
    rows = _two_target_rows()
    with pytest.raises(UsageError, match=r"sweep sw-test has no target 'tpu' -- its targets: gpu-a100, cpu-xeon"):
        build_pareto(rows, target="tpu")
    no_carbon = [row(0, [TRAIN]), row(1, [TRAIN, _prune("unstructured", 0.5)])]
    with pytest.raises(UsageError) as e:
        build_pareto(no_carbon, x="carbon")
    assert e.value.exit_code == 2 and "\n" not in str(e.value)
    assert "no carbon / sample figures" in str(e.value) and "carbon:" in str(e.value) and "--x energy" in str(e.value)
    with pytest.raises(UsageError, match="no energy / sample figures.*use --x time"):
        build_pareto([row(0, [TRAIN], energy_j=None)], x="energy")


def test_render_pareto_formats() -> None:
    p = build_pareto(_two_target_rows(), x="energy")
    data = json.loads(render_pareto(p, "json"))
    assert data["x"] == "energy_per_sample_j" and data["y"] == "top1"
    flags = {(t["target"], q["point_index"]): q["on_frontier"] for t in data["targets"] for q in t["points"]}
    assert flags == {("gpu-a100", 0): True, ("gpu-a100", 1): False, ("gpu-a100", 2): True, ("gpu-a100", 3): False,
                     ("cpu-xeon", 4): True, ("cpu-xeon", 5): False, ("cpu-xeon", 6): True, ("cpu-xeon", 7): False}
    assert data["targets"][1]["without_metrics"] == ["s-int8: prune(method=structured, ratio=0.6, mode=all) > "
                                                     "quantize(weights=int8)"]
    lines = list(csv.reader(io.StringIO(render_pareto(p, "csv"))))
    assert lines[0][:4] == ["target", "point_index", "model", "energy_per_sample_j"] and len(lines) == 9
    md = render_pareto(p, "markdown")
    assert md.count("| 0 | baseline |") == 1 and "| 1 |" not in md  # the frontier only
    assert "gpu-a100: energy / sample (mJ) vs top-1 accuracy -- 2 of 4 points non-dominated" in md
    table = render_pareto(p, "table")
    assert "cpu-xeon: energy / sample (mJ) vs top-1 accuracy -- 2 of 4 points non-dominated; 1 without figures" in table
    assert "cpu:est" in table


# ------------------------------------------------------------------ compare


def test_build_comparison_folds_points_into_models_by_target() -> None:
    c = build_comparison(_two_target_rows())
    assert c.targets == ("gpu-a100", "cpu-xeon")
    assert [m.label for m in c.models] == [
        "baseline", "unstructured: prune(method=unstructured, ratio=0.5)",
        "structured: prune(method=structured, ratio=0.3, mode=all)",
        "structured: prune(method=structured, ratio=0.6, mode=all)",
        "s-int8: prune(method=structured, ratio=0.6, mode=all) > quantize(weights=int8)",
    ]
    assert [m.compression for m in c.models] == ["none", "simulated", "materialized", "materialized", "materialized"]
    base = c.models[0]
    assert set(base.cells) == {"gpu-a100", "cpu-xeon"}
    assert base.cells["cpu-xeon"].energy_per_sample_j == pytest.approx(20 * base.cells["gpu-a100"].energy_per_sample_j)
    assert base.top1 == pytest.approx(0.9) and base.params == 1000
    failed = c.models[-1]
    assert set(failed.cells) == {"cpu-xeon"} and failed.top1 is None and failed.params == 400


def test_comparison_same_chain_from_two_pipelines_is_one_model() -> None:
    s3 = _prune("structured", 0.3, "all")
    rows = [row(0, [TRAIN, s3], pipeline="a", top1=0.80), row(1, [TRAIN, s3], "cpu", pipeline="a", top1=0.78),
            row(2, [TRAIN, s3], pipeline="b", top1=0.80), row(3, [TRAIN, s3], "cpu", pipeline="b", top1=0.78)]
    c = build_comparison(rows)
    assert len(c.models) == 1
    m = c.models[0]
    assert m.label.startswith("a: ") and m.also == ("b: prune(method=structured, ratio=0.3, mode=all)",)
    assert {t: r.point_index for t, r in m.cells.items()} == {"gpu-a100": 0, "cpu": 1}
    # the accuracy differs by target (e.g. other kernels): shown once, with its range
    assert m.top1 == pytest.approx(0.79) and (m.top1_min, m.top1_max) == (0.78, 0.80)
    assert "79.0 ± 1.0 (78.0-80.0 by target)" in render_comparison(c, "table")


def test_render_comparison_shapes() -> None:
    c = build_comparison(_two_target_rows())
    data = json.loads(render_comparison(c, "json"))
    assert data["targets"] == ["gpu-a100", "cpu-xeon"] and len(data["models"]) == 5
    cell = data["models"][2]["cells"]["cpu-xeon"]
    assert cell["energy_per_sample_j"] == pytest.approx(0.04) and cell["energy_source"]["cpu"] == "estimate-tdp"
    assert cell["carbon_g_per_sample_std"] == pytest.approx(4e-7) and cell["status"] == "succeeded"
    assert data["models"][4]["cells"]["cpu-xeon"]["status"] == "failed"
    assert data["models"][1]["materialized"] is False and data["models"][1]["compression"] == "simulated"

    lines = list(csv.DictReader(io.StringIO(render_comparison(c, "csv"))))
    assert len(lines) == 5
    assert float(lines[0]["energy_per_sample_j@cpu-xeon"]) == pytest.approx(0.06) and lines[0]["model"] == "baseline"
    assert lines[0]["energy_source@gpu-a100"] == "cpu=estimate-tdp;gpu=none"
    assert lines[4]["status@gpu-a100"] == "" and lines[4]["status@cpu-xeon"] == "failed"

    md = render_comparison(c, "markdown").splitlines()
    assert md[0].startswith("| model | top1 % | gpu-a100 ms/sample | gpu-a100 mJ/sample | gpu-a100 µg CO2/sample |")
    data_lines = [line for line in md[2:] if line.startswith("|")]
    assert len(data_lines) == 5 and all(line.count(" | ") == md[0].count(" | ") for line in data_lines)
    assert "| 3.000 ± 0.010 mJ (cpu:est) |" in data_lines[0]
    assert "not evaluated" in data_lines[4] and "failed" in data_lines[4]

    table = render_comparison(c, "table")
    assert "60.000 ± 0.010 mJ (cpu:est)" in table and "materialized" in table and "simulated" in table


def test_comparison_without_carbon_leaves_carbon_out() -> None:
    c = build_comparison([row(0, [TRAIN]), row(1, [TRAIN], "cpu")])
    assert not c.has_carbon
    md = render_comparison(c, "markdown")
    assert "CO2" not in md.splitlines()[0] and "no carbon figures" in md


def test_simulated_node_types_on_one_host_are_named() -> None:
    rows = [row(0, [TRAIN], "cpu-small", node_id="a"), row(1, [TRAIN], "cpu-xeon", node_id="b")]
    same = build_comparison(rows, [node("a", "cpu-small", "box"), node("b", "cpu-xeon", "box"),
                                   node("old", "gpu-a100", "elsewhere")])
    assert same.notes == ("simulated: node types cpu-small, cpu-xeon all ran on one host (box), so their time, "
                          "energy and carbon are not a hardware comparison",)
    assert "simulated: node types cpu-small, cpu-xeon" in render_comparison(same, "table")
    assert build_comparison(rows, [node("a", "cpu-small", "box1"), node("b", "cpu-xeon", "box2")]).notes == ()
    one_type = [row(0, [TRAIN], "cpu-small", node_id="a"), row(1, [TRAIN], "cpu-small", node_id="b")]
    assert build_comparison(one_type, [node("a", "cpu-small", "box"), node("b", "cpu-small", "box")]).notes == ()


def test_results_contract_is_unchanged_by_the_new_fields() -> None:
    data = json.loads(render_results([row(0, [TRAIN], carbon_g=1e-7)], "json"))
    assert "carbon_g_per_sample_std" not in data[0] and "stage_kinds" not in data[0]
    assert data[0]["carbon_g_per_sample"] == pytest.approx(1e-7)


# ------------------------------------------------------------------ prune series (Fig. 3)


def test_prune_series_groups_by_method_and_rest_of_chain() -> None:
    u3, u6 = _prune("unstructured", 0.3), _prune("unstructured", 0.6)
    s3, s6 = _prune("structured", 0.3, "all"), _prune("structured", 0.6, "all")
    h5 = _prune("structured", 0.5, "heads")
    rows = [
        row(0, [TRAIN]), row(1, [TRAIN, u3]), row(2, [TRAIN, u6]), row(3, [TRAIN, s6]), row(4, [TRAIN, s3]),
        row(5, [TRAIN, h5]), row(6, [TRAIN, QUANT]), row(7, [TRAIN, s3, QUANT]), row(8, [TRAIN, s6, QUANT]),
        row(9, [TRAIN, s3, s6]),  # two prunes: no single ratio, left out
        row(10, [TRAIN, u3], "cpu"),
    ]
    series = prune_series(rows)
    assert set(series) == {"gpu-a100", "cpu"}
    got = {name: [(p.ratio, p.row.point_index) for p in pts] for name, pts in series["gpu-a100"].items()}
    assert got == {
        "unstructured": [(0.0, 0), (0.3, 1), (0.6, 2)],
        "structured/all": [(0.0, 0), (0.3, 4), (0.6, 3)],
        "structured/heads": [(0.0, 0), (0.5, 5)],
        "structured/all > quantize(weights=int8)": [(0.0, 6), (0.3, 7), (0.6, 8)],  # ratio 0: quantize only
    }
    # no baseline on cpu: the series starts at its first ratio
    assert {n: [p.ratio for p in pts] for n, pts in series["cpu"].items()} == {"unstructured": [0.3]}


def test_short_label_drops_pipeline_and_parameter_names() -> None:
    r = row(0, [TRAIN, _prune("structured", 0.3, "all"), QUANT], pipeline="s8")
    assert short_label(r) == "prune structured,0.3,all > quantize int8"
    assert short_label(row(1, [TRAIN])) == "baseline"


# ------------------------------------------------------------------ placement


SAVINGS = {
    "policy": "carbon-deadline",
    "stages": [
        {"key": "aaaaaaaaaaaaaaaa", "kind": "train", "node_type": "gpu-a100", "region": "FR",
         "start": "2024-05-01T02:00:00+00:00", "expected_carbon_g": 1.25, "measured_carbon_g": 1.5,
         "fifo_node_type": "gpu-a100", "fifo_region": "DE", "fifo_start": "2024-05-01T00:00:00+00:00",
         "fifo_expected_carbon_g": 9.75},
        {"key": "bbbbbbbbbbbbbbbb", "kind": "prune", "node_type": "cpu-xeon", "region": "FR",
         "start": "2024-05-01T02:10:00+00:00", "expected_carbon_g": 0.25, "measured_carbon_g": None,
         "fifo_node_type": "cpu-xeon", "fifo_region": "FR", "fifo_start": "2024-05-01T02:10:00+00:00",
         "fifo_expected_carbon_g": 0.25},
    ],
    "expected_carbon_g": 1.5, "fifo_expected_carbon_g": 10.0, "measured_carbon_g": 1.5,
    "saved_expected_g": 8.5, "saved_expected_pct": 85.0,
}


def test_placement_section_from_the_savings_dict() -> None:
    assert placement_summary(SAVINGS) == ("carbon-aware placement (carbon-deadline): expected 1.5 g CO2eq vs 10 g "
                                          "under fifo, saved 8.5 g (85%); measured 1.5 g")
    section = placement_section(SAVINGS)
    body = section.split('<table id="placement-table">')[1]
    assert body.count("<tr>") == 3  # header + one per stage
    assert "gpu-a100 / FR" in body and "gpu-a100 / DE" in body and "9.75" in body
    assert "2024-05-01T02:00:00+00:00" in body and "aaaaaaaaaaaa<" in body  # keys shortened to 12
    assert re.findall(r"<td>(yes|no)</td></tr>", body) == ["yes", "no"]  # moved from fifo's choice?
    assert placement_summary(None) == NO_PLACEMENT
    assert NO_PLACEMENT in placement_section(None) and "<table" not in placement_section(None)


# ------------------------------------------------------------------ the HTML page


def _sweep(spec_text: str = "name: t\n") -> SweepRecord:
    t = datetime(2024, 5, 1, tzinfo=timezone.utc)
    return SweepRecord(id="sw-test", name="t", spec_text=spec_text, spec_hash="h", status="partial", created_at=t,
                       started_at=t, finished_at=t, artifact_root="/a", naive_stage_count=20, unique_stage_count=12)


def _stage(key: str, kind: str, status: str, params: dict[str, Any], error: str | None = None,
           node_id: str | None = "a") -> StageRecord:
    return StageRecord(sweep_id="sw-test", key=key, kind=kind, params=params, parent_key=None, target=None,
                       status=status, attempts=1, error=error, traceback=None, node_id=node_id, started_at=None,
                       finished_at=None, duration_s=None, metrics={}, energy=None)


def _tbody_rows(page: str, table_id: str) -> int:
    m = re.search(rf'<table id="{re.escape(table_id)}">.*?<tbody>(.*?)</tbody>', page, re.S)
    assert m, f"no table {table_id}"
    return m.group(1).count("<tr>")


def test_build_report_is_self_contained_with_the_expected_tables() -> None:
    rows = [replace(r, node_id="a" if r.target == "gpu-a100" else "b") for r in _two_target_rows()]
    stages = [_stage("k-train", "train", "succeeded", {"epochs": 3}),
              _stage("k-q8", "quantize", "failed", {"weights": "int8"}, error="quanto: unsupported <layer>",
                     node_id="b"),
              _stage("k-eval", "evaluate", "skipped", {"target": "cpu-xeon"}, error="a parent stage failed",
                     node_id=None)]
    page = build_report(sweep=_sweep("name: t\nnote: </pre><script>alert(1)</script>\n"), rows=rows, stages=stages,
                        nodes=[node("a", "gpu-a100", "box"), node("b", "cpu-xeon", "box", "DE"),
                               node("z", "tpu", "far")],
                        savings=SAVINGS, stage_counts={"succeeded": 10, "failed": 1, "skipped": 1})
    # nothing outside the file: every image a data URI, no external source of any kind
    assert re.findall(r'\b(?:src|href)="(?!data:image/png;base64,|#)', page) == []
    assert "http://" not in page and "https://" not in page
    assert "default-src 'none'" in page
    assert page.count("<script>") == 1  # the spec's text is escaped, not executed
    assert "&lt;/pre&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert page.count('src="data:image/png;base64,') == 3 + 2  # Pareto: energy, time, carbon; prune: top-1, energy
    assert _tbody_rows(page, "comparison-table") == 5
    assert _tbody_rows(page, "hardware-table") == 2  # the nodes this sweep used, not node "z"
    assert _tbody_rows(page, "energy-sources-table") == 8
    assert _tbody_rows(page, "failures-table") == 2 and "quanto: unsupported &lt;layer&gt;" in page
    assert _tbody_rows(page, "placement-table") == 2
    assert _tbody_rows(page, "frontier-energy-gpu-a100") == 2
    assert "simulated: node types cpu-xeon, gpu-a100 all ran on one host (box)" in page
    assert "cpu: 0 measured by a sensor, 8 estimated" in page


def test_build_report_without_measurements_or_placement() -> None:
    rows = [row(0, [TRAIN], status="failed")]
    page = build_report(sweep=_sweep(), rows=rows, stages=[_stage("k-train", "train", "failed", {}, error="boom")],
                        nodes=[], savings=None)
    assert "<img" not in page and NO_PLACEMENT in page
    assert "no evaluation succeeded" in page and "no pruned points with measurements" in page
    assert "no node facts recorded" in page and "no energy readings in this sweep" in page


# ------------------------------------------------------------------ CLI


@pytest.mark.parametrize("cmd", ["compare", "pareto", "report"])
def test_commands_have_help(cmd: str, capsys) -> None:
    code, out, _ = _call([cmd, "--help"], capsys)
    assert code == 0 and out.startswith(f"Usage: greensweep {cmd} [OPTIONS] [SWEEP]")


def test_commands_refuse_bad_input_in_one_line(capsys, tmp_path: Path) -> None:
    missing = tmp_path / "none.db"
    for argv in (["compare", "--db", f"sqlite:///{missing}"], ["report", "--db", f"sqlite:///{missing}"]):
        code, _, err = _call(argv, capsys)
        assert code == 2 and err.count("\n") == 1 and f"no store at {missing}" in err
    assert not missing.exists()
    code, _, err = _call(["pareto", "--plot", str(tmp_path / "front.svg")], capsys)
    assert code == 2 and "must name a .png file" in err and err.count("\n") == 1
    code, _, err = _call(["pareto", "--x", "watts"], capsys)
    assert code == 2 and "'watts' is not one of" in err


def test_store_rows_carry_chain_kinds_params_and_carbon_std(tmp_path: Path) -> None:
    """The fields the reports read from ResultRow, filled by a real store."""
    from orchestrator.carbon.base import Intensity
    from orchestrator.store import Store
    from workers.types import ArtifactInfo, EnergyReading, EvalRepeat, StageResult

    store = Store.open(f"sqlite:///{tmp_path / 's.db'}")
    prune = {"method": "structured", "ratio": 0.5, "mode": "all"}
    stages = [{"key": "k-t", "kind": "train", "params": {"epochs": 1}},
              {"key": "k-p", "kind": "prune", "params": prune, "parent_key": "k-t"},
              {"key": "k-e", "kind": "evaluate", "params": {"target": "local"}, "parent_key": "k-p", "target": "local"}]
    points = [{"point_index": 0, "label": "s: prune", "pipeline": "s", "stage_keys": ["k-t", "k-p"],
               "target": "local", "eval_key": "k-e"}]
    store.create_sweep("sw-1", "t", "name: t\n", "h", "/a", stages, points, naive_stage_count=3)
    art = ArtifactInfo(key="k-p", path="/a/k-p", size_bytes=10, sha256="0", materialized=True, params=5, macs=50)
    store.record_stage_result("sw-1", StageResult(key="k-p", kind="prune", status="succeeded", duration_s=1.0,
                                                  node_id="n", artifact=art))
    repeats = tuple(EvalRepeat(repeat=i, samples=100, top1=0.5, top5=0.9, duration_s=1.0, time_per_sample_s=0.01,
                               throughput_samples_per_s=100.0,
                               energy=EnergyReading(duration_s=1.0, cpu_energy_j=e, cpu_source="rapl"))
                    for i, e in enumerate((36.0, 72.0)))
    store.record_stage_result("sw-1", StageResult(key="k-e", kind="evaluate", status="succeeded", duration_s=2.0,
                                                  node_id="n", repeats=repeats))
    store.record_carbon("sw-1", "k-e", Intensity(g_co2_per_kwh=100.0, source="s", kind="average", region="FR"))
    (r,) = store.results("sw-1")
    store.close()
    assert r.stage_kinds == ("train", "prune") and r.stage_params[1] == prune
    # per sample: 0.36 J and 0.72 J -> 1e-5 g and 2e-5 g at 100 g/kWh
    assert r.carbon_g_per_sample == pytest.approx(1.5e-5)
    assert r.carbon_g_per_sample_std == pytest.approx(((0.5e-5) ** 2 * 2) ** 0.5)
    assert {t: list(s) for t, s in prune_series([r]).items()} == {"local": ["structured/all"]}


# ------------------------------------------------------- aggregation and savings, pure


def _stage_rec(key: str, kind: str, params: dict[str, Any], status: str = "succeeded", *,
           sweep_id: str = "sw-a", metrics: dict[str, Any] | None = None) -> StageRecord:
    return StageRecord(sweep_id=sweep_id, key=key, kind=kind, params=params, parent_key=None, target=None,
                       status=status, attempts=1, error=None, traceback=None, node_id="n1", started_at=None,
                       finished_at=None, duration_s=1.0, metrics=metrics or {}, energy=None)


def _repeat(i: int, *, cpu_j: float | None, idle_w: float | None = None, carbon_g: float | None = None,
            samples: int = 100, top1: float = 0.5) -> MeasurementRecord:
    energy = None if cpu_j is None else EnergyRecord(
        gpu_energy_j=None, cpu_energy_j=cpu_j, dram_energy_j=None, gpu_source=None, cpu_source="rapl",
        dram_source=None, gpu_idle_power_w=None, cpu_idle_power_w=idle_w, dram_idle_power_w=None,
        carbon_g=carbon_g, intensity_g_per_kwh=100.0 if carbon_g else None,
        intensity_source="static:FR" if carbon_g else None, intensity_kind="average" if carbon_g else None)
    return MeasurementRecord(sweep_id="sw-a", stage_key="k-e", repeat=i, samples=samples, top1=top1, top5=0.9,
                             duration_s=2.0, time_per_sample_s=0.02, throughput_samples_per_s=50.0, energy=energy)


def _point(measurements: tuple[MeasurementRecord, ...], *, status: str = "succeeded",
           measured_in: str | None = "sw-a") -> PointRecord:
    prune = {"method": "structured", "ratio": 0.5, "mode": "all", "importance": "l1"}
    evaluation = _stage_rec("k-e", "evaluate", {"target": "local"}, status, metrics={"params": 7})
    measured = None if measured_in is None else replace(evaluation, sweep_id=measured_in, status="succeeded")
    return PointRecord(sweep_id="sw-a", point_index=0, label="s: prune", pipeline="s", stage_keys=("k-t", "k-p"),
                       chain=(_stage_rec("k-t", "train", {"epochs": 3}), None), target="local", eval_key="k-e",
                       evaluation=evaluation, measured=measured, measurements=measurements if measured else (),
                       artifact=None)


def test_result_row_statistics_from_raw_records() -> None:
    # two repeats of 100 samples: 40 J and 60 J gross, 5 W idle for 2 s -> 30 J and 50 J net
    r = result_row(_point((_repeat(0, cpu_j=40.0, idle_w=5.0, carbon_g=1e-3, top1=0.4),
                           _repeat(1, cpu_j=60.0, idle_w=5.0, carbon_g=3e-3, top1=0.6))))
    assert r.repeats == 2 and r.top1 == pytest.approx(0.5) and r.top1_std == pytest.approx(0.02 ** 0.5)
    assert r.energy_per_sample_j == pytest.approx(0.5) and r.cpu_energy_per_sample_j == pytest.approx(0.5)
    assert r.net_energy_per_sample_j == pytest.approx(0.4)
    assert r.gpu_energy_per_sample_j is None and r.energy_source == {"cpu": "rapl"} and r.idle_power_w == {"cpu": 5.0}
    assert r.carbon_g_per_sample == pytest.approx(2e-5) and r.intensity_source == "static:FR"
    # the chain is labelled by the one stage label; a key missing from the sweep shows as itself
    assert r.stages == ("train(epochs=3)", "k-p") and r.stage_kinds == ("train", "")
    assert r.params == 7  # no artifact: what the evaluation saw of the model


def test_result_row_without_a_sensor_or_a_measurement() -> None:
    one = result_row(_point((_repeat(0, cpu_j=None),)))
    assert one.top1_std == 0.0  # a single repeat
    assert one.energy_per_sample_j is None and one.net_energy_per_sample_j is None  # never a made-up 0 J
    assert one.energy_source == {} and one.carbon_g_per_sample is None
    failed = result_row(_point((), status="failed", measured_in=None))
    assert failed.status == "failed" and failed.repeats == 0 and failed.top1 is None
    assert failed.measured_in_sweep is None
    reused = result_row(_point((_repeat(0, cpu_j=10.0),), status="reused", measured_in="sw-old"))
    assert reused.status == "reused" and reused.measured_in_sweep == "sw-old" and reused.top1 == 0.5


def test_carbon_savings_sums_known_figures() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)

    def placed(key: str, expected: float | None, fifo: float | None, measured: float | None,
               node: str = "n1") -> PlacementRecord:
        return PlacementRecord(
            sweep_id="sw-a", stage_key=key, kind="prune", stage_status="succeeded", policy="carbon",
            decided_at=t0, node_id=node, node_type="cpu", region="FR", start_at=t0, expected_duration_s=1.0,
            expected_energy_j=1.0, expected_intensity_g_per_kwh=50.0, expected_carbon_g=expected,
            estimate_source="nominal", fifo_node_id="n1", fifo_node_type="cpu", fifo_region="DE",
            fifo_start_at=t0, fifo_expected_energy_j=1.0, fifo_expected_intensity_g_per_kwh=400.0,
            fifo_expected_carbon_g=fifo, measured_carbon_g=measured)

    assert carbon_savings("sw-a", []) is None
    s = carbon_savings("sw-a", [placed("a", 1.0, 4.0, None, node="n2"), placed("b", 1.0, 4.0, None)])
    assert s is not None and s["saved_expected_g"] == 6.0 and s["saved_expected_pct"] == 75.0
    assert s["measured_carbon_g"] is None  # nothing accounted yet: None, not 0 g
    assert [st["moved"] for st in s["stages"]] == [True, False]
    json.dumps(s)  # JSON-able as `carbon savings --json` prints it
