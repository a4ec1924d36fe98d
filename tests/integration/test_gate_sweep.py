"""End to end: a conditional ``qat`` decided both ways in one real sweep (local Ray, a real
store, OpenVINO). The PTQ sibling is calibrated on a single image, so it loses several
points of top-1, significantly: the gate with a 1-point threshold runs QAT, the one with a
50-point threshold skips it as not needed -- and the sweep succeeds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SPEC = """
name: gate
seed: 0
model:
  arch: vit_tiny_patch16_224
  kwargs: {img_size: 8, patch_size: 2, in_chans: 1, depth: 2, embed_dim: 48, num_heads: 2}
dataset: {name: digits}
train: {epochs: 6, lr: 0.003}
pipelines:
  - name: ptq
    stages:
      - quantize: {engine: openvino, weights: int8, activations: int8, calibration_batches: 1, batch_size: 1}
  - name: qat-if-1pt
    stages:
      - qat: {epochs: 1, calibration_batches: 2}
        when: {ptq_top1_drop_over: 0.01}
  - name: qat-if-50pt
    stages:
      - qat: {epochs: 1, calibration_batches: 3}
        when: {ptq_top1_drop_over: 0.5}
evaluate: {targets: [local], runtimes: [openvino], batch_size: 128, warmup_batches: 1, repeats: 2,
           min_window_s: 0.05, warmup_s: 0.1, idle_s: 0}
"""

GREENSWEEP = str(Path(sys.executable).parent / "greensweep")


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GREENSWEEP, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def test_one_sweep_runs_qat_where_ptq_hurt_and_skips_it_where_the_loss_is_under_the_threshold(tmp_path: Path):
    spec = tmp_path / "gate.yaml"
    spec.write_text(SPEC)
    env = {**os.environ, "GREENSWEEP_ARTIFACTS": str(tmp_path / "artifacts"),
           "GREENSWEEP_DB_URL": f"sqlite:///{tmp_path / 'store.db'}"}
    plan = _run(["plan", str(spec)], tmp_path, env)
    assert plan.returncode == 0 and "conditional stages: 2" in plan.stdout, plan.stdout + plan.stderr

    run = _run(["run", str(spec), "--progress", "plain"], tmp_path, env)
    assert run.returncode == 0, run.stdout + run.stderr
    sweep_id = run.stdout.split()[1]
    assert f"sweep {sweep_id} succeeded" in run.stdout and "(2 skipped" in run.stdout

    rows = {r["pipeline"]: r for r in json.loads(_run(["results", sweep_id, "--format", "json"], tmp_path,
                                                       env).stdout)}
    base, ptq = rows["baseline"], rows["ptq"]
    assert base["top1"] - ptq["top1"] > 0.01  # one calibration image: activations clipped
    needed, skipped = rows["qat-if-1pt"], rows["qat-if-50pt"]
    assert needed["status"] == "succeeded" and needed["decision"].startswith("needed: PTQ lost")
    assert needed["top1"] > ptq["top1"]
    assert skipped["status"] == "skipped" and skipped["top1"] is None
    assert skipped["decision"].startswith("not needed: PTQ lost") and "<= 50.0" in skipped["decision"]

    status = _run(["status", sweep_id], tmp_path, env).stdout
    assert "needed: PTQ lost" in status and "not needed: PTQ lost" in status
    assert "2 skipped" in status  # the stage and its evaluation
