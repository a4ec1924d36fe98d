"""Meter overhead and repeatability of the evaluation protocol.

1. Overhead: the same evaluation (the quickstart-sized ViT on the digits test split,
   batch 64, 5-second windows) run alternately with the machine's real meter (whatever
   ``make_meter`` finds: NVML / RAPL / the TDP estimate) and with a time-only
   ``NullMeter``; overhead = (time/sample with meter - without) / without, over several
   alternating rounds so drift hits both sides alike. Target: < 1 % of wall time.
2. Repeatability: the coefficient of variation of time/sample (and energy/sample) over
   the 5 repeats of one evaluation. Target: < 3 % on CPU (< 1 % for GPU energy).

Usage:  .venv/bin/python benchmarks/meter_overhead.py [--rounds 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch

from workers.hardware import cpu_model
from workers.meters import NullMeter
from workers.modelio import save_artifact
from workers.models import build_model
from workers.stages import evaluate
from workers.types import DatasetRef, ModelRef, StageTask, WorkerEnv

MODEL = ModelRef("vit_tiny_patch16_224", {"img_size": 8, "patch_size": 2, "in_chans": 1, "depth": 4,
                                          "embed_dim": 96, "num_heads": 3, "num_classes": 10})
PARAMS = {"batch_size": 64, "warmup_batches": 3, "repeats": 5, "min_window_s": 5.0, "idle_s": 2.0}


def _evaluate(root: str, device: str, threads: int, with_meter: bool) -> dict:
    original = evaluate.make_meter
    if not with_meter:
        evaluate.make_meter = lambda dev: NullMeter(dev)
    try:
        task = StageTask("bench", "eval", "evaluate", dict(PARAMS), "model", MODEL, DatasetRef("digits"), 0, root)
        return dict(evaluate.run(task, WorkerEnv(device=device, num_threads=threads)).metrics)
    finally:
        evaluate.make_meter = original


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="alternating with/without rounds")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    threads = torch.get_num_threads()

    with tempfile.TemporaryDirectory() as root:
        torch.manual_seed(0)
        save_artifact(build_model(MODEL, 10), root=root, key="model", model_ref=MODEL, num_classes=10,
                      input_shape=(1, 8, 8), materialized=True, compression={"chain": []})
        with_m, without_m = [], []
        for _ in range(args.rounds):
            without_m.append(_evaluate(root, device, threads, with_meter=False))
            with_m.append(_evaluate(root, device, threads, with_meter=True))

    t_with = statistics.fmean(m["time_per_sample_s"] for m in with_m)
    t_without = statistics.fmean(m["time_per_sample_s"] for m in without_m)
    result = {
        "benchmark": "meter_overhead",
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "logical_cpus": torch.get_num_threads(), "device": device,
                    "torch": torch.__version__, "python": platform.python_version()},
        "protocol": PARAMS,
        "meter": with_m[0]["meter"],
        "energy_source": with_m[0]["energy_source"],
        "rounds": args.rounds,
        "time_per_sample_s_with_meter": t_with,
        "time_per_sample_s_without_meter": t_without,
        "overhead_pct": 100 * (t_with - t_without) / t_without,
        "time_per_sample_cv_pct": [100 * m["time_per_sample_s_cv"] for m in with_m + without_m],
        "energy_per_sample_j": [m["energy_per_sample_j"] for m in with_m],
        "energy_per_sample_cv_pct": [100 * m["energy_per_sample_j_cv"] for m in with_m
                                     if m.get("energy_per_sample_j_cv") is not None],
        "idle_power_w": with_m[0]["idle_power_w"],
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
