"""ONNX Runtime and OpenVINO on the backend seam, and the runtime-native quantization
engines: export, on-disk size, fp32 agreement with torch, the pinned thread settings, the
content-addressed cache, runtime artifacts that travel and verify, and evaluations that
run on each runtime -- on a tiny ViT and a tiny CNN, on the CPU."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import timm
import torch

from workers.artifacts import pack, unpack, verified_manifest
from workers.backends import get_backend
from workers.backends.base import ThreadSettings, agreement, check_exact
from workers.modelio import save_artifact
from workers.models import build_model
from workers.stages import evaluate, quantize
from workers.types import DatasetRef, ModelRef, StageTask, WorkerEnv

ENV = WorkerEnv(device="cpu", num_threads=1)
VIT = ModelRef("vit_tiny_patch16_224", {"img_size": 8, "patch_size": 2, "in_chans": 1, "depth": 2,
                                        "embed_dim": 32, "num_heads": 2, "num_classes": 10})
CNN = ModelRef("resnet10t", {"in_chans": 1, "num_classes": 10})
SHAPES = {"vit": (1, 8, 8), "cnn": (1, 32, 32)}


def _model(which: str) -> torch.nn.Module:
    torch.manual_seed(0)
    ref = VIT if which == "vit" else CNN
    return timm.create_model(ref.arch, **ref.kwargs).eval()


@pytest.mark.parametrize("which", ["vit", "cnn"])
@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_fp32_deployable_matches_torch_and_is_cached(which: str, runtime: str, tmp_path: Path):
    model, x = _model(which), torch.randn(7, *SHAPES[which])
    backend = get_backend(runtime).load()
    manifest = {"key": f"artifact-{which}", "size_bytes": 1}
    d = backend.prepare(model, manifest, precision="fp32", device="cpu", threads=ThreadSettings(intra_op=2),
                        example=x, cache_dir=tmp_path)
    with torch.no_grad():
        found = agreement(model(x), d.run(x))
        short = agreement(model(x[:3]), d.run(x[:3]))  # dynamic batch: the last batch of a split is short
    check_exact(found, runtime)
    check_exact(short, runtime)
    (entry,) = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    on_disk = sum(f.stat().st_size for f in entry.iterdir() if f.suffix in (".onnx", ".data", ".xml", ".bin"))
    assert d.size_bytes == on_disk > 0
    info = d.describe()
    assert info["threads"] == {"intra_op": 2, "inter_op": 1} and info["runtime_version"]
    if runtime == "onnxruntime":
        assert info["settings"]["intra_op_allow_spinning"] == "0"
        assert info["settings"]["providers"] == ["CPUExecutionProvider"]
    else:
        assert info["settings"]["num_streams"] == 1 and "float32" in info["settings"]["inference_precision"]
    assert info["settings"]["model"].endswith("now")
    d.close()
    again = backend.prepare(model, manifest, precision="fp32", device="cpu", threads=ThreadSettings(intra_op=1),
                            example=x, cache_dir=tmp_path)
    assert again.describe()["settings"]["model"].endswith("(cache)")  # exported once
    assert again.describe()["threads"]["intra_op"] == 1
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == [entry.name]


def test_check_exact_names_the_difference():
    ref = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    check_exact(agreement(ref, ref + 1e-5), "x")
    with pytest.raises(ValueError, match=r"x disagrees .* max \|logit difference\| 0.6 .* top-1 agreement 50.0 %"):
        check_exact(agreement(ref, torch.tensor([[1.0, 0.0], [0.5, 0.4]])), "x")


def test_openvino_refuses_a_precision_the_cpu_lacks(monkeypatch):
    import openvino as ov

    backend = get_backend("openvino").load()
    monkeypatch.setattr(ov.Core, "get_property", lambda self, device, name: ["FP32", "INT8"])
    assert "no BF16 on this CPU" in backend.unsupported("cpu", "bf16")
    assert backend.unsupported("cpu", "auto") is None and backend.unsupported("cpu", "fp32") is None


# -- runtime-native quantization ------------------------------------------------------------


@pytest.fixture(scope="module")
def parents(tmp_path_factory) -> dict[str, str]:
    """A float artifact of each tiny model under one root."""
    root = str(tmp_path_factory.mktemp("artifacts"))
    for which, ref in (("vit", VIT), ("cnn", CNN)):
        torch.manual_seed(0)
        save_artifact(build_model(ref, 10), root=root, key=f"parent-{which}", model_ref=ref, num_classes=10,
                      input_shape=SHAPES[which], materialized=True, compression={"chain": []})
    return {"root": root}


def _quantize(root: str, which: str, key: str, **params) -> dict:
    ref = VIT if which == "vit" else CNN
    task = StageTask("sw", key, "quantize", {"weights": "int8", "calibration_batches": 2, "batch_size": 16, **params},
                     f"parent-{which}", ref, DatasetRef("digits"), 0, root)
    return dict(quantize.run(task, ENV).metrics)


CASES = [
    ("onnxruntime", {"activations": "int8"}, "model.onnx", {"QuantizeLinear", "DequantizeLinear"}),
    ("onnxruntime", {"mode": "dynamic"}, "model.onnx", {"DynamicQuantizeLinear", "MatMulInteger"}),
    ("openvino", {"activations": "int8"}, "model.xml", {"FakeQuantize"}),
]


@pytest.mark.parametrize("engine, extra, main_file, ops", CASES, ids=["ort-static", "ort-dynamic", "openvino"])
def test_runtime_quantization_makes_a_runtime_artifact_that_travels(parents, engine, extra, main_file, ops, tmp_path):
    root = parents["root"]
    key = f"q-vit-{engine}-{extra.get('mode', 'static')}"
    metrics = _quantize(root, "vit", key, engine=engine, **extra)
    manifest = verified_manifest(root, key)
    assert manifest is not None and manifest["deploy"]["format"] == ("onnx" if engine == "onnxruntime" else "openvino")
    assert main_file in manifest["deploy"]["files"] and metrics["size_bytes_after"] == manifest["size_bytes"]
    assert manifest["size_bytes"] == manifest["deploy"]["size_bytes"] and manifest["extra"]["float_parent"]
    payload = Path(root) / key / main_file
    if main_file.endswith(".onnx"):
        found = {n.op_type for n in onnx.load(str(payload)).graph.node}
    else:
        found = {op for op in ops if f'type="{op}"' in payload.read_text()}
    assert ops <= found
    # the float parent's weights travel with it, unchanged
    assert (Path(root) / key / "weights.safetensors").read_bytes() == (
        Path(root) / "parent-vit" / "weights.safetensors").read_bytes()
    other = tmp_path / "node"
    assert unpack(other, key, pack(root, key))["deploy"] == manifest["deploy"]
    # a payload changed after it was written is refused, here and in transit
    blob = pack(root, key)
    payload.write_bytes(payload.read_bytes() + b" ")
    try:
        assert verified_manifest(root, key) is None
    finally:
        payload.write_bytes(payload.read_bytes()[:-1])
    assert verified_manifest(root, key) is not None
    tampered = blob.replace(b"DequantizeLinear", b"DequantizeLinean", 1) if b"DequantizeLinear" in blob else None
    if tampered is not None:
        from workers.artifacts import ArtifactTransferError

        with pytest.raises(ArtifactTransferError, match="checksum"):
            unpack(tmp_path / "other", key, tampered)


def test_tensorrt_quantization_makes_symmetric_int8_qdq(parents):
    """``engine: tensorrt``: the Q/DQ form TensorRT builds int8 engines from (its
    calibrators are gone): int8 activations and weights, every zero point 0."""
    from onnx import TensorProto, numpy_helper

    root = parents["root"]
    metrics = _quantize(root, "vit", "q-vit-trt", engine="tensorrt", activations="int8", per_channel=True)
    manifest = verified_manifest(root, "q-vit-trt")
    assert manifest is not None and manifest["deploy"]["format"] == "onnx-qdq" and metrics["engine"] == "tensorrt"
    assert manifest["deploy"]["settings"]["symmetric"] is True
    graph = onnx.load(str(Path(root) / "q-vit-trt" / "model.onnx")).graph
    inits = {i.name: i for i in graph.initializer}
    quantizers = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert {n.op_type for n in quantizers} == {"QuantizeLinear", "DequantizeLinear"}
    zero_points = [inits[n.input[2]] for n in quantizers if len(n.input) > 2 and n.input[2] in inits]
    assert zero_points and all(z.data_type == TensorProto.INT8 for z in zero_points)
    assert all(not numpy_helper.to_array(z).any() for z in zero_points)
    # the float parent travels with it, for the evaluation's agreement check
    assert manifest["extra"]["float_parent"] == "parent-vit"


def test_tensorrt_is_refused_off_an_nvidia_gpu_with_the_fix():
    backend = get_backend("tensorrt").load()
    assert "NVIDIA GPUs only" in backend.unsupported("cpu", "fp32")
    with pytest.raises(ValueError, match="NVIDIA GPUs only"):
        backend.prepare(_model("vit"), {"key": "a", "size_bytes": 1}, precision="fp32", device="cpu",
                        threads=ThreadSettings(intra_op=1), example=torch.randn(2, 1, 8, 8), cache_dir=None)


def test_evaluations_run_each_model_on_its_runtime_and_report_agreement(parents):
    root = parents["root"]
    _quantize(root, "cnn", "q-cnn-ov", engine="openvino", activations="int8")
    protocol = {"batch_size": 64, "warmup_batches": 1, "warmup_s": 0.0, "repeats": 1, "min_window_s": 0.0,
                "idle_s": 0.0}

    def run(parent: str, which: str, runtime: str) -> dict:
        ref = VIT if which == "vit" else CNN
        task = StageTask("sw", f"e-{parent}-{runtime}", "evaluate", {**protocol, "runtime": runtime}, parent, ref,
                         DatasetRef("digits"), 0, root)
        return dict(evaluate.run(task, ENV).metrics)

    for runtime in ("torch", "onnxruntime", "openvino"):
        m = run("parent-cnn", "cnn", runtime)
        assert m["runtime"]["runtime"] == runtime and m["agreement"]["top1_agreement"] == 1.0
        assert m["samples"] == 360 and 0 <= m["top1"] <= 1
    q = run("q-cnn-ov", "cnn", "openvino")
    assert q["agreement"]["reference"] == "the float parent (torch fp32)"
    assert 0 < q["agreement"]["top1_agreement"] <= 1 and q["deployable_size_bytes"] > 0
    with pytest.raises(ValueError, match="an openvino model runs on openvino, not on onnxruntime"):
        run("q-cnn-ov", "cnn", "onnxruntime")
