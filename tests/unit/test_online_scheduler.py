"""orchestrator.scheduler.online: the coordinator's carbon-aware placement, without Ray.

Slots are plain objects; intensity comes from a fake provider with known hourly series,
so the expected decisions (and their fifo counterfactuals) are known exactly.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from orchestrator.catalog import load_catalog
from orchestrator.cluster import NodeInfo
from orchestrator.plan import PlannedStage
from orchestrator.scheduler import Slot, choose_slot
from orchestrator.scheduler.online import CarbonPlacer, Estimates, policy_for

T0 = datetime(2026, 11, 22, 12, 0, tzinfo=timezone.utc)


class FakeProvider:
    """Hourly intensity per region, from T0 on."""

    def __init__(self, series: dict[str, list[float]]) -> None:
        self.data = series

    def series(self, region: str, start: datetime, end: datetime, step_s: float) -> list[float]:
        offset = int((start - T0.replace(minute=0)).total_seconds() // 3600)
        n = int((end - start).total_seconds() // step_s) + 1
        s = self.data[region]
        return [s[min(len(s) - 1, offset + i)] for i in range(n)]


class FakePlan:
    def __init__(self, stages: list[PlannedStage]) -> None:
        self.stages = tuple(stages)

    def stage(self, key: str) -> PlannedStage:
        return next(s for s in self.stages if s.key == key)


def slot(node_id: str, node_type: str, region: str) -> Slot:
    return Slot(node=NodeInfo(node_id=node_id, node_type=node_type, region=region, num_cpus=1, num_gpus=0,
                              address="127.0.0.1"), handle=None)


TRAIN = PlannedStage(key="k-train", kind="train", params={}, parent_key=None, label="train")
EVAL_SMALL = PlannedStage(key="k-ev-s", kind="evaluate", params={}, parent_key="k-train", label="evaluate",
                          target="cpu-small")
EVAL_XEON = PlannedStage(key="k-ev-x", kind="evaluate", params={}, parent_key="k-train", label="evaluate",
                         target="cpu-xeon")
PLAN = FakePlan([TRAIN, EVAL_SMALL, EVAL_XEON])


def placer(policy: str, series: dict[str, list[float]], *, deadline: datetime | None = None,
           now: list[datetime] | None = None) -> CarbonPlacer:
    clock = now or [T0]
    return CarbonPlacer(policy=policy, provider=FakeProvider(series), estimates=Estimates([], load_catalog()),
                        deadline=deadline, clock=lambda: clock[0])


def test_greedy_moves_training_to_the_clean_region_and_records_fifo() -> None:
    dirty, clean = slot("n-de", "cpu-small", "DE"), slot("n-fr", "cpu-xeon", "FR")
    slots = [dirty, clean]
    assert choose_slot(TRAIN, slots) is dirty  # what fifo does: the first compatible slot
    p = placer("greedy-carbon", {"DE": [400.0] * 72, "FR": [40.0] * 72})
    status = {"k-train": "pending", "k-ev-s": "pending", "k-ev-x": "pending"}
    ((stage, chosen, d),) = p.place([TRAIN], slots, slots, status, PLAN)
    assert stage is TRAIN and chosen is clean
    assert d["region"] == "FR" and d["fifo_region"] == "DE" and d["fifo_node_id"] == "n-de"
    assert d["start_at"] == T0 and d["estimate_source"] == "catalog"
    # catalog: cpu-xeon 160 W, relative speed 2 -> 300 s; cpu-small 15 W, speed 0.5 -> 1200 s
    assert d["expected_duration_s"] == pytest.approx(300.0)
    assert d["expected_carbon_g"] == pytest.approx(160 * 300 / 3.6e6 * 40.0)
    assert d["fifo_expected_carbon_g"] == pytest.approx(15 * 1200 / 3.6e6 * 400.0)
    assert d["expected_intensity_g_per_kwh"] == pytest.approx(40.0)


def test_evaluations_stay_pinned_to_their_target_type() -> None:
    dirty, clean = slot("n-de", "cpu-small", "DE"), slot("n-fr", "cpu-xeon", "FR")
    p = placer("greedy-carbon", {"DE": [400.0] * 72, "FR": [40.0] * 72})
    status = {"k-train": "succeeded", "k-ev-s": "pending", "k-ev-x": "pending"}
    out = p.place([EVAL_SMALL, EVAL_XEON], [dirty, clean], [dirty, clean], status, PLAN)
    placed = {stage.key: s.node.node_type for stage, s, _ in out}
    assert placed == {"k-ev-s": "cpu-small", "k-ev-x": "cpu-xeon"}  # the dirty grid too: the target is the point


def test_carbon_deadline_waits_for_the_clean_window_then_starts() -> None:
    only = slot("n-de", "cpu-xeon", "DE")
    now = [T0]
    series = {"DE": [500.0, 500.0, 500.0, 50.0] + [500.0] * 68}
    p = placer("carbon-deadline", series, deadline=T0 + timedelta(hours=24), now=now)
    status = {"k-train": "pending", "k-ev-s": "pending", "k-ev-x": "pending"}
    plan = FakePlan([TRAIN])
    assert p.place([TRAIN], [only], [only], status, plan) == []  # hours 0-2 are dirty: it waits
    now[0] = T0 + timedelta(hours=3)
    ((_, chosen, d),) = p.place([TRAIN], [only], [only], status, plan)
    assert chosen is only and d["expected_intensity_g_per_kwh"] == pytest.approx(50.0)


def test_measured_durations_replace_the_catalog() -> None:
    est = Estimates([("train", "cpu-xeon", 100.0, 5000.0), ("train", "cpu-xeon", 300.0, 15000.0)], load_catalog())
    e = est.get("train", "cpu-xeon")
    assert e.source == "measured" and e.duration_s == 200.0 and e.power_w == pytest.approx(50.0)
    assert est.get("prune", "cpu-xeon").source == "catalog"


def test_a_type_not_measured_yet_is_scaled_from_one_that_was() -> None:
    """cpu-small (15 W, speed 0.5) from cpu-xeon runs (160 W, speed 2): 4x the time at
    15/160 of the measured power -- not 15 W nominal against a measured 50 W."""
    est = Estimates([("train", "cpu-xeon", 100.0, 5000.0), ("train", "cpu-xeon", 300.0, 15000.0)], load_catalog())
    e = est.get("train", "cpu-small")
    assert e.source == "scaled"
    assert e.duration_s == pytest.approx(200.0 * 2 / 0.5) and e.power_w == pytest.approx(50.0 * 15 / 160)


def test_policy_defaults() -> None:
    from types import SimpleNamespace

    from orchestrator.spec import SchedulingSpec

    assert policy_for(SimpleNamespace(scheduling=SchedulingSpec(), carbon=None)) == "fifo"
    assert policy_for(SimpleNamespace(scheduling=SchedulingSpec(), carbon=object())) == "greedy-carbon"
    assert policy_for(SimpleNamespace(scheduling=SchedulingSpec(deadline_h=5), carbon=object())) == "carbon-deadline"
    assert policy_for(SimpleNamespace(scheduling=SchedulingSpec(policy="fifo"), carbon=object())) == "fifo"


def test_a_finished_stage_teaches_the_estimates_and_forces_a_replan() -> None:
    from workers.types import EnergyReading, StageResult

    p = placer("greedy-carbon", {"DE": [400.0] * 72, "FR": [40.0] * 72})
    node = slot("n-fr", "cpu-xeon", "FR").node
    p._dirty = False
    p.observe(TRAIN, node, StageResult(key="k-train", kind="train", status="succeeded", duration_s=50.0,
                                       node_id="n-fr", energy=EnergyReading(duration_s=50.0, cpu_energy_j=1000.0)))
    e = p.estimates.get("train", "cpu-xeon")
    assert (e.source, e.duration_s, e.power_w) == ("measured", 50.0, 20.0)
    assert p._dirty


def test_the_plan_keeps_the_clock_hours_of_the_intensity_series() -> None:
    """Re-planned at 12:30, the series' element for 13:00-14:00 still covers 13:00-14:00:
    the training waits for 13:00 sharp, not for 13:30 (an axis starting at "now")."""
    clean = slot("n-fr", "cpu-xeon", "FR")
    now = [T0 + timedelta(minutes=30)]
    p = placer("carbon-deadline", {"FR": [500.0, 50.0] + [500.0] * 70}, deadline=T0 + timedelta(hours=24), now=now)
    status = {"k-train": "pending", "k-ev-s": "pending", "k-ev-x": "pending"}
    assert p.place([TRAIN], [clean], [clean], status, PLAN) == []
    assert p.held["k-train"][1] == T0 + timedelta(hours=1)
    where_when, note = p.held_notes([clean])["k-train"]
    assert where_when == ("n-fr", "2026-11-22 13:00") and "planned start 2026-11-22 13:00 UTC on cpu-xeon/FR" in note
    assert "fifo would start it 12:30 on cpu-xeon/FR" in note
    now[0] = T0 + timedelta(hours=1)
    ((stage, chosen, d),) = p.place([TRAIN], [clean], [clean], status, PLAN)
    assert chosen is clean and d["start_at"] == T0 + timedelta(hours=1)
    assert d["expected_intensity_g_per_kwh"] == pytest.approx(50.0)


def test_a_stage_only_queued_for_a_busy_slot_is_not_reported_as_waiting() -> None:
    a = PlannedStage(key="k-pa", kind="prune", params={}, parent_key=None, label="prune a")
    b = PlannedStage(key="k-pb", kind="prune", params={}, parent_key=None, label="prune b")
    clean = slot("n-fr", "cpu-xeon", "FR")
    p = placer("greedy-carbon", {"FR": [40.0] * 72})
    ((stage, _, _),) = p.place([a, b], [clean], [clean], {"k-pa": "pending", "k-pb": "pending"}, FakePlan([a, b]))
    assert stage is a and set(p.held) == {"k-pb"}  # planned after a, on the only slot: as fifo would
    assert p.held_notes([clean]) == {}


def test_plans_on_stale_or_fallback_intensity_are_labelled_and_warned_once() -> None:
    """Local data that stops covering the window: the next hour is planned on the last
    series, labelled stale; a region that never had data gets the labelled fallback,
    and a decision that compares it with another region carries the worse label."""
    from orchestrator.carbon import CarbonDataError

    class Failing(FakeProvider):
        broken: set[str] = set()

        def series(self, region: str, start: datetime, end: datetime, step_s: float) -> list[float]:
            if region in self.broken:
                raise CarbonDataError(f"carbon: trace {region}-2020-hourly does not cover the window")
            return super().series(region, start, end, step_s)

    provider = Failing({"DE": [400.0] * 72, "FR": [40.0] * 72})
    provider.broken = {"PL"}
    now, warnings = [T0], []
    p = CarbonPlacer(policy="greedy-carbon", provider=provider, estimates=Estimates([], load_catalog()),
                     warn=warnings.append, clock=lambda: now[0])
    de, fr = slot("n-de", "cpu-xeon", "DE"), slot("n-fr", "cpu-xeon", "FR")
    status = {"k-train": "pending"}
    ((_, chosen, d),) = p.place([TRAIN], [fr], [fr], status, FakePlan([TRAIN]))
    assert d["estimate_source"] == "catalog" and warnings == []
    provider.broken = {"PL", "FR"}
    now[0] = T0 + timedelta(hours=1)
    p._dirty = True
    ((_, chosen, d),) = p.place([TRAIN], [fr], [fr], status, FakePlan([TRAIN]))
    assert d["estimate_source"] == "catalog+stale-intensity" and d["expected_intensity_g_per_kwh"] == pytest.approx(40.0)
    (warning,) = warnings
    assert "region 'FR' is not available for 2026-11-22 13:00 UTC" in warning and "does not cover the window" in warning
    assert "series fetched 2026-11-22 12:00 UTC, labelled stale-intensity" in warning
    p._dirty = True
    p.place([TRAIN], [fr], [fr], status, FakePlan([TRAIN]))
    assert len(warnings) == 1  # said once per change, not per re-plan
    pl = slot("n-pl", "cpu-xeon", "PL")
    p._dirty = True
    ((_, chosen, d),) = p.place([TRAIN], [pl, de], [pl, de], status, FakePlan([TRAIN]))
    assert chosen is de and d["fifo_region"] == "PL"  # fifo takes the first slot, priced at the fallback
    assert d["estimate_source"] == "catalog+fallback-intensity"
    assert "no carbon intensity for region 'PL'" in warnings[-1] and "fallback 475 g/kWh (static:iea-2019)" in warnings[-1]


def test_when_no_plan_can_be_made_stages_go_on_by_fifo_and_it_is_said_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A carbon error while planning must not stall the sweep: fifo places the ready
    stages (no carbon decision stored), the warning is given once, and planning is tried
    again after REPLAN_S rather than on every tick."""
    from orchestrator.carbon import CarbonDataError
    from orchestrator.scheduler import online

    dirty, clean = slot("n-de", "cpu-small", "DE"), slot("n-fr", "cpu-xeon", "FR")
    warnings: list[str] = []
    p = placer("greedy-carbon", {"DE": [400.0] * 72, "FR": [40.0] * 72})
    p.warn = warnings.append
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise CarbonDataError("region 'DE': intensity table is damaged")

    monkeypatch.setattr(p, "_replan", broken)
    status = {"k-train": "pending", "k-ev-s": "pending", "k-ev-x": "pending"}
    for _ in range(3):
        ((stage, chosen, decision),) = p.place([TRAIN], [dirty, clean], [dirty, clean], status, PLAN)
        assert stage is TRAIN and chosen is choose_slot(TRAIN, [dirty, clean]) and decision is None
    assert len(calls) == 1 and len(warnings) == 1 and "placing by fifo" in warnings[0]
    assert p.held == {}
    monkeypatch.setattr(online.time, "monotonic", lambda: 10 ** 9)  # REPLAN_S later
    p.place([TRAIN], [dirty, clean], [dirty, clean], status, PLAN)
    assert len(calls) == 2 and len(warnings) == 1  # tried again; the same cause is not repeated
