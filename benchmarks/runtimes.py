"""Deployment runtimes side by side: the same trained models on torch, ONNX Runtime and
OpenVINO, float and int8, in real greensweep sweeps on this machine.

Two models, each trained on the digits data: the quickstart's ViT and a timm CNN
(``mobilenetv3_small_050`` at 1x32x32). For each: torch fp32 eager (the reference) and
bf16 (where this CPU has it), ONNX Runtime fp32 / int8 static (QDQ) / int8 dynamic,
OpenVINO fp32 / its default precision (``auto``) / int8 (NNCF) -- and optimum-quanto int8
for comparison. Time and energy per sample (mean and std over the repeats), top-1,
top-1 agreement with the float model, and the deployable's on-disk size, from the store.
Then ``greensweep compare``'s best runtime per model.

The sweeps share one store and artifact root, so the trained model and the quantized
artifacts are built once; a second sweep (bf16, on the runtimes that have it here) reuses
them. Targets (issue 13): the best runtime for the ViT is >= 1.5x torch fp32 at <= 1 point
top-1 loss; the best int8 deployment beats torch fp32 eager.

Usage:  .venv/bin/python benchmarks/runtimes.py [--json OUT] [--repeats 5] [--epochs 30]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

MODELS = {
    "vit": ("vit_tiny_patch16_224", {"img_size": 8, "patch_size": 2, "in_chans": 1, "depth": 4, "embed_dim": 96,
                                     "num_heads": 3}, None),
    "cnn": ("mobilenetv3_small_050", {}, [1, 32, 32]),
}
PIPELINES = """
  - name: quanto-int8
    stages:
      - quantize: {weights: int8, activations: int8}
  - name: ort-int8-static
    stages:
      - quantize: {engine: onnxruntime, mode: static, weights: int8, activations: int8}
  - name: ort-int8-dynamic
    stages:
      - quantize: {engine: onnxruntime, mode: dynamic, weights: int8}
  - name: ov-int8
    stages:
      - quantize: {engine: openvino, weights: int8, activations: int8}
"""


def _spec(name: str, arch: str, kwargs: dict[str, Any], input_size: list[int] | None, epochs: int, repeats: int,
          runtimes: list[str], precisions: list[str], pipelines: bool) -> str:
    size = f"\n  input_size: {input_size}" if input_size else ""
    return f"""name: {name}
seed: 0
model:
  arch: {arch}
  kwargs: {json.dumps(kwargs)}{size}
dataset: {{name: digits}}
train: {{epochs: {epochs}, lr: 0.002, batch_size: 64}}
pipelines:{PIPELINES if pipelines else " []"}
evaluate:
  targets: [local]
  runtimes: {json.dumps(runtimes)}
  precision: {json.dumps(precisions)}
  batch_size: 64
  repeats: {repeats}
  min_window_s: 2.0
  idle_s: 2.0
"""


def _rows(db: str, sweep_id: str) -> list[dict[str, Any]]:
    from orchestrator.report.results import render_results
    from orchestrator.store import Store

    with Store.open(db) as store:
        return json.loads(render_results(store.results(sweep_id), "json"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--models", default="vit,cnn")
    args = ap.parse_args()

    from orchestrator.runner import run_sweep
    from workers.hardware import cpu_facts, runtime_precisions

    supported = runtime_precisions("cpu")
    bf16 = [r for r, p in supported.items() if p.get("bf16") is None and "bf16" in p]
    out: dict[str, Any] = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_facts(),
                           "not_supported_here": {r: {p: why for p, why in ps.items() if why}
                                                  for r, ps in supported.items()}, "models": {}}
    work = Path(tempfile.mkdtemp(prefix="greensweep-runtimes-"))
    os.environ["GREENSWEEP_ARTIFACTS"] = str(work / "artifacts")
    db = f"sqlite:///{work / 'store.db'}"
    for name in args.models.split(","):
        arch, kwargs, input_size = MODELS[name]
        rows: list[dict[str, Any]] = []
        sweeps = [(["torch", "onnxruntime", "openvino"], ["fp32", "auto"], True)]
        if bf16:
            sweeps.append((bf16, ["bf16"], False))
        for runtimes, precisions, pipelines in sweeps:
            spec = work / f"{name}-{'-'.join(precisions)}.yaml"
            spec.write_text(_spec(f"runtimes-{name}", arch, kwargs, input_size, args.epochs, args.repeats, runtimes,
                                  precisions, pipelines))
            outcome = run_sweep(spec, db=db)
            rows += _rows(db, outcome.sweep_id)
            compare = subprocess.run([str(Path(os.sys.executable).parent / "greensweep"), "compare",
                                      outcome.sweep_id, "--db", db], capture_output=True, text=True)
            out.setdefault("compare", {})[f"{name}-{'-'.join(precisions)}"] = compare.stdout
        ref = next(r for r in rows if r["point"] == "baseline" and (r["runtime"], r["precision"]) == ("torch", "fp32"))
        table = []
        for r in rows:
            if r["status"] != "succeeded":
                table.append({"point": r["point"], "runtime": r["runtime"], "precision": r["precision"],
                              "status": r["status"]})
                continue
            table.append({
                "point": r["point"].split(":")[0], "runtime": r["runtime"], "precision": r["precision"],
                "runtime_version": r["runtime_version"], "ms_per_sample": 1e3 * r["time_per_sample_s"],
                "ms_std": 1e3 * (r["time_per_sample_s_std"] or 0.0),
                "speedup_vs_torch_fp32": ref["time_per_sample_s"] / r["time_per_sample_s"],
                "mj_per_sample": None if r["energy_per_sample_j"] is None else 1e3 * r["energy_per_sample_j"],
                "energy_source": r["energy_source"], "top1": r["top1"],
                "top1_delta_points": 100 * (r["top1"] - ref["top1"]), "top1_agreement": r["top1_agreement"],
                "size_bytes": r["deployable_size_bytes"],
            })
        out["models"][name] = table
        print(f"\n{name} ({arch}), reference torch fp32 {1e3 * ref['time_per_sample_s']:.4f} ms/sample, "
              f"top-1 {100 * ref['top1']:.1f} %")
        print("| point | runtime | precision | ms/sample (± std) | x torch fp32 | mJ/sample (est.) | top-1 % "
              "| agreement | size |")
        print("|---|---|---|---:|---:|---:|---:|---:|---:|")
        for t in table:
            if "ms_per_sample" not in t:
                print(f"| {t['point']} | {t['runtime']} | {t['precision']} | {t['status']} | | | | | |")
                continue
            mj = "" if t["mj_per_sample"] is None else f"{t['mj_per_sample']:.3f}"
            print(f"| {t['point']} | {t['runtime']} | {t['precision']} | {t['ms_per_sample']:.4f} ± {t['ms_std']:.4f} "
                  f"| {t['speedup_vs_torch_fp32']:.2f} | {mj} | {100 * t['top1']:.1f} | {t['top1_agreement']:.3f} "
                  f"| {t['size_bytes'] / 1024:.0f} KiB |")
    for key, text in out.get("compare", {}).items():
        print(f"\ncompare ({key}):\n{text}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
