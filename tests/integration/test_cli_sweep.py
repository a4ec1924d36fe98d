"""End to end: a small real sweep through the CLI, on a real local Ray and a real store.

The sweep trains a tiny ViT on digits, prunes it (unstructured and structured), quantizes
the structured branch, and evaluates every point. A second run of the same spec must
reuse every artifact (train, prune and quantize do not run again) and still evaluate.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SPEC = """
name: tiny
seed: 1
model:
  arch: vit_tiny_patch16_224
  kwargs: {img_size: 8, patch_size: 2, in_chans: 1, depth: 2, embed_dim: 48, num_heads: 3}
dataset: {name: digits}
train: {epochs: 8, batch_size: 64, lr: 0.003}
pipelines:
  - name: unstructured
    stages:
      - prune: {method: unstructured, ratio: 0.5}
  - name: structured
    stages:
      - prune: {method: structured, mode: all, ratio: 0.5}
      - quantize: {weights: int8, activations: [none, int8], calibration_batches: 2}
evaluate: {targets: [local], batch_size: 128, warmup_batches: 1, repeats: 2, min_window_s: 0.1, warmup_s: 0.2}
"""

GREENSWEEP = str(Path(sys.executable).parent / "greensweep")


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GREENSWEEP, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)



def test_sweep_end_to_end_and_reuse(tmp_path: Path, db_url: str) -> None:
    spec = tmp_path / "tiny.yaml"
    spec.write_text(SPEC)
    env = {**os.environ, "GREENSWEEP_ARTIFACTS": str(tmp_path / "artifacts"), "GREENSWEEP_DB_URL": db_url}

    first = _run(["run", str(spec)], tmp_path, env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "Traceback" not in first.stderr
    sweep_id = first.stdout.split()[1]
    assert sweep_id.startswith("sw-")
    assert "done    train" in first.stdout

    res = _run(["results", sweep_id, "--format", "json"], tmp_path, env)
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert len(rows) == 4  # baseline, unstructured, structured>w8, structured>w8a8
    required = {"sweep_id", "point", "stages", "target", "top1", "top5", "time_per_sample_s",
                "time_per_sample_s_std", "params", "macs", "size_bytes", "materialized"}
    by_point = {r["point"]: r for r in rows}
    for r in rows:
        assert required <= r.keys()
        assert r["sweep_id"] == sweep_id and r["target"] == "local" and r["status"] == "succeeded"
        assert 0.0 <= r["top1"] <= r["top5"] <= 1.0
        assert r["time_per_sample_s"] > 0 and r["repeats"] == 2
        assert r["stages"][0].startswith("train")
    base = by_point["baseline"]
    unstructured = next(r for p, r in by_point.items() if p.startswith("unstructured"))
    structured = [r for p, r in by_point.items() if p.startswith("structured")]
    assert base["top1"] > 0.3  # 8 epochs clearly beat chance (0.1)
    # Unstructured pruning is simulated: same params and MACs as the baseline.
    assert unstructured["materialized"] is False
    assert unstructured["params"] == base["params"] and unstructured["macs"] == base["macs"]
    # Structured pruning is materialized: fewer params and MACs; int8 is smaller on disk.
    for r in structured:
        assert r["materialized"] is True
        assert r["params"] < base["params"] and r["macs"] < base["macs"]
        assert r["size_bytes"] < base["size_bytes"]

    # The store holds exactly what ran.
    from orchestrator.store import Store

    store = Store.open(db_url)
    counts = store.stage_counts(sweep_id)
    assert counts == {"succeeded": 9}  # train, 2 prunes, 2 quantize, 4 evaluate

    # A second sweep of the same spec reuses every artifact and re-evaluates.
    second = _run(["run", str(spec)], tmp_path, env)
    assert second.returncode == 0, second.stdout + second.stderr
    sweep2 = second.stdout.split()[1]
    assert sweep2 != sweep_id
    assert store.stage_counts(sweep2) == {"reused": 5, "succeeded": 4}
    rows2 = json.loads(_run(["results", sweep2, "--format", "json"], tmp_path, env).stdout)
    assert {r["point"]: r["top1"] for r in rows2} == {r["point"]: r["top1"] for r in rows}

    # status and csv read the same store.
    st = _run(["status", sweep_id], tmp_path, env)
    assert st.returncode == 0 and "succeeded" in st.stdout
    csv_out = _run(["results", sweep_id, "--format", "csv"], tmp_path, env)
    assert csv_out.stdout.splitlines()[0].startswith("sweep_id,")
    assert len(csv_out.stdout.splitlines()) == 5


def test_run_bad_spec_writes_nothing(tmp_path: Path) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text(SPEC.replace("ratio: 0.5}", "ratio: 1.5}", 1))
    env = {**os.environ, "GREENSWEEP_ARTIFACTS": str(tmp_path / "artifacts"),
           "GREENSWEEP_DB_URL": f"sqlite:///{tmp_path}/store.db"}
    out = _run(["run", str(spec)], tmp_path, env)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: pipelines[0].stages[0].prune.ratio")
    assert not (tmp_path / "store.db").exists() and not (tmp_path / "artifacts").exists()


RETRAIN_SPEC = """
name: retrain
seed: 0
model:
  arch: vit_tiny_patch16_224
  kwargs: {img_size: 8, patch_size: 2, in_chans: 1, depth: 2, embed_dim: 48, num_heads: 3}
dataset: {name: digits}
train: {epochs: 6, batch_size: 64, lr: 0.003}
pipelines:
  - name: distill
    stages:
      - prune: {method: structured, mode: all, ratio: 0.5}
      - distill: {epochs: 2, lr: 0.001, batch_size: 64}
  - name: finetune
    stages:
      - prune: {method: structured, mode: all, ratio: 0.5}
      - finetune: {epochs: 2, lr: 0.001, batch_size: 64}
evaluate: {targets: [local], batch_size: 128, warmup_batches: 1, repeats: 2, min_window_s: 0.1, idle_s: 0.2, warmup_s: 0.2}
carbon: {provider: static, regions: {local: FR}}
"""


def test_retraining_sweep_records_progress_energy_and_carbon(tmp_path: Path) -> None:
    """distill's default teacher is the sweep's baseline; every epoch of every
    retraining stage is in the store; every measurement carries energy and carbon."""
    spec = tmp_path / "retrain.yaml"
    spec.write_text(RETRAIN_SPEC)
    db = f"sqlite:///{tmp_path}/store.db"
    env = {**os.environ, "GREENSWEEP_ARTIFACTS": str(tmp_path / "artifacts"), "GREENSWEEP_DB_URL": db}
    out = _run(["run", str(spec)], tmp_path, env)
    assert out.returncode == 0, out.stdout + out.stderr
    sweep_id = out.stdout.split()[1]

    from orchestrator.store import Store

    store = Store.open(db)
    stages = {s.kind: s for s in store.stages(sweep_id)}
    train_key = stages["train"].key
    assert stages["distill"].params["teacher"] == f"artifact:{train_key}"
    for kind, epochs in (("train", 6), ("distill", 2), ("finetune", 2)):
        reports = store.progress(sweep_id, stages[kind].key)
        assert [r["epoch"] for r in reports] == list(range(1, epochs + 1)), kind
        assert all(r["val_top1"] is not None for r in reports)

    rows = {r.pipeline: r for r in store.results(sweep_id)}
    pruned_parent = stages["prune"].metrics
    assert pruned_parent["params_after"] < pruned_parent["params_before"]
    for r in rows.values():
        assert r.energy_source.get("cpu") in ("rapl", "estimate-tdp")
        assert r.energy_per_sample_j > 0 and r.idle_power_w.get("cpu") is not None
        assert r.intensity_source.startswith("static:") and r.intensity_kind == "average"
        assert r.intensity_g_per_kwh == pytest.approx(56.0)  # FR, Ember 2023
        assert r.carbon_g_per_sample == pytest.approx(r.energy_per_sample_j / 3.6e6 * 56.0)


def test_run_sweep_from_python_returns_the_sweep_id_and_succeeded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``orchestrator.run_sweep`` runs a tiny sweep in this process (its own local Ray,
    shut down after), quietly, and returns what the store then says."""
    import orchestrator
    from orchestrator.store import Store

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GREENSWEEP_ARTIFACTS", str(tmp_path / "artifacts"))
    monkeypatch.setenv("RAY_ADDRESS", "local")
    spec = tmp_path / "tiny.yaml"
    spec.write_text(SPEC.replace("epochs: 8", "epochs: 1").replace("activations: [none, int8]", "activations: none"))
    db = f"sqlite:///{tmp_path / 'py.db'}"
    outcome = orchestrator.run_sweep(spec, db=db)
    assert (outcome.status, outcome.sweep_id[:3]) == ("succeeded", "sw-")
    import ray

    assert not ray.is_initialized()  # the Ray it started is gone
    with Store.open(db) as store:
        assert store.get_sweep(outcome.sweep_id).status == "succeeded"
        assert outcome.counts == store.stage_counts(outcome.sweep_id)
        assert len(store.results(outcome.sweep_id)) == 3  # baseline, unstructured, structured > int8
