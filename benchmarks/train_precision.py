"""Mixed-precision training on this CPU: bf16 autocast against fp32, time per epoch.

The quickstart ViT (``examples/quickstart.yaml``: vit_tiny_patch16_224, img_size 8, patch
2, in_chans 1, depth 4, embed_dim 96, 3 heads) trained on the digits data through the
real shared loop (:func:`workers.training.fit`: AdamW, cosine schedule, validation and a
checkpoint every epoch), once at ``precision: fp32`` and once at ``precision: bf16``, at
2 intra-op threads -- and the same at larger widths and batches, since bf16's gain on a
CPU (AVX512-BF16 dot products, AMX tiles) shows only on matmuls big enough to feed them.

Per configuration, ``--rounds`` rounds each train a fresh model (same seed) at both
precisions, the order alternating per round so drift hits both alike. An epoch's time is
the loop's own ``epoch_s`` (training plus validation, its meter window; checkpointing
excluded). Reported: the median epoch time of each precision over every round's epochs
but the first of each fit (kernel selection and allocator warm-up; reported apart), the
ratio bf16 / fp32, the validation top-1 each precision reached (best epoch; mean over
rounds) and the 1-minute load average around each fit (a machine shared with other work
shows it there). The CPU's model name and the flags that decide bf16 speed are recorded.

Usage:  .venv/bin/python benchmarks/train_precision.py [--epochs 5] [--rounds 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from workers.data import load_dataset
from workers.hardware import SPEED_FLAGS, cpu_flags, cpu_model
from workers.models import build_model
from workers.stages.registry import TrainParams
from workers.training import CrossEntropy, fit
from workers.types import DatasetRef, ModelRef, StageTask, WorkerEnv

QUICKSTART = {"img_size": 8, "patch_size": 2, "in_chans": 1, "depth": 4, "embed_dim": 96, "num_heads": 3}
# (name, model kwargs over the quickstart's, batch size, learning rate): the quickstart's own
# rate; the 4x wider model trains at a lower one (at 2e-3 it stays near chance in 5 epochs).
CONFIGS = (
    ("quickstart (dim 96, batch 64)", {}, 64, 2e-3),
    ("dim 384, batch 64", {"embed_dim": 384, "num_heads": 6}, 64, 5e-4),
    ("dim 384, batch 256", {"embed_dim": 384, "num_heads": 6}, 256, 5e-4),
)
THREADS = 2


def _lscpu() -> dict[str, Any]:
    """lscpu's model name, and which of the precision-relevant ISA flags the CPU has."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                     None)
    except (OSError, subprocess.CalledProcessError):
        model = None
    flags = cpu_flags()
    return {"model_name": model, "cpuinfo_model": cpu_model(), "speed_flags": sorted(flags & SPEED_FLAGS),
            "bf16_flags": sorted(flags & {"avx512_bf16", "amx_bf16", "amx_tile"})}


def _train(root: Path, kwargs: dict[str, Any], batch_size: int, lr: float, precision: str, epochs: int,
           key: str) -> dict[str, Any]:
    torch.set_num_threads(THREADS)
    ref = ModelRef("vit_tiny_patch16_224", {**QUICKSTART, **kwargs})
    torch.manual_seed(0)
    model = build_model(ref, 10)
    params = TrainParams(epochs=epochs, lr=lr, batch_size=batch_size, precision=precision)
    task = StageTask("bench", key, "train", params.model_dump(mode="json"), None, ref, DatasetRef("digits"), 0,
                     str(root))
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    result = fit(model, load_dataset(DatasetRef("digits"), seed=0), params, objective=CrossEntropy(),
                 input_shape=(1, 8, 8), task=task, env=WorkerEnv(device="cpu", num_threads=THREADS))
    return {"precision": result.metrics()["precision"], "epoch_s": [h["epoch_s"] for h in result.history],
            "val_top1": [h["val_top1"] for h in result.history], "best_val_top1": result.best_val_top1,
            "wall_s": time.perf_counter() - started,
            "load_avg_1min": [load_before, os.getloadavg()[0]],  # other processes on the machine
            "params": sum(p.numel() for p in model.parameters())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    cpu = _lscpu()
    if not set(cpu["bf16_flags"]) & {"avx512_bf16", "amx_bf16"}:
        raise SystemExit(f"this CPU ({cpu['model_name']}) has neither AVX512-BF16 nor AMX: greensweep refuses bf16 "
                         "training on it, so there is nothing to compare -- run this on a CPU that has them")

    configs = []
    with tempfile.TemporaryDirectory(prefix="gs-precision-") as tmp:
        for c, (name, kwargs, batch, lr) in enumerate(CONFIGS):
            runs: dict[str, list[dict[str, Any]]] = {"fp32": [], "bf16": []}
            for r in range(args.rounds):
                order = ("fp32", "bf16") if r % 2 == 0 else ("bf16", "fp32")
                for precision in order:
                    run = _train(Path(tmp), kwargs, batch, lr, precision, args.epochs, key=f"c{c}r{r}{precision}")
                    runs[precision].append(run)
                    print(f"{name:32s} round {r} {precision}: epochs {[round(s, 2) for s in run['epoch_s']]} s, "
                          f"best val top-1 {run['best_val_top1']:.3f}", flush=True)
            summary: dict[str, Any] = {"name": name, "model_kwargs": {**QUICKSTART, **kwargs}, "batch_size": batch,
                                       "lr": lr, "params": runs["fp32"][0]["params"], "runs": runs}
            for precision, fits in runs.items():
                steady = [s for f in fits for s in f["epoch_s"][1:]]
                summary[precision] = {
                    "median_epoch_s": statistics.median(steady),
                    "epoch_s_min_max": [min(steady), max(steady)],
                    "first_epoch_s": [f["epoch_s"][0] for f in fits],
                    "best_val_top1_mean": statistics.fmean(f["best_val_top1"] for f in fits),
                    "final_val_top1_mean": statistics.fmean(f["val_top1"][-1] for f in fits),
                }
            summary["bf16_over_fp32_epoch_s"] = summary["bf16"]["median_epoch_s"] / summary["fp32"]["median_epoch_s"]
            configs.append(summary)

    result = {
        "benchmark": "train_precision",
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu, "threads": THREADS, "torch": torch.__version__, "python": platform.python_version(),
                    "onednn": torch.backends.mkldnn.is_available()},
        "protocol": {"epochs": args.epochs, "rounds": args.rounds, "dataset": "digits", "optimizer": "AdamW, cosine",
                     "epoch_s": "training + validation of the epoch (the loop's meter window), median over "
                                "epochs 2.. of every round"},
        "configs": configs,
    }
    print()
    print(f"{'config':32s} {'fp32 s/epoch':>12s} {'bf16 s/epoch':>12s} {'bf16/fp32':>9s} "
          f"{'fp32 top-1':>10s} {'bf16 top-1':>10s}")
    for s in configs:
        print(f"{s['name']:32s} {s['fp32']['median_epoch_s']:12.3f} {s['bf16']['median_epoch_s']:12.3f} "
              f"{s['bf16_over_fp32_epoch_s']:9.2f} {s['fp32']['best_val_top1_mean']:10.3f} "
              f"{s['bf16']['best_val_top1_mean']:10.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
