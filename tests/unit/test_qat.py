"""Quantization-aware training (the ``qat`` stage) on a tiny ViT, on the CPU: fake
quantizers in the training forward pass, conversion to an OpenVINO int8 model, an
artifact without pickle that a second process evaluates on OpenVINO, resume after a
killed epoch, and what the planner pairs a qat chain with."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from orchestrator.errors import SpecError
from orchestrator.plan import build_plan
from orchestrator.spec import parse_spec
from workers.artifacts import verified_manifest
from workers.hardware import cpu_flags
from workers.modelio import save_artifact
from workers.models import build_model
from workers.stages import qat
from workers.stages.quantize_runtimes import count_quantizers, float_weights, prepare_qat
from workers.types import DatasetRef, ModelRef, StageTask, WorkerEnv

ENV = WorkerEnv(device="cpu", num_threads=1)
VIT = ModelRef("vit_tiny_patch16_224", {"img_size": 8, "patch_size": 2, "in_chans": 1, "depth": 1,
                                        "embed_dim": 24, "num_heads": 2, "num_classes": 10})
PARAMS = {"epochs": 2, "lr": 1e-3, "batch_size": 64, "calibration_batches": 2}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    """A float parent under one artifact root."""
    root = str(tmp_path_factory.mktemp("artifacts"))
    torch.manual_seed(0)
    save_artifact(build_model(VIT, 10), root=root, key="parent", model_ref=VIT, num_classes=10,
                  input_shape=(1, 8, 8), materialized=True, compression={"chain": []})
    return root


def _task(root: str, key: str, **params) -> StageTask:
    return StageTask("sw", key, "qat", {**PARAMS, **params}, "parent", VIT, DatasetRef("digits"), 0, root)


def test_fake_quantizers_train_with_the_model_and_leave_its_float_weights_loadable():
    torch.manual_seed(0)
    model = build_model(VIT, 10).eval()
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    quantized, settings = prepare_qat(model, torch.randn(32, 1, 8, 8), batch_size=16)
    assert settings["quantizers"] == count_quantizers(quantized) > 0
    assert "not compiled" in settings["fake_quantize"] and settings["model_type"] == "transformer"
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert not torch.equal(quantized(x), build_model_with(plain)(x))  # the forward pass is rounded
    quantized.train()
    quantized(x).sum().backward()  # straight-through: every float weight gets a gradient
    assert all(p.grad is not None for n, p in quantized.named_parameters() if n.endswith("weight"))
    scales = [p for n, p in quantized.named_parameters() if "__nncf_hooks" in n]
    assert scales and any(p.grad is not None and p.grad.abs().sum() > 0 for p in scales)  # scales are trained
    assert set(float_weights(quantized)) == set(plain)


def build_model_with(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = build_model(VIT, 10).eval()
    model.load_state_dict(state)
    return model


def test_qat_makes_an_openvino_int8_artifact_without_pickle(root: str):
    metrics = qat.run(_task(root, "qat-a"), ENV).metrics
    assert metrics["quantizers"] > 0 and metrics["calibration_samples"] == 128
    assert [h["epoch"] for h in metrics["history"]] == [1, 2] and metrics["resumed_from_epoch"] == 0
    for name in ("initial_val_top1", "ptq_val_top1", "best_val_top1"):
        assert 0 <= metrics[name] <= 1
    manifest = verified_manifest(root, "qat-a")
    assert manifest is not None and manifest["deploy"]["format"] == "openvino"
    assert manifest["deploy"]["settings"]["trained"] == "quantization-aware"
    assert manifest["extra"]["float_parent"] == "parent" and manifest["extra"]["qat"]["quantizers"] > 0
    assert manifest["compression"]["chain"][-1]["kind"] == "qat"
    files = {p.name for p in (Path(root) / "qat-a").iterdir()}
    assert {"model.xml", "model.bin", "weights.safetensors"} <= files
    assert not {f for f in files if f.endswith((".pt", ".pth", ".pkl", ".pickle"))}
    assert 'type="FakeQuantize"' in (Path(root) / "qat-a" / "model.xml").read_text()
    # the trained float weights are the parent architecture's, and they did train
    trained = load_file(str(Path(root) / "qat-a" / "weights.safetensors"))
    before = load_file(str(Path(root) / "parent" / "weights.safetensors"))
    assert set(trained) == set(before)
    assert any(not torch.equal(trained[k], before[k]) for k in before)


EVALUATE_ELSEWHERE = """
import json, sys
from workers.stages import evaluate
from workers.types import DatasetRef, ModelRef, StageTask, WorkerEnv
root, runtime = sys.argv[1], sys.argv[2]
ref = ModelRef("vit_tiny_patch16_224", json.loads(sys.argv[3]))
protocol = {"batch_size": 64, "warmup_batches": 1, "warmup_s": 0.0, "repeats": 1, "min_window_s": 0.0,
            "idle_s": 0.0, "runtime": runtime}
task = StageTask("sw", "e-" + runtime, "evaluate", protocol, "qat-a", ref, DatasetRef("digits"), 0, root)
try:
    m = evaluate.run(task, WorkerEnv(device="cpu", num_threads=1)).metrics
    print(json.dumps({"top1": m["top1"], "runtime": m["runtime"]["runtime"], "agreement": m["agreement"]}))
except ValueError as e:
    print(json.dumps({"error": str(e)}))
"""


def _evaluate_in_another_process(root: str, runtime: str) -> dict:
    out = subprocess.run([sys.executable, "-c", EVALUATE_ELSEWHERE, root, runtime, json.dumps(VIT.kwargs)],
                         capture_output=True, text=True, check=True, cwd=Path(__file__).parents[2])
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_second_process_evaluates_the_qat_model_on_openvino_only(root: str):
    if verified_manifest(root, "qat-a") is None:
        qat.run(_task(root, "qat-a"), ENV)
    found = _evaluate_in_another_process(root, "openvino")
    assert found["runtime"] == "openvino" and 0 <= found["top1"] <= 1
    assert 0 < found["agreement"]["top1_agreement"] <= 1
    refused = _evaluate_in_another_process(root, "torch")
    assert "an openvino model runs on openvino, not on torch" in refused["error"]


def test_a_qat_stage_killed_after_an_epoch_resumes_there_and_ends_where_an_unbroken_one_does(root: str):
    unbroken = qat.run(_task(root, "qat-b"), ENV).metrics

    class Killed(Exception):
        pass

    def die_after_first_epoch(update: dict) -> None:
        if update["epoch"] == 1:
            raise Killed

    with pytest.raises(Killed):
        qat.run(_task(root, "qat-c"), WorkerEnv(device="cpu", num_threads=1, report_progress=die_after_first_epoch))
    assert verified_manifest(root, "qat-c") is None
    resumed = qat.run(_task(root, "qat-c"), ENV).metrics
    assert resumed["resumed_from_epoch"] == 1
    assert [h["val_top1"] for h in resumed["history"]] == [h["val_top1"] for h in unbroken["history"]]
    a = load_file(str(Path(root) / "qat-b" / "weights.safetensors"))
    b = load_file(str(Path(root) / "qat-c" / "weights.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


HEAD = """name: q
seed: 0
model:
  arch: vit_tiny_patch16_224
  kwargs: {img_size: 8, patch_size: 2, in_chans: 1, depth: 1, embed_dim: 24, num_heads: 2}
dataset: {name: digits, options: {}}
train: {epochs: 2, lr: 0.002}
evaluate: {targets: [local], runtimes: [torch, onnxruntime, openvino]}
pipelines:
  - name: p
    stages:
"""


def _plan(stages: str):
    return build_plan(parse_spec(HEAD + stages, base_dir=".", check_arch=False))


def test_a_qat_chain_is_measured_on_openvino_only_and_may_wait_for_a_cleaner_window():
    plan = _plan("      - prune: {method: unstructured, ratio: 0.5}\n      - qat: {epochs: 2}\n")
    assert {p.runtime for p in plan.points if p.pipeline == "p"} == {"openvino"}
    (stage,) = [s for s in plan.stages if s.kind == "qat"]
    assert stage.params["engine"] == "openvino" and stage.label.startswith("qat")
    assert any(u.runtime == "torch" and u.label.startswith("p") for u in plan.unpaired)


@pytest.mark.parametrize("stages, message", [
    ("      - qat: {}\n      - prune: {method: structured, ratio: 0.3}\n", "cannot start from the openvino model"),
    ("      - quantize: {weights: int8}\n      - qat: {}\n", "cannot start from the quanto model"),
    ("      - qat: {weights: int4}\n", "weights"),
    ("      - qat: {engine: onnxruntime}\n", "engine"),
])
def test_qat_spec_errors_name_the_problem(stages: str, message: str):
    with pytest.raises(SpecError) as e:
        _plan(stages)
    assert message in str(e.value) and "\n" not in str(e.value)



@pytest.mark.skipif(not {"avx512_bf16", "amx_bf16"} & cpu_flags(),
                    reason="this CPU has neither avx512_bf16 nor amx_bf16 in /proc/cpuinfo: bf16 training is refused")
def test_qat_trains_its_fake_quantizers_under_bf16_autocast(root: str):
    if verified_manifest(root, "qat-a") is None:
        qat.run(_task(root, "qat-a"), ENV)
    metrics = qat.run(_task(root, "qat-bf16", precision="bf16"), ENV).metrics
    assert metrics["precision"] == "bf16" and metrics["autocast"]["dtype"] == "bfloat16"
    assert all(math.isfinite(h["train_loss"]) for h in metrics["history"]) and 0 <= metrics["best_val_top1"] <= 1
    assert 'type="FakeQuantize"' in (Path(root) / "qat-bf16" / "model.xml").read_text()
    trained = load_file(str(Path(root) / "qat-bf16" / "weights.safetensors"))
    assert {t.dtype for t in trained.values()} == {torch.float32}  # fp32 weights, trained under bf16
    fp32 = load_file(str(Path(root) / "qat-a" / "weights.safetensors"))
    assert any(not torch.equal(trained[k], fp32[k]) for k in fp32)  # bf16 changed what trained
