"""workers.stages.registry: a stage kind declares what it reads, where it may run, how
long it takes before anything was measured, and its label -- and nothing else in the
code base needs its name.

The first tests pin the bug the declaration fixed: a ``checkpoint:`` teacher's digest was
only key material, so the coordinator never shipped the file through the object store.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from orchestrator.errors import SpecError
from orchestrator.plan import build_plan, stage_key
from orchestrator.spec import parse_spec
from workers.stages.registry import (
    STAGE_KINDS,
    NoopParams,
    StageInputs,
    StageKind,
    get_kind,
    kind_with_role,
    pipeline_kinds,
    register_kind,
    unregister_kind,
)

SPEC = """name: kinds
seed: 0
model:
  arch: vit_tiny_patch16_224
  kwargs: {{img_size: 8, patch_size: 2, in_chans: 1, depth: 1, embed_dim: 24, num_heads: 2}}
{model_extra}
dataset: {{name: digits}}
{train}
evaluate: {{targets: [local], repeats: 1}}
pipelines:
  - name: kd
    stages:
      - prune: {{method: structured, ratio: 0.5}}
      - distill: {{epochs: 1, teacher: {teacher}}}
"""


def _spec(tmp_path: Path, *, teacher: str, train: str = "train: {epochs: 1}", model_extra: str = ""):
    return parse_spec(SPEC.format(teacher=teacher, train=train, model_extra=model_extra), base_dir=tmp_path,
                      check_arch=False)


def _file(tmp_path: Path, name: str, data: bytes) -> tuple[str, str]:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path.resolve()), hashlib.sha256(data).hexdigest()


def test_a_checkpoint_teacher_is_declared_as_a_file_the_stage_reads(tmp_path: Path) -> None:
    path, sha = _file(tmp_path, "teacher.safetensors", b"teacher weights")
    plan = build_plan(_spec(tmp_path, teacher="checkpoint:teacher.safetensors"))
    distill = next(s for s in plan.stages if s.kind == "distill")
    assert distill.inputs == StageInputs(files=((path, sha),))
    # the key is what it was before the declaration existed: params (less precision, keyed only
    # when it is not fp32) plus the file's digest
    before = {k: v for k, v in distill.params.items() if k != "precision"}
    assert distill.params["precision"] == "fp32"
    assert distill.key == stage_key(distill.parent_key, "distill", {**before, "teacher_sha256": sha})
    # and the params the worker validates carry no digest (its parameter model forbids extras)
    assert "teacher_sha256" not in distill.params
    get_kind("distill").params.model_validate(dict(distill.params))


def test_the_teacher_file_content_not_its_name_makes_the_key(tmp_path: Path) -> None:
    _file(tmp_path, "t.safetensors", b"one")
    first = next(s for s in build_plan(_spec(tmp_path, teacher="checkpoint:t.safetensors")).stages
                 if s.kind == "distill")
    _file(tmp_path, "t.safetensors", b"two")
    second = next(s for s in build_plan(_spec(tmp_path, teacher="checkpoint:t.safetensors")).stages
                  if s.kind == "distill")
    assert first.key != second.key and first.inputs.files[0][1] != second.inputs.files[0][1]


def test_a_baseline_teacher_reads_the_trained_baseline_artifact(tmp_path: Path) -> None:
    plan = build_plan(_spec(tmp_path, teacher="baseline"))
    train = next(s for s in plan.stages if s.kind == "train")
    distill = next(s for s in plan.stages if s.kind == "distill")
    assert distill.params["teacher"] == f"artifact:{train.key}"
    assert distill.inputs == StageInputs(artifacts=(train.key,))


def test_root_stages_read_the_spec_checkpoint(tmp_path: Path) -> None:
    path, sha = _file(tmp_path, "start.safetensors", b"start")
    spec = _spec(tmp_path, teacher="baseline", train="", model_extra="  checkpoint: start.safetensors")
    plan = build_plan(spec)
    prune = next(s for s in plan.stages if s.kind == "prune")
    distill = next(s for s in plan.stages if s.kind == "distill")
    baseline_eval = next(s for s in plan.stages if s.kind == "evaluate" and s.parent_key is None)
    assert prune.parent_key is None and prune.inputs.files == ((path, sha),)
    assert baseline_eval.inputs.files == ((path, sha),)
    # the baseline teacher is the checkpoint itself: a file the distill stage reads too
    assert distill.params["teacher"] == f"checkpoint:{path}" and distill.inputs.files == ((path, sha),)


def test_a_baseline_teacher_without_a_baseline_model_is_a_spec_error(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"pipeline kd: distill.*teacher 'baseline' needs the sweep's baseline"):
        build_plan(parse_spec(SPEC.format(teacher="baseline", train="", model_extra="  pretrained: true"),
                              base_dir=tmp_path, check_arch=False))


def test_the_coordinator_ships_what_the_plan_declares(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipment is read from the planned stage (no hand-built task): the parent
    artifact and the teacher file with its spec-time digest."""
    from types import SimpleNamespace

    from orchestrator.coordinator import Coordinator
    from workers import artifacts

    path, sha = _file(tmp_path, "teacher.safetensors", b"teacher weights")
    plan = build_plan(_spec(tmp_path, teacher="checkpoint:teacher.safetensors"))
    distill = next(s for s in plan.stages if s.kind == "distill")
    put: list[bytes] = []
    monkeypatch.setattr(artifacts, "pack", lambda root, key: b"artifact " + key.encode())
    pool = SimpleNamespace(put=lambda value: put.append(value) or len(put))
    coordinator = SimpleNamespace(options=SimpleNamespace(transfer="object-store"), artifact_root=str(tmp_path),
                                  pool=pool, _blobs={}, _file_bytes=lambda entry: Path(path).read_bytes())
    keys, refs = Coordinator._shipment(coordinator, distill)  # type: ignore[arg-type]
    assert keys == (distill.parent_key, artifacts.file_entry(sha, path))
    assert put == [f"artifact {distill.parent_key}".encode(), b"teacher weights"] and refs == [1, 2]


def test_roles_and_declarations_of_the_shipped_kinds() -> None:
    assert kind_with_role("baseline").name == "train" and kind_with_role("evaluation").name == "evaluate"
    assert pipeline_kinds() == ("prune", "quantize", "finetune", "distill", "qat")
    assert {k for k, sk in STAGE_KINDS.items() if sk.may_wait} == {"train", "finetune", "distill", "qat"}
    assert get_kind("qat").artifact_format({"engine": "openvino"}) == "openvino"
    assert get_kind("qat").consumes == ("torch",)
    assert get_kind("train").default_duration_s == 600.0 and get_kind("prune").default_duration_s == 60.0
    assert get_kind("prune").keeps_zeros({"method": "unstructured"})
    assert not get_kind("prune").keeps_zeros({"method": "structured"})
    assert all(sk.label for sk in STAGE_KINDS.values())


def test_register_refuses_a_reference_that_is_not_a_parameter() -> None:
    with pytest.raises(ValueError, match="reference 'teacher' is not one of its parameters"):
        register_kind(StageKind("broken", NoopParams, "workers.stages.noop:run", False, True, references=("teacher",)))
    assert "broken" not in STAGE_KINDS


@pytest.fixture
def round_kind():
    """A kind the code base has never heard of: its parameter model and runner live in
    ``tests/unit/kind_round.py``, its registration is one call."""
    from tests.unit.kind_round import RoundParams

    kind = register_kind(StageKind("round", RoundParams, "tests.unit.kind_round:run", produces_artifact=True,
                                   flexible=True, default_duration_s=5.0, label="weight rounding"))
    yield kind
    unregister_kind("round")


ROUND_SPEC = SPEC.format(teacher="baseline", train="train: {epochs: 1}", model_extra="").replace(
    "      - distill: {epochs: 1, teacher: baseline}\n", "      - round: {dtype: [float16, bfloat16]}\n")


def test_a_registered_kind_goes_through_spec_and_plan(tmp_path: Path, round_kind: StageKind) -> None:
    plan = build_plan(parse_spec(ROUND_SPEC, base_dir=tmp_path, check_arch=False))
    rounds = [s for s in plan.stages if s.kind == "round"]
    assert [s.params["dtype"] for s in rounds] == ["float16", "bfloat16"]
    assert len([s for s in plan.stages if s.kind == "evaluate" and s.parent_key in {r.key for r in rounds}]) == 2
    assert "round" in pipeline_kinds()
    from orchestrator.scheduler.online import _default_duration_s

    assert _default_duration_s("round") == 5.0
    with pytest.raises(SpecError, match=r"round\.dtype: .*float16"):
        parse_spec(ROUND_SPEC.replace("[float16, bfloat16]", "int3"), base_dir=tmp_path, check_arch=False)


def test_an_unregistered_kind_is_unknown_to_the_spec(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="unknown stage kind 'round'"):
        parse_spec(ROUND_SPEC, base_dir=tmp_path, check_arch=False)


def test_a_registered_kind_runs_in_a_sweep(tmp_path: Path, round_kind: StageKind,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Spec -> plan -> coordinator -> the kind's own runner (executed in-process by the
    fake pool: a Ray worker process would not see a registration made by a test) ->
    artifacts -> evaluations -> stored results, with no other file knowing 'round'."""
    from orchestrator import coordinator as coordinator_module
    from orchestrator.cluster import NodeInfo
    from orchestrator.coordinator import Coordinator, RunOptions, coordinator_id
    from orchestrator.pool.fake import Execute, FakeWorkerPool
    from orchestrator.store import Store

    monkeypatch.setattr(coordinator_module, "WAIT_TICK_S", 0.01)
    text = ROUND_SPEC.replace("evaluate: {targets: [local], repeats: 1}",
                              "evaluate: {targets: [local], repeats: 1, warmup_s: 0, min_window_s: 0, idle_s: 0}")
    spec = parse_spec(text, base_dir=tmp_path, check_arch=False)
    plan = build_plan(spec)
    root = str(tmp_path / "artifacts")
    store = Store.open(f"sqlite:///{tmp_path / 'store.db'}")
    try:
        options = RunOptions()
        store.create_sweep(
            sweep_id="sw-round", name=spec.name, spec_text=spec.source_text, spec_hash=spec.spec_hash,
            artifact_root=root,
            stages=[{"key": s.key, "kind": s.kind, "params": dict(s.params), "parent_key": s.parent_key,
                     "target": s.target} for s in plan.stages],
            points=[{"point_index": p.index, "label": p.label, "pipeline": p.pipeline, "stage_keys": list(p.stage_keys),
                     "target": p.target, "eval_key": p.eval_key} for p in plan.points],
            naive_stage_count=plan.naive_stage_count, options=options.to_json())
        store.take_sweep("sw-round", coordinator_id(), stale_after_s=options.stale_after_s)
        node = NodeInfo(node_id="n" * 32, node_type="local", region="local", num_cpus=1, num_gpus=0,
                        address="127.0.0.1")
        pool = FakeWorkerPool([node], lambda task, node, attempt: Execute())

        class Quiet:
            def __getattr__(self, name):
                return lambda *args, **kwargs: None

        outcome = Coordinator(store=store, spec=spec, plan=plan, sweep_id="sw-round", artifact_root=root, pool=pool,
                              progress=Quiet(), options=options).run()
        assert outcome.status == "succeeded", [s.error for s in store.stages("sw-round") if s.error]
        rows = {r.point: r for r in store.results("sw-round")}
        rounded = [r for label, r in rows.items() if "round(" in label]
        assert len(rounded) == 2 and all(r.top1 is not None and 0 <= r.top1 <= 1 for r in rounded)
        assert {r.stage_kinds[-1] for r in rounded} == {"round"}
        for stage in (s for s in plan.stages if s.kind == "round"):
            assert (tmp_path / "artifacts" / stage.key).is_dir()  # its artifact, under its key
    finally:
        store.close()
