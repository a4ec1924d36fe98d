"""Conclusions that follow the paired verdicts: results, compare, Pareto, the answer and
the HTML report of points measured in cohorts (hand-built rows, no Ray), and the same
read from a store through the CLI; rows from before cohorts read as they always did."""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from orchestrator.report import (
    RESULT_FIELDS,
    answer_lines,
    answers,
    build_comparison,
    build_pareto,
    build_report,
    noise_floors,
    render_comparison,
    render_pareto,
    render_results,
)
from orchestrator.store import Store
from orchestrator.store.records import CohortRecord, ResultRow, SweepRecord
from tests.cli import run_cli
from tests.unit.test_report import TRAIN, _prune, row
from workers.types import EnergyReading, EvalRepeat, StageResult

PAIRED = ("time_ratio_vs_baseline", "time_ratio_ci_low", "time_ratio_ci_high", "verdict_time",
          "energy_ratio_vs_baseline", "energy_ratio_ci_low", "energy_ratio_ci_high", "verdict_energy",
          "verdict_top1")
U3, U6, S6 = _prune("unstructured", 0.3), _prune("unstructured", 0.6), _prune("structured", 0.6, "all")
REF_TOP1 = 0.964


def paired(r: ResultRow, time: tuple[float, float, float, str] | None = None,
           energy: tuple[float, float, float, str] | None = None, top1: str = "same", *,
           follows: bool = False, cohort: str = "c-1", reference_key: str = "e-0") -> ResultRow:
    """*r* as measured in a cohort: time and energy ratio, interval and verdict; ratio 1
    and ``same`` where not given (the reference's own figures)."""
    t = time or (1.0, 1.0, 1.0, "same")
    e = energy or (1.0, 1.0, 1.0, "same")
    return replace(r, time_ratio_vs_baseline=t[0], time_ratio_ci_low=t[1], time_ratio_ci_high=t[2],
                   verdict_time=t[3], energy_ratio_vs_baseline=e[0], energy_ratio_ci_low=e[1],
                   energy_ratio_ci_high=e[2], verdict_energy=e[3], verdict_top1=top1, cohort_id=cohort,
                   reference_key=reference_key, reference_top1=REF_TOP1,
                   reference_time_per_sample_s=1e-3, reference_energy_per_sample_j=0.757e-3,
                   energy_follows_time=follows)


def demo_rows(*, u3_top1: float = REF_TOP1, u6_top1: float = 0.962) -> list[ResultRow]:
    """The demo that prompted this: unstructured 30 % and 60 % ~3 % cheaper than the
    baseline on noise alone (0.733 and 0.735 mJ against 0.757), structured 60 % really."""
    return [
        paired(row(0, [TRAIN], "local", energy_j=0.757e-3, time_s=1e-3, top1=REF_TOP1, materialized=None)),
        paired(row(1, [TRAIN, U3], "local", pipeline="u", energy_j=0.733e-3, time_s=0.98e-3, top1=u3_top1,
                   materialized=False),
               time=(0.98, 0.95, 1.01, "same"), energy=(0.97, 0.93, 1.01, "same")),
        paired(row(2, [TRAIN, U6], "local", pipeline="u", energy_j=0.735e-3, time_s=0.99e-3, top1=u6_top1,
                   materialized=False),
               time=(0.99, 0.96, 1.02, "same"), energy=(0.97, 0.94, 1.00, "same")),
        paired(row(3, [TRAIN, S6], "local", pipeline="s", energy_j=0.40e-3, time_s=0.52e-3, top1=0.953),
               time=(0.52, 0.50, 0.55, "faster"), energy=(0.53, 0.50, 0.56, "cheaper"), top1="same", follows=True),
    ]


def _frontier(rows: list[ResultRow], x: str = "energy") -> list[int]:
    (front,) = build_pareto(rows, x=x).fronts
    return [q.row.point_index for q in front.frontier]


# ------------------------------------------------------------------ Pareto


@pytest.mark.parametrize("x", ["energy", "time"])
def test_points_cheaper_on_noise_alone_are_not_on_the_frontier(x: str) -> None:
    rows = demo_rows()
    assert _frontier(rows, x) == [3, 0]  # structured 60 %, then the baseline; no unstructured point
    (front,) = build_pareto(rows, x=x).fronts
    by_index = {q.row.point_index: q for q in front.points}
    baseline = by_index[0].x
    assert by_index[1].x == by_index[2].x == baseline and by_index[1].equated and not by_index[0].equated
    assert by_index[1].x_measured == getattr(rows[1], "energy_per_sample_j" if x == "energy" else "time_per_sample_s")
    # without the verdicts (a store from before cohorts) the same figures put them on it, as they did
    old = [replace(r, **dict.fromkeys(PAIRED)) for r in rows]
    assert _frontier(old, x) == [3, 1]  # unstructured 30 % "dominated" the baseline


def test_a_point_equal_in_cost_on_noise_is_on_the_frontier_only_when_more_accurate() -> None:
    rows = demo_rows(u3_top1=0.97)
    assert _frontier(rows) == [3, 1]  # unstructured 30 % is more accurate at the baseline's cost: it wins
    data = json.loads(render_pareto(build_pareto(rows), "json"))
    u3 = next(q for q in data["targets"][0]["points"] if q["point_index"] == 1)
    assert (u3["x"], u3["x_measured"], u3["x_verdict"], u3["on_frontier"]) == (0.757e-3, 0.733e-3, "same", True)
    table = render_pareto(build_pareto(rows), "table")
    assert "≈ 0.7570 (baseline's; own 0.7330 ± 0.0100)" in table and "counts it as the baseline's" in table
    assert "≈" in render_pareto(build_pareto(rows), "markdown")


def test_without_the_reference_as_a_point_same_costs_are_the_cohorts_reference_figure() -> None:
    """evaluate.baseline false: the reference was measured but is no point; a ``same`` cost
    is the reference's figure its cohorts recorded, one number for the target."""
    rows = demo_rows()[1:]
    (front,) = build_pareto(rows, x="energy").fronts
    assert {q.row.point_index: q.x for q in front.points if q.equated} == {1: 0.757e-3, 2: 0.757e-3}
    assert _frontier(rows) == [3, 1]  # u3 beats u6 on accuracy at the same (reference) cost
    bare = [replace(r, reference_energy_per_sample_j=None) for r in rows]  # nor that: figure / ratio
    (front,) = build_pareto(bare, x="energy").fronts
    assert {q.row.point_index: q.x for q in front.points if q.equated} == pytest.approx({1: 0.733e-3 / 0.97,
                                                                                          2: 0.735e-3 / 0.97})


def test_carbon_follows_the_energy_verdict() -> None:
    rows = [replace(r, carbon_g_per_sample=r.energy_per_sample_j * 1e-4) for r in demo_rows()]
    assert _frontier(rows, "carbon") == [3, 0]


# ------------------------------------------------------------------ the answer


def _answer_rows() -> list[ResultRow]:
    base = demo_rows()
    a = paired(row(4, [TRAIN, _prune("structured", 0.9, "all")], "local", pipeline="s", top1=0.90, time_s=0.4e-3),
               time=(0.40, 0.38, 0.42, "faster"), top1="worse")  # much cheaper, significantly worse by 6 points
    b = paired(row(5, [TRAIN, _prune("structured", 0.7, "all")], "local", pipeline="s", top1=0.958, time_s=0.45e-3),
               time=(0.45, 0.43, 0.47, "faster"), top1="worse")  # significantly worse, but within a point
    d = paired(row(6, [TRAIN, _prune("structured", 0.8, "all")], "local", pipeline="s", top1=0.952, time_s=0.42e-3),
               time=(0.42, 0.40, 0.44, "faster"), top1="worse")  # a 1.2-point drop that is significant
    return [*base, a, b, d]


def test_the_answer_is_the_cheapest_significant_saving_with_acceptable_accuracy() -> None:
    rows = _answer_rows()
    assert answer_lines(rows) == [
        "local / torch: s: prune(method=structured, ratio=0.7, mode=all) — 0.45x time [0.43, 0.47], "
        "top-1 95.8% (baseline 96.4%, significantly worse)"]
    # without it: structured 60 %, 1.1 points below the baseline but `same` by McNemar
    (line,) = answer_lines([r for r in rows if r.point_index != 5])
    assert line == ("local / torch: s: prune(method=structured, ratio=0.6, mode=all) — 0.52x time [0.50, 0.55], "
                    "top-1 95.3% (baseline 96.4%, ≈)")
    # the same 1.1-point drop called significantly worse is not acceptable
    worse = [replace(r, verdict_top1="worse") if r.point_index == 3 else r for r in rows if r.point_index != 5]
    assert answer_lines(worse) == ["local / torch: no model is significantly faster than the baseline within 1 point "
                                   "of its top-1"]


def test_the_answer_per_target_and_runtime_and_when_there_is_nothing_to_answer() -> None:
    rows = demo_rows()
    ort = paired(replace(row(7, [TRAIN], "local", top1=0.964, time_s=0.6e-3), runtime="onnxruntime"),
                 time=(0.61, 0.58, 0.64, "faster"))
    bf16 = paired(replace(row(8, [TRAIN], "local", top1=0.962, time_s=0.5e-3), runtime="onnxruntime",
                          precision="bf16"), time=(0.50, 0.47, 0.53, "faster"))
    gpu = paired(row(9, [TRAIN, U3], "gpu", pipeline="u"), time=(0.99, 0.97, 1.01, "same"), cohort="c-2",
                 reference_key="e-none")
    found = answers([*rows, ort, bf16, gpu])
    assert [(a.target, a.runtime, a.best.point_index if a.best else None) for a in found] == [
        ("local", "torch", 3), ("local", "onnxruntime", 8), ("gpu", "torch", None)]
    assert found[1].line().startswith("local / onnxruntime: baseline (bf16) — 0.50x time [0.47, 0.53]")
    assert found[2].line() == ("gpu / torch: no model is significantly faster than the baseline within 1 point of "
                               "its top-1")
    old = [replace(r, **dict.fromkeys(PAIRED)) for r in rows]  # measured before cohorts: nothing to answer from
    assert answers(old) == [] and answer_lines(old) == []


def test_a_missing_reference_top1_is_the_reference_rows() -> None:
    rows = [replace(r, reference_top1=None, verdict_top1=None) for r in _answer_rows()]
    assert answers(rows)[0].best.point_index == 5 and answers(rows)[0].reference_top1 == REF_TOP1


# ------------------------------------------------------------------ results and compare


def test_results_rows_gain_exactly_the_paired_fields() -> None:
    rows = demo_rows()
    data = json.loads(render_results(rows, "json"))
    at = RESULT_FIELDS.index(PAIRED[0])  # appended together, after the runtime fields (later keys follow them)
    assert RESULT_FIELDS[at:at + 9] == PAIRED and RESULT_FIELDS[at - 1] == "top1_agreement"
    assert all(list(d) == list(RESULT_FIELDS) for d in data)
    assert {k: data[3][k] for k in PAIRED} == {
        "time_ratio_vs_baseline": 0.52, "time_ratio_ci_low": 0.50, "time_ratio_ci_high": 0.55, "verdict_time": "faster",
        "energy_ratio_vs_baseline": 0.53, "energy_ratio_ci_low": 0.50, "energy_ratio_ci_high": 0.56,
        "verdict_energy": "cheaper", "verdict_top1": "same"}
    assert "cohort_id" not in data[0] and "energy_follows_time" not in data[0]
    table = render_results(rows, "table")
    assert "time vs baseline" in table and "0.52x [0.50, 0.55]" in table and "≈ 0.98x [0.95, 1.01]" in table
    assert "≈ 1.00x [1.00, 1.00]" in table  # the baseline itself
    lines = list(csv.DictReader(io.StringIO(render_results(rows, "csv"))))
    assert lines[3]["verdict_time"] == "faster" and lines[3]["time_ratio_ci_low"] == "0.5"
    old = [replace(r, **dict.fromkeys(PAIRED)) for r in rows]
    assert "time vs baseline" not in render_results(old, "table")
    assert all(d[k] is None for d in json.loads(render_results(old, "json")) for k in PAIRED)


def test_compare_shows_ratios_with_intervals_and_says_when_energy_follows_time() -> None:
    c = build_comparison(demo_rows())
    table = render_comparison(c, "table")
    assert "time 0.52x [0.50, 0.55]" in table and "time ≈ 0.98x [0.95, 1.01]" in table
    assert "energy 0.53x [0.50, 0.56] (estimate, follows time)" in table
    assert "energy ≈ 0.97x [0.93, 1.01]" in table and "energy ≈ 0.97x [0.93, 1.01] (" not in table
    assert "not significant (the interval reaches into [0.98, 1.02])" in table
    cell = json.loads(render_comparison(c, "json"))["models"][3]["cells"]["local"]
    assert (cell["verdict_time"], cell["time_ratio_ci_high"], cell["energy_follows_time"]) == ("faster", 0.55, True)
    markdown = render_comparison(c, "markdown").split("\n\n")[0].splitlines()
    assert "local time vs baseline" in markdown[0] and "local energy vs baseline" in markdown[0]
    assert len({line.count(" | ") for line in markdown if "---" not in line}) == 1  # columns line up
    assert "| 0.53x [0.50, 0.56] (estimate, follows time) |" in markdown[5]
    old = build_comparison([replace(r, **dict.fromkeys(PAIRED)) for r in demo_rows()])
    assert "vs baseline" not in render_comparison(old, "table") + render_comparison(old, "markdown")


# ------------------------------------------------------------------ HTML report


def _cohort(cohort_id: str, target: str, cv: float | None) -> CohortRecord:
    return CohortRecord(sweep_id="sw-test", id=cohort_id, node_id="n1", target=target, seed=1, rounds=7, size=4,
                        reference_key="e-0", reference_shown=True, protocol={}, noise_floor_cv=cv, reference={},
                        created_at=datetime(2026, 12, 1, tzinfo=timezone.utc))


def _sweep() -> SweepRecord:
    t = datetime(2026, 12, 1, tzinfo=timezone.utc)
    return SweepRecord(id="sw-test", name="t", spec_text="name: t\n", spec_hash="h", status="succeeded", created_at=t,
                       started_at=t, finished_at=t, artifact_root="/a", naive_stage_count=4, unique_stage_count=4)


def test_noise_floor_is_the_median_over_a_targets_cohorts() -> None:
    floors = noise_floors([_cohort("c-1", "local", 0.05), _cohort("c-2", "local", 0.01), _cohort("c-3", "local", 0.021),
                           _cohort("c-4", "gpu", None)])
    assert [(f.target, f.median_cv, f.cohorts, f.measured) for f in floors] == [("local", 0.021, 3, 3),
                                                                                ("gpu", None, 1, 0)]
    assert floors[0].line().startswith("local: noise floor 2.1 % -- round-to-round CV")
    assert "not measured" in floors[1].line()


def test_the_report_opens_with_the_answer_and_states_each_targets_noise_floor() -> None:
    page = build_report(sweep=_sweep(), rows=_answer_rows(), stages=[], nodes=[], savings=None,
                        cohorts=[_cohort("c-1", "local", 0.03), _cohort("c-2", "local", 0.021)])
    assert page.index('<section id="answer">') < page.index('<section id="summary">') < page.index('id="spec"')
    answer = re.search(r'<section id="answer">(.*?)</section>', page, re.S).group(1)
    assert "local / torch: s: prune(method=structured, ratio=0.7, mode=all) — 0.45x time [0.43, 0.47]" in answer
    assert "local: noise floor 2.6 %" in answer
    assert "time 0.52x [0.50, 0.55]" in page and "(estimate, follows time)" in page  # the comparison's cells
    assert "counts it as the baseline" not in page  # no frontier cost was taken as the baseline's
    equated = build_report(sweep=_sweep(), rows=demo_rows(u3_top1=0.97), stages=[], nodes=[], savings=None)
    assert "≈ 0.7570 (baseline&#x27;s; own 0.7330 ± 0.0100)" in equated and "counts it as the baseline" in equated
    old = build_report(sweep=_sweep(), rows=[replace(r, **dict.fromkeys(PAIRED)) for r in demo_rows()], stages=[],
                       nodes=[], savings=None)
    assert "no model was measured in a cohort" in old and 'id="noise-floor"' not in old


# ------------------------------------------------------------------ from a store, through the CLI

SID = "sw-cohorts00001"


def _evaluation(key: str, ms: float, top1: float, ratio: tuple[float, float, float, str], verdict_top1: str,
                cohort_id: str) -> StageResult:
    repeats = tuple(EvalRepeat(repeat=i, samples=100, top1=top1, top5=1.0, duration_s=ms / 10,
                               time_per_sample_s=ms / 1e3, throughput_samples_per_s=1e3 / ms,
                               energy=EnergyReading(duration_s=ms / 10, cpu_energy_j=ms, cpu_source="estimate-tdp"))
                    for i in range(3))
    cohort: dict[str, Any] = {
        "id": cohort_id, "seed": 1234, "rounds": 3, "size": 3, "node_id": "node-x", "target": "local",
        "reference_key": "k-e-base", "reference_shown": True, "protocol": {"repeats": 3, "order": "seeded-random"},
        "noise_floor_cv": {"c-a": 0.02, "c-b": 0.04}[cohort_id],
        "reference": {"time_per_sample_s": [0.01] * 3, "energy_per_sample_j": [0.1] * 3, "top1": 0.96}}
    paired_figures = {"time_ratio_vs_baseline": ratio[0], "time_ratio_ci_low": ratio[1], "time_ratio_ci_high": ratio[2],
                      "verdict_time": ratio[3], "energy_ratio_vs_baseline": ratio[0], "energy_ratio_ci_low": ratio[1],
                      "energy_ratio_ci_high": ratio[2],
                      "verdict_energy": {"faster": "cheaper", "slower": "costlier"}.get(ratio[3], "same"),
                      "verdict_top1": verdict_top1, "top1_mcnemar_p": 0.5, "top1_discordant": [1, 1],
                      "time_ratio_cv": 0.01, "energy_follows_time": True}
    return StageResult(key=key, kind="evaluate", status="succeeded", duration_s=1.0, node_id="node-x",
                       repeats=repeats, metrics={"params": 10, "macs": 100, "size_bytes": 40, "materialized": True,
                                                 "cohort": cohort, "paired": paired_figures})


@pytest.fixture
def db(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'cohorts.db'}"
    chains = {"k-e-base": ["k-train"], "k-e-u": ["k-train", "k-u"], "k-e-s": ["k-train", "k-s"]}
    stages = [{"key": "k-train", "kind": "train", "params": {"epochs": 1}},
              {"key": "k-u", "kind": "prune", "params": {"method": "unstructured", "ratio": 0.6},
               "parent_key": "k-train"},
              {"key": "k-s", "kind": "prune", "params": {"method": "structured", "ratio": 0.6, "mode": "all"},
               "parent_key": "k-train"},
              *({"key": key, "kind": "evaluate", "params": {"target": "local"}, "parent_key": chain[-1],
                 "target": "local"} for key, chain in chains.items())]
    points = [{"point_index": i, "label": label, "pipeline": "p", "stage_keys": chains[key], "target": "local",
               "eval_key": key}
              for i, (label, key) in enumerate((("baseline", "k-e-base"), ("u: unstructured 60%", "k-e-u"),
                                                ("s: structured 60%", "k-e-s")))]
    with Store.open(url) as store:
        store.create_sweep(SID, "cohorts", "name: cohorts\n", "h", "/a", stages, points, naive_stage_count=6)
        store.record_stage_results(SID, [
            _evaluation("k-e-base", 10.0, 0.96, (1.0, 1.0, 1.0, "same"), "same", "c-a"),
            _evaluation("k-e-u", 9.7, 0.96, (0.97, 0.94, 1.01, "same"), "same", "c-a")])
        store.record_stage_result(SID, _evaluation("k-e-s", 5.2, 0.955, (0.52, 0.50, 0.55, "faster"), "same", "c-b"))
    return url


def test_the_cli_reads_a_cohort_sweep(db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["results", SID, "--db", db, "--format", "json"], capsys)
    data = json.loads(out)
    assert code == 0 and [(d["verdict_time"], d["time_ratio_ci_high"]) for d in data] == [
        ("same", 1.0), ("same", 1.01), ("faster", 0.55)]
    code, out, _ = run_cli(["pareto", SID, "--db", db, "--format", "json"], capsys)
    points = {q["point_index"]: q for q in json.loads(out)["targets"][0]["points"]}
    assert code == 0 and not points[1]["on_frontier"] and points[1]["x"] == points[0]["x"]
    code, out, _ = run_cli(["compare", SID, "--db", db], capsys)
    assert code == 0 and "energy 0.52x [0.50, 0.55] (estimate, follows time)" in out
    report = tmp_path / "r.html"
    code, _, _ = run_cli(["report", SID, "--db", db, "--out", str(report)], capsys)
    page = report.read_text()
    assert code == 0 and "local / torch: s: structured 60% — 0.52x time [0.50, 0.55], top-1 95.5%" in page
    assert "local: noise floor 3.0 %" in page  # the median of the two cohorts' 2 % and 4 %


def test_the_end_of_a_run_prints_the_answer(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    from orchestrator.cli.run import _report_outcome

    outcome = SimpleNamespace(sweep_id=SID, status="succeeded", wall_s=1.0, counts={"succeeded": 4},
                              carbon_aware=False)
    with Store.open(db) as store:
        _report_outcome(outcome, store)
    out = capsys.readouterr().out
    answer = out.index("  local / torch: s: structured 60% — 0.52x time [0.50, 0.55], top-1 95.5% (baseline 96.0%, ≈)")
    assert out.index("time vs baseline") < answer < out.index(f"sweep {SID} succeeded")
