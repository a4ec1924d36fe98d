"""End to end: a sweep on two runtimes through the CLI, on a real local Ray and a real
store -- a float model on torch and ONNX Runtime, an ONNX Runtime int8 model on ONNX
Runtime only; the stored rows carry runtime, precision, version and threads, and
``compare`` names the best runtime; the three evaluations form one cohort with the reference,
and every row carries its paired figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SPEC = """
name: runtimes
seed: 2
model:
  arch: vit_tiny_patch16_224
  kwargs: {img_size: 8, patch_size: 2, in_chans: 1, depth: 2, embed_dim: 48, num_heads: 3}
dataset: {name: digits}
train: {epochs: 6, batch_size: 64, lr: 0.003}
pipelines:
  - name: ort-int8
    stages:
      - quantize: {engine: onnxruntime, weights: int8, activations: int8, calibration_batches: 2}
evaluate: {targets: [local], runtimes: [torch, onnxruntime], batch_size: 128, warmup_batches: 1, repeats: 3,
           min_window_s: 0.1, warmup_s: 0.2, idle_s: 0}
"""

GREENSWEEP = str(Path(sys.executable).parent / "greensweep")


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GREENSWEEP, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_a_sweep_on_two_runtimes_stores_and_compares_them(tmp_path: Path, db_url: str) -> None:
    spec = tmp_path / "runtimes.yaml"
    spec.write_text(SPEC)
    env = {**os.environ, "GREENSWEEP_ARTIFACTS": str(tmp_path / "artifacts"), "GREENSWEEP_DB_URL": db_url}
    plan = _run(["plan", str(spec)], tmp_path, env)
    assert plan.returncode == 0 and "3 points" in plan.stdout and "not points: 1 combination" in plan.stdout

    first = _run(["run", str(spec), "--progress", "plain"], tmp_path, env)
    assert first.returncode == 0, first.stdout + first.stderr
    sweep_id = first.stdout.split()[1]

    rows = json.loads(_run(["results", sweep_id, "--format", "json"], tmp_path, env).stdout)
    got = {(r["point"].split(":")[0], r["runtime"], r["precision"]) for r in rows}
    assert got == {("baseline", "torch", "fp32"), ("baseline", "onnxruntime", "fp32"),
                   ("ort-int8", "onnxruntime", "fp32")}
    for r in rows:
        assert r["status"] == "succeeded" and r["runtime_version"] and r["threads"]["inter_op"] >= 1
        assert r["deployable_size_bytes"] > 0 and 0 < r["top1_agreement"] <= 1
    base = {r["runtime"]: r for r in rows if r["point"] == "baseline"}
    assert base["onnxruntime"]["top1_agreement"] == 1.0  # fp32 export agrees with torch
    assert abs(base["onnxruntime"]["top1"] - base["torch"]["top1"]) < 0.01  # accuracy measured on each runtime
    int8 = next(r for r in rows if r["point"].startswith("ort-int8"))
    assert int8["deployable_size_bytes"] < base["onnxruntime"]["deployable_size_bytes"]

    # one cohort: the baseline on torch fp32 is the reference (ratio 1), the others paired with it
    assert base["torch"]["time_ratio_vs_baseline"] == 1.0 and base["torch"]["verdict_time"] == "same"
    for r in rows:
        assert 0 < r["time_ratio_ci_low"] <= r["time_ratio_ci_high"] and r["time_ratio_vs_baseline"] > 0
        assert r["verdict_time"] in ("faster", "slower", "same") and r["verdict_top1"] in ("better", "worse", "same")
        assert r["verdict_energy"] in ("cheaper", "costlier", "same")
        for name in ("energy_ratio_vs_baseline", "energy_ratio_ci_low", "energy_ratio_ci_high"):
            assert r[name] > 0
    assert "answer" in first.stdout and "local / onnxruntime" in first.stdout
    from orchestrator.store import Store

    with Store.open(db_url) as store:
        (cohort,) = store.cohorts(sweep_id)
    # on CPU the windows are interleaved in slices, and the Ray greensweep starts does not nice its workers
    assert cohort.protocol["interleave"] == "slices" and cohort.protocol["niceness"] == 0
    counts = cohort.protocol["slices_per_window"]
    assert len(counts) == 3 and all(len(c) == 3 and min(c) >= 1 for c in counts.values())

    compare = _run(["compare", sweep_id, "--format", "json"], tmp_path, env)
    assert compare.returncode == 0, compare.stderr
    assert "onnxruntime" in compare.stdout and "best" in compare.stdout
