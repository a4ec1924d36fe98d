"""Migration 0004 on a store written at 0003: the runtime columns are added and the old
evaluate rows backfilled, with no row lost; on SQLite always, on PostgreSQL when
``GREENSWEEP_TEST_POSTGRES_URL`` is set (the ``db_url`` fixture)."""

from __future__ import annotations

import importlib.util
import shutil
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import sqlalchemy as sa

from orchestrator.store import Store, create_engine_for, current, head, migrations, upgrade
from orchestrator.store.records import DEFAULT_PRECISION, DEFAULT_RUNTIME
from tests.unit.schema_probe import columns, count

SID = "sw-000000000003"
T0 = datetime(2026, 11, 30, tzinfo=timezone.utc)
TORCH_DESCRIBED = {"runtime": "torch", "runtime_version": "2.6.0+cpu", "precision": "fp32", "device": "cpu",
                   "threads": {"intra_op": 2, "inter_op": 1}, "settings": {}}

# The 0003 tables as that revision wrote them (only the columns these rows fill).
_sweeps = sa.table("sweeps", *(sa.column(c) for c in ("id", "name", "spec_text", "spec_hash", "status",
                                                      "artifact_root", "naive_stage_count", "unique_stage_count")),
                   sa.column("created_at", sa.DateTime(timezone=True)))
_stages = sa.table("stages", *(sa.column(c) for c in ("sweep_id", "key", "position", "kind", "parent_key", "target",
                                                      "status", "attempts")),
                   sa.column("params", sa.JSON()), sa.column("metrics", sa.JSON()))
_points = sa.table("points", *(sa.column(c) for c in ("sweep_id", "point_index", "label", "pipeline", "target",
                                                      "eval_key")),
                   sa.column("stage_keys", sa.JSON()))
_measurements = sa.table("measurements", *(sa.column(c) for c in (
    "sweep_id", "stage_key", "repeat", "samples", "top1", "top5", "duration_s", "time_per_sample_s",
    "throughput_samples_per_s")))


def _stage(key: str, position: int, kind: str, params: dict[str, Any], metrics: dict[str, Any], *,
           target: str | None = None, status: str = "succeeded") -> dict[str, Any]:
    return {"sweep_id": SID, "key": key, "position": position, "kind": kind, "params": params, "metrics": metrics,
            "parent_key": None if position == 0 else "k-train", "target": target, "status": status, "attempts": 1}


def _write_0003_store(url: str) -> None:
    """A store at 0003 with a sweep as greensweep wrote it then: a train, an evaluation that
    recorded a torch description in its metrics, one that ran before evaluations recorded
    any, one pending, and one whose params already name a runtime."""
    engine = create_engine_for(url)
    try:
        migrations.upgrade_engine(engine, url, "0003")
        with migrations.write_engine(engine).begin() as c:
            c.execute(_sweeps.insert().values(id=SID, name="old", spec_text="name: old\n", spec_hash="h",
                                              status="succeeded", artifact_root="/a", naive_stage_count=5,
                                              unique_stage_count=5, created_at=T0))
            c.execute(_stages.insert(), [
                _stage("k-train", 0, "train", {"epochs": 1}, {"best_val_top1": 0.9}),
                _stage("k-eval-described", 1, "evaluate", {"target": "cpu", "repeats": 2},
                       {"params": 10, "runtime": TORCH_DESCRIBED, "deployable_size_bytes": 4096}, target="cpu"),
                _stage("k-eval-bare", 2, "evaluate", {"target": "gpu"}, {"params": 10}, target="gpu"),
                _stage("k-eval-pending", 3, "evaluate", {"target": "arm"}, {}, target="arm", status="pending"),
                _stage("k-eval-ort", 4, "evaluate", {"target": "cpu", "runtime": "onnxruntime", "precision": "bf16"},
                       {}, target="cpu", status="failed"),
            ])
            c.execute(_points.insert(), [
                {"sweep_id": SID, "point_index": i, "label": "baseline", "pipeline": "baseline", "target": t,
                 "eval_key": key, "stage_keys": ["k-train"]}
                for i, (t, key) in enumerate((("cpu", "k-eval-described"), ("gpu", "k-eval-bare"),
                                              ("arm", "k-eval-pending"), ("cpu", "k-eval-ort")))])
            c.execute(_measurements.insert(), [
                {"sweep_id": SID, "stage_key": key, "repeat": r, "samples": 100, "top1": 0.9, "top5": 1.0,
                 "duration_s": 1.0, "time_per_sample_s": 0.01, "throughput_samples_per_s": 100.0}
                for key in ("k-eval-described", "k-eval-bare") for r in range(2)])
    finally:
        engine.dispose()




def test_upgrade_from_0003_backfills_evaluations(db_url: str) -> None:
    _write_0003_store(db_url)
    assert current(db_url) == "0003" and not {"runtime", "precision", "runtime_version"} & columns(db_url, "stages")
    assert upgrade(db_url) == head()  # through 0004, to the head
    with Store.open(db_url) as store:
        stages = {s.key: s for s in store.stages(SID)}
        assert {k: (s.runtime, s.precision, s.runtime_version) for k, s in stages.items()} == {
            "k-train": (None, None, None),  # not an evaluation
            "k-eval-described": ("torch", "fp32", "2.6.0+cpu"),
            "k-eval-bare": ("torch", "fp32", None),  # measured before evaluations named their runtime
            "k-eval-pending": ("torch", "fp32", None),
            "k-eval-ort": ("onnxruntime", "bf16", None),  # its params say so
        }
        rows = store.results(SID)
        assert [(r.target, r.runtime, r.precision, r.status) for r in rows] == [
            ("cpu", "torch", "fp32", "succeeded"), ("gpu", "torch", "fp32", "succeeded"),
            ("arm", "torch", "fp32", "pending"), ("cpu", "onnxruntime", "bf16", "failed")]
        assert rows[0].runtime_version == "2.6.0+cpu" and rows[0].threads == {"intra_op": 2, "inter_op": 1}
        assert rows[0].deployable_size_bytes == 4096 and rows[0].top1 == pytest.approx(0.9)
        assert rows[1].runtime_version is None and rows[1].threads is None and rows[1].repeats == 2
    assert (count(db_url, "measurements"), count(db_url, "points"), count(db_url, "stages")) == (4, 4, 5)


def test_downgrade_to_0003_drops_the_columns_and_keeps_the_rows(db_url: str) -> None:
    """The columns go in place: no table copy that would cascade-delete the stages'
    measurements and points."""
    _write_0003_store(db_url)
    upgrade(db_url)
    engine = create_engine_for(db_url)
    try:
        from alembic import command

        with migrations.write_engine(engine).begin() as connection:
            command.downgrade(migrations.alembic_config(connection), "0003")
    finally:
        engine.dispose()
    assert current(db_url) == "0003" and not {"runtime", "precision", "runtime_version"} & columns(db_url, "stages")
    assert (count(db_url, "measurements"), count(db_url, "points"), count(db_url, "stages")) == (4, 4, 5)
    assert upgrade(db_url) == head()  # and back again


def test_kept_0001_store_reads_as_torch_fp32(tmp_path: Path) -> None:
    (old,) = sorted((Path(__file__).parents[1] / "data" / "stores").glob("store-0001.db"))
    copy = tmp_path / old.name
    shutil.copy(old, copy)
    url = f"sqlite:///{copy}"
    upgrade(url)
    with Store.open(url) as store:
        (sweep,) = store.list_sweeps()
        evaluations = [s for s in store.stages(sweep.id) if s.kind == "evaluate"]  # this one has no target column
        assert evaluations and all((s.runtime, s.precision) == ("torch", "fp32") for s in evaluations)
        assert [(r.runtime, r.precision) for r in store.results(sweep.id)] == [("torch", "fp32")]


def _migration() -> ModuleType:
    path = migrations.script_location() / "versions" / "0004_runtime_precision.py"
    spec = importlib.util.spec_from_file_location("greensweep_migration_0004", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_backfill_defaults_are_the_evaluate_params_defaults() -> None:
    """The migration (a snapshot), the store and the evaluate stage agree on what an
    evaluation that names no runtime or precision runs on."""
    from workers.stages.registry import EvaluateParams

    params = EvaluateParams()
    migration = _migration()
    assert (params.runtime, params.precision) == (DEFAULT_RUNTIME, DEFAULT_PRECISION)
    assert (migration.DEFAULT_RUNTIME, migration.DEFAULT_PRECISION) == (DEFAULT_RUNTIME, DEFAULT_PRECISION)
