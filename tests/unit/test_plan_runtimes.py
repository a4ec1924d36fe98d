"""The runtime and precision axes of evaluation: pairing chains with runtimes at plan time,
the keys of default evaluations, spec errors, and the run-start check of the nodes."""

from __future__ import annotations

import hashlib
import json

import pytest

from orchestrator.cli import main
from orchestrator.cluster import NodeInfo, require_runtimes
from orchestrator.errors import ClusterError, SpecError
from orchestrator.plan import Plan, build_plan, evaluation_label
from orchestrator.spec import parse_spec

HEAD = """name: base
seed: 0
model:
  arch: vit_tiny_patch16_224
  kwargs: {img_size: 8, patch_size: 2, in_chans: 1, depth: 1, embed_dim: 24, num_heads: 2}
dataset: {name: digits, options: {}}
train: {epochs: 2, lr: 0.002}
"""

# The spec whose stage keys were recorded before evaluations had a runtime (commit
# 1620e2d): 17 stages, the sha256 of their keys in plan order, and the root key.
RECORDED = HEAD + """evaluate: {targets: [local, cpu-xeon], repeats: 3}
pipelines:
  - name: pq
    stages:
      - prune: {method: structured, ratio: [0.25, 0.5]}
      - quantize: {weights: int8, activations: [none, int8]}
"""
RECORDED_KEYS = (17, "2ac5416e7955406b", "15c9d2878ac9490a59f84c78")

RUNTIMES = HEAD + """evaluate:
  targets: [local]
  runtimes: [torch, onnxruntime, openvino]
  precision: [fp32, auto]
pipelines:
  - name: structured
    stages:
      - prune: {method: structured, ratio: 0.3}
  - name: quanto
    stages:
      - quantize: {weights: int8, activations: int8}
  - name: ort-int8
    stages:
      - quantize: {engine: onnxruntime, mode: static, weights: int8, activations: int8}
  - name: ov-int8
    stages:
      - prune: {method: structured, ratio: 0.3}
      - quantize: {engine: openvino, weights: int8, activations: int8}
"""


def _plan(text: str) -> Plan:
    return build_plan(parse_spec(text, base_dir=".", check_arch=False))


def _combos(plan: Plan) -> dict[str, set[tuple[str, str]]]:
    out: dict[str, set[tuple[str, str]]] = {}
    for p in plan.points:
        out.setdefault(p.pipeline, set()).add((p.runtime, p.precision))
    return out


def test_default_evaluations_keep_the_keys_stores_were_written_with():
    plan = _plan(RECORDED)
    keys = [s.key for s in plan.stages]
    assert (len(keys), hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16], plan.root_key) == RECORDED_KEYS
    evaluations = [s for s in plan.stages if s.kind == "evaluate"]
    assert {s.params["runtime"] for s in evaluations} == {"torch"}  # stored with the params, not keyed
    assert {s.label for s in evaluations} == {"evaluate(local)", "evaluate(cpu-xeon)"}


def test_each_chain_is_measured_where_its_model_runs():
    plan = _plan(RUNTIMES)
    combos = _combos(plan)
    float_everywhere = {("torch", "fp32"), ("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "auto")}
    assert combos["baseline"] == float_everywhere
    assert combos["structured"] == float_everywhere
    assert combos["quanto"] == {("torch", "fp32")}  # a quanto model is a torch model with quanto modules
    assert combos["ort-int8"] == {("onnxruntime", "fp32")}
    assert combos["ov-int8"] == {("openvino", "fp32"), ("openvino", "auto")}
    # the ov-int8 chain reuses the structured pipeline's prune stage
    assert len({p.stage_keys[1] for p in plan.points if p.pipeline in ("structured", "ov-int8")}) == 1


def test_impossible_combinations_are_listed_with_their_reason_not_points():
    plan = _plan(RUNTIMES)
    quanto_ort = [u for u in plan.unpaired if u.label.startswith("quanto") and u.runtime == "onnxruntime"]
    assert quanto_ort and all(u.reason for u in quanto_ort)
    torch_auto = [u for u in plan.unpaired if u.runtime == "torch" and u.precision == "auto"]
    assert {u.label.split(":")[0] for u in torch_auto} >= {"baseline", "structured"}
    n_grid = 5 * 3 * 2  # chains x runtimes x precisions
    assert len(plan.points) + len(plan.unpaired) == n_grid
    data = plan.to_json()
    assert len(data["unpaired"]) == len(plan.unpaired)
    assert {(p["runtime"], p["precision"]) for p in data["point_list"]} >= {("openvino", "auto")}


def test_runtime_and_precision_are_part_of_an_evaluations_key_and_label():
    plan = _plan(RUNTIMES)
    baseline = [p for p in plan.points if p.pipeline == "baseline"]
    assert len({p.eval_key for p in baseline}) == len(baseline)
    labels = {plan.stage(p.eval_key).label for p in baseline}
    assert labels == {"evaluate(local)", "evaluate(local, onnxruntime)", "evaluate(local, openvino)",
                      "evaluate(local, openvino, auto)"}
    assert evaluation_label("evaluate", "gpu-a100", "torch", "fp16") == "evaluate(gpu-a100, torch, fp16)"


def test_quanto_keys_do_not_change_with_the_engine_parameter_spelled_out():
    spelled = RECORDED.replace("{weights: int8, activations: [none, int8]}",
                               "{engine: quanto, weights: int8, activations: [none, int8]}")
    assert [s.key for s in _plan(spelled).stages] == [s.key for s in _plan(RECORDED).stages]


@pytest.mark.parametrize("evaluate, pipeline, message", [
    ("{runtimes: [tensorflow]}", "prune: {method: structured, ratio: 0.3}", "unknown runtime 'tensorflow'"),
    ("{precision: [int3]}", "prune: {method: structured, ratio: 0.3}", "evaluate.precision"),
    ("{runtimes: [torch, torch]}", "prune: {method: structured, ratio: 0.3}", "unique"),
    ("{}", "quantize: {engine: onnxruntime, weights: int4, activations: int8}", "int8 only"),
    ("{}", "quantize: {engine: onnxruntime, mode: dynamic, weights: int8, activations: int8}", "activations: none"),
    ("{}", "quantize: {engine: openvino, weights: int8}", "activations: int8"),
    ("{}", "quantize: {weights: int8, per_channel: true}", "engine: onnxruntime"),
    ("{runtimes: [torch]}", "quantize: {engine: openvino, weights: int8, activations: int8}",
     "nothing can measure"),
])
def test_spec_errors_name_the_field_and_the_fix(evaluate: str, pipeline: str, message: str):
    text = HEAD + f"evaluate: {evaluate}\npipelines:\n  - name: p\n    stages:\n      - {pipeline}\n"
    with pytest.raises(SpecError) as e:
        _plan(text)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_a_stage_cannot_start_from_a_runtime_model():
    text = HEAD + """evaluate: {runtimes: [onnxruntime]}
pipelines:
  - name: p
    stages:
      - quantize: {engine: onnxruntime, weights: int8, activations: int8}
      - prune: {method: structured, ratio: 0.3}
"""
    with pytest.raises(SpecError, match=r"cannot start from the onnx model .* put quantize\(.*\) last"):
        _plan(text)


def test_cli_plan_lists_points_with_runtimes_and_what_is_not_a_point(tmp_path, monkeypatch, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text(RUNTIMES)
    monkeypatch.chdir(tmp_path)
    main(["plan", str(spec)])
    out = capsys.readouterr().out
    assert "@ local on openvino auto" in out
    assert "not points: 18 combinations a runtime cannot run" in out  # 5 chains x 6 - 12 points
    assert "  - a quanto model runs on torch, not on onnxruntime: quanto" in out
    main(["plan", str(spec), "--json"])
    data = json.loads(capsys.readouterr().out)
    assert data["unpaired"]


def _node(node_id: str, node_type: str, gpus: int = 0) -> NodeInfo:
    return NodeInfo(node_id=node_id, node_type=node_type, region=None, num_cpus=2, num_gpus=gpus, address="127.0.0.1")


def test_run_start_refuses_a_runtime_a_target_node_lacks():
    plan = _plan(RUNTIMES)
    nodes = [_node("a" * 20, "local")]
    facts = {"a" * 20: {"runtimes": {"torch": "2.6", "onnxruntime": "1.20", "openvino": None}}}
    with pytest.raises(ClusterError) as e:
        require_runtimes(plan, nodes, facts)
    assert "openvino is not installed on node aaaaaaaaaaaa (local)" in str(e.value)
    assert "pip install openvino" in str(e.value)
    facts["a" * 20]["runtimes"]["openvino"] = "2025.1"
    require_runtimes(plan, nodes, facts)


def test_run_start_refuses_a_precision_the_targets_device_cannot_run():
    text = HEAD + """evaluate: {targets: [local], runtimes: [onnxruntime], precision: [fp16]}
pipelines:
  - name: p
    stages:
      - prune: {method: structured, ratio: 0.3}
"""
    plan = _plan(text)  # a torch model may be exported at fp16: a plan-time pairing
    gpu, cpu = _node("g" * 20, "local", gpus=1), _node("c" * 20, "local")
    installed = {"runtimes": {"onnxruntime": "1.20"}}
    require_runtimes(plan, [gpu], {gpu.node_id: installed})
    with pytest.raises(ClusterError, match="evaluate.precision: .*fp16"):
        require_runtimes(plan, [cpu], {cpu.node_id: installed})


TENSORRT = HEAD + """evaluate:
  targets: [local]
  runtimes: [torch, tensorrt]
  precision: [fp32, fp16]
pipelines:
  - name: trt-int8
    stages:
      - quantize: {engine: tensorrt, weights: int8, activations: int8, per_channel: true}
"""


def test_tensorrt_pairs_float_models_and_its_own_int8_and_runs_only_on_nvidia_nodes():
    plan = _plan(TENSORRT)
    combos = _combos(plan)
    assert combos["baseline"] == {("torch", "fp32"), ("torch", "fp16"), ("tensorrt", "fp32"), ("tensorrt", "fp16")}
    assert combos["trt-int8"] == {("tensorrt", "fp32")}  # explicit Q/DQ: a TensorRT model only
    not_points = {(u.label.split(":")[0], u.runtime, u.precision): u.reason for u in plan.unpaired}
    assert "runs on tensorrt, not on torch" in not_points[("trt-int8", "torch", "fp32")]
    gpu, cpu = _node("g" * 20, "local", gpus=1), _node("c" * 20, "local")
    installed = {"runtimes": {"torch": "2.6", "tensorrt": "10.13"}}
    require_runtimes(plan, [gpu], {gpu.node_id: installed})
    with pytest.raises(ClusterError) as e:  # not "pip install tensorrt": it would not help
        require_runtimes(plan, [cpu], {cpu.node_id: {"runtimes": {"torch": "2.6", "tensorrt": None}}})
    assert "tensorrt does not run on cpu nodes (local node cccccccccccc)" in str(e.value)
    assert "NVIDIA GPU" in str(e.value) and "\n" not in str(e.value)


def test_tensorrt_quantization_is_static():
    text = HEAD + "pipelines:\n  - name: p\n    stages:\n      - quantize: {engine: tensorrt, mode: dynamic, " \
                  "weights: int8}\nevaluate: {runtimes: [tensorrt]}\n"
    with pytest.raises(SpecError, match="engine tensorrt quantizes statically"):
        _plan(text)
