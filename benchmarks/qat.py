"""QAT only where post-training quantization hurts: one real greensweep sweep, decided by
its own gate.

The quickstart's ViT (or ``--model cnn``: ``mobilenetv3_small_050`` at 1x32x32) trained on
the digits data, then quantized to OpenVINO int8 two ways, each with a gated ``qat``
beside it (``when: {ptq_top1_drop_over: 0.01}``) that targets the same quantization and
starts from the same calibration:

- ``ptq-few``: NNCF post-training quantization calibrated on one batch of ``--few`` train
  images (a calibration set too small for the activation ranges);
- ``ptq``: calibrated on 8 batches of 64 (the default).

The gate reads the stored evaluations: the float parent's and the sibling's top-1 on the
same test samples, and McNemar's exact test between them. Reported: each gate's decision;
for a QAT that ran, its top-1 against the float model's (McNemar on the same samples,
from the per-sample correctness the evaluations store) and its paired time ratio against
the reference next to its PTQ sibling's. Targets (issue 15): where PTQ loses more than
1 point, QAT is not significantly below the float model and its int8 deployment is at
least as fast as the PTQ one; where PTQ does not, the gate skips QAT.

Usage:  .venv/bin/python benchmarks/qat.py [--json OUT] [--model vit|cnn] [--epochs 30] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

MODELS = {
    "vit": ("vit_tiny_patch16_224", {"img_size": 8, "patch_size": 2, "in_chans": 1, "depth": 4, "embed_dim": 96,
                                     "num_heads": 3}, None),
    "cnn": ("mobilenetv3_small_050", {}, [1, 32, 32]),
}


def _spec(arch: str, kwargs: dict[str, Any], input_size: list[int] | None, epochs: int, repeats: int, few: int,
          qat_epochs: int, qat_lr: float) -> str:
    size = f"\n  input_size: {input_size}" if input_size else ""
    qat = f"epochs: {qat_epochs}, lr: {qat_lr}"
    return f"""name: qat-gate
seed: 0
model:
  arch: {arch}
  kwargs: {json.dumps(kwargs)}{size}
dataset: {{name: digits}}
train: {{epochs: {epochs}, lr: 0.002, batch_size: 64}}
pipelines:
  - name: ptq-few
    stages:
      - quantize: {{engine: openvino, weights: int8, activations: int8, calibration_batches: 1, batch_size: {few}}}
  - name: qat-few
    stages:
      - qat: {{{qat}, calibration_batches: 1, batch_size: {few}}}
        when: {{ptq_top1_drop_over: 0.01}}
  - name: ptq
    stages:
      - quantize: {{engine: openvino, weights: int8, activations: int8}}
  - name: qat
    stages:
      - qat: {{{qat}}}
        when: {{ptq_top1_drop_over: 0.01}}
evaluate:
  targets: [local]
  runtimes: [torch, openvino]
  batch_size: 64
  repeats: {repeats}
  min_window_s: 1.0
  idle_s: 2.0
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--model", choices=sorted(MODELS), default="vit")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--few", type=int, default=4, help="images PTQ-few and QAT-few calibrate on")
    ap.add_argument("--qat-epochs", type=int, default=3)
    ap.add_argument("--qat-lr", type=float, default=1e-4)
    args = ap.parse_args()

    from orchestrator.report.results import render_results
    from orchestrator.runner import run_sweep
    from orchestrator.store import Store
    from workers.hardware import cpu_facts
    from workers.stats import mcnemar, unpack_correct

    arch, kwargs, input_size = MODELS[args.model]
    work = Path(tempfile.mkdtemp(prefix="greensweep-qat-"))
    os.environ["GREENSWEEP_ARTIFACTS"] = str(work / "artifacts")
    db = f"sqlite:///{work / 'store.db'}"
    spec = work / "qat.yaml"
    spec.write_text(_spec(arch, kwargs, input_size, args.epochs, args.repeats, args.few, args.qat_epochs,
                          args.qat_lr))
    outcome = run_sweep(spec, db=db)
    with Store.open(db) as store:
        rows = json.loads(render_results(store.results(outcome.sweep_id), "json"))
        stages = {s.key: s for s in store.stages(outcome.sweep_id)}
    by = {(r["pipeline"], r["runtime"]): r for r in rows}
    float_ov = by[("baseline", "openvino")]
    out: dict[str, Any] = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_facts(),
                           "model": {"arch": arch, "kwargs": kwargs, "input_size": input_size},
                           "args": vars(args) | {"json": str(args.json)}, "sweep": outcome.sweep_id,
                           "status": outcome.status, "float": _figures(by[("baseline", "torch")]), "cases": {}}
    print(f"{arch}: float top-1 {100 * float_ov['top1']:.1f} % (openvino fp32), sweep {outcome.status}")
    for ptq_name, qat_name in (("ptq-few", "qat-few"), ("ptq", "qat")):
        ptq, qat = by[(ptq_name, "openvino")], by.get((qat_name, "openvino"))
        qat_stage = next(s for s in stages.values() if s.kind == "qat" and s.params.get("batch_size") == (
            args.few if qat_name == "qat-few" else 64))
        case: dict[str, Any] = {"ptq": _figures(ptq), "gate": qat_stage.metrics.get("gate"),
                                "qat_status": qat_stage.status}
        if qat is not None and qat["status"] == "succeeded":
            case["qat"] = _figures(qat)
            case["qat_train"] = {k: qat_stage.metrics.get(k) for k in ("ptq_val_top1", "initial_val_top1",
                                                                      "best_val_top1", "best_epoch", "quantizers")}
            qat_eval = next(s for s in stages.values() if s.kind == "evaluate" and s.parent_key == qat_stage.key)
            reference = next(s for s in stages.values() if s.kind == "evaluate" and s.parent_key == qat_stage.parent_key
                             and (s.params.get("runtime"), s.params.get("precision")) == ("openvino", "fp32"))
            test = mcnemar(unpack_correct(reference.metrics["correct_top1"]),
                           unpack_correct(qat_eval.metrics["correct_top1"]))
            case["qat_vs_float"] = {"drop_points": 100 * (reference.metrics["top1"] - qat_eval.metrics["top1"]),
                                    "mcnemar_p": test.p, "discordant": [test.b, test.c], "verdict": test.verdict}
        out["cases"][ptq_name] = case
        gate = case["gate"] or {}
        print(f"\n{ptq_name}: PTQ top-1 {100 * ptq['top1']:.1f} %, time x{_ratio(ptq)}; gate: {gate.get('reason')}")
        if "qat" in case:
            v = case["qat_vs_float"]
            print(f"  QAT top-1 {100 * case['qat']['top1']:.1f} % ({v['drop_points']:+.1f} points below float, "
                  f"McNemar p {v['mcnemar_p']:.3g}: {v['verdict']}), time x{_ratio(case['qat'])}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str))


def _figures(r: dict[str, Any]) -> dict[str, Any]:
    return {k: r.get(k) for k in ("top1", "time_per_sample_s", "time_ratio_vs_baseline", "time_ratio_ci_low",
                                  "time_ratio_ci_high", "verdict_time", "verdict_top1", "deployable_size_bytes",
                                  "status", "decision")}


def _ratio(f: dict[str, Any]) -> str:
    if f.get("time_ratio_vs_baseline") is None:
        return "-"
    return f"{f['time_ratio_vs_baseline']:.2f} [{f['time_ratio_ci_low']:.2f}, {f['time_ratio_ci_high']:.2f}]"


if __name__ == "__main__":
    main()
