"""Comparisons you can trust (issue 14): does a cohort tell an effect from noise?

The quickstart's model (its ViT trained on the digits data) and four compressions of it:
unstructured pruning at 30 % and 60 % (masks: the same dense compute as the baseline, so
no real time difference) and structured pruning at 30 % and 60 % (smaller matrices: really
faster). All evaluated on torch fp32 on this machine, ``--runs`` times (default 20), each
run a new sweep whose evaluations form one cohort (the builds are reused after the first).

Each run measures the cohort twice, once per way of sharing a round (``--interleave``,
default both, alternating which goes first): ``windows`` -- each model one contiguous
window after another, the protocol of the first cohorts -- and ``slices`` -- the windows
interleaved in 50 ms slices, the default on CPU.

Per run and interleaving, from the store:

- **new protocol** (cohort: interleaved rounds, paired ratio to the reference -- turn by
  turn where sliced -- 95 % t-interval, verdict): the verdict of each point; the
  round-to-round CV of its paired time ratio (and, for comparison, of the ratio of the
  rounds' whole windows);
- **old protocol's reading of the same windows** (each model's mean and CV on its own, the
  comparison the first round's ``pareto`` made): whether the point's mean time per sample
  is below the baseline's (it was then "cheaper"), and the unpaired CV of its time per
  sample over the rounds.

Targets: each unstructured point ``same`` for time in >= 19 of 20 runs; structured 60 %
``faster`` in 20 of 20; the paired ratio's CV < 3 % on CPU.

Usage:  .venv/bin/python benchmarks/trust.py [--runs 20] [--interleave windows slices] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

SPEC = """name: trust
seed: 0
model:
  arch: vit_tiny_patch16_224
  kwargs: {{img_size: 8, patch_size: 2, in_chans: 1, depth: 4, embed_dim: 96, num_heads: 3}}
dataset: {{name: digits}}
train: {{epochs: {epochs}, lr: 0.002}}
pipelines:
  - name: unstructured
    stages:
      - prune: {{method: unstructured, ratio: [0.3, 0.6]}}
  - name: structured
    stages:
      - prune: {{method: structured, mode: all, ratio: [0.3, 0.6]}}
evaluate:
  targets: [local]
  batch_size: 64
  warmup_batches: 3
  repeats: {repeats}
  min_window_s: {window}
  idle_s: 1.0
  interleave: {interleave}
"""


def _cv(values: list[float]) -> float | None:
    return statistics.stdev(values) / statistics.fmean(values) if len(values) > 1 else None


def _run_figures(db: str, sweep_id: str) -> dict[str, dict[str, Any]]:
    """Per point label: the new protocol's verdict, ratio, interval and paired CV, and the
    old reading of the same windows."""
    from orchestrator.store import Store

    with Store.open(db) as store:
        rows = store.results(sweep_id)
        times: dict[str, list[float]] = {}
        for m in store.measurements(sweep_id):
            times.setdefault(m.stage_key, []).append((m.repeat, m.time_per_sample_s))  # type: ignore[arg-type]
    by_key = {k: [t for _, t in sorted(v)] for k, v in times.items()}  # type: ignore[misc]
    base = next(r for r in rows if r.point == "baseline")
    base_times = by_key[base.eval_key]
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        mine = by_key[r.eval_key]
        ratios = [a / b for a, b in zip(mine, base_times)]
        out[r.point] = {
            "verdict_time": r.verdict_time, "time_ratio": r.time_ratio_vs_baseline,
            "ci": [r.time_ratio_ci_low, r.time_ratio_ci_high], "verdict_top1": r.verdict_top1,
            # the protocol's own: over the rounds' paired ratios (turn by turn where sliced)
            "paired_ratio_cv": r.time_ratio_cv,
            "window_ratio_cv": _cv(ratios),  # the same from the rounds' whole windows
            "unpaired_cv": _cv(mine),
            "old_cheaper": statistics.fmean(mine) < statistics.fmean(base_times),
        }
    return out


def _summary(runs: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for p in runs[0]:
        figs = [r[p] for r in runs]
        verdicts = [f["verdict_time"] for f in figs]
        summary[p] = {
            "same": verdicts.count("same"), "faster": verdicts.count("faster"), "slower": verdicts.count("slower"),
            "old_cheaper": sum(f["old_cheaper"] for f in figs),
            "median_ratio": statistics.median(f["time_ratio"] for f in figs),
            "paired_ratio_cv_median": statistics.median(f["paired_ratio_cv"] or 0.0 for f in figs),
            "window_ratio_cv_median": statistics.median(f["window_ratio_cv"] or 0.0 for f in figs),
            "unpaired_cv_median": statistics.median(f["unpaired_cv"] or 0.0 for f in figs),
            "verdict_top1": {v: [f["verdict_top1"] for f in figs].count(v) for v in ("better", "worse", "same")},
        }
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--window", type=float, default=1.0, help="min_window_s (the quickstart's: 1.0)")
    ap.add_argument("--interleave", nargs="+", choices=["windows", "slices"], default=["windows", "slices"])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from orchestrator.runner import run_sweep
    from workers.hardware import cpu_facts

    work = Path(tempfile.mkdtemp(prefix="greensweep-trust-"))
    os.environ["GREENSWEEP_ARTIFACTS"] = str(work / "artifacts")
    db = f"sqlite:///{work / 'store.db'}"
    specs = {}
    for mode in args.interleave:
        specs[mode] = work / f"trust-{mode}.yaml"
        specs[mode].write_text(SPEC.format(epochs=args.epochs, repeats=args.repeats, window=args.window,
                                           interleave=mode))
    runs: dict[str, list[dict[str, dict[str, Any]]]] = {mode: [] for mode in args.interleave}
    for i in range(args.runs):
        modes = args.interleave if i % 2 == 0 else list(reversed(args.interleave))
        for mode in modes:
            outcome = run_sweep(specs[mode], db=db)
            if outcome.status != "succeeded":
                raise SystemExit(f"run {i + 1} ({mode}): sweep {outcome.sweep_id} {outcome.status}")
            runs[mode].append(_run_figures(db, outcome.sweep_id))
            print(f"run {i + 1}/{args.runs} {mode}: " + "; ".join(
                f"{p.split(':')[-1].strip()}: {f['verdict_time']} {f['time_ratio']:.3f}"
                f" cv {100 * (f['paired_ratio_cv'] or 0):.1f} %" for p, f in runs[mode][-1].items()), flush=True)

    summaries = {mode: _summary(r) for mode, r in runs.items()}
    result = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_facts(), "runs": args.runs,
              "repeats": args.repeats, "min_window_s": args.window, "summary": summaries, "per_run": runs}
    print(f"\n{args.runs} runs, {args.repeats} rounds of >= {args.window:g} s windows; CPU {result['cpu']['model']}")
    print("| point | rounds | new: same / faster / slower | old: mean below baseline's | median ratio "
          "| paired ratio CV (median) | whole-window ratio CV | unpaired CV (median) | top-1 verdicts |")
    print("|---|---|---|---:|---:|---:|---:|---:|---|")
    for p in summaries[args.interleave[0]]:
        for mode, summary in summaries.items():
            s = summary[p]
            print(f"| {p} | {mode} | {s['same']} / {s['faster']} / {s['slower']} | {s['old_cheaper']} of {args.runs} "
                  f"| {s['median_ratio']:.3f} | {100 * s['paired_ratio_cv_median']:.1f} % "
                  f"| {100 * s['window_ratio_cv_median']:.1f} % "
                  f"| {100 * s['unpaired_cv_median']:.1f} % | {s['verdict_top1']} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
