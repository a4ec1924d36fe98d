"""Store: attempts, coordinator ownership and heartbeat, cancel, resume bookkeeping,
artifact claims and placement decisions -- on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import pytest

from orchestrator.errors import UsageError
from orchestrator.store import Store
from tests.unit.test_store import artifact_result, create, store  # noqa: F401 - fixtures
from workers.types import EnergyReading, StageResult

SID = "sw-000000000001"


def test_attempts_are_numbered_and_closed_once(store: Store) -> None:
    create(store)
    assert store.mark_stage_running(SID, "k-train", "node-a") == 1
    store.end_attempt(SID, "k-train", "lost", "worker on node-a died", back_to_pending=True)
    assert store.stages(SID)[0].status == "pending"
    assert store.mark_stage_running(SID, "k-train", "node-b") == 2
    store.record_stage_result(SID, artifact_result("k-train", "train"))
    store.record_stage_result(SID, artifact_result("k-train", "train"))  # replay: still one result
    attempts = store.attempts(SID, "k-train")
    assert [(a.attempt, a.node_id, a.status) for a in attempts] == [(1, "node-a", "lost"), (2, "node-b", "succeeded")]
    assert attempts[0].error == "worker on node-a died" and attempts[1].finished_at is not None
    st = next(s for s in store.stages(SID) if s.key == "k-train")
    assert st.status == "succeeded" and st.attempts == 2


def test_batch_running_and_results_are_one_transaction_each(store: Store) -> None:
    create(store)
    assert store.mark_stages_running(SID, [("k-train", "n"), ("k-eval0", "n")]) == {"k-train": 1, "k-eval0": 1}
    bad = StageResult(key="k-eval0", kind="train", status="succeeded", duration_s=1.0, node_id="n")
    with pytest.raises(ValueError):
        store.record_stage_results(SID, [artifact_result("k-train", "train"), bad])
    # nothing of the failed batch was written
    assert {s.key: s.status for s in store.stages(SID)}["k-train"] == "running"


def test_take_sweep_refuses_a_live_owner_and_takes_a_stale_or_gone_one(store: Store) -> None:
    create(store)
    store.take_sweep(SID, "host-a:1", stale_after_s=60)
    with pytest.raises(UsageError, match="being run by coordinator host-a:1.*greensweep cancel"):
        store.take_sweep(SID, "host-b:2", stale_after_s=60)
    store.take_sweep(SID, "host-b:2", stale_after_s=60, gone=lambda owner: owner == "host-a:1")
    assert store.get_sweep(SID).coordinator == "host-b:2"
    store.take_sweep(SID, "host-c:3", stale_after_s=0)  # heartbeat older than 0 s: stale
    assert store.get_sweep(SID).status == "running" and store.get_sweep(SID).heartbeat_at is not None


def test_take_sweep_has_one_winner_under_a_race(store: Store) -> None:
    create(store)
    store.set_sweep_status(SID, "pending")
    winners, errors = [], []

    def take(owner: str) -> None:
        try:
            store.take_sweep(SID, owner, stale_after_s=60)
            winners.append(owner)
        except UsageError as e:
            errors.append(str(e))

    threads = [threading.Thread(target=take, args=(f"h:{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1 and len(errors) == 3
    assert store.get_sweep(SID).coordinator == winners[0]


def test_cancel_live_is_a_request_dead_is_immediate(store: Store) -> None:
    create(store)
    store.take_sweep(SID, "h:1", stale_after_s=60)
    store.mark_stage_running(SID, "k-train", "n")
    assert store.heartbeat(SID) is False
    assert store.request_cancel(SID, stale_after_s=60) == "requested"
    assert store.heartbeat(SID) is True  # the coordinator sees it on its next heartbeat
    # its coordinator gone: cancelled at once, the running stage back to pending
    assert store.request_cancel(SID, stale_after_s=60, gone=lambda owner: True) == "cancelled"
    assert store.get_sweep(SID).status == "cancelled"
    assert [a.status for a in store.attempts(SID, "k-train")] == ["cancelled"]
    assert next(s for s in store.stages(SID) if s.key == "k-train").status == "pending"
    assert store.request_cancel(SID, stale_after_s=60) == "already-cancelled"  # ended: unchanged


def test_interrupted_stages_lose_their_attempt(store: Store) -> None:
    create(store)
    store.mark_stages_running(SID, [("k-train", "n")])
    assert store.interrupted_stages(SID) == ["k-train"]
    assert [a.status for a in store.attempts(SID, "k-train")] == ["lost"]
    assert next(s for s in store.stages(SID) if s.key == "k-train").status == "pending"


def test_artifact_claims_one_builder_stale_takeover_release(store: Store) -> None:
    create(store)
    create(store, "sw-000000000002")
    assert store.claim_artifact("k-train", SID, stale_after_s=60) is None
    assert store.claim_artifact("k-train", SID, stale_after_s=60) is None  # re-entrant
    assert store.claim_artifact("k-train", "sw-000000000002", stale_after_s=60) == SID
    assert store.claim_artifact("k-train", "sw-000000000002", stale_after_s=0) is None  # stale: taken over
    assert store.claim_artifact("k-train", SID, stale_after_s=60) == "sw-000000000002"
    store.release_artifact("k-train", "sw-000000000002")
    assert store.claim_artifact("k-train", SID, stale_after_s=60) is None
    store.release_sweep(SID, "succeeded")  # releases every claim of the sweep
    assert store.claim_artifact("k-train", "sw-000000000002", stale_after_s=60) is None


def test_placements_and_carbon_savings(store: Store) -> None:
    create(store)
    t0 = datetime(2026, 11, 22, 12, tzinfo=timezone.utc)
    assert store.carbon_savings(SID) is None
    decision = {
        "stage_key": "k-train", "policy": "greedy-carbon", "node_id": "n-fr", "node_type": "cpu-xeon",
        "region": "FR", "start_at": t0, "expected_duration_s": 600.0, "expected_energy_j": 90000.0,
        "expected_intensity_g_per_kwh": 40.0, "expected_carbon_g": 1.0, "estimate_source": "catalog",
        "fifo_node_id": "n-de", "fifo_node_type": "cpu-small", "fifo_region": "DE", "fifo_start_at": t0,
        "fifo_expected_energy_j": 90000.0, "fifo_expected_intensity_g_per_kwh": 400.0,
        "fifo_expected_carbon_g": 10.0,
    }
    store.record_placement(SID, {**decision, "expected_carbon_g": 2.0})
    store.record_placement(SID, decision)  # a re-plan replaces the decision
    store.record_stage_result(SID, StageResult(
        key="k-train", kind="train", status="succeeded", duration_s=500.0, node_id="n-fr",
        energy=EnergyReading(cpu_energy_j=72000.0, cpu_source="estimate-tdp", duration_s=500.0)))
    from orchestrator.carbon.base import Intensity

    store.record_carbon(SID, "k-train", Intensity(region="FR", g_co2_per_kwh=50.0, source="test", kind="average",
                                                  valid_from=t0, valid_to=t0 + timedelta(hours=1)))
    (p,) = store.placements(SID)
    assert p.node_type == "cpu-xeon" and p.fifo_region == "DE" and p.measured_carbon_g == pytest.approx(1.0)
    s = store.carbon_savings(SID)
    assert s["expected_carbon_g"] == 1.0 and s["fifo_expected_carbon_g"] == 10.0
    assert s["saved_expected_g"] == 9.0 and s["saved_expected_pct"] == pytest.approx(90.0)
    assert s["measured_carbon_g"] == pytest.approx(72000 / 3.6e6 * 50.0)
    assert s["stages"][0]["moved"] is True


def test_read_only_open_of_an_empty_database_refuses_and_writes_nothing(db_url: str) -> None:
    import sqlalchemy as sa

    from orchestrator.errors import StoreError

    with pytest.raises(StoreError, match="is empty \\(no sweep has run there\\)"):
        Store.open(db_url, create=False)
    engine = sa.create_engine(db_url)
    try:
        assert sa.inspect(engine).get_table_names() == []
    finally:
        engine.dispose()
    with Store.open(db_url) as store:  # a writer creates the schema as before
        assert store.list_sweeps() == []


def test_every_store_operation_is_in_the_documented_contract() -> None:
    """The SQL store adds no public operation the contract (BaseStore) does not declare
    and document, and leaves none of it abstract."""
    import inspect

    from orchestrator.store import BaseStore

    public = {name for name in dir(Store) if not name.startswith("_")}
    assert public - set(dir(BaseStore)) <= {"open", "masked_url"}  # how the SQL store is opened and named
    assert not Store.__abstractmethods__
    for name in public & set(dir(BaseStore)):
        assert inspect.getdoc(getattr(Store, name)), f"Store.{name} has no contract docstring"
