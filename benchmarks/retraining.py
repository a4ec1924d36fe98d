"""The reference paper's Table III, on the digits quickstart model: baseline -> pruned
(aggressive enough to hurt) -> + fine-tune -> + distill -> + int8 quantization, with top-1,
time/sample, energy/sample (with its source), params and MACs, over several seeds.

Each seed is one real `greensweep run` (baseline trained with that seed, the pruned model
retrained with that seed), all into one SQLite store. Targets (issue 4): the retrained
pruned model within 1 point of the baseline's top-1 while at least 30 % cheaper per
sample; and an honest answer to "did distillation beat fine-tuning here, by how much?".

Usage:  .venv/bin/python benchmarks/retraining.py [--seeds 0 1 2] [--ratio 0.5] [--epochs 30] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

SPEC = """
name: retraining-seed-{seed}
seed: {seed}
model:
  arch: vit_tiny_patch16_224
  kwargs: {{img_size: 8, patch_size: 2, in_chans: 1, depth: 4, embed_dim: 96, num_heads: 3}}
dataset: {{name: digits}}
train: {{epochs: 30, lr: 0.002, batch_size: 64}}
pipelines:
  - name: pruned
    stages:
      - prune: {{method: structured, mode: all, ratio: {ratio}}}
  - name: finetune
    stages:
      - prune: {{method: structured, mode: all, ratio: {ratio}}}
      - finetune: {{epochs: {epochs}, lr: {lr}, batch_size: 64, warmup_epochs: 1}}
  - name: distill
    stages:
      - prune: {{method: structured, mode: all, ratio: {ratio}}}
      - distill: {{epochs: {epochs}, lr: {lr}, batch_size: 64, warmup_epochs: 1, alpha: {alpha}, temperature: 4}}
  - name: distill-int8
    stages:
      - prune: {{method: structured, mode: all, ratio: {ratio}}}
      - distill: {{epochs: {epochs}, lr: {lr}, batch_size: 64, warmup_epochs: 1, alpha: {alpha}, temperature: 4}}
      - quantize: {{weights: int8, activations: int8}}
evaluate: {{targets: [local], batch_size: 256, warmup_batches: 3, repeats: 5, min_window_s: 2.0, idle_s: 2.0}}
"""
ORDER = ("baseline", "pruned", "finetune", "distill", "distill-int8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--epochs", type=int, default=30, help="retraining epochs (finetune and distill)")
    ap.add_argument("--lr", type=float, default=0.001)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    exe = str(Path(sys.executable).parent / "greensweep")
    rows: dict[str, list[dict]] = defaultdict(list)
    with tempfile.TemporaryDirectory(prefix="gs-retrain-") as tmp:
        env = {**os.environ, "GREENSWEEP_ARTIFACTS": f"{tmp}/artifacts", "GREENSWEEP_DB_URL": f"sqlite:///{tmp}/s.db"}
        for seed in args.seeds:
            spec = Path(tmp) / f"seed{seed}.yaml"
            spec.write_text(SPEC.format(seed=seed, ratio=args.ratio, epochs=args.epochs, lr=args.lr, alpha=args.alpha))
            run = subprocess.run([exe, "run", str(spec)], env=env, capture_output=True, text=True)
            if run.returncode != 0:
                raise SystemExit(f"seed {seed} failed:\n{run.stdout}\n{run.stderr}")
            sweep = run.stdout.split()[1]
            out = subprocess.run([exe, "results", sweep, "--format", "json"], env=env, capture_output=True, text=True)
            for r in json.loads(out.stdout):
                rows[r["pipeline"]].append(r)

    def mean(name: str, key: str) -> float:
        return statistics.fmean(r[key] for r in rows[name])

    def std(name: str, key: str) -> float:
        values = [r[key] for r in rows[name]]
        return statistics.stdev(values) if len(values) > 1 else 0.0

    base_top1, base_time = mean("baseline", "top1"), mean("baseline", "time_per_sample_s")
    base_energy = mean("baseline", "energy_per_sample_j")
    table = []
    for name in ORDER:
        r0 = rows[name][0]
        table.append({
            "point": name,
            "top1_pct": 100 * mean(name, "top1"), "top1_pct_std_over_seeds": 100 * std(name, "top1"),
            "time_per_sample_ms": 1e3 * mean(name, "time_per_sample_s"),
            "time_vs_baseline_pct": 100 * (mean(name, "time_per_sample_s") / base_time - 1),
            "energy_per_sample_mj": 1e3 * mean(name, "energy_per_sample_j"),
            "energy_vs_baseline_pct": 100 * (mean(name, "energy_per_sample_j") / base_energy - 1),
            "energy_source": r0["energy_source"], "params": r0["params"], "macs": r0["macs"],
            "size_bytes": r0["size_bytes"],
        })
    kd_minus_ft = [100 * (d["top1"] - f["top1"]) for d, f in zip(rows["distill"], rows["finetune"])]
    best_retrained = max(("finetune", "distill"), key=lambda n: mean(n, "top1"))
    result = {
        "benchmark": "retraining",
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seeds": args.seeds, "prune_ratio": args.ratio, "retrain_epochs": args.epochs, "lr": args.lr,
        "alpha": args.alpha,
        "table": table,
        "distill_minus_finetune_top1_points_per_seed": kd_minus_ft,
        "target_within_1_point": 100 * (base_top1 - mean(best_retrained, "top1")) <= 1.0,
        "target_30pct_cheaper": mean(best_retrained, "energy_per_sample_j") <= 0.7 * base_energy,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
