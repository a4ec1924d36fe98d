"""The offline carbon-aware planner: known optima, invariants on random instances, the CLI."""

from __future__ import annotations

import json
import random

import pytest

from orchestrator.cli import main
from orchestrator.errors import SpecError
from orchestrator.scheduler.instance import parse_instance
from orchestrator.scheduler.planner import POLICIES, Plan, plan

H = 3600
GPU = {"gpu": {"power_w": 1000}}


def doc(tasks, nodes=None, intensity=None, node_types=None):
    return {"step_s": H, "node_types": node_types or GPU,
            "nodes": nodes or [{"id": "n1", "node_type": "gpu", "region": "A", "slots": 1}],
            "tasks": tasks, "intensity": intensity or {"A": [100.0] * 24}}


def task(tid, hours=1, **kw):
    return {"id": tid, "durations_s": {"gpu": hours * H}, **kw}


def by_task(p: Plan):
    return {a.task: a for a in p.assignments}


# -- known answers -------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["greedy-carbon", "carbon-deadline"])
def test_one_task_two_regions_goes_to_cleaner(policy):
    inst = parse_instance(doc([task("t")], nodes=[{"id": "dirty", "node_type": "gpu", "region": "A"},
                                                  {"id": "clean", "node_type": "gpu", "region": "B"}],
                              intensity={"A": [500.0], "B": [50.0]}))
    a = by_task(plan(inst, policy))["t"]
    assert (a.node, a.start_s) == ("clean", 0)
    assert a.carbon_g == pytest.approx(1.0 * 50)  # 1 kWh at 50 g/kWh
    assert by_task(plan(inst, "fifo"))["t"].node == "dirty"


def test_flexible_task_waits_for_dip_within_deadline():
    inst = parse_instance(doc([task("t", flexible=True, deadline_s=10 * H)],
                              intensity={"A": [300, 300, 300, 20, 300, 300]}))
    a = by_task(plan(inst, "carbon-deadline"))["t"]
    assert (a.start_s, a.end_s, a.carbon_g) == (3 * H, 4 * H, pytest.approx(20))


def test_non_flexible_task_starts_at_zero():
    inst = parse_instance(doc([task("t", flexible=False)], intensity={"A": [300, 300, 20]}))
    assert by_task(plan(inst, "carbon-deadline"))["t"].start_s == 0


def test_deadline_forbids_waiting():
    inst = parse_instance(doc([task("t", flexible=True, deadline_s=2 * H)], intensity={"A": [300, 200, 300, 10]}))
    a = by_task(plan(inst, "carbon-deadline"))["t"]
    assert a.start_s == H and a.end_s <= 2 * H


def test_successor_deadline_bounds_waiting():
    inst = parse_instance(doc([task("a", flexible=True), task("b", flexible=True, deadline_s=3 * H, depends_on=["a"])],
                              intensity={"A": [100, 100, 100, 1, 1]}))
    p = plan(inst, "carbon-deadline")
    assert by_task(p)["b"].end_s <= 3 * H and p.deadline_misses == 0


def test_capacity_one_serializes_two_tasks():
    inst = parse_instance(doc([task("a", 2), task("b", 2)]))
    for policy in POLICIES:
        a, b = by_task(plan(inst, policy))["a"], by_task(plan(inst, policy))["b"]
        assert a.end_s <= b.start_s or b.end_s <= a.start_s


def test_two_slots_run_in_parallel():
    inst = parse_instance(doc([task("a", 2), task("b", 2)],
                              nodes=[{"id": "n1", "node_type": "gpu", "region": "A", "slots": 2}]))
    assert plan(inst, "fifo").makespan_s == 2 * H


def test_dependencies_respected():
    inst = parse_instance(doc([task("b", 1, depends_on=["a"]), task("a", 3)],
                              nodes=[{"id": "n1", "node_type": "gpu", "region": "A"},
                                     {"id": "n2", "node_type": "gpu", "region": "A"}]))
    for policy in POLICIES:
        p = by_task(plan(inst, policy))
        assert p["b"].start_s >= p["a"].end_s == 3 * H


def test_intensity_past_series_end_holds_last_value():
    inst = parse_instance(doc([task("t", 3)], intensity={"A": [100.0, 40.0]}))
    assert by_task(plan(inst, "fifo"))["t"].carbon_g == pytest.approx(100 + 40 + 40)


def test_empty_task_list():
    p = plan(parse_instance(doc([])), "carbon-deadline")
    assert (p.assignments, p.carbon_g, p.makespan_s) == ((), 0.0, 0.0)


# -- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize("mutate, needle", [
    (lambda d: d["nodes"][0].update(node_type="tpu"), "nodes[0].node_type"),
    (lambda d: d["nodes"][0].update(region="Z"), "nodes[0].region"),
    (lambda d: d["tasks"][0].update(durations_s={"cpu": 10}), "tasks[0].durations_s"),
    (lambda d: d["tasks"][0].update(depends_on=["ghost"]), "tasks[0].depends_on[0]"),
    (lambda d: d["tasks"][0].update(depends_on=["b"]), "cycle"),
    (lambda d: d["tasks"][0].update(deadline_s=-1), "tasks[0].deadline_s"),
    (lambda d: d["intensity"].update(A=[-5.0]), "intensity.A[0]"),
    (lambda d: d.update(step_s=0), "step_s"),
    (lambda d: d["tasks"][1].update(id="a"), "duplicate task id"),
    (lambda d: d["tasks"][0].update(speed=3), "tasks[0].speed"),
    (lambda d: d.pop("nodes"), "nodes"),
])
def test_malformed_instance_names_the_field(mutate, needle):
    d = doc([task("a"), task("b", depends_on=["a"])], node_types={"gpu": {"power_w": 1}, "cpu": {"power_w": 1}})
    mutate(d)
    with pytest.raises(SpecError) as e:
        parse_instance(d)
    assert needle in str(e.value) and "\n" not in str(e.value) and "--" in str(e.value)


# -- invariants on random instances --------------------------------------------------------


def random_doc(rng: random.Random) -> dict:
    regions = ["A", "B", "C"][: rng.randint(1, 3)]
    types = {"gpu": {"power_w": rng.choice([300, 400])}, "cpu": {"power_w": 150}}
    nodes = [{"id": f"n{i}", "node_type": rng.choice(list(types)), "region": rng.choice(regions),
              "slots": rng.randint(1, 2)} for i in range(rng.randint(1, 4))]
    present = sorted({n["node_type"] for n in nodes})
    tasks = []
    for i in range(rng.randint(1, 12)):
        durs = {t: rng.choice([0.5, 1, 1.5, 2, 3.25]) * H for t in rng.sample(list(types), rng.randint(1, 2))}
        if not set(durs) & set(present):
            durs[present[0]] = 2 * H
        t = {"id": f"t{i}", "durations_s": durs, "flexible": rng.random() < 0.7,
             "depends_on": rng.sample([x["id"] for x in tasks], k=min(len(tasks), rng.randint(0, 2)))}
        if rng.random() < 0.6:
            t["deadline_s"] = rng.randint(2, 40) * H
        tasks.append(t)
    intensity = {r: [rng.uniform(20, 600) for _ in range(rng.randint(1, 36))] for r in regions}
    return {"step_s": H, "node_types": types, "nodes": nodes, "tasks": tasks, "intensity": intensity}


def recompute_carbon_g(d: dict, node: dict, start_s: float, end_s: float) -> float:
    """Independent integral: walk the steps one by one."""
    series = d["intensity"][node["region"]]
    total, t = 0.0, start_s
    while t < end_s - 1e-9:
        k = int(t // H)
        nxt = min(end_s, (k + 1) * H)
        total += series[min(k, len(series) - 1)] * (nxt - t)
        t = nxt
    return d["node_types"][node["node_type"]]["power_w"] * total / 3.6e6


def check_plan(d: dict, p: Plan) -> set[str]:
    """Assert capacity, dependencies, compatibility and carbon; return the missed deadlines."""
    nodes = {n["id"]: n for n in d["nodes"]}
    tasks = {t["id"]: t for t in d["tasks"]}
    got = by_task(p)
    assert set(got) == set(tasks)
    missed = set()
    for tid, a in got.items():
        t, n = tasks[tid], nodes[a.node]
        assert a.end_s - a.start_s == pytest.approx(t["durations_s"][n["node_type"]])
        assert a.start_s >= 0
        for dep in t["depends_on"]:
            assert a.start_s >= got[dep].end_s - 1e-6
        assert a.carbon_g == pytest.approx(recompute_carbon_g(d, n, a.start_s, a.end_s), rel=1e-9, abs=1e-9)
        if t.get("deadline_s") is not None and a.end_s > t["deadline_s"] + 1e-6:
            missed.add(tid)
    for nid, n in nodes.items():
        events = sorted([(a.start_s, 1) for a in got.values() if a.node == nid]
                        + [(a.end_s - 1e-6, -1) for a in got.values() if a.node == nid], key=lambda e: (e[0], e[1]))
        running = 0
        for _, delta in events:
            running += delta
            assert running <= n["slots"]
    assert p.carbon_g == pytest.approx(sum(a.carbon_g for a in p.assignments))
    assert p.makespan_s == pytest.approx(max(a.end_s for a in p.assignments))
    assert p.deadline_misses == len(missed)
    return missed


@pytest.mark.parametrize("seed", range(50))
def test_random_instances_keep_invariants(seed):
    d = random_doc(random.Random(seed))
    inst = parse_instance(d)
    plans = {policy: plan(inst, policy) for policy in POLICIES}
    missed = {policy: check_plan(d, p) for policy, p in plans.items()}
    assert plans["carbon-deadline"].carbon_g <= plans["fifo"].carbon_g + 1e-9
    assert missed["carbon-deadline"] <= missed["fifo"]
    assert plan(inst, "carbon-deadline") == plans["carbon-deadline"]  # deterministic


def test_fifo_uses_first_free_node_in_node_order():
    d = doc([task("a"), task("b")], nodes=[{"id": "x", "node_type": "gpu", "region": "B"},
                                           {"id": "y", "node_type": "gpu", "region": "A"}],
            intensity={"A": [1.0], "B": [900.0]})
    got = by_task(plan(parse_instance(d), "fifo"))
    assert (got["a"].node, got["b"].node, got["b"].start_s) == ("x", "y", 0)


def test_unknown_policy_is_rejected():
    with pytest.raises(ValueError, match="unknown policy"):
        plan(parse_instance(doc([task("t")])), "random")


# -- CLI -----------------------------------------------------------------------------------


def test_cli_prints_json_plan(tmp_path, capsys):
    path = tmp_path / "inst.json"
    path.write_text(json.dumps(doc([task("t1", 2, flexible=True, deadline_s=86400)])))
    try:
        main(["carbon", "plan", "--instance", str(path), "--policy", "fifo"])
    except SystemExit as e:  # success may return or exit 0
        assert e.code in (0, None)
    out = json.loads(capsys.readouterr().out)
    assert out["assignments"] == [{"task": "t1", "node": "n1", "start_s": 0, "end_s": 7200, "carbon_g": 200.0}]
    assert (out["carbon_g"], out["makespan_s"], out["deadline_misses"]) == (200.0, 7200, 0)


def test_cli_malformed_instance_exits_2_with_one_line(tmp_path, capsys):
    path = tmp_path / "inst.json"
    d = doc([task("t1")])
    d["nodes"][0]["region"] = "nowhere"
    path.write_text(json.dumps(d))
    with pytest.raises(SystemExit) as e:
        main(["carbon", "plan", "--instance", str(path), "--policy", "carbon-deadline"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1 and "nodes[0].region" in err


def test_cli_unreadable_json_exits_2(tmp_path, capsys):
    path = tmp_path / "inst.json"
    path.write_text("{not json")
    with pytest.raises(SystemExit) as e:
        main(["carbon", "plan", "--instance", str(path)])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: instance:")
