"""Migration 0005 on a store written at 0004: the ``cohorts`` table and the cohort columns
are added with no row lost and nothing backfilled, the old rows read as measured outside
any cohort, and the upgraded store records a cohort; on SQLite always, on PostgreSQL when
``GREENSWEEP_TEST_POSTGRES_URL`` is set (the ``db_url`` fixture)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa

from orchestrator.store import Store, create_engine_for, current, head, migrations, upgrade
from tests.unit.schema_probe import columns, count, tables
from workers.types import EvalRepeat, StageResult

SID = "sw-000000000004"
T0 = datetime(2026, 12, 1, tzinfo=timezone.utc)

# The 0004 tables as that revision wrote them (only the columns these rows fill).
_sweeps = sa.table("sweeps", *(sa.column(c) for c in ("id", "name", "spec_text", "spec_hash", "status",
                                                      "artifact_root", "naive_stage_count", "unique_stage_count")),
                   sa.column("created_at", sa.DateTime(timezone=True)))
_stages = sa.table("stages", *(sa.column(c) for c in ("sweep_id", "key", "position", "kind", "parent_key", "target",
                                                      "status", "attempts", "runtime", "precision",
                                                      "runtime_version")),
                   sa.column("params", sa.JSON()), sa.column("metrics", sa.JSON()))
_points = sa.table("points", *(sa.column(c) for c in ("sweep_id", "point_index", "label", "pipeline", "target",
                                                      "eval_key")),
                   sa.column("stage_keys", sa.JSON()))
_measurements = sa.table("measurements", *(sa.column(c) for c in (
    "sweep_id", "stage_key", "repeat", "samples", "top1", "top5", "duration_s", "time_per_sample_s",
    "throughput_samples_per_s")))


def _write_0004_store(url: str) -> None:
    """A store at 0004: a train and two torch fp32 evaluations measured one after another
    (two repeats each), and one pending evaluation."""
    engine = create_engine_for(url)
    try:
        migrations.upgrade_engine(engine, url, "0004")
        with migrations.write_engine(engine).begin() as c:
            c.execute(_sweeps.insert().values(id=SID, name="old", spec_text="name: old\n", spec_hash="h",
                                              status="running", artifact_root="/a", naive_stage_count=4,
                                              unique_stage_count=4, created_at=T0))
            c.execute(_stages.insert(), [
                {"sweep_id": SID, "key": key, "position": i, "kind": kind, "params": params, "metrics": {},
                 "parent_key": None if i == 0 else "k-train", "target": target, "status": status, "attempts": 1,
                 "runtime": None if target is None else "torch", "precision": None if target is None else "fp32",
                 "runtime_version": None}
                for i, (key, kind, params, target, status) in enumerate((
                    ("k-train", "train", {"epochs": 1}, None, "succeeded"),
                    ("k-eval-a", "evaluate", {"target": "cpu"}, "cpu", "succeeded"),
                    ("k-eval-b", "evaluate", {"target": "cpu"}, "cpu", "succeeded"),
                    ("k-eval-c", "evaluate", {"target": "cpu"}, "cpu", "pending")))])
            c.execute(_points.insert(), [
                {"sweep_id": SID, "point_index": i, "label": f"p{i}", "pipeline": "p", "target": "cpu",
                 "eval_key": key, "stage_keys": ["k-train"]}
                for i, key in enumerate(("k-eval-a", "k-eval-b", "k-eval-c"))])
            c.execute(_measurements.insert(), [
                {"sweep_id": SID, "stage_key": key, "repeat": r, "samples": 100, "top1": 0.9, "top5": 1.0,
                 "duration_s": 1.0, "time_per_sample_s": 0.01, "throughput_samples_per_s": 100.0}
                for key in ("k-eval-a", "k-eval-b") for r in range(2)])
    finally:
        engine.dispose()





def _cohort_result(key: str) -> StageResult:
    cohort: dict[str, Any] = {
        "id": "c-0a1b", "seed": 7, "rounds": 2, "size": 2, "node_id": "node-1", "target": "cpu",
        "reference_key": "k-eval-a", "reference_shown": True, "protocol": {"repeats": 2, "order": "seeded-random"},
        "noise_floor_cv": 0.02, "reference": {"time_per_sample_s": [0.01, 0.0102], "energy_per_sample_j": None,
                                              "top1": 0.9}}
    repeats = tuple(EvalRepeat(repeat=r, samples=100, top1=0.9, top5=1.0, duration_s=0.5, time_per_sample_s=0.005,
                               throughput_samples_per_s=200.0) for r in range(2))
    return StageResult(key=key, kind="evaluate", status="succeeded", duration_s=1.0, node_id="node-1",
                       repeats=repeats, metrics={"cohort": cohort})


def test_upgrade_from_0004_adds_cohorts_and_keeps_every_row(db_url: str) -> None:
    _write_0004_store(db_url)
    assert current(db_url) == "0004" and "cohorts" not in tables(db_url)
    assert "cohort_id" not in columns(db_url, "stages")
    assert upgrade(db_url) == head() == "0005"
    assert "cohorts" in tables(db_url)
    assert {"cohort_id", "position"} <= columns(db_url, "measurements") and "cohort_id" in columns(db_url, "stages")
    assert [count(db_url, t) for t in ("stages", "measurements", "points", "cohorts")] == [4, 4, 3, 0]
    with Store.open(db_url) as store:
        assert all(s.cohort_id is None for s in store.stages(SID))  # nothing backfilled
        assert all((m.cohort_id, m.position) == (None, None) for m in store.measurements(SID))
        assert store.cohorts(SID) == []
        rows = store.results(SID)
        assert [r.repeats for r in rows] == [2, 2, 0]
        assert all(r.verdict_time is None and r.time_ratio_vs_baseline is None for r in rows)
        # the upgraded store records a cohort measurement over an old one
        store.record_stage_result(SID, _cohort_result("k-eval-b"))
        (cohort,) = store.cohorts(SID)
        assert (cohort.id, cohort.seed, cohort.reference_key, cohort.noise_floor_cv) == ("c-0a1b", 7, "k-eval-a", 0.02)
        assert {s.key: s.cohort_id for s in store.stages(SID)}["k-eval-b"] == "c-0a1b"
        assert {m.cohort_id for m in store.measurements(SID, "k-eval-b")} == {"c-0a1b"}
        assert {m.cohort_id for m in store.measurements(SID, "k-eval-a")} == {None}


def test_downgrade_to_0004_drops_cohorts_and_keeps_the_rows(db_url: str) -> None:
    """The columns go in place: no table copy that would cascade-delete the stages'
    measurements and points."""
    _write_0004_store(db_url)
    upgrade(db_url)
    with Store.open(db_url) as store:
        store.record_stage_result(SID, _cohort_result("k-eval-b"))
    engine = create_engine_for(db_url)
    try:
        from alembic import command

        with migrations.write_engine(engine).begin() as connection:
            command.downgrade(migrations.alembic_config(connection), "0004")
    finally:
        engine.dispose()
    assert current(db_url) == "0004" and "cohorts" not in tables(db_url)
    assert not {"cohort_id", "position"} & columns(db_url, "measurements")
    assert "cohort_id" not in columns(db_url, "stages")
    assert [count(db_url, t) for t in ("stages", "measurements", "points")] == [4, 4, 3]
    assert upgrade(db_url) == head()  # and back again
