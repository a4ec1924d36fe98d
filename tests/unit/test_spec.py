"""orchestrator.spec: the bad-spec corpus, the CLI's one-line errors, and good specs.

Every file in ``tests/specs/bad/`` starts with ``# expect: <text>``; loading it must
raise :class:`SpecError` whose single-line message contains that text, and
``greensweep plan`` on it must exit 2 with exactly one ``error:`` line on stderr and
write nothing. Files in ``tests/specs/good/`` must load and plan.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.errors import SpecError
from orchestrator.spec import SweepSpec, count_points, load_spec, parse_spec
from tests.cli import run_cli
from workers.stages.registry import EvaluateParams, TrainParams

REPO = Path(__file__).resolve().parents[2]
SPECS = REPO / "tests" / "specs"
BAD_SPECS = sorted((SPECS / "bad").glob("*.yaml"))
GOOD_SPECS = sorted((SPECS / "good").glob("*.yaml"))
QUICKSTART = REPO / "examples" / "quickstart.yaml"
EXPECT = "# expect: "

TINY_MODEL = """model:
  arch: vit_tiny_patch16_224
  kwargs: {img_size: 8, patch_size: 2, in_chans: 1, depth: 1, embed_dim: 24, num_heads: 2}
"""


def _expected(path: Path) -> str:
    first = path.read_text().split("\n", 1)[0]
    assert first.startswith(EXPECT), f"{path.name}: first line must be '{EXPECT}<substring of the error>'"
    text = first[len(EXPECT):].strip()
    assert text, f"{path.name}: empty expectation"
    return text


def _ids(paths: list[Path]) -> list[str]:
    return [p.stem for p in paths]


# -- the bad corpus ------------------------------------------------------------------------


def test_bad_corpus_is_large_and_well_formed():
    assert len(BAD_SPECS) >= 30
    expectations = [_expected(p) for p in BAD_SPECS]
    assert all(len(e) >= 10 for e in expectations), "expectations must be specific"


@pytest.mark.parametrize("path", BAD_SPECS, ids=_ids(BAD_SPECS))
def test_bad_spec_raises_one_line_spec_error(path: Path):
    with pytest.raises(SpecError) as info:
        load_spec(path)
    msg = str(info.value)
    assert _expected(path) in msg
    assert "\n" not in msg and "\r" not in msg, "a SpecError is one line"
    assert msg == msg.strip() and msg
    # Internals must not leak into user-facing messages.
    for leak in ("_SpecFile", "_Section", "pydantic", "Traceback", "errors.pydantic.dev"):
        assert leak not in msg
    assert info.value.exit_code == 2


@pytest.mark.parametrize("path", BAD_SPECS, ids=_ids(BAD_SPECS))
def test_cli_plan_bad_spec_exits_2_with_one_error_line(path: Path, tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["plan", str(path)], capsys)
    assert code == 2
    assert out == ""
    assert err.endswith("\n") and err.count("\n") == 1, f"stderr must be exactly one line: {err!r}"
    assert err.startswith("error: ")
    assert _expected(path) in err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == [], "plan on a bad spec must write nothing (no .greensweep/)"


def test_cli_plan_json_bad_spec_also_exits_2(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["plan", "--json", str(SPECS / "bad" / "prune_ratio_above_one.yaml")], capsys)
    assert (code, out) == (2, "")
    assert err.startswith("error: pipelines[0].stages[0].prune.ratio: ") and err.count("\n") == 1


def _greensweep_script() -> Path:
    script = Path(sys.executable).parent / "greensweep"
    if not script.exists():
        pytest.skip("the greensweep console script is not installed next to this Python")
    return script


def test_greensweep_script_bad_specs_in_subprocesses(tmp_path: Path):
    """The installed console script: exit 2, one stderr line, no traceback, nothing written."""
    script = _greensweep_script()
    # Specs that fail before the timm lookup, so no subprocess pays the torch import (seconds
    # each); the in-process main() tests above cover every file of the corpus.
    names = ["yaml_tab_indent", "empty", "not_a_mapping_list", "unknown_top_level_key",
             "no_pipelines_no_baseline", "checkpoint_missing_file"]
    env = {k: v for k, v in os.environ.items() if k != "GREENSWEEP_DEBUG"}
    procs = {  # started together
        n: subprocess.Popen([str(script), "plan", str(SPECS / "bad" / f"{n}.yaml")], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for n in names
    }
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, (name, err)
        assert out == ""
        assert err.count("\n") == 1 and err.startswith("error: "), (name, err)
        assert _expected(SPECS / "bad" / f"{name}.yaml") in err
        assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_cli_plan_missing_spec_file(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["plan", "nope.yaml"], capsys)
    assert (code, out) == (2, "")
    assert err.startswith("error: spec file not found: nope.yaml") and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_cli_plan_directory_instead_of_file(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "specdir").mkdir()
    code, out, err = run_cli(["plan", "specdir"], capsys)
    assert (code, out) == (2, "")
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


# -- messages that cannot live in the corpus -------------------------------------------------


def test_zero_byte_file_is_empty_spec(tmp_path: Path):
    p = tmp_path / "spec.yaml"
    p.write_bytes(b"")
    with pytest.raises(SpecError, match=r"^spec is empty"):
        load_spec(p)


def test_missing_spec_file_and_unreadable_spec(tmp_path: Path):
    with pytest.raises(SpecError, match=r"^spec file not found: .*missing\.yaml -- check the path"):
        load_spec(tmp_path / "missing.yaml")
    with pytest.raises(SpecError, match=r"^cannot read spec file .*IsADirectoryError"):
        load_spec(tmp_path)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(SpecError) as info:
        load_spec(binary)
    assert "\n" not in str(info.value)


def test_unknown_arch_suggests_close_names():
    with pytest.raises(SpecError) as info:
        load_spec(SPECS / "bad" / "arch_unknown.yaml")
    msg = str(info.value)
    assert "similar: " in msg and "vit_tiny_patch16_224" in msg.split("similar: ", 1)[1]


def test_check_arch_false_skips_the_timm_lookup():
    text = (SPECS / "bad" / "arch_unknown.yaml").read_text()
    spec = parse_spec(text, check_arch=False)
    assert spec.model.arch == "vit_tinyy_patch16"


def test_yaml_error_names_line_and_column():
    with pytest.raises(SpecError) as info:
        parse_spec("name: x\nmodel:\n\tarch: y\n")
    assert str(info.value).startswith("spec is not valid YAML at line 3, column 1: ")
    assert str(info.value).endswith("-- fix the syntax")


def test_duplicate_key_names_its_line():
    text = f"name: x\n{TINY_MODEL}dataset: {{name: digits}}\ntrain: {{}}\nseed: 1\nseed: 2\n"
    with pytest.raises(SpecError, match=r"^spec is not valid YAML at line 8, column 1: duplicate key 'seed'"):
        parse_spec(text, check_arch=False)


def test_misspelled_key_is_reported_rather_than_the_missing_one():
    """'nmae' is both an unknown key and a missing 'name': the typo is the useful message."""
    text = f"nmae: x\n{TINY_MODEL}dataset: {{name: digits}}\ntrain: {{}}\n"
    with pytest.raises(SpecError, match=r"^nmae: unknown key; allowed keys: name, "):
        parse_spec(text, check_arch=False)


def test_grid_error_names_element_even_when_another_parameter_is_missing():
    text = (f"name: x\n{TINY_MODEL}dataset: {{name: digits}}\ntrain: {{}}\n"
            "pipelines: [{name: p, stages: [{prune: {ratio: [0.5, 2.0]}}]}]\n")
    with pytest.raises(SpecError, match=r"^pipelines\[0\]\.stages\[0\]\.prune\.ratio\[1\]: .*\(got 2\.0\)"):
        parse_spec(text, check_arch=False)


def test_error_names_the_pipeline_and_stage_index():
    text = (f"name: x\n{TINY_MODEL}dataset: {{name: digits}}\ntrain: {{}}\n"
            "pipelines:\n"
            "  - {name: a, stages: [{quantize: {weights: int8}}]}\n"
            "  - {name: b, stages: [{quantize: {weights: int8}}, {prune: {method: structured, ratio: 0.5}},"
            " {quantize: {weights: int5}}]}\n")
    with pytest.raises(SpecError, match=r"^pipelines\[1\]\.stages\[2\]\.quantize\.weights: .*'int5'"):
        parse_spec(text, check_arch=False)


# -- good specs ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", GOOD_SPECS, ids=_ids(GOOD_SPECS))
def test_good_specs_load(path: Path):
    spec = load_spec(path)
    assert isinstance(spec, SweepSpec)
    assert 1 <= count_points(spec) <= spec.max_points


@pytest.mark.parametrize("path", [QUICKSTART, *GOOD_SPECS], ids=["quickstart", *_ids(GOOD_SPECS)])
def test_cli_plan_good_spec_exits_0_and_writes_nothing(path: Path, tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["plan", str(path)], capsys)
    assert (code, err) == (0, "")
    assert out.startswith("sweep ")
    assert list(tmp_path.iterdir()) == []


def test_quickstart_parses():
    spec = load_spec(QUICKSTART)
    assert spec.name == "quickstart" and spec.seed == 0
    assert spec.model.arch == "vit_tiny_patch16_224"
    assert dict(spec.model.kwargs) == {"img_size": 8, "patch_size": 2, "in_chans": 1, "depth": 4,
                                       "embed_dim": 96, "num_heads": 3}
    assert spec.model.checkpoint is None and spec.model.pretrained is False and spec.checkpoint_sha256 is None
    assert (spec.dataset.name, spec.dataset.path, dict(spec.dataset.options)) == ("digits", None, {})
    assert spec.train == TrainParams(epochs=30, lr=0.002, weight_decay=0.05, batch_size=64).model_dump(mode="json")
    assert [p.name for p in spec.pipelines] == ["unstructured", "structured", "quanto-int8", "ort-int8", "ov-int8"]
    assert [len(p.stages) for p in spec.pipelines] == [1, 1, 1, 1, 2]
    assert spec.evaluate.targets == ("local",)
    assert spec.evaluate.runtimes == ("torch", "onnxruntime", "openvino") and spec.evaluate.precisions == ("fp32", "auto")
    assert (spec.evaluate.batch_size, spec.evaluate.warmup_batches, spec.evaluate.repeats) == (64, 3, 7)
    assert spec.evaluate.baseline is True
    assert spec.store_url is None and spec.max_points == 1000
    assert spec.source_text == QUICKSTART.read_text()
    assert spec.spec_hash == hashlib.sha256(QUICKSTART.read_bytes()).hexdigest()
    assert count_points(spec) == 7 * 3 * 2  # chains x runtimes x precisions: an upper bound of the points


def test_quickstart_stage_templates():
    spec = load_spec(QUICKSTART)
    prune = spec.pipelines[1].stages[0]
    assert prune.kind == "prune"
    assert prune.axes == (("method", ("structured",)), ("mode", ("all",)), ("ratio", (0.3, 0.6)))
    combos = prune.combinations()
    assert [written for written, _ in combos] == [
        {"method": "structured", "mode": "all", "ratio": 0.3},
        {"method": "structured", "mode": "all", "ratio": 0.6},
    ]
    assert combos[0][1] == {"method": "structured", "ratio": 0.3, "mode": "all", "importance": "l1", "n": None, "m": None}
    quant = spec.pipelines[4].stages[1]
    assert [full for _, full in quant.combinations()] == [
        {"weights": "int8", "activations": "int8", "calibration_batches": 8, "batch_size": 64, "engine": "openvino",
         "mode": "static", "per_channel": False}
    ]


def test_spec_is_frozen():
    spec = load_spec(QUICKSTART)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "other"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.pipelines[0].stages[0].kind = "quantize"  # type: ignore[misc]


def test_defaults_are_filled():
    spec = load_spec(SPECS / "good" / "minimal.yaml")
    assert spec.seed == 0
    assert spec.train == TrainParams().model_dump(mode="json")
    assert spec.train == {"epochs": 30, "lr": 2e-3, "weight_decay": 0.05, "batch_size": 64,
                          "val_fraction": 0.1, "label_smoothing": 0.0, "warmup_epochs": 0, "augment": "none",
                          "accumulate_steps": 1, "patience": None, "amp": True, "precision": "fp32"}
    assert dict(spec.model.kwargs) == {} and spec.model.pretrained is False
    assert spec.pipelines == ()
    assert spec.evaluate.targets == ("local",) and spec.evaluate.baseline is True and spec.evaluate.cohort_size == 8
    defaults = EvaluateParams()
    assert (spec.evaluate.batch_size, spec.evaluate.warmup_batches, spec.evaluate.repeats) == (
        defaults.batch_size, defaults.warmup_batches, defaults.repeats)
    assert spec.evaluate.params_for("gpu") == {"target": "gpu", "batch_size": 64, "warmup_batches": 3, "repeats": 7,
                                               "min_window_s": 5.0, "idle_s": 2.0,
                                               "warmup_s": 3.0, "runtime": "torch", "precision": "fp32",
                                               "interleave": "auto", "slice_s": 0.05}
    assert (spec.evaluate.runtimes, spec.evaluate.precisions) == (("torch",), ("fp32",))
    assert spec.max_points == 1000 and spec.store_url is None
    assert count_points(spec) == 1


def test_unstructured_prune_keeps_mode_none_and_structured_defaults_to_all():
    text = (f"name: x\n{TINY_MODEL}dataset: {{name: digits}}\ntrain: {{}}\n"
            "pipelines:\n  - {name: u, stages: [{prune: {method: unstructured, ratio: 0.5}}]}\n"
            "  - {name: s, stages: [{prune: {method: structured, ratio: 0.5}}]}\n")
    spec = parse_spec(text, check_arch=False)
    (_, u), = spec.pipelines[0].stages[0].combinations()
    (_, s), = spec.pipelines[1].stages[0].combinations()
    assert u["mode"] is None and s["mode"] == "all"


def test_relative_checkpoint_resolves_against_the_spec_directory(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the spec's directory
    spec = load_spec(Path(os.path.relpath(SPECS / "good" / "checkpoint.yaml", tmp_path)))
    weights = (SPECS / "good" / "weights" / "tiny.safetensors").resolve()
    assert spec.model.checkpoint == str(weights)
    assert spec.checkpoint_sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert spec.train is None


def test_relative_paths_in_a_spec_elsewhere(tmp_path: Path, monkeypatch):
    proj = tmp_path / "proj"
    (proj / "ckpt").mkdir(parents=True)
    (proj / "data").mkdir()
    import torch

    torch.save({"w": torch.zeros(2)}, proj / "ckpt" / "w.pt")  # a real weights-only file: it is checked
    _write_imagefolder(proj / "data")  # its headers are read: it must be a dataset
    (proj / "spec.yaml").write_text(
        "name: x\nmodel: {arch: vit_tiny_patch16_224, checkpoint: ckpt/w.pt, kwargs: {num_classes: 2}}\n"
        "dataset: {name: imagefolder, path: data}\n")
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)
    spec = load_spec(proj / "spec.yaml")
    assert spec.model.checkpoint == str((proj / "ckpt" / "w.pt").resolve())
    assert spec.dataset.path == str((proj / "data").resolve())
    assert spec.checkpoint_sha256 == hashlib.sha256((proj / "ckpt" / "w.pt").read_bytes()).hexdigest()
    # parse_spec resolves against base_dir, not the working directory.
    text = (proj / "spec.yaml").read_text()
    assert parse_spec(text, base_dir=proj).model.checkpoint == spec.model.checkpoint
    with pytest.raises(SpecError, match=r"^model\.checkpoint: file not found: .*elsewhere"):
        parse_spec(text)  # base_dir defaults to '.', which is 'elsewhere'
    # An absolute checkpoint path is used as is.
    absolute = text.replace("ckpt/w.pt", str(proj / "ckpt" / "w.pt")).replace("path: data", f"path: {proj / 'data'}")
    assert parse_spec(absolute, base_dir=other).model.checkpoint == spec.model.checkpoint


def _write_imagefolder(root: Path, classes: tuple[str, ...] = ("cat", "dog"), size: tuple[int, int] = (6, 6)) -> None:
    from PIL import Image

    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (size[1], size[0]), (40 * i, 0, 0)).save(root / c / f"{i}.png")


def test_pretrained_without_train_evaluates_as_loaded():
    spec = load_spec(SPECS / "good" / "pretrained.yaml")
    assert spec.model.pretrained is True and spec.train is None and spec.model.checkpoint is None
    assert spec.evaluate.targets == ("local", "gpu") and count_points(spec) == 2


def test_anchors_and_merge_keys_work():
    spec = load_spec(SPECS / "good" / "anchors.yaml")
    int8, prune_int8 = spec.pipelines
    assert int8.stages[0].axes == (("weights", ("int8",)), ("activations", ("none", "int8")))
    assert dict(prune_int8.stages[1].axes) == {"weights": ("int8",), "activations": ("none", "int8"),
                                               "calibration_batches": (4,)}
    assert count_points(spec) == 28 == spec.max_points  # exactly at the limit is allowed


GRID_BASE = f"name: g\n{TINY_MODEL}dataset: {{name: digits}}\ntrain: {{}}\n"


@pytest.mark.parametrize(
    ("extra", "points"),
    [
        ("", 1),  # baseline only
        ("evaluate: {baseline: false}\npipelines: [{name: p, stages: [{quantize: {weights: int8}}]}]\n", 1),
        ("pipelines: [{name: p, stages: [{prune: {method: structured, ratio: [0.1, 0.2, 0.3]}}]}]\n", 1 + 3),
        ("pipelines: [{name: p, stages: [{prune: {method: structured, mode: [all, heads], ratio: [0.1, 0.2, 0.3]}},"
         " {quantize: {weights: [int8, int4], activations: [none, int8]}}]}]\n", 1 + 2 * 3 * 2 * 2),
        ("evaluate: {targets: [a, b, c]}\n"
         "pipelines: [{name: p, stages: [{quantize: {weights: [int8, int4]}}]},"
         " {name: q, stages: [{prune: {method: unstructured, ratio: [0.5, 0.7]}}]}]\n", (1 + 2 + 2) * 3),
        ("evaluate: {targets: [a, b], baseline: false}\n"
         "pipelines: [{name: p, stages: [{quantize: {weights: int8}}, {quantize: {weights: int8}}]}]\n", 2),
    ],
    ids=["baseline", "one-point", "ratio-axis", "four-axes", "targets", "no-baseline-two-targets"],
)
def test_grid_counts(extra: str, points: int):
    spec = parse_spec(GRID_BASE + extra, check_arch=False)
    assert count_points(spec) == points


def test_max_points_is_inclusive():
    extra = "pipelines: [{name: p, stages: [{prune: {method: structured, ratio: [0.1, 0.2, 0.3]}}]}]\n"
    assert count_points(parse_spec(GRID_BASE + extra + "limits: {max_points: 4}\n", check_arch=False)) == 4
    with pytest.raises(SpecError, match=r"^pipelines: the grid expands to 4 points, over limits\.max_points=3 "):
        parse_spec(GRID_BASE + extra + "limits: {max_points: 3}\n", check_arch=False)


@pytest.mark.parametrize("path", sorted((REPO / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_spec_parses_and_plans(path: Path) -> None:
    from orchestrator.plan import build_plan

    spec = load_spec(path)
    assert build_plan(spec).points


# -- model.input_size and the checks that read more than the spec --------------------------


def test_input_size_is_parsed_and_keys_change_only_when_it_is_given():
    from orchestrator.plan import root_key

    base = "name: x\nmodel: {arch: convnext_atto%s}\ndataset: {name: digits}\ntrain: {epochs: 1}\n"
    with_size = parse_spec(base % ", input_size: [1, 32, 32]")
    assert with_size.model.input_size == (1, 32, 32)
    without = parse_spec(base % "", check_arch=False)  # convnext_atto cannot take 8x8 digits; keys only here
    assert without.model.input_size is None
    assert root_key(with_size) != root_key(without)
    assert root_key(without) == root_key(dataclasses.replace(without, model=dataclasses.replace(without.model)))


def test_more_classes_than_the_dataset_and_remote_data_still_plan(tmp_path: Path):
    parse_spec("name: x\nmodel: {arch: resnet18, kwargs: {num_classes: 20}}\ndataset: {name: digits}\ntrain: {}\n")
    # an options.root that does not exist here is data on the cluster: not read, still plans
    spec = parse_spec("name: x\nmodel: {arch: resnet18}\ndataset: {name: cifar10, options: {root: nowhere}}\n"
                      "train: {}\n", base_dir=tmp_path)
    assert spec.dataset.options["root"] == str(tmp_path / "nowhere")


def test_imagefolder_class_count_is_read_from_its_folders(tmp_path: Path):
    _write_imagefolder(tmp_path / "data", classes=("a", "b", "c"))
    text = "name: x\nmodel: {arch: resnet18, kwargs: {num_classes: 2}}\ndataset: {name: imagefolder, path: data}\ntrain: {}\n"
    with pytest.raises(SpecError, match=r"^model\.kwargs\.num_classes: 2 is fewer than the 3 classes of dataset 'imagefolder'"):
        parse_spec(text, base_dir=tmp_path)
    assert parse_spec(text.replace("num_classes: 2", "num_classes: 3"), base_dir=tmp_path).model.kwargs["num_classes"] == 3


def test_teacher_artifact_is_looked_up_under_the_artifact_root(tmp_path: Path):
    import json

    text = (f"name: x\n{TINY_MODEL}dataset: {{name: digits}}\ntrain: {{epochs: 1}}\n"
            "pipelines: [{name: p, stages: [{distill: {teacher: 'artifact:abc123', epochs: 1}}]}]\n")
    with pytest.raises(SpecError, match=r"^pipelines\[0\]\.stages\[0\]\.distill\.teacher: artifact abc123 does not exist"):
        parse_spec(text, artifact_root=tmp_path)
    d = tmp_path / "abc123"
    d.mkdir()
    (d / "weights.safetensors").write_bytes(b"w")
    (d / "structure.json").write_text("{}")
    (d / "manifest.json").write_text(json.dumps({"sha256": "0" * 64}))
    with pytest.raises(SpecError, match="artifact abc123 fails its checksum"):
        parse_spec(text, artifact_root=tmp_path)
    (d / "manifest.json").write_text(json.dumps({"sha256": hashlib.sha256(b"w").hexdigest()}))
    assert parse_spec(text, artifact_root=tmp_path).pipelines[0].stages[0].kind == "distill"


def test_spec_module_stays_torch_free_at_import():
    code = "import sys, orchestrator.spec; assert 'torch' not in sys.modules and 'timm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
