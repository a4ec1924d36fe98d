"""How to pair interleaved slices: the estimators behind ``workers.stats.turn_ratio``.

An A/A test outside Ray and the store, so only the machine's own noise is in it: the
quickstart-shaped ViT (depth 4, width 96) and four other models -- two exact copies of it
and two narrower ViTs -- measured as a cohort measures them on CPU: ``--rounds`` rounds, in
each the models taking turns in slices of whole passes (360 digit-sized inputs, batch 64)
lasting at least 50 ms until each has ``--window`` seconds, in seeded random turn orders.
Model 0 is the reference; models 1 and 4 are copies of it, so their true ratio is 1 and
all variation of their per-round ratio is noise; models 2 and 3 (widths 72 and 48, about
0.7x and 0.45x its time, like the quickstart's structured prunings) have a fixed true ratio
too, so theirs is noise as well -- but noise that pairing cancels only in so far as the
machine's state slows both models alike. Per cohort and per model, the round-to-round CV of
the ratio estimated three ways:

- ``totals``: the round's total time per sample over the reference's (contiguous windows
  give only this);
- ``turn-median``: the median of the per-turn slice ratios;
- ``turn-trimmed``: their mean with 20 % set aside at each end (``TURN_TRIM``).

Usage:  .venv/bin/python benchmarks/pairing.py [--threads 2] [--window 1.0] [--cohorts 6]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import random
import statistics
import time
from datetime import datetime, timezone

import timm
import torch

from workers.hardware import cpu_facts
from workers.stats import turn_ratio


def _vit(width: int) -> torch.nn.Module:
    return timm.create_model("vit_tiny_patch16_224", img_size=8, patch_size=2, in_chans=1, depth=4, embed_dim=width,
                             num_heads=3, num_classes=10).eval()


def _cv(values: list[float]) -> float:
    return statistics.stdev(values) / statistics.fmean(values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--window", type=float, default=1.0, help="seconds per model per round (min_window_s)")
    ap.add_argument("--slice", type=float, default=0.05, help="seconds per slice (slice_s)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--cohorts", type=int, default=6)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = _vit(96)
    models = [base, copy.deepcopy(base), _vit(72), _vit(48), copy.deepcopy(base)]
    copies = (1, 4)
    narrower = (2, 3)
    compared = copies + narrower
    batches = list(torch.randn(360, 1, 8, 8).split(64))
    slice_ns = int(args.slice * 1e9)

    def one_pass(model: torch.nn.Module) -> None:
        for b in batches:
            model(b)

    estimators = ("totals", "turn-median", "turn-trimmed")
    cvs: dict[str, dict[int, list[float]]] = {k: {c: [] for c in compared} for k in estimators}
    rng = random.Random(0)
    with torch.no_grad():
        for model in models:  # warm-up
            start = time.perf_counter()
            while time.perf_counter() - start < 3:
                one_pass(model)
        for cohort in range(args.cohorts):
            per: dict[str, dict[int, list[float]]] = {k: {c: [] for c in compared} for k in cvs}
            for _ in range(args.rounds):
                turns: list[dict[int, float]] = []
                total_s = [0.0] * len(models)
                samples = [0] * len(models)
                pending = list(range(len(models)))
                rng.shuffle(pending)
                gc.collect()
                gc.disable()
                while pending:
                    turn = {}
                    for i in pending:
                        start, passes = time.perf_counter_ns(), 0
                        while True:
                            one_pass(models[i])
                            passes += 1
                            if time.perf_counter_ns() - start >= slice_ns:
                                break
                        took = (time.perf_counter_ns() - start) / 1e9
                        turn[i] = took / (passes * 360)
                        total_s[i] += took
                        samples[i] += passes * 360
                    turns.append(turn)
                    pending = [i for i in pending if total_s[i] < args.window]
                    rng.shuffle(pending)
                gc.enable()
                for c in compared:
                    both = [t for t in turns if c in t and 0 in t]
                    mine, ref = [t[c] for t in both], [t[0] for t in both]
                    per["totals"][c].append((total_s[c] / samples[c]) / (total_s[0] / samples[0]))
                    per["turn-median"][c].append(statistics.median(a / b for a, b in zip(mine, ref)))
                    per["turn-trimmed"][c].append(turn_ratio(mine, ref))
            for k in cvs:
                for c in compared:
                    cvs[k][c].append(_cv(per[k][c]))
            print(f"cohort {cohort + 1}/{args.cohorts}: " + "  ".join(
                f"{k} copies {100 * statistics.median(v[c][-1] for c in copies):.2f} %"
                f" narrower {100 * statistics.median(v[c][-1] for c in narrower):.2f} %" for k, v in cvs.items()),
                flush=True)
    result = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_facts(),
              "threads": args.threads, "window_s": args.window, "slice_s": args.slice, "rounds": args.rounds,
              "cohorts": args.cohorts,
              # over cohorts and the two models of each kind
              "median_cv": {k: statistics.median(x for c in copies for x in v[c]) for k, v in cvs.items()},
              "median_cv_narrower": {k: statistics.median(x for c in narrower for x in v[c]) for k, v in cvs.items()},
              "median_cv_by_model": {k: {f"model {c}": statistics.median(v[c]) for c in compared}
                                     for k, v in cvs.items()}}
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
