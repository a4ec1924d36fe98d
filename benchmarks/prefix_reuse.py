"""Prefix reuse: greensweep's deduplicated DAG against a Ray Tune grid that runs the whole
chain per point (the way Tune users run compression sweeps today).

The grid: baseline train -> structured prune at 3 ratios -> quantize in 3 modes ->
evaluate, i.e. 9 points. greensweep runs 1 train + 3 prunes + 9 quantizations + 9
evaluations (22 stages); the Tune trainable runs train -> prune -> quantize -> evaluate
for each of the 9 points (36 stages). Both use the very same stage code, the same seed
and the same thread count, so every point must produce identical accuracy, params, MACs
and size; only the wall time may differ.

Both sides pay for their own Ray start: greensweep is timed as the `greensweep run`
command (CLI imports, local Ray, actors, store writes included); Tune as `ray.init` ->
`Tuner.fit()` -> `ray.shutdown`, with one trial at a time holding both cores, as a
greensweep worker does (the fair setting for measured timings on a 2-core machine).

Usage:  .venv/bin/python benchmarks/prefix_reuse.py [--epochs 30] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

# 3 prune ratios x 3 quantization modes (int8 weights, int8 weights + int8 activations,
# float8 weights); the two pipelines share the prune prefix.
SPEC = """
name: prefix-reuse-benchmark
seed: 0
model:
  arch: vit_tiny_patch16_224
  kwargs: {{img_size: 8, patch_size: 2, in_chans: 1, depth: 4, embed_dim: 96, num_heads: 3}}
dataset: {{name: digits}}
train: {{epochs: {epochs}, lr: 0.002, batch_size: 64}}
pipelines:
  - name: int8
    stages:
      - prune: {{method: structured, mode: all, ratio: [0.2, 0.4, 0.6]}}
      - quantize: {{weights: int8, activations: [none, int8]}}
  - name: fp8
    stages:
      - prune: {{method: structured, mode: all, ratio: [0.2, 0.4, 0.6]}}
      - quantize: {{weights: float8, activations: none}}
evaluate: {{targets: [local], batch_size: 64, warmup_batches: 3, repeats: 3, min_window_s: 0.5, baseline: false}}
"""

COMPARED = ("top1", "top5", "params", "macs", "size_bytes", "materialized")


def _write_spec(workdir: Path, epochs: int) -> Path:
    path = workdir / "spec.yaml"
    path.write_text(SPEC.format(epochs=epochs))
    return path


def run_greensweep(spec: Path, workdir: Path) -> tuple[float, list[dict], dict]:
    env = {
        **os.environ,
        "GREENSWEEP_ARTIFACTS": str(workdir / "gs-artifacts"),
        "GREENSWEEP_DB_URL": f"sqlite:///{workdir}/gs.db",
    }
    exe = str(Path(sys.executable).parent / "greensweep")
    start = time.perf_counter()
    proc = subprocess.run([exe, "run", str(spec)], env=env, capture_output=True, text=True)
    wall_s = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"greensweep run failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    sweep_id = proc.stdout.split()[1]
    out = subprocess.run([exe, "results", sweep_id, "--format", "json"], env=env, capture_output=True, text=True)
    rows = json.loads(out.stdout)
    from orchestrator.store import Store

    store = Store.open(env["GREENSWEEP_DB_URL"])
    counts = store.stage_counts(sweep_id)
    return wall_s, rows, {"executed_stages": sum(counts.values()), "counts": counts}


def _tune_trainable(config: dict) -> None:
    """One Tune trial = one point: the whole chain, in a trial-private artifact root."""
    import tempfile as _tempfile

    import torch
    from ray import tune

    from orchestrator.coordinator import task_for
    from orchestrator.plan import build_plan
    from orchestrator.spec import parse_spec
    from workers.stages.registry import get_kind
    from workers.types import WorkerEnv

    torch.set_num_threads(config["threads"])
    spec = parse_spec(config["spec_text"], check_arch=False)
    plan = build_plan(spec)
    point = next(p for p in plan.points if p.label == config["point"])
    env = WorkerEnv(device="cpu", num_threads=config["threads"], node_id="tune")
    with _tempfile.TemporaryDirectory() as root:
        out = None
        for key in (*point.stage_keys, point.eval_key):
            stage = plan.stage(key)
            out = get_kind(stage.kind).load_runner()(task_for(spec, "tune", stage, root), env)
        m = out.metrics
        tune.report({k: m[k] for k in ("top1", "top5", "params", "macs", "size_bytes", "materialized",
                                       "time_per_sample_s")})


def run_tune(spec: Path, workdir: Path, threads: int) -> tuple[float, list[dict], dict]:
    import ray
    from ray import tune

    from orchestrator.plan import build_plan
    from orchestrator.spec import parse_spec

    text = spec.read_text()
    plan = build_plan(parse_spec(text))
    labels = [p.label for p in plan.points]
    start = time.perf_counter()
    ray.init(num_cpus=threads, include_dashboard=False, _node_ip_address="127.0.0.1",
             logging_level="ERROR", log_to_driver=False)
    try:
        tuner = tune.Tuner(
            tune.with_resources(_tune_trainable, {"cpu": threads}),
            param_space={"point": tune.grid_search(labels), "spec_text": text, "threads": threads},
            run_config=tune.RunConfig(storage_path=str(workdir / "tune"), verbose=0),
        )
        grid = tuner.fit()
    finally:
        ray.shutdown()
    wall_s = time.perf_counter() - start
    rows = []
    for result in grid:
        if result.error:
            raise SystemExit(f"tune trial failed: {result.error}")
        rows.append({"point": result.config["point"], **result.metrics})
    executed = sum(len(p.stage_keys) + 1 for p in plan.points)
    return wall_s, rows, {"executed_stages": executed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=30, help="baseline training epochs (quickstart: 30)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()
    threads = os.cpu_count() or 1

    with tempfile.TemporaryDirectory(prefix="gs-bench-") as tmp:
        workdir = Path(tmp)
        spec = _write_spec(workdir, args.epochs)
        gs_wall, gs_rows, gs_info = run_greensweep(spec, workdir)
        tune_wall, tune_rows, tune_info = run_tune(spec, workdir, threads)

    gs_by = {r["point"]: r for r in gs_rows}
    tune_by = {r["point"]: r for r in tune_rows}
    mismatches = []
    for point, t in tune_by.items():
        g = gs_by[point]
        for k in COMPARED:
            if g[k] != t[k]:
                mismatches.append(f"{point}: {k} greensweep={g[k]} tune={t[k]}")

    result = {
        "benchmark": "prefix_reuse",
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": platform.processor() or platform.machine(), "logical_cpus": threads,
                    "python": platform.python_version()},
        "epochs": args.epochs,
        "points": len(tune_rows),
        "greensweep": {"wall_s": round(gs_wall, 1), **gs_info},
        "ray_tune": {"wall_s": round(tune_wall, 1), **tune_info},
        "ratio_greensweep_over_tune": round(gs_wall / tune_wall, 3),
        "identical_metrics": not mismatches,
        "mismatches": mismatches,
        "per_point": [
            {"point": p, **{k: gs_by[p][k] for k in COMPARED},
             "greensweep_time_per_sample_s": gs_by[p]["time_per_sample_s"],
             "tune_time_per_sample_s": tune_by[p]["time_per_sample_s"]}
            for p in sorted(tune_by)
        ],
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    if mismatches or result["ratio_greensweep_over_tune"] > 0.5:
        sys.exit(1)


if __name__ == "__main__":
    main()
