"""workers.models: building, safe checkpoints, and the artifact contract (checksums,
atomic saves, rebuilding without pickle).

``reload_in_subprocess`` is shared with test_prune / test_quantize: it proves an artifact
rebuilds from its files alone, in a fresh interpreter, to a model that computes exactly
what the saved one did.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from workers import modelio
from workers.artifacts import MANIFEST_FILE, STRUCTURE_FILE, WEIGHTS_FILE
from workers.modelio import artifact_info, load_artifact, save_artifact
from workers.models import (
    ArtifactLoadError,
    PretrainedWeightsUnavailableError,
    build_model,
    count_macs,
    count_params,
    model_input_shape,
    timm_kwargs,
)
from workers.types import ModelRef

REPO = Path(__file__).resolve().parents[2]
TINY_VIT = ModelRef(
    "vit_tiny_patch16_224",
    {"img_size": 8, "patch_size": 2, "in_chans": 1, "depth": 2, "embed_dim": 48, "num_heads": 3, "num_classes": 10},
)
VIT_SHAPE = (1, 8, 8)


# --------------------------------------------------------------------------- shared helpers


@contextlib.contextmanager
def capturing_saves() -> Iterator[dict[str, nn.Module]]:
    """Record every model a stage hands to ``save_artifact``, by key: the reference a
    reloaded artifact must reproduce (stages import ``save_artifact`` when they run)."""
    saved: dict[str, nn.Module] = {}
    real_save = modelio.save_artifact

    def spy(model: nn.Module, **kwargs: Any) -> Any:
        saved[kwargs["key"]] = model
        return real_save(model, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(modelio, "save_artifact", spy)
        yield saved



def reference_outputs(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The outputs the reloaded model must reproduce, computed single-threaded (as the
    child does) so float reductions run in the same order and results compare bitwise."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            return model.eval()(inputs)
    finally:
        torch.set_num_threads(threads)


_CHILD = textwrap.dedent(
    """
    import json, pickle, sys
    import torch
    from safetensors.torch import load_file

    def refuse(*args, **kwargs):
        raise AssertionError("load_artifact must not unpickle")

    torch.load = pickle.load = pickle.loads = refuse  # rebuilding may use json + safetensors only
    torch.set_num_threads(1)
    from workers.modelio import load_artifact

    results = {}
    for case in json.load(open(sys.argv[1])):
        model, manifest = load_artifact(case["root"], case["key"])
        tensors = load_file(case["tensors"])
        with torch.no_grad():
            out = model(tensors["inputs"])
        expected = tensors["expected"]
        results[case["key"]] = {
            "equal": bool(torch.equal(out, expected)),
            "max_abs_diff": float((out - expected).abs().max()),
            "training": model.training,
            "sha256": manifest["sha256"],
        }
    print(json.dumps(results))
    """
)


def reload_in_subprocess(tmp_path: Path, cases: list[tuple[str, str, torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
    """Load every ``(root, key, inputs, expected)`` artifact in a fresh interpreter and
    assert it reproduces ``expected`` bitwise, in eval mode. Returns the child's report."""
    specs = []
    for i, (root, key, inputs, expected) in enumerate(cases):
        tensors = tmp_path / f"case-{i}.safetensors"
        save_file({"inputs": inputs.contiguous(), "expected": expected.contiguous()}, str(tensors))
        specs.append({"root": root, "key": key, "tensors": str(tensors)})
    spec_file = tmp_path / "cases.json"
    spec_file.write_text(json.dumps(specs))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(spec_file)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for key, result in report.items():
        assert result["equal"], f"{key}: reloaded outputs differ by up to {result['max_abs_diff']}"
        assert result["training"] is False, key
    assert set(report) == {case[1] for case in cases}
    return report


# --------------------------------------------------------------------------- building


def _vit() -> nn.Module:
    torch.manual_seed(0)
    return build_model(TINY_VIT, 10)


def test_build_model_uses_arch_kwargs_and_num_classes():
    model = _vit()
    assert model.get_classifier().out_features == 10
    assert model(torch.randn(2, *VIT_SHAPE)).shape == (2, 10)


def test_unknown_arch_is_a_one_line_value_error():
    with pytest.raises(ValueError, match="unknown timm architecture 'no_such_net'") as info:
        build_model(ModelRef("no_such_net", {}), 10)
    assert "\n" not in str(info.value)


def test_kwargs_timm_rejects_are_a_value_error():
    with pytest.raises(ValueError, match="timm cannot build 'resnet18'"):
        build_model(ModelRef("resnet18", {"no_such_option": 1}), 10)


def test_conflicting_num_classes_is_refused():
    with pytest.raises(ValueError, match="num_classes=10 but 5"):
        build_model(TINY_VIT, 5)


def test_pretrained_offline_says_use_checkpoint(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast instead of retrying
    with pytest.raises(PretrainedWeightsUnavailableError, match="cannot be downloaded here.*checkpoint:") as info:
        build_model(ModelRef("resnet18", {}, pretrained=True), 10)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("form", ["safetensors", "state_dict", "nested"])
def test_checkpoint_weights_are_loaded(tmp_path, form):
    source = _vit()
    state = source.state_dict()
    if form == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file(state, str(path))
    else:
        path = tmp_path / "w.pt"
        torch.save(state if form == "state_dict" else {"state_dict": state, "epoch": 3}, path)
    torch.manual_seed(1)  # a different initialisation, overwritten by the checkpoint
    model = build_model(ModelRef(TINY_VIT.arch, TINY_VIT.kwargs, checkpoint=str(path)), 10)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name]), name


class _Evil:
    """Unpickling this would create ``marker`` -- proof that code from the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_checkpoint_is_refused_without_running_it(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"weight": torch.zeros(2), "evil": _Evil(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=2)
    assert not marker.exists()
    with pytest.raises(ArtifactLoadError, match="not weights-only.*refused") as info:
        build_model(ModelRef(TINY_VIT.arch, TINY_VIT.kwargs, checkpoint=str(path)), 10)
    assert "\n" not in str(info.value)
    assert not marker.exists()


def test_checkpoint_of_another_model_is_a_clean_error(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"fc.weight": torch.zeros(3, 3)}, str(path))
    with pytest.raises(ArtifactLoadError, match="does not fit the model: .* missing .* 1 unexpected"):
        build_model(ModelRef(TINY_VIT.arch, TINY_VIT.kwargs, checkpoint=str(path)), 10)


def test_missing_checkpoint_is_a_clean_error(tmp_path):
    with pytest.raises(ArtifactLoadError, match="does not exist"):
        build_model(ModelRef(TINY_VIT.arch, TINY_VIT.kwargs, checkpoint=str(tmp_path / "nope.pt")), 10)


def test_model_input_shape_without_data_is_the_kwargs_else_the_arch_default():
    assert model_input_shape(TINY_VIT) == (1, 8, 8)
    assert model_input_shape(ModelRef("resnet18", {})) == (3, 224, 224)
    assert model_input_shape(ModelRef("vit_tiny_patch16_224", {"img_size": [16, 32]})) == (3, 16, 32)


def test_input_size_decides_the_shape_for_every_architecture():
    """model.input_size wins over the data's size and the arch default, for CNNs too."""
    cnn = ModelRef("convnext_atto", {}, input_size=(1, 32, 32))
    assert model_input_shape(cnn, (1, 8, 8)) == model_input_shape(cnn) == (1, 32, 32)
    assert model_input_shape(ModelRef("resnet18", {}), (1, 8, 8)) == (3, 8, 8)  # without it: the data's size
    vit = ModelRef("deit_tiny_patch16_224", {"patch_size": 4}, input_size=(3, 32, 16))
    assert model_input_shape(vit, (1, 8, 8)) == (3, 32, 16)


def test_input_size_sets_in_chans_everywhere_and_img_size_only_for_fixed_size_archs():
    assert timm_kwargs(ModelRef("resnet18", {"num_classes": 10}, input_size=(1, 8, 8))) == {
        "num_classes": 10, "in_chans": 1}
    assert timm_kwargs(ModelRef("vit_tiny_patch16_224", {"patch_size": 2}, input_size=(1, 8, 8))) == {
        "patch_size": 2, "in_chans": 1, "img_size": (8, 8)}
    assert timm_kwargs(ModelRef("resnet18", {"drop_rate": 0.1})) == {"drop_rate": 0.1}  # no input_size: as written


def test_input_size_builds_a_cnn_and_a_vit_that_run_at_that_size(tmp_path):
    """convnext_atto cannot run on 8x8 digits; with input_size [1, 32, 32] it builds for
    one channel and runs, and its artifact rebuilds from the record alone."""
    cnn = ModelRef("convnext_atto", {}, input_size=(1, 32, 32))
    vit = ModelRef("vit_tiny_patch16_224", {"patch_size": 4, "depth": 1, "embed_dim": 24, "num_heads": 2},
                   input_size=(1, 16, 16))
    for i, ref in enumerate((cnn, vit)):
        torch.manual_seed(0)
        model = build_model(ref, 10).eval()
        shape = model_input_shape(ref, (1, 8, 8))
        with torch.no_grad():
            assert model(torch.zeros(2, *shape)).shape == (2, 10)
        save_artifact(model, root=str(tmp_path), key=f"k{i}", model_ref=ref, num_classes=10, input_shape=shape,
                      materialized=True, compression={"chain": []})
        loaded, manifest = load_artifact(str(tmp_path), f"k{i}")
        assert manifest["input_shape"] == list(shape) and manifest["model"]["input_size"] == list(ref.input_size)
        x = torch.randn(1, *shape)
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x))


# --------------------------------------------------------------------------- counting


def test_count_macs_counts_multiply_accumulates():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(4 * 5 * 5, 7))
    expected = 4 * 5 * 5 * (2 * 3 * 3) + 100 * 7
    assert count_macs(model, (2, 5, 5)) == expected


def test_count_macs_leaves_training_state_alone():
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)).train()
    stats = model[1].running_mean.clone()
    count_macs(model, (1, 4, 4))
    assert model.training and torch.equal(model[1].running_mean, stats)


def test_count_params_counts_dense_elements():
    assert count_params(nn.Linear(3, 4)) == 16


# --------------------------------------------------------------------------- artifacts


def _save(model: nn.Module, root: Path, key: str = "k1", **overrides: Any):
    kwargs: dict[str, Any] = dict(
        root=str(root),
        key=key,
        model_ref=TINY_VIT,
        num_classes=10,
        input_shape=VIT_SHAPE,
        materialized=True,
        compression={"chain": []},
    )
    kwargs.update(overrides)
    return save_artifact(model, **kwargs)


def test_save_writes_the_documented_layout(tmp_path):
    model = _vit()
    info = _save(model, tmp_path, extra={"note": "x"})
    directory = tmp_path / "k1"
    assert sorted(p.name for p in directory.iterdir()) == sorted([WEIGHTS_FILE, STRUCTURE_FILE, MANIFEST_FILE])
    assert [p.name for p in tmp_path.iterdir()] == ["k1"]  # no temporary directory left behind
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    assert info.size_bytes == manifest["size_bytes"] == (directory / WEIGHTS_FILE).stat().st_size
    assert info.sha256 == manifest["sha256"]
    assert info.params == manifest["params"] == count_params(model)
    assert info.macs == manifest["macs"] == count_macs(model, VIT_SHAPE) > 0
    assert manifest["input_shape"] == [1, 8, 8] and manifest["num_classes"] == 10
    assert manifest["compression"] == {"chain": []} and manifest["materialized"] is True
    assert manifest["extra"] == {"note": "x"}
    assert set(manifest["versions"]) >= {"torch", "timm", "optimum-quanto"}
    assert info.path == str(directory)
    assert artifact_info(str(tmp_path), "k1") == info


def test_round_trip_in_process(tmp_path):
    model = _vit()
    inputs = torch.randn(3, *VIT_SHAPE)
    expected = reference_outputs(model, inputs)
    _save(model, tmp_path)
    loaded, manifest = load_artifact(str(tmp_path), "k1")
    assert not loaded.training
    assert torch.allclose(loaded(inputs), expected, atol=1e-6)
    assert manifest["key"] == "k1"


def test_loading_does_not_move_the_global_rng(tmp_path):
    _save(_vit(), tmp_path)
    state = torch.get_rng_state()
    load_artifact(str(tmp_path), "k1")
    assert torch.equal(torch.get_rng_state(), state)


def test_tampered_weights_fail_the_checksum(tmp_path):
    _save(_vit(), tmp_path)
    weights = tmp_path / "k1" / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactLoadError, match=r"artifact k1 failed its checksum .*delete .*k1 and re-run") as info:
        load_artifact(str(tmp_path), "k1")
    assert "\n" not in str(info.value)
    assert artifact_info(str(tmp_path), "k1") is None


def test_a_tampered_artifact_is_replaced_by_the_next_save(tmp_path):
    _save(_vit(), tmp_path)
    (tmp_path / "k1" / WEIGHTS_FILE).write_bytes(b"garbage")
    info = _save(_vit(), tmp_path)
    assert artifact_info(str(tmp_path), "k1") == info
    assert [p.name for p in tmp_path.iterdir()] == ["k1"]


def test_absent_or_incomplete_artifacts(tmp_path):
    assert artifact_info(str(tmp_path), "nothing") is None
    with pytest.raises(ArtifactLoadError, match="not found or incomplete"):
        load_artifact(str(tmp_path), "nothing")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / WEIGHTS_FILE).write_bytes(b"")
    assert artifact_info(str(tmp_path), "half") is None


def test_keys_must_be_plain_names(tmp_path):
    for key in ("../escape", "a/b", ".hidden", ""):
        with pytest.raises(ValueError, match="plain directory name"):
            _save(_vit(), tmp_path, key=key)


def test_saving_an_existing_key_returns_the_existing_artifact(tmp_path):
    first = _save(_vit(), tmp_path)
    mtime = (tmp_path / "k1" / MANIFEST_FILE).stat().st_mtime_ns
    torch.manual_seed(5)
    second = _save(build_model(TINY_VIT, 10), tmp_path)  # other weights, same key
    assert second == first
    assert (tmp_path / "k1" / MANIFEST_FILE).stat().st_mtime_ns == mtime


def test_losing_the_rename_race_returns_the_winner(tmp_path, monkeypatch):
    """The other process finishes between our existence check and our rename."""
    winner = _save(_vit(), tmp_path)
    real_info = modelio.artifact_info
    calls = iter([None])  # the first check sees nothing yet
    monkeypatch.setattr(modelio, "artifact_info", lambda root, key: next(calls, real_info(root, key)))
    torch.manual_seed(7)
    assert _save(build_model(TINY_VIT, 10), tmp_path) == winner
    assert [p.name for p in tmp_path.iterdir()] == ["k1"]


def test_concurrent_saves_of_one_key_agree(tmp_path):
    models_ = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        models_.append(build_model(TINY_VIT, 10))
    barrier = threading.Barrier(2)
    results: list[Any] = [None, None]

    def save(i: int) -> None:
        barrier.wait()
        results[i] = _save(models_[i], tmp_path)

    threads = [threading.Thread(target=save, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    on_disk = artifact_info(str(tmp_path), "k1")
    assert on_disk is not None and results[0] == results[1] == on_disk
    assert [p.name for p in tmp_path.iterdir()] == ["k1"]


def test_plain_model_reloads_in_another_process(tmp_path):
    model = _vit()
    inputs = torch.randn(4, *VIT_SHAPE)
    _save(model, tmp_path / "root")
    reload_in_subprocess(tmp_path, [(str(tmp_path / "root"), "k1", inputs, reference_outputs(model, inputs))])
