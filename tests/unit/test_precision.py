"""Mixed-precision training (``precision: fp32|bf16|fp16`` on the kinds that run the shared
loop): stage keys, the loop under autocast on this CPU, the precision recorded, bitwise
resume, placement on nodes whose own hardware runs it, and the run-start refusal."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from orchestrator import cluster
from orchestrator.cluster import NodeInfo, require_needs, with_facts
from orchestrator.errors import CapabilityError, ClusterError, SpecError
from orchestrator.plan import Plan, build_plan, stage_key
from orchestrator.plan import PlannedStage
from orchestrator.pool.fake import FakeWorkerPool
from orchestrator.scheduler import Slot, choose_slot, compatible, unmet
from orchestrator.spec import parse_spec
from tests.cli import run_cli
from workers.checkpoints import checkpoint_dir
from workers.data import load_dataset
from workers.hardware import cpu_flags
from workers.stages import train
from workers.stages.registry import STAGE_KINDS, FinetuneParams, get_kind
from workers.training import CrossEntropy, fit, loop_autocast
from workers.types import DatasetRef, ModelRef, StageTask, WorkerEnv

BF16_FLAGS = {"avx512_bf16", "amx_bf16"}
needs_cpu_bf16 = pytest.mark.skipif(
    not cpu_flags() & BF16_FLAGS,
    reason="this CPU has neither avx512_bf16 nor amx_bf16 in /proc/cpuinfo: bf16 training is refused on it",
)

ENV = WorkerEnv(device="cpu", num_threads=1)
TINY_VIT = ModelRef(
    "vit_tiny_patch16_224",
    {"img_size": 8, "patch_size": 2, "in_chans": 1, "depth": 1, "embed_dim": 48, "num_heads": 3, "drop_rate": 0.1},
)
RESUME_PARAMS = {"epochs": 3, "lr": 3e-3, "batch_size": 64, "augment": "flip-crop", "warmup_epochs": 1}

HEAD = """name: mp
seed: 0
model:
  arch: vit_tiny_patch16_224
  kwargs: {img_size: 8, patch_size: 2, in_chans: 1, depth: 1, embed_dim: 24, num_heads: 2}
dataset: {name: digits, options: {}}
evaluate: {targets: [local], runtimes: [torch, openvino]}
"""


def _spec(train: str = "{epochs: 2}", stages: str = "{}") -> str:
    """A spec with every training kind: train, then finetune, distill and qat, each given *stages*'s params."""
    return HEAD + f"""train: {train}
pipelines:
  - name: retrain
    stages:
      - prune: {{method: unstructured, ratio: 0.5}}
      - finetune: {stages}
      - distill: {stages}
      - qat: {stages}
"""


def _plan(text: str) -> Plan:
    return build_plan(parse_spec(text, base_dir=".", check_arch=False))


def _keys(plan: Plan) -> dict[str, str]:
    return {s.kind: s.key for s in plan.stages if s.kind != "evaluate"}


# --------------------------------------------------------------------------- params and keys


def test_fp32_is_the_default_and_leaves_every_training_kinds_key_unchanged():
    plain = _plan(_spec())
    spelled = _plan(_spec("{epochs: 2, precision: fp32}", "{precision: fp32}"))
    assert _keys(plain) == _keys(spelled)
    assert {s.kind for s in plain.stages} >= {"train", "finetune", "distill", "qat"}
    for st in plain.stages:
        kind = get_kind(st.kind)
        if st.kind == "evaluate":
            continue
        if "precision" in kind.params.model_fields:
            assert st.params["precision"] == "fp32" and "precision" not in kind.key_material(st.params, st.inputs)
            assert "precision" not in st.label
        # the key is the one the stage had before precision existed: of its params without it
        assert st.key == stage_key(st.parent_key or plain.root_key, st.kind, kind.key_material(st.params, st.inputs))


def test_bf16_is_keyed_and_labelled_and_only_changes_what_it_trains():
    plain, mixed = _keys(_plan(_spec())), _plan(_spec(stages="{precision: bf16}"))
    keys = _keys(mixed)
    assert keys["train"] == plain["train"] and keys["prune"] == plain["prune"]  # upstream of any bf16 stage
    assert all(keys[k] != plain[k] for k in ("finetune", "distill", "qat"))
    labels = {s.kind: s.label for s in mixed.stages}
    assert labels["finetune"] == "finetune(precision=bf16)"
    assert _keys(_plan(_spec("{epochs: 2, precision: bf16}")))["train"] != plain["train"]


@pytest.mark.parametrize("train, stages, message", [
    ("{epochs: 2, precision: fp64}", "{}", "train.precision"),
    ("{epochs: 2}", "{precision: int8}", "pipelines[0].stages[1].finetune.precision"),
])
def test_an_unknown_precision_is_a_one_line_spec_error(train: str, stages: str, message: str):
    with pytest.raises(SpecError) as e:
        _plan(_spec(train, stages))
    assert message in str(e.value) and "'fp32', 'bf16' or 'fp16'" in str(e.value) and "\n" not in str(e.value)


def test_precision_is_a_parameter_of_the_training_kinds_only():
    loop = {name for name, kind in STAGE_KINDS.items() if "precision" in kind.params.model_fields}
    assert loop >= {"train", "finetune", "distill", "qat"}
    for name in ("train", "finetune", "distill", "qat"):
        kind = STAGE_KINDS[name]
        assert "precision" in kind.unkeyed_defaults
        assert kind.needs({"precision": "fp32"}) == () and kind.needs({"precision": "bf16"}) == (("torch", "bf16"),)
    with pytest.raises(SpecError, match=r"prune\.precision: unknown parameter"):
        _plan(HEAD + "train: {epochs: 1}\npipelines:\n  - name: p\n    stages:\n"
              "      - prune: {method: structured, ratio: 0.3, precision: bf16}\n")


# --------------------------------------------------------------------------- the loop


def test_the_autocast_follows_precision_and_amp_keeps_its_cuda_only_meaning():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert loop_autocast(FinetuneParams(), cpu).dtype is None  # amp is on by default: no effect on a CPU
    assert loop_autocast(FinetuneParams(), cuda).dtype == torch.bfloat16
    assert loop_autocast(FinetuneParams(amp=False), cuda).dtype is None
    bf16 = loop_autocast(FinetuneParams(precision="bf16", amp=False), cpu)
    assert (bf16.device_type, bf16.dtype, bf16.grad_scaling, bf16.precision) == ("cpu", torch.bfloat16, False, "bf16")
    fp16 = loop_autocast(FinetuneParams(precision="fp16"), cuda)
    assert (fp16.dtype, fp16.grad_scaling, fp16.precision) == (torch.float16, True, "fp16")
    assert fp16.describe() == {"precision": "fp16",
                               "autocast": {"device_type": "cuda", "dtype": "float16", "grad_scaling": True}}


def test_fp16_on_a_cpu_is_refused_before_any_training(tmp_path: Path):
    with pytest.raises(ValueError) as e:
        loop_autocast(FinetuneParams(precision="fp16"), torch.device("cpu"))
    assert "CUDA GPUs only" in str(e.value) and "precision: bf16 or fp32" in str(e.value)
    task = _task(tmp_path, kind="finetune", params={"epochs": 1, "precision": "fp16"})
    with pytest.raises(ValueError, match="fp16 trains on CUDA GPUs only"):
        fit(_mlp(), load_dataset(DatasetRef("digits"), seed=0), FinetuneParams(epochs=1, precision="fp16"),
            objective=CrossEntropy(), input_shape=(1, 8, 8), task=task, env=ENV)
    assert not checkpoint_dir(task).exists()


def _task(root: Path, *, key: str = "ab12", kind: str = "train", params: dict[str, Any] | None = None) -> StageTask:
    return StageTask(sweep_id="sweep", key=key, kind=kind, params=params or {}, parent_key=None, model=TINY_VIT,
                     dataset=DatasetRef("digits"), seed=0, artifact_root=str(root))


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def _fit_recording(root: Path, key: str, precision: str) -> tuple[nn.Module, Any, list[tuple[bool, torch.dtype]], Any]:
    """Fit the MLP for 2 epochs at *precision*, recording (training?, output dtype) of its
    first Linear on every forward pass."""
    torch.set_num_threads(1)
    model, seen = _mlp(), []
    model[1].register_forward_hook(lambda module, args, out: seen.append((module.training, out.dtype)))
    params = FinetuneParams(epochs=2, lr=1e-2, batch_size=64, precision=precision)
    task = _task(root, key=key, kind="finetune", params=params.model_dump(mode="json"))
    optimizer_dtypes: list[torch.dtype] = []
    original = torch.optim.AdamW.step

    def step(self: torch.optim.AdamW, *args: Any, **kwargs: Any) -> Any:
        out = original(self, *args, **kwargs)
        optimizer_dtypes.extend(t.dtype for state in self.state.values() for t in state.values()
                                if isinstance(t, torch.Tensor) and t.dim() > 0)
        return out

    torch.optim.AdamW.step = step  # type: ignore[method-assign]
    try:
        result = fit(model, load_dataset(DatasetRef("digits"), seed=0), params, objective=CrossEntropy(),
                     input_shape=(1, 8, 8), task=task, env=ENV)
    finally:
        torch.optim.AdamW.step = original  # type: ignore[method-assign]
    return model, result, seen, set(optimizer_dtypes)


@needs_cpu_bf16
def test_bf16_trains_and_validates_under_autocast_on_this_cpu_with_fp32_weights(tmp_path: Path):
    model, result, seen, optimizer_dtypes = _fit_recording(tmp_path, "bf01", "bf16")
    assert {dtype for training, dtype in seen if training} == {torch.bfloat16}
    assert {dtype for training, dtype in seen if not training} == {torch.bfloat16}  # validation too
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # mixed precision: fp32 master weights
    assert {t.dtype for t in result.best_state.values()} == {torch.float32}
    assert optimizer_dtypes == {torch.float32}
    metrics = result.metrics()
    assert metrics["precision"] == "bf16"
    assert metrics["autocast"] == {"device_type": "cpu", "dtype": "bfloat16", "grad_scaling": False}
    assert metrics["best_val_top1"] > 0.5  # it learns: digits, 2 epochs

    _, fp32, fp32_seen, _ = _fit_recording(tmp_path, "fp01", "fp32")
    assert {dtype for _, dtype in fp32_seen} == {torch.float32}
    assert fp32.metrics()["precision"] == "fp32" and fp32.metrics()["autocast"] is None
    assert fp32.history[0]["train_loss"] != result.history[0]["train_loss"]  # the comparison can tell


@needs_cpu_bf16
def test_a_killed_bf16_run_resumes_bitwise_and_its_result_records_bf16(tmp_path: Path):
    from workers.modelio import load_artifact

    class Crash(RuntimeError):
        pass

    params = {**RESUME_PARAMS, "precision": "bf16"}
    clean = train.run(_task(tmp_path / "clean", params=params), ENV)
    task = _task(tmp_path / "crash", params=params)

    def crash_after_first_epoch(report: dict[str, Any]) -> None:
        if report["epoch"] == 1:
            raise Crash("killed")

    with pytest.raises(Crash):
        train.run(task, dataclasses.replace(ENV, report_progress=crash_after_first_epoch))
    resumed = train.run(task, ENV)
    assert resumed.metrics["resumed_from_epoch"] == 1
    a = load_artifact(str(tmp_path / "clean"), task.key)[0].state_dict()
    b = load_artifact(str(tmp_path / "crash"), task.key)[0].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert [h["train_loss"] for h in resumed.metrics["history"]] == [h["train_loss"] for h in clean.metrics["history"]]
    # what reaches the stored result
    assert resumed.metrics["precision"] == clean.metrics["precision"] == "bf16"
    assert json.loads(json.dumps(resumed.metrics))["autocast"]["dtype"] == "bfloat16"
    fp32 = train.run(_task(tmp_path / "fp32", params=RESUME_PARAMS), ENV)
    assert fp32.metrics["precision"] == "fp32"
    c = load_artifact(str(tmp_path / "fp32"), task.key)[0].state_dict()
    assert not all(torch.equal(a[n], c[n]) for n in a)  # bf16 did change the training


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_training_on_cuda_scales_the_loss_and_resumes_with_the_scalers_state(tmp_path: Path):
    class Crash(RuntimeError):
        pass

    env = dataclasses.replace(ENV, device="cuda:0")
    params = {**RESUME_PARAMS, "precision": "fp16"}
    task = _task(tmp_path, params=params)

    def crash(report: dict[str, Any]) -> None:
        if report["epoch"] == 1:
            raise Crash("killed")

    with pytest.raises(Crash):
        train.run(task, dataclasses.replace(env, report_progress=crash))
    state = json.loads((checkpoint_dir(task) / "epoch-00001" / "state.json").read_text())
    assert state["grad_scaler"]["scale"] > 0
    out = train.run(task, env)
    assert out.metrics["resumed_from_epoch"] == 1 and out.metrics["precision"] == "fp16"
    assert out.metrics["autocast"] == {"device_type": "cuda", "dtype": "float16", "grad_scaling": True}
    assert out.metrics["best_val_top1"] > 0.2


# --------------------------------------------------------------------------- placement

BF16_NO = "this CPU has neither AVX512-BF16 nor AMX (bf16 would be emulated, slower than fp32)"


def _node(name: str, *, bf16: bool | None, gpus: int = 0, node_type: str = "cpu-xeon",
          region: str = "EU") -> NodeInfo:
    """A node whose facts say whether its torch runs bf16 (None: facts not read)."""
    node = NodeInfo(node_id=name.ljust(24, "0"), node_type=node_type, region=region, num_cpus=2, num_gpus=gpus,
                    address="127.0.0.1")
    if bf16 is None:
        return node
    torch_answers: dict[str, str | None] = {"fp32": None, "bf16": None if bf16 else BF16_NO}
    if gpus:
        torch_answers["fp16"] = None
    return with_facts(node, {"precisions": {"torch": torch_answers}})


def _stage(kind: str = "finetune", precision: str = "bf16", key: str = "k-ft") -> PlannedStage:
    return PlannedStage(key=key, kind=kind, params={**FinetuneParams(precision=precision).model_dump()},
                        parent_key=None, label=f"{kind}(precision={precision})")


def test_a_node_knows_what_its_own_hardware_runs():
    assert _node("a", bf16=True).cannot_run("torch", "bf16") is None
    assert _node("b", bf16=False).cannot_run("torch", "bf16") == BF16_NO
    assert "not fp16" in (_node("c", bf16=True).cannot_run("torch", "fp16") or "")  # a CPU node: torch's declaration
    assert _node("g", bf16=True, gpus=1).cannot_run("torch", "fp16") is None
    assert "did not report" in (_node("u", bf16=None).cannot_run("torch", "bf16") or "")  # unknown: refused


def test_fifo_places_a_bf16_stage_only_on_a_node_that_runs_bf16():
    without, with_bf16 = Slot(_node("a", bf16=False), None), Slot(_node("b", bf16=True), None)
    assert choose_slot(_stage(), [without, with_bf16]) is with_bf16
    assert choose_slot(_stage(precision="fp32"), [without, with_bf16]) is without  # fp32: the first, as always
    assert choose_slot(_stage(), [without]) is None
    assert unmet(_stage(), without.node) == f"bf16: {BF16_NO}"
    gpu, cpu = Slot(_node("g", bf16=True, gpus=1), None), Slot(_node("c", bf16=True), None)
    assert choose_slot(_stage(precision="fp16"), [cpu, gpu]) is gpu
    assert choose_slot(_stage(precision="fp16"), [cpu]) is None
    assert compatible(_stage(precision="fp16"), gpu.node) and not compatible(_stage(precision="fp16"), cpu.node)


def test_the_carbon_placer_never_offers_a_bf16_stage_a_node_without_it():
    from datetime import datetime, timezone

    from orchestrator.catalog import load_catalog
    from orchestrator.scheduler.online import CarbonPlacer, Estimates

    t0 = datetime(2026, 12, 4, 12, 0, tzinfo=timezone.utc)

    class Provider:
        def series(self, region: str, start: datetime, end: datetime, step_s: float) -> list[float]:
            n = int((end - start).total_seconds() // step_s) + 1
            return [{"FR": 40.0, "DE": 400.0}[region]] * n

    class OnePlan:
        def __init__(self, *stages: PlannedStage) -> None:
            self.stages = stages

        def stage(self, key: str) -> PlannedStage:
            return next(s for s in self.stages if s.key == key)

    # two nodes of one type: the clean one's CPU lacks bf16
    clean = Slot(_node("fr", bf16=False, region="FR"), None)
    dirty = Slot(_node("de", bf16=True, region="DE"), None)
    slots = [clean, dirty]
    for stage, expected in ((_stage(precision="fp32", key="k-32"), clean), (_stage(key="k-bf"), dirty)):
        placer = CarbonPlacer(policy="greedy-carbon", provider=Provider(), estimates=Estimates([], load_catalog()),
                              clock=lambda: t0)
        try:
            ((placed, chosen, decision),) = placer.place([stage], slots, slots, {stage.key: "pending"},
                                                         OnePlan(stage))
        finally:
            placer.close()
        assert placed is stage and chosen is expected
        assert decision["node_type"] == "cpu-xeon"  # the real node type is recorded, not the planner's group


def test_the_coordinator_runs_a_bf16_stage_on_the_node_that_can(tmp_path: Path):
    import uuid

    from orchestrator.coordinator import Coordinator, RunOptions, coordinator_id
    from orchestrator.store import Store
    from workers.stages.registry import NoopParams, StageKind, register_kind, unregister_kind

    # a kind whose stages need torch at bf16, running as a no-op: the coordinator's placement alone is tested
    register_kind(StageKind("bf16_noop", NoopParams, "workers.stages.noop:run", produces_artifact=False,
                            flexible=True, hidden=True, needs=lambda params: (("torch", "bf16"),)))
    try:
        root = stage_key("root", "fake", {"run": uuid.uuid4().hex})
        stages = [PlannedStage(stage_key(root, "bf16_noop", {"index": i}), "bf16_noop", {"index": i}, None,
                               f"bf16_noop({i})") for i in range(3)]
        plan = Plan(root_key=root, stages=tuple(stages), points=(), naive_stage_count=3,
                    _by_key={s.key: s for s in stages})
        without, capable = _node("a", bf16=False), _node("b", bf16=True)
        pool = FakeWorkerPool([without, capable])
        spec = parse_spec("name: fake\nmodel: {arch: noop, pretrained: true}\ndataset: {name: synthetic}\n",
                          check_arch=False)
        with Store.open(f"sqlite:///{tmp_path / 'store.db'}") as store:
            sweep_id = "sw-000000000bf1"
            store.create_sweep(sweep_id=sweep_id, name="fake", spec_text=spec.source_text, spec_hash=spec.spec_hash,
                               artifact_root=str(tmp_path), stages=[{"key": s.key, "kind": s.kind,
                                                                     "params": dict(s.params), "parent_key": None,
                                                                     "target": None} for s in stages],
                               points=[], naive_stage_count=3, options=RunOptions().to_json())
            store.take_sweep(sweep_id, coordinator_id(), stale_after_s=60.0)

            class Quiet:
                def __getattr__(self, name: str) -> Any:
                    return lambda *args, **kwargs: None

            outcome = Coordinator(store=store, spec=spec, plan=plan, sweep_id=sweep_id, artifact_root=str(tmp_path),
                                  pool=pool, progress=Quiet()).run()
        assert outcome.status == "succeeded"
        assert {node_id for node_id, _ in pool.started} == {capable.node_id}
    finally:
        unregister_kind("bf16_noop")


# --------------------------------------------------------------------------- run start


def test_run_start_refuses_a_precision_no_live_node_runs_in_one_line():
    plan = _plan(_spec(stages="{precision: bf16}"))
    require_needs(plan, [_node("a", bf16=False), _node("b", bf16=True)])  # one node can: fine
    with pytest.raises(CapabilityError) as e:
        require_needs(plan, [_node("a", bf16=False)])
    msg = str(e.value)
    assert "finetune(precision=bf16) (and 2 more stage(s)): precision bf16 runs on no live node" in msg
    assert BF16_NO in msg and "cpu-xeon node a00000000000" in msg
    assert "use precision: fp32, or add a node with a CPU with AVX512-BF16 or AMX" in msg and "\n" not in msg
    assert e.value.exit_code == 2 and isinstance(e.value, SpecError) and isinstance(e.value, ClusterError)
    with pytest.raises(CapabilityError, match="precision fp16 runs on no live node .* add a node with a CUDA GPU"):
        require_needs(_plan(_spec("{epochs: 1, precision: fp16}")), [_node("b", bf16=True)])
    require_needs(_plan(_spec("{epochs: 1, precision: fp16}")), [_node("b", bf16=True), _node("g", bf16=True, gpus=1)])
    require_needs(_plan(_spec()), [_node("u", bf16=None)])  # fp32 asks nothing of a node


def test_run_with_bf16_where_no_node_runs_it_exits_2_before_anything_is_written(tmp_path: Path, monkeypatch,
                                                                                capsys):
    from orchestrator.pool import ray as ray_pool

    local = NodeInfo(node_id="l" * 24, node_type="local", region="local", num_cpus=2, num_gpus=0,
                     address="127.0.0.1")
    no_bf16 = {"precisions": {"torch": {"fp32": None, "bf16": BF16_NO}}, "runtimes": {"torch": torch.__version__}}
    monkeypatch.setattr(cluster, "connect", lambda *args, **kwargs: None)
    monkeypatch.setattr(cluster, "discover_nodes", lambda: [local])
    monkeypatch.setattr(cluster, "shutdown", lambda: None)
    monkeypatch.setattr(ray_pool, "RayWorkerPool",
                        lambda nodes, cache_dir=None: FakeWorkerPool(nodes, facts={local.node_id: no_bf16}))
    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "s.yaml"
    spec.write_text(HEAD.replace("runtimes: [torch, openvino]", "runtimes: [torch]")
                    + "train: {epochs: 1, precision: bf16}\n")
    db = tmp_path / "store.db"
    code, out, err = run_cli(["run", str(spec), "--db", f"sqlite:///{db}"], capsys)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: train(epochs=1, precision=bf16): precision bf16 runs on no")
    assert BF16_NO in err and "use precision: fp32" in err and "Traceback" not in err
    assert not db.exists() and not (tmp_path / ".greensweep").exists()
