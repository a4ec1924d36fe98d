"""The store's contract, on every backend: SQLite (a temporary file) always, PostgreSQL
(a fresh schema per test) when ``GREENSWEEP_TEST_POSTGRES_URL`` is set."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import timezone
from pathlib import Path

import pytest
import sqlalchemy as sa

from orchestrator.errors import SchemaMismatchError, StoreError, UsageError, mask_url
from orchestrator.store import Store, create_engine_for, current, default_db_url, head, migrations, upgrade
from orchestrator.store.models import Base
from workers.types import ArtifactInfo, EnergyReading, EvalRepeat, StageResult

POSTGRES_ENV = "GREENSWEEP_TEST_POSTGRES_URL"
TABLES = {"sweeps", "stages", "points", "artifacts", "measurements", "nodes", "stage_progress",
          "stage_attempts", "placements", "artifact_claims", "cohorts", "alembic_version"}



@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    with Store.open(db_url) as s:
        yield s


# A sweep: train -> prune -> quantize, evaluated at the baseline and at the end.
STAGES = [
    {"key": "k-train", "kind": "train", "params": {"epochs": 3, "lr": 0.002}, "parent_key": None},
    {
        "key": "k-prune",
        "kind": "prune",
        "params": {"method": "structured", "ratio": 0.5, "mode": "all"},
        "parent_key": "k-train",
    },
    {
        "key": "k-quant",
        "kind": "quantize",
        "params": {"weights": "int8", "activations": "int8"},
        "parent_key": "k-prune",
    },
    {
        "key": "k-eval0",
        "kind": "evaluate",
        "params": {"target": "cpu", "repeats": 3},
        "parent_key": "k-train",
        "target": "cpu",
    },
    {
        "key": "k-eval1",
        "kind": "evaluate",
        "params": {"target": "cpu", "repeats": 3},
        "parent_key": "k-quant",
        "target": "cpu",
    },
]
POINTS = [
    {
        "point_index": 0,
        "label": "baseline",
        "pipeline": "baseline",
        "stage_keys": ["k-train"],
        "target": "cpu",
        "eval_key": "k-eval0",
    },
    {
        "point_index": 1,
        "label": "structured(all,0.5) > quantize(w8a8)",
        "pipeline": "structured",
        "stage_keys": ["k-train", "k-prune", "k-quant"],
        "target": "cpu",
        "eval_key": "k-eval1",
    },
]


def create(store: Store, sweep_id: str = "sw-000000000001", stages: list[dict] = STAGES) -> None:
    store.create_sweep(sweep_id, "tiny", "name: tiny\n", "hash", "/artifacts", stages, POINTS, naive_stage_count=6)


def artifact_result(key: str, kind: str, *, params: int = 1000, materialized: bool = True) -> StageResult:
    artifact = ArtifactInfo(
        key=key,
        path=f"/artifacts/{key}",
        size_bytes=4096,
        sha256="ab" * 32,
        materialized=materialized,
        params=params,
        macs=10 * params,
        compression={"by": kind},
    )
    return StageResult(
        key=key,
        kind=kind,
        status="succeeded",
        duration_s=2.0,
        node_id="node-a",
        artifact=artifact,
        energy=EnergyReading(duration_s=2.0, cpu_energy_j=30.0, cpu_source="estimate-tdp"),
    )


def eval_result(key: str, top1: list[float], *, energy_j: float | None = 10.0) -> StageResult:
    repeats = tuple(
        EvalRepeat(
            repeat=i,
            samples=100,
            top1=t,
            top5=min(1.0, t + 0.05),
            duration_s=1.0 + i,
            time_per_sample_s=(1.0 + i) / 100,
            throughput_samples_per_s=100 / (1.0 + i),
            energy=None
            if energy_j is None
            else EnergyReading(duration_s=1.0 + i, cpu_energy_j=energy_j * (i + 1), cpu_source="rapl"),
        )
        for i, t in enumerate(top1)
    )
    return StageResult(
        key=key,
        kind="evaluate",
        status="succeeded",
        duration_s=5.0,
        node_id="node-b",
        repeats=repeats,
        metrics={"params": 1, "macs": 2, "size_bytes": 3, "materialized": False},
    )


def count(url: str, table: str) -> int:
    engine = create_engine_for(url)
    try:
        with engine.connect() as c:
            return c.execute(sa.text(f"SELECT COUNT(*) FROM {table}")).scalar_one()
    finally:
        engine.dispose()


# ---------------------------------------------------------------- schema


def test_open_creates_schema_on_empty_database(db_url: str) -> None:
    with Store.open(db_url):
        pass
    engine = create_engine_for(db_url)
    try:
        assert set(sa.inspect(engine).get_table_names()) == TABLES
    finally:
        engine.dispose()
    assert current(db_url) == head() == "0005"
    assert upgrade(db_url) == head()  # idempotent


def test_alembic_head_matches_models(db_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    upgrade(db_url)
    engine = create_engine_for(db_url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()


@pytest.fixture
def newer_scripts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Make this greensweep's head a revision 9999 (a copy of the scripts plus one no-op)."""
    real_head = head()
    scripts = tmp_path / "alembic"
    shutil.copytree(migrations.script_location(), scripts, ignore=shutil.ignore_patterns("__pycache__"))
    (scripts / "versions" / "9999_next.py").write_text(
        f'revision = "9999"\ndown_revision = "{real_head}"\nbranch_labels = None\ndepends_on = None\n\n\n'
        "def upgrade() -> None:\n    pass\n\n\ndef downgrade() -> None:\n    pass\n"
    )
    monkeypatch.setattr(migrations, "script_location", lambda: scripts)
    return "9999"


def test_older_schema_names_the_upgrade_command(db_url: str, newer_scripts: str) -> None:
    engine = create_engine_for(db_url)
    try:
        migrations.upgrade_engine(engine, db_url, "0001")
    finally:
        engine.dispose()
    with pytest.raises(SchemaMismatchError) as info:
        Store.open(db_url)
    message = str(info.value)
    assert message.endswith(f"run: greensweep db upgrade --db {mask_url(db_url)}")
    assert "'0001'" in message and f"'{newer_scripts}'" in message and "\n" not in message

    with Store.open(db_url, upgrade=True):
        pass
    assert current(db_url) == newer_scripts


def test_newer_schema_asks_to_upgrade_greensweep(db_url: str) -> None:
    upgrade(db_url)
    engine = create_engine_for(db_url)
    try:
        with engine.begin() as c:
            c.execute(sa.text("UPDATE alembic_version SET version_num = '9999_future'"))
    finally:
        engine.dispose()
    for attempt in (lambda: Store.open(db_url), lambda: Store.open(db_url, upgrade=True), lambda: upgrade(db_url)):
        with pytest.raises(SchemaMismatchError, match=r"'9999_future'.*newer greensweep.*upgrade greensweep"):
            attempt()


def test_database_with_other_tables_needs_an_explicit_upgrade(db_url: str) -> None:
    engine = create_engine_for(db_url)
    try:
        with engine.begin() as c:
            c.execute(sa.text("CREATE TABLE unrelated (id INTEGER PRIMARY KEY)"))
    finally:
        engine.dispose()
    with pytest.raises(SchemaMismatchError, match="has no greensweep schema; run: greensweep db upgrade --db "):
        Store.open(db_url)
    with Store.open(db_url, upgrade=True):
        pass
    assert current(db_url) == head()


def test_downgraded_database_is_recreated(db_url: str) -> None:
    engine = create_engine_for(db_url)
    try:
        migrations.upgrade_engine(engine, db_url)
        from alembic import command

        with migrations.write_engine(engine).begin() as connection:
            command.downgrade(migrations.alembic_config(connection), "base")
        assert set(sa.inspect(engine).get_table_names()) == {"alembic_version"}
    finally:
        engine.dispose()
    with Store.open(db_url) as store:
        create(store)
    assert current(db_url) == head()


# ---------------------------------------------------------------- connecting


def test_unreachable_postgres_is_one_masked_line() -> None:
    with pytest.raises(StoreError) as info:
        create_engine_for("postgresql://greensweep:s3cret-pw@127.0.0.1:1/sweeps")
    message = str(info.value)
    assert "s3cret-pw" not in message and "greensweep:***@127.0.0.1:1/sweeps" in message
    assert "\n" not in message and "cannot connect" in message
    with pytest.raises(StoreError, match=r"greensweep:\*\*\*@"):
        Store.open("postgresql+psycopg://greensweep:s3cret-pw@127.0.0.1:1/sweeps")


@pytest.mark.parametrize("url", ["not a url", "mysql://u:pw@localhost/db", "postgresql+nosuchdriver://u:pw@h/db"])
def test_bad_urls_are_store_errors(url: str) -> None:
    with pytest.raises(StoreError) as info:
        create_engine_for(url)
    assert "\n" not in str(info.value) and ":pw@" not in str(info.value)


def test_default_url_and_sqlite_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GREENSWEEP_DB_URL", raising=False)
    assert default_db_url() == "sqlite:///./.greensweep/greensweep.db"
    monkeypatch.setenv("GREENSWEEP_DB_URL", f"sqlite:///{tmp_path}/nested/dir/store.db")
    with Store.open() as store:
        assert store.list_sweeps() == []
    assert (tmp_path / "nested" / "dir" / "store.db").is_file()


def test_sqlite_engine_settings(tmp_path: Path) -> None:
    engine = create_engine_for(f"sqlite:///{tmp_path / 's.db'}")
    try:
        with engine.connect() as c:
            assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert c.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000
    finally:
        engine.dispose()


def test_postgresql_scheme_uses_psycopg() -> None:
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        pytest.skip(f"{POSTGRES_ENV} not set")
    plain = sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    engine = create_engine_for(plain)
    try:
        assert engine.dialect.driver == "psycopg"
    finally:
        engine.dispose()


# ---------------------------------------------------------------- writes and reads


def test_create_sweep_and_read_back(store: Store) -> None:
    create(store)
    sweep = store.get_sweep("sw-000000000001")
    assert sweep is not None
    assert (sweep.name, sweep.status, sweep.spec_text) == ("tiny", "pending", "name: tiny\n")
    assert (sweep.naive_stage_count, sweep.unique_stage_count) == (6, 5)
    assert sweep.created_at.tzinfo == timezone.utc and sweep.started_at is None
    stages = store.stages("sw-000000000001")
    assert [s.key for s in stages] == [s["key"] for s in STAGES]  # plan order
    assert stages[1].params == {"method": "structured", "ratio": 0.5, "mode": "all"}
    assert stages[4].target == "cpu" and stages[4].parent_key == "k-quant"
    assert all(s.status == "pending" and s.attempts == 0 and s.energy is None for s in stages)
    assert store.stage_counts("sw-000000000001") == {"pending": 5}
    assert store.get_sweep("sw-nope") is None
    assert store.latest_sweep_id() == "sw-000000000001"


def test_sweep_and_stage_lifecycle(store: Store) -> None:
    create(store)
    sid = "sw-000000000001"
    store.set_sweep_status(sid, "running")
    started = store.get_sweep(sid).started_at
    assert started is not None and started.tzinfo == timezone.utc
    store.mark_stage_running(sid, "k-train", "node-a")
    store.mark_stage_running(sid, "k-train", "node-b")  # a retry
    train = store.stages(sid)[0]
    assert (train.status, train.attempts, train.node_id) == ("running", 2, "node-b")
    store.mark_stage_reused(sid, "k-prune")
    store.mark_stage_skipped(sid, "k-quant", "parent failed\nsecond line")
    failed = StageResult(
        key="k-train",
        kind="train",
        status="failed",
        duration_s=1.5,
        node_id="node-b",
        error="boom: out of memory",
        traceback="Traceback...\nRuntimeError: boom",
    )
    store.record_stage_result(sid, failed)
    stages = {s.key: s for s in store.stages(sid)}
    assert stages["k-quant"].error == "parent failed"
    assert stages["k-train"].error == "boom: out of memory" and "RuntimeError" in stages["k-train"].traceback
    assert store.stage_counts(sid) == {"pending": 2, "failed": 1, "skipped": 1, "reused": 1}
    store.set_sweep_status(sid, "partial")
    sweep = store.get_sweep(sid)
    assert sweep.status == "partial" and sweep.finished_at >= sweep.started_at == started
    store.set_sweep_status(sid, "running")  # resumed
    assert store.get_sweep(sid).finished_at is None and store.get_sweep(sid).started_at == started
    with pytest.raises(ValueError, match="unknown sweep status"):
        store.set_sweep_status(sid, "done")


def test_unknown_ids_are_usage_errors(store: Store) -> None:
    create(store)
    with pytest.raises(UsageError, match="no sweep 'sw-nope'"):
        store.set_sweep_status("sw-nope", "running")
    with pytest.raises(UsageError, match="no stage 'k-nope'"):
        store.mark_stage_running("sw-000000000001", "k-nope", "node-a")
    with pytest.raises(UsageError):
        store.results("sw-nope")


def test_record_stage_result_is_idempotent(store: Store, db_url: str) -> None:
    create(store)
    sid = "sw-000000000001"
    train = artifact_result("k-train", "train")
    evaluation = eval_result("k-eval0", [0.8, 0.9, 0.85])
    for _ in range(2):
        store.record_stage_result(sid, train)
        store.record_stage_result(sid, evaluation)
    assert count(db_url, "artifacts") == 1
    assert count(db_url, "measurements") == 3
    assert [m.repeat for m in store.measurements(sid, "k-eval0")] == [0, 1, 2]
    stage = store.stages(sid)[0]
    assert stage.status == "succeeded" and stage.energy.cpu_energy_j == 30.0
    assert stage.energy.cpu_source == "estimate-tdp" and stage.energy.gpu_energy_j is None

    artifact = store.artifact("k-train")
    assert artifact is not None and artifact.created_by_sweep == sid and artifact.compression == {"by": "train"}
    assert store.artifact("k-nope") is None

    # A replay with fewer repeats leaves exactly the replayed ones.
    store.record_stage_result(sid, replace(evaluation, repeats=evaluation.repeats[:2]))
    assert [m.repeat for m in store.measurements(sid)] == [0, 1]

    # Artifacts are global: another sweep recording the same key updates, not duplicates.
    create(store, "sw-000000000002")
    store.record_stage_result("sw-000000000002", replace(train, artifact=replace(train.artifact, size_bytes=1)))
    assert count(db_url, "artifacts") == 1
    assert store.artifact("k-train").size_bytes == 1 and store.artifact("k-train").created_by_sweep == sid


def test_results_aggregate_repeats(store: Store) -> None:
    create(store)
    sid = "sw-000000000001"
    for key, kind in (("k-train", "train"), ("k-prune", "prune"), ("k-quant", "quantize")):
        store.record_stage_result(sid, artifact_result(key, kind, params={"k-train": 1000}.get(key, 400)))
    store.record_stage_result(sid, eval_result("k-eval1", [0.70, 0.80, 0.90]))
    store.mark_stage_running(sid, "k-eval0", "node-b")

    baseline, compressed = store.results(sid)
    assert (baseline.point_index, baseline.status, baseline.repeats) == (0, "running", 0)
    assert baseline.top1 is None and baseline.time_per_sample_s is None and baseline.energy_per_sample_j is None
    assert baseline.params == 1000 and baseline.materialized is True  # model facts are known anyway

    r = compressed
    assert r.point == "structured(all,0.5) > quantize(w8a8)" and r.pipeline == "structured"
    assert r.stage_keys == ("k-train", "k-prune", "k-quant")
    assert r.stages == (
        "train(epochs=3)",
        "prune(method=structured, ratio=0.5, mode=all)",
        "quantize(weights=int8, activations=int8)",
    )
    assert (r.status, r.target, r.node_id, r.repeats, r.measured_in_sweep) == ("succeeded", "cpu", "node-b", 3, sid)
    assert r.top1 == pytest.approx(0.80) and r.top1_std == pytest.approx(0.10)
    assert r.top5 == pytest.approx(0.85)
    assert r.time_per_sample_s == pytest.approx(0.02) and r.time_per_sample_s_std == pytest.approx(0.01)
    assert r.throughput_samples_per_s == pytest.approx((100 + 50 + 100 / 3) / 3)
    assert r.energy_per_sample_j == pytest.approx(0.2) and r.energy_per_sample_j_std == pytest.approx(0.1)
    assert r.cpu_energy_per_sample_j == pytest.approx(0.2) and r.gpu_energy_per_sample_j is None
    assert r.energy_source == {"cpu": "rapl", "gpu": "none", "dram": "none"}
    assert r.carbon_g_per_sample is None
    assert (r.params, r.macs, r.size_bytes, r.materialized) == (400, 4000, 4096, True)

    store.record_stage_result(sid, eval_result("k-eval0", [0.95], energy_j=None))
    baseline = store.results(sid)[0]
    assert baseline.top1 == pytest.approx(0.95) and baseline.top1_std == 0.0 and baseline.time_per_sample_s_std == 0.0
    assert baseline.energy_per_sample_j is None and baseline.energy_source == {}


def test_reused_evaluation_reports_the_sweep_that_measured_it(store: Store) -> None:
    create(store, "sw-000000000001")
    store.record_stage_result("sw-000000000001", eval_result("k-eval1", [0.5, 0.7]))
    create(store, "sw-000000000002")
    store.mark_stage_reused("sw-000000000002", "k-eval1")
    row = store.results("sw-000000000002")[1]
    assert (row.status, row.measured_in_sweep, row.repeats) == ("reused", "sw-000000000001", 2)
    assert row.top1 == pytest.approx(0.6)
    assert row.params == 1  # no artifact row for k-quant: the evaluation's metrics say it

    # what results() aggregates: the raw, frozen records of each point, from the store
    from orchestrator.report.aggregate import result_rows

    point = store.points("sw-000000000002")[1]
    assert point.evaluation.status == "reused" and point.measured is not None
    assert point.measured.sweep_id == "sw-000000000001" and [m.repeat for m in point.measurements] == [0, 1]
    assert [s.key if s else None for s in point.chain] == list(point.stage_keys) and point.artifact is None
    with pytest.raises(AttributeError):
        point.measurements[0].top1 = 1.0  # type: ignore[misc]
    assert result_rows(store.points("sw-000000000002")) == store.results("sw-000000000002")
    assert store.points("sw-000000000001")[0].measurements == ()  # k-eval0 never ran


def test_create_sweep_writes_all_or_nothing(store: Store, db_url: str) -> None:
    with pytest.raises(StoreError) as info:
        create(store, stages=[*STAGES, STAGES[1]])  # duplicate stage key
    assert "\n" not in str(info.value)
    bad_point = [s for s in STAGES if s["key"] != "k-eval1"]  # a point's eval_key is missing
    with pytest.raises(StoreError):
        create(store, stages=bad_point)
    assert store.list_sweeps() == [] and store.latest_sweep_id() is None
    for table in ("sweeps", "stages", "points"):
        assert count(db_url, table) == 0
    create(store)  # the same id works once the failed attempts left nothing behind
    with pytest.raises(StoreError):
        create(store)  # but only once


def test_nodes_upsert(store: Store) -> None:
    store.upsert_node("node-a", "cpu-xeon", "europe-north1", "host-a", {"cpu": "Xeon"})
    first = store.nodes()[0]
    store.upsert_node("node-a", "cpu-xeon", "europe-north1", "host-a", {"cpu": "Xeon", "cores": 2})
    store.upsert_node("node-b", "gpu-a100", "us-east1", None, {})
    a, b = store.nodes()
    assert (b.node_id, b.node_type) == ("node-b", "gpu-a100")
    assert a.hardware == {"cpu": "Xeon", "cores": 2}
    assert a.first_seen == first.first_seen and a.last_seen >= first.last_seen


def test_a_locked_wal_switch_is_retried_and_other_errors_are_not() -> None:
    """SQLite reports a lock upgrade that would deadlock at once, without its busy timeout:
    the WAL switch of a new file's first connections waits for its turn instead."""
    import sqlite3

    from orchestrator.store.session import _retry_locked

    calls: list[int] = []

    def locked_twice() -> None:
        calls.append(1)
        if len(calls) < 3:
            raise sqlite3.OperationalError("database is locked")

    _retry_locked(locked_twice)
    assert len(calls) == 3

    def broken() -> None:
        calls.append(1)
        raise sqlite3.OperationalError("disk I/O error")

    with pytest.raises(sqlite3.OperationalError, match="disk I/O"):
        _retry_locked(broken)
    assert len(calls) == 4


def test_list_sweeps_newest_first(store: Store) -> None:
    for i in range(3):
        create(store, f"sw-00000000000{i}")
    assert [s.id for s in store.list_sweeps()] == ["sw-000000000002", "sw-000000000001", "sw-000000000000"]
    assert [s.id for s in store.list_sweeps(limit=1)] == ["sw-000000000002"]
    assert store.latest_sweep_id() == "sw-000000000002"


def test_concurrent_sqlite_writers_do_not_lock(tmp_path: Path) -> None:
    """Four writers, each with its own engine (as separate processes would have), race
    to create the schema on an empty file and then write at once."""
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    writers, results_each = 4, 15
    barrier = threading.Barrier(writers)
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            barrier.wait()
            with Store.open(url) as store:
                sid = f"sw-00000000000{n}"
                create(store, sid)
                store.set_sweep_status(sid, "running")
                for i in range(results_each):
                    store.mark_stage_running(sid, "k-eval1", f"node-{n}")
                    store.record_stage_result(sid, eval_result("k-eval1", [0.5 + i / 100] * 3))
                    store.upsert_node(f"node-{n}", "cpu", "eu", None, {"i": i})
                    store.results(sid)
                store.set_sweep_status(sid, "succeeded")
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    with Store.open(url) as store:
        assert len(store.list_sweeps()) == writers
        for n in range(writers):
            assert store.stages(f"sw-00000000000{n}")[4].attempts == results_each
            assert len(store.measurements(f"sw-00000000000{n}")) == 3
    assert count(url, "nodes") == writers


# ------------------------------------------------------------------ real old stores


OLD_STORES = sorted((Path(__file__).parents[1] / "data" / "stores").glob("store-*.db"))


@pytest.mark.parametrize("old", OLD_STORES, ids=lambda p: p.name)
def test_real_old_store_is_refused_then_upgraded_with_its_data(old: Path, tmp_path: Path) -> None:
    """Each kept old-schema SQLite file: refused with the exact command, then upgraded to
    head by `greensweep db upgrade` without losing a row."""
    copy = tmp_path / old.name
    shutil.copy(old, copy)
    url = f"sqlite:///{copy}"
    with pytest.raises(SchemaMismatchError, match=r"run: greensweep db upgrade --db sqlite:///"):
        Store.open(url)
    assert upgrade(url) == head()
    with Store.open(url) as store:
        (sweep,) = store.list_sweeps()
        rows = store.results(sweep.id)
        assert [r.point for r in rows] == ["baseline"] and rows[0].top1 == pytest.approx(0.9)
        key = store.stages(sweep.id)[0].key
        store.record_progress(sweep.id, key, [{"epoch": 1, "val_top1": 0.5}])
        assert store.progress(sweep.id, key) == [{"epoch": 1, "val_top1": 0.5}]


def test_progress_is_idempotent_per_step(store: Store) -> None:
    create(store)
    key = store.stages("sw-000000000001")[0].key
    store.record_progress("sw-000000000001", key, [{"epoch": 1, "loss": 2.0}, {"epoch": 2, "loss": 1.5}])
    store.record_progress("sw-000000000001", key, [{"epoch": 2, "loss": 1.4}, {"step": 3, "loss": 1.2}])
    assert store.progress("sw-000000000001", key) == [
        {"epoch": 1, "loss": 2.0}, {"epoch": 2, "loss": 1.4}, {"step": 3, "loss": 1.2}]
    with pytest.raises(ValueError, match="no 'step' or 'epoch'"):
        store.record_progress("sw-000000000001", key, [{"loss": 1.0}])


def test_carbon_and_net_energy(store: Store) -> None:
    """record_carbon: grams = kWh x intensity on the stage and every repeat, with the
    intensity's value, source and kind; net energy subtracts idle power x window."""
    from orchestrator.carbon import Intensity

    create(store)
    sid = "sw-000000000001"
    result = eval_result("k-eval1", [0.8, 0.8])
    idle = tuple(replace(r, energy=replace(r.energy, cpu_idle_power_w=2.0)) for r in result.repeats)
    store.record_stage_result(sid, replace(result, repeats=idle))
    store.record_carbon(sid, "k-eval1", Intensity(g_co2_per_kwh=360.0, source="static:test 2024",
                                                   kind="average", region="FR"))
    r = store.results(sid)[1]
    # repeats: 10 J in 1 s and 20 J in 2 s over 100 samples; idle 2 W.
    assert r.energy_per_sample_j == pytest.approx(0.15)
    assert r.net_energy_per_sample_j == pytest.approx(((10 - 2) / 100 + (20 - 4) / 100) / 2)
    assert r.idle_power_w == {"cpu": 2.0}
    assert r.carbon_g_per_sample == pytest.approx(0.15 / 3.6e6 * 360.0)
    assert (r.intensity_g_per_kwh, r.intensity_source, r.intensity_kind) == (360.0, "static:test 2024", "average")
    # A stage with no energy figure gets the intensity but no grams.
    store.record_stage_result(sid, eval_result("k-eval0", [0.9], energy_j=None))
    store.record_carbon(sid, "k-eval0", Intensity(g_co2_per_kwh=360.0, source="s", kind="average", region="FR"))
    assert store.results(sid)[0].carbon_g_per_sample is None


# ------------------------------------------------------------------ runtimes (0004)


def runtime_metrics(runtime: str, version: str, precision: str = "fp32", top1_agreement: float = 1.0) -> dict:
    """What an evaluation on *runtime* records beside its repeats (workers/stages/evaluate)."""
    return {"params": 1, "macs": 2, "size_bytes": 3, "materialized": False, "deployable_size_bytes": 5000,
            "runtime": {"runtime": runtime, "runtime_version": version, "precision": precision, "device": "cpu",
                        "threads": {"intra_op": 2, "inter_op": 1}, "settings": {}},
            "agreement": {"top1_agreement": top1_agreement, "max_abs_diff": 1e-6, "max_abs_logit": 9.0,
                          "reference": "the float parent (torch fp32)"}}


def test_evaluations_carry_their_runtime_precision_and_version(store: Store) -> None:
    """create_sweep fills runtime / precision of the stages with a target from their params
    (torch / fp32 when they name none); a recorded result adds the runtime's version."""
    onnx = {"key": "k-eval-ort", "kind": "evaluate", "params": {"target": "cpu", "runtime": "onnxruntime",
                                                                "precision": "fp32"},
            "parent_key": "k-quant", "target": "cpu"}
    points = [*POINTS, {**POINTS[1], "point_index": 2, "eval_key": "k-eval-ort"}]
    sid = "sw-000000000001"
    store.create_sweep(sid, "tiny", "name: tiny\n", "hash", "/artifacts", [*STAGES, onnx], points,
                       naive_stage_count=7)
    by_key = {s.key: s for s in store.stages(sid)}
    assert (by_key["k-train"].runtime, by_key["k-train"].precision) == (None, None)
    assert (by_key["k-eval1"].runtime, by_key["k-eval1"].precision) == ("torch", "fp32")
    assert (by_key["k-eval-ort"].runtime, by_key["k-eval-ort"].precision) == ("onnxruntime", "fp32")
    assert all(s.runtime_version is None for s in by_key.values())

    store.record_stage_result(sid, replace(eval_result("k-eval-ort", [0.79, 0.81]),
                                           metrics=runtime_metrics("onnxruntime", "1.20.1", top1_agreement=0.98)))
    store.record_stage_result(sid, replace(eval_result("k-eval1", [0.8]), metrics=runtime_metrics("torch", "2.6.0")))
    store.record_stage_result(sid, artifact_result("k-train", "train"))  # no runtime: the column stays empty
    by_key = {s.key: s for s in store.stages(sid)}
    assert by_key["k-eval-ort"].runtime_version == "1.20.1" and by_key["k-eval1"].runtime_version == "2.6.0"
    assert by_key["k-train"].runtime_version is None

    rows = store.results(sid)
    assert [(r.point_index, r.runtime, r.precision) for r in rows] == [
        (0, "torch", "fp32"), (1, "torch", "fp32"), (2, "onnxruntime", "fp32")]
    ort = rows[2]
    assert (ort.runtime_version, ort.threads, ort.deployable_size_bytes) == ("1.20.1", {"intra_op": 2, "inter_op": 1},
                                                                             5000)
    assert ort.top1_agreement == pytest.approx(0.98) and ort.top1 == pytest.approx(0.80)
    unmeasured = rows[0]
    assert (unmeasured.runtime_version, unmeasured.threads, unmeasured.top1_agreement) == (None, None, None)

    # A reused evaluation reports the version of the sweep that measured it.
    store.create_sweep("sw-000000000002", "tiny", "name: tiny\n", "hash", "/artifacts", [*STAGES, onnx], points,
                       naive_stage_count=7)
    store.mark_stage_reused("sw-000000000002", "k-eval-ort")
    again = store.results("sw-000000000002")[2]
    assert (again.status, again.runtime, again.runtime_version) == ("reused", "onnxruntime", "1.20.1")


# ------------------------------------------------------------------ cohorts (0005)


@dataclass(frozen=True)
class _Round(EvalRepeat):
    """An evaluation round as a cohort reports it: with its position in the round's order
    (``EvalRepeat.position`` once the worker side has it)."""

    position: int | None = None


def cohort_metrics(cohort_id: str = "c-00aa", *, reference_key: str = "k-eval0", **paired: object) -> dict:
    """What an evaluation measured in a cohort records beside its repeats (workers/stages/evaluate)."""
    return {"params": 1, "macs": 2, "size_bytes": 3, "materialized": False,
            "cohort": {"id": cohort_id, "seed": 1234, "rounds": 3, "size": 2, "node_id": "node-b", "target": "cpu",
                       "reference_key": reference_key, "reference_shown": True,
                       "protocol": {"repeats": 3, "min_window_s": 0.5, "order": "seeded-random"},
                       "noise_floor_cv": 0.021,
                       "reference": {"time_per_sample_s": [0.01, 0.02, 0.03], "energy_per_sample_j": None,
                                     "top1": 0.9}},
            "paired": {"time_ratio_vs_baseline": 1.0, "time_ratio_ci_low": 1.0, "time_ratio_ci_high": 1.0,
                       "verdict_time": "same", "energy_ratio_vs_baseline": None, "energy_ratio_ci_low": None,
                       "energy_ratio_ci_high": None, "verdict_energy": None, "verdict_top1": "same",
                       "top1_mcnemar_p": 1.0, "top1_discordant": [0, 0], "time_ratio_cv": 0.0,
                       "energy_follows_time": False, **paired}}


def cohort_result(key: str, cohort_id: str = "c-00aa", **paired: object) -> StageResult:
    result = eval_result(key, [0.9, 0.8, 0.85])
    rounds = tuple(_Round(**{f: getattr(r, f) for f in ("repeat", "samples", "top1", "top5", "duration_s",
                                                          "time_per_sample_s", "throughput_samples_per_s", "energy")},
                          position=(r.repeat + 1) % 2) for r in result.repeats)
    return replace(result, repeats=rounds, metrics=cohort_metrics(cohort_id, **paired))


def test_a_cohort_is_recorded_once_with_its_members(store: Store, db_url: str) -> None:
    """Members of one cohort recorded one by one, together, and again (a replay) write one
    cohort row; each stage and measurement names it, each round with its position."""
    create(store)
    sid = "sw-000000000001"
    store.record_stage_result(sid, cohort_result("k-eval0"))
    store.record_stage_result(sid, cohort_result("k-eval1", time_ratio_vs_baseline=0.5, verdict_time="faster"))
    store.record_stage_results(sid, [cohort_result("k-eval0"), cohort_result("k-eval1")])  # replayed together
    assert count(db_url, "cohorts") == 1
    (cohort,) = store.cohorts(sid)
    assert (cohort.id, cohort.node_id, cohort.target, cohort.seed, cohort.rounds, cohort.size) == (
        "c-00aa", "node-b", "cpu", 1234, 3, 2)
    assert (cohort.reference_key, cohort.reference_shown, cohort.noise_floor_cv) == ("k-eval0", True, 0.021)
    assert cohort.protocol["order"] == "seeded-random" and cohort.reference["time_per_sample_s"] == [0.01, 0.02, 0.03]
    assert cohort.created_at.tzinfo is timezone.utc
    stages = {s.key: s.cohort_id for s in store.stages(sid)}
    assert stages == {"k-train": None, "k-prune": None, "k-quant": None, "k-eval0": "c-00aa", "k-eval1": "c-00aa"}
    ms = store.measurements(sid, "k-eval1")
    assert [(m.repeat, m.cohort_id, m.position) for m in ms] == [(0, "c-00aa", 1), (1, "c-00aa", 0), (2, "c-00aa", 1)]
    assert count(db_url, "measurements") == 6


def test_two_cohorts_in_one_batch_and_a_later_result_outside_any(store: Store, db_url: str) -> None:
    create(store)
    sid = "sw-000000000001"
    store.record_stage_results(sid, [cohort_result("k-eval0", "c-1"), cohort_result("k-eval1", "c-2")])
    assert [c.id for c in store.cohorts(sid)] == ["c-1", "c-2"]
    store.record_stage_result(sid, eval_result("k-eval1", [0.8]))  # measured again, not in a cohort
    assert {s.key: s.cohort_id for s in store.stages(sid)}["k-eval1"] is None
    assert [(m.cohort_id, m.position) for m in store.measurements(sid, "k-eval1")] == [(None, None)]
    assert count(db_url, "cohorts") == 2  # the cohort stays: it measured k-eval0


@pytest.mark.parametrize("cohort, message", [
    ({"seed": 1, "rounds": 3, "size": 2, "target": "cpu", "reference_key": "k"}, "without id"),
    ({"id": "c-1", "seed": 1, "size": 2, "target": "cpu"}, "without rounds, reference_key"),
    ({"id": "c-1", "seed": "x", "rounds": 3, "size": 2, "target": "cpu", "reference_key": "k"}, "malformed field"),
    ("c-1", "of type str"),
])
def test_a_malformed_cohort_is_refused_and_nothing_is_written(store: Store, db_url: str, cohort: object,
                                                              message: str) -> None:
    create(store)
    sid = "sw-000000000001"
    good = cohort_result("k-eval0")
    bad = replace(cohort_result("k-eval1"), metrics={**cohort_metrics(), "cohort": cohort})
    with pytest.raises(ValueError, match=message) as info:
        store.record_stage_results(sid, [good, bad])
    assert "'k-eval1'" in str(info.value) and "\n" not in str(info.value)
    assert [count(db_url, t) for t in ("cohorts", "measurements")] == [0, 0]
    assert {s.key: s.status for s in store.stages(sid)}["k-eval0"] == "pending"


def test_results_carry_the_paired_figures(store: Store) -> None:
    create(store)
    sid = "sw-000000000001"
    store.record_stage_result(sid, cohort_result("k-eval0"))
    store.record_stage_result(sid, cohort_result("k-eval1", time_ratio_vs_baseline=0.52, time_ratio_ci_low=0.5,
                                                 time_ratio_ci_high=0.55, verdict_time="faster", verdict_top1="worse",
                                                 energy_ratio_vs_baseline=0.53, energy_ratio_ci_low=0.51,
                                                 energy_ratio_ci_high=0.56, verdict_energy="cheaper",
                                                 energy_follows_time=True, time_ratio_cv=0.012))
    base, pruned = store.results(sid)
    assert (base.time_ratio_vs_baseline, base.time_ratio_ci_low, base.time_ratio_ci_high, base.verdict_time) == (
        1.0, 1.0, 1.0, "same")
    assert (pruned.time_ratio_vs_baseline, pruned.time_ratio_ci_low, pruned.time_ratio_ci_high) == (0.52, 0.5, 0.55)
    assert (pruned.verdict_time, pruned.verdict_energy, pruned.verdict_top1) == ("faster", "cheaper", "worse")
    assert (pruned.energy_ratio_vs_baseline, pruned.energy_ratio_ci_low, pruned.energy_ratio_ci_high) == (
        0.53, 0.51, 0.56)
    assert (pruned.cohort_id, pruned.reference_key, pruned.reference_top1) == ("c-00aa", "k-eval0", 0.9)
    assert pruned.reference_time_per_sample_s == pytest.approx(0.02) and pruned.reference_energy_per_sample_j is None
    assert (pruned.energy_follows_time, pruned.time_ratio_cv) == (True, 0.012)
    # A reused evaluation carries the figures of the sweep that measured it.
    store.create_sweep("sw-000000000002", "tiny", "name: tiny\n", "hash", "/artifacts", STAGES, POINTS,
                       naive_stage_count=6)
    store.mark_stage_reused("sw-000000000002", "k-eval1")
    again = store.results("sw-000000000002")[1]
    assert (again.status, again.verdict_time, again.time_ratio_vs_baseline) == ("reused", "faster", 0.52)
    assert store.cohorts("sw-000000000002") == []  # the cohort belongs to the sweep that measured it
