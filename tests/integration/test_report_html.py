"""compare, pareto and report on a store filled by a real small sweep, and the HTML report
opened in headless Chromium.

One sweep (a tiny ViT on digits, unstructured and structured pruning at two ratios) runs
once for the module on the simulated two-node-type cluster (clusters/local-sim.yaml:
cpu-small and cpu-xeon, one in FR and one in DE), with carbon accounted from the shipped
hourly traces.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from orchestrator.catalog import CLUSTERS_DIR, load_simulated_cluster
from orchestrator.cli import main
from orchestrator.store import Store
from orchestrator.store.records import ResultRow

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SPEC = """
name: report-tiny
seed: 1
model:
  arch: vit_tiny_patch16_224
  kwargs: {img_size: 8, patch_size: 2, in_chans: 1, depth: 1, embed_dim: 32, num_heads: 2}
dataset: {name: digits}
train: {epochs: 3, batch_size: 64, lr: 0.003}
pipelines:
  - name: unstructured
    stages:
      - prune: {method: unstructured, ratio: [0.3, 0.6]}
  - name: structured
    stages:
      - prune: {method: structured, mode: all, ratio: [0.3, 0.6]}
evaluate: {targets: [cpu-small, cpu-xeon], batch_size: 256, warmup_batches: 1, repeats: 5, min_window_s: 0.05,
           warmup_s: 0, idle_s: 0.1}
carbon: {provider: timeseries, replay: true}
"""
TARGETS = ["cpu-small", "cpu-xeon"]
SIM_FILE = CLUSTERS_DIR / "local-sim.yaml"


@dataclass(frozen=True)
class Sweep:
    db: str
    sweep_id: str
    rows: list[ResultRow]
    workdir: Path


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Sweep:
    workdir = tmp_path_factory.mktemp("report")
    (workdir / "spec.yaml").write_text(SPEC)
    db = f"sqlite:///{workdir / 'store.db'}"
    env = {**os.environ, "GREENSWEEP_ARTIFACTS": str(workdir / "artifacts"), "GREENSWEEP_DB_URL": db}
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "run", "spec.yaml",
         "--cluster", str(SIM_FILE)],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sweep_id = proc.stdout.split()[1]
    with Store.open(db) as store:
        rows = store.results(sweep_id)
    assert len(rows) == 10 and all(r.status == "succeeded" for r in rows)
    assert all(r.cohort_id and r.verdict_time and r.verdict_energy for r in rows)  # every point measured in a cohort
    return Sweep(db, sweep_id, rows, workdir)


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def _tbody_rows(page: str, table_id: str) -> int:
    m = re.search(rf'<table id="{re.escape(table_id)}">.*?<tbody>(.*?)</tbody>', page, re.S)
    assert m, f"no table {table_id}"
    return m.group(1).count("<tr>")


def test_compare_table_matches_the_store(sweep: Sweep, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _cli(["compare", sweep.sweep_id, "--db", sweep.db, "--format", "json"], capsys)
    assert code == 0, err
    data = json.loads(out)
    assert data["sweep_id"] == sweep.sweep_id and data["targets"] == TARGETS
    labels = list(dict.fromkeys(r.point for r in sweep.rows))
    assert [m["model"] for m in data["models"]] == labels and len(labels) == 5
    by_index = {r.point_index: r for r in sweep.rows}
    for m in data["models"]:
        assert set(m["cells"]) == set(TARGETS)
        for target, cell in m["cells"].items():
            r = by_index[cell["point_index"]]
            assert (r.point, r.target) == (m["model"], target)
            for field in ("time_per_sample_s", "time_per_sample_s_std", "energy_per_sample_j",
                          "energy_per_sample_j_std", "carbon_g_per_sample", "carbon_g_per_sample_std"):
                assert cell[field] == pytest.approx(getattr(r, field)) and cell[field] is not None, field
            assert cell["energy_source"]["cpu"] in ("rapl", "estimate-tdp")
        assert m["top1"] == pytest.approx(by_index[m["cells"]["cpu-small"]["point_index"]].top1)
    compression = {m["model"].split(":")[0]: m["compression"] for m in data["models"]}
    assert compression == {"baseline": "none", "unstructured": "simulated", "structured": "materialized"}
    base = data["models"][0]
    for m in data["models"][1:]:
        if m["compression"] == "materialized":
            assert m["params"] < base["params"] and m["macs"] < base["macs"]
        else:
            assert m["params"] == base["params"]
    # each node type sits in its own region (FR, DE): its carbon uses that region's trace
    regions = {n.node_type: n.region for n in load_simulated_cluster(SIM_FILE).nodes}
    assert sorted(regions.values()) == ["DE", "FR"]
    for target, cell in base["cells"].items():
        assert f":{regions[target]}-2020-hourly" in cell["intensity_source"]
    # both node types are simulated on this one host, and the comparison says so
    assert any(n.startswith("simulated:") and f"({socket.gethostname()})" in n for n in data["notes"])

    code, out, _ = _cli(["compare", sweep.sweep_id, "--db", sweep.db, "--format", "csv"], capsys)
    lines = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and [line["model"] for line in lines] == labels
    assert float(lines[0]["energy_per_sample_j@cpu-xeon"]) == pytest.approx(data["models"][0]["cells"]["cpu-xeon"]
                                                                            ["energy_per_sample_j"])
    code, out, _ = _cli(["compare", sweep.sweep_id, "--db", sweep.db, "--format", "markdown"], capsys)
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert code == 0 and len(table) == 1 + 5 and "cpu-xeon µg CO2/sample" in table[0]
    code, out, _ = _cli(["compare", "--db", sweep.db], capsys)  # the latest sweep, as a terminal table
    assert code == 0 and "cpu-small" in out and "(cpu:" in out and "simulated: node types" in out


VERDICT_OF = {"energy_per_sample_j": "verdict_energy", "time_per_sample_s": "verdict_time",
              "carbon_g_per_sample": "verdict_energy"}  # carbon is energy x the region's intensity


def _frontier(rows: list[ResultRow], field: str = "energy_per_sample_j") -> set[int]:
    """Non-dominated point indices by the definition (independent of pareto_mask), costs
    following the paired verdicts: a point whose verdict is ``same`` costs what the
    baseline (the cohorts' reference, a point here) costs, and loses a tie with it."""
    refs = {r.reference_key for r in rows if r.reference_key}
    baseline = next(r for r in rows if r.eval_key in refs)

    def equated(r: ResultRow) -> bool:
        return r is not baseline and getattr(r, VERDICT_OF[field]) == "same"

    def x(r: ResultRow) -> float:
        return getattr(baseline if equated(r) else r, field)

    def dominated(r: ResultRow) -> bool:
        if equated(r) and r.top1 <= baseline.top1:
            return True
        return any(x(o) <= x(r) and o.top1 >= r.top1 and (x(o) < x(r) or o.top1 > r.top1) for o in rows if o is not r)

    return {r.point_index for r in rows if not dominated(r)}


def test_pareto_frontier_and_plot(sweep: Sweep, capsys: pytest.CaptureFixture[str]) -> None:
    plot = sweep.workdir / "front.png"
    code, out, err = _cli(["pareto", sweep.sweep_id, "--db", sweep.db, "--format", "json", "--plot", str(plot)],
                          capsys)
    assert code == 0, err
    data = json.loads(out)
    assert [t["target"] for t in data["targets"]] == TARGETS
    for t in data["targets"]:
        mine = [r for r in sweep.rows if r.target == t["target"]]
        assert {q["point_index"] for q in t["points"] if q["on_frontier"]} == _frontier(mine)
        assert len(t["points"]) == 5 and t["without_metrics"] == []
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    code, out, err = _cli(["pareto", sweep.sweep_id, "--db", sweep.db, "--x", "carbon", "--target", "cpu-xeon",
                           "--format", "markdown"], capsys)
    assert code == 0, err
    assert out.startswith("**cpu-xeon: carbon / sample (µg CO2eq) vs top-1 accuracy") and "cpu-small" not in out
    code, _, err = _cli(["pareto", sweep.sweep_id, "--db", sweep.db, "--target", "gpu-a100"], capsys)
    assert code == 2 and "has no target 'gpu-a100' -- its targets: cpu-small, cpu-xeon" in err


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_report_html_opens_in_headless_chromium(sweep: Sweep, capsys: pytest.CaptureFixture[str]) -> None:
    out_path = sweep.workdir / "report.html"
    code, out, err = _cli(["report", sweep.sweep_id, "--db", sweep.db, "--out", str(out_path)], capsys)
    assert code == 0, err
    assert f"wrote {out_path}" in out and "5 models x 2 targets" in out
    page = out_path.read_text(encoding="utf-8")

    # the tables hold what the store holds
    assert _tbody_rows(page, "comparison-table") == 5
    assert _tbody_rows(page, "hardware-table") == 2  # the two simulated nodes, as they described themselves
    assert page.count(f"<td>{socket.gethostname()}</td>") == 2
    assert _tbody_rows(page, "energy-sources-table") == 10
    for metric, field in (("energy", "energy_per_sample_j"), ("time", "time_per_sample_s"),
                          ("carbon", "carbon_g_per_sample")):
        for target in TARGETS:
            front = _frontier([r for r in sweep.rows if r.target == target], field)
            assert _tbody_rows(page, f"frontier-{metric}-{target}") == len(front), (metric, target)
    assert 'id="no-failures"' in page
    with Store.open(sweep.db) as store:
        savings_of = getattr(store, "carbon_savings", None)
        savings = savings_of(sweep.sweep_id) if callable(savings_of) else None
    if savings is None:
        assert "no carbon-aware placement recorded for this sweep" in page and "placement-table" not in page
    else:
        assert _tbody_rows(page, "placement-table") == len(savings["stages"])
    images = re.findall(r'<img [^>]*src="([^"]*)"', page)
    assert len(images) == 3 + 2  # Pareto: energy, time, carbon; vs prune ratio: top-1, energy
    assert all(src.startswith("data:image/png;base64,") for src in images)
    assert not re.search(r'(?:src|href)="(?:https?:|//|file:)', page)

    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run installs it)")
    dom, attrs = _open_in_chromium(browser, out_path, sweep.workdir / "chromium-profile")
    assert attrs.get("data-images-total") == str(len(images))
    assert attrs.get("data-images-ok") == str(len(images))
    assert attrs.get("data-images-loaded") == "true"
    # the browser parsed the same tables
    assert _tbody_rows(dom, "comparison-table") == 5 and _tbody_rows(dom, "hardware-table") == 2

    # ... and the check does see a broken image
    broken = sweep.workdir / "broken.html"
    broken.write_text(page.replace(images[0], "data:image/png;base64,bm90IGEgcG5n", 1), encoding="utf-8")
    _, attrs = _open_in_chromium(browser, broken, sweep.workdir / "chromium-profile")
    assert attrs.get("data-images-ok") == str(len(images) - 1) and attrs.get("data-images-loaded") == "false"


def _open_in_chromium(browser: str, page: Path, profile: Path) -> tuple[str, dict[str, str]]:
    """Load *page* from disk in headless Chromium; its DOM after the load and <body>'s attributes."""
    proc = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=90,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    body = re.search(r"<body[^>]*>", proc.stdout)
    assert body, proc.stdout[:500]
    return proc.stdout, dict(re.findall(r'([\w-]+)="([^"]*)"', body.group(0)))
