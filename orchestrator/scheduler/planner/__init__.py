"""Offline carbon-aware planning: a pure function from an :class:`Instance` to a :class:`Plan`.

This module decides, for every task of an instance, which node runs it and when; it never
touches Ray or the store, so a policy can be evaluated on 10,000 tasks in a unit test or
from ``greensweep carbon plan``. Policies:

``fifo``
    Carbon-agnostic baseline (what a plain Ray cluster does): tasks in topological order,
    ties by input order, each at its earliest feasible start on the first compatible node
    (in node order) with a free slot for its whole duration.
``greedy-carbon``
    Spatial shifting: the same earliest start, but among the nodes free at that time the
    one with the least carbon for this task.
``carbon-deadline``
    Spatial and temporal shifting. *Construction*: list scheduling in which a flexible task
    takes the minimum-carbon (node, start) that ends by its latest safe end (its own
    deadline and, through a critical-path backward pass on fastest durations, its
    descendants' deadlines); non-flexible tasks behave as in ``greedy-carbon``. Other task
    orders (biggest energy first, least slack first) are tried when the budget allows, and
    the search starts from the cleanest schedule that misses no deadline ``fifo`` meets
    (``fifo``'s own, if need be). *Improvement* (:meth:`.search._Planner.improve`): a local search
    that only ever moves flexible tasks to places where every constraint holds -- one task
    at a time to its cheapest feasible (node, start), then simulated annealing over "ruin
    and recreate" moves and exact dynamic-programming re-plans of one node's slot -- for a
    work budget ``effort`` (:data:`DEFAULT_EFFORT`); its random choices are seeded, so a
    plan is reproducible. Finally the result is compared with the ``fifo`` plan, which is
    returned instead (``fell_back_to_fifo``) unless the candidate emits no more carbon and
    misses no deadline that ``fifo`` meets -- so this policy never does worse than the
    baseline, by construction.

Model: a node runs at most ``slots`` tasks at once (each slot is a lane of busy intervals;
a task takes one lane for its whole run) and none before its ``busy_until_s``; a task
starts no earlier than its ``release_s`` and the end of all its dependencies; energy is
``power_w`` x duration; carbon integrates the region's intensity over the run, piecewise
constant per step, holding each series' last value past its end.

The package, in the order a plan is made: :mod:`.carbon` (intensity integrated over
windows), :mod:`.lanes` (free time of every node slot), :mod:`.construct` (the planning
state, one task's placement, list scheduling), :mod:`.search` (the improvement), and
this module, the entry point: :func:`plan` and the result types.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from orchestrator.scheduler.instance import Instance
from orchestrator.scheduler.planner.carbon import CarbonIntegrator
from orchestrator.scheduler.planner.construct import _MISS_SLACK_S, _REL_TOL
from orchestrator.scheduler.planner.search import _Planner

POLICIES = ("fifo", "greedy-carbon", "carbon-deadline")

DEFAULT_EFFORT = 3000
"""Default work budget of the ``carbon-deadline`` search beyond its first list schedule.
One unit is one candidate placement of one task that scans up to 64 free intervals; one
that scans more costs proportionally more, and a lane re-plan costs 2**tasks/16 more, so
the budget tracks running time: at most 0.2 s on the 8-task benchmark instances (plenty to
reach the optimum there), and a small share of planning 10,000 tasks, whose free intervals
number in the thousands."""


@dataclass(frozen=True)
class Assignment:
    """Task ``task`` runs on node ``node`` during ``[start_s, end_s)``, emitting ``carbon_g``."""

    task: str
    node: str
    start_s: float
    end_s: float
    carbon_g: float


@dataclass(frozen=True)
class Plan:
    """A complete schedule; ``assignments`` are in the instance's task order."""

    policy: str
    assignments: tuple[Assignment, ...]
    carbon_g: float
    makespan_s: float
    deadline_misses: int
    fell_back_to_fifo: bool = False

    def to_json(self) -> dict[str, object]:
        """The documented output format (``docs/scheduler-instance.md``)."""
        return {
            "policy": self.policy,
            "assignments": [{"task": a.task, "node": a.node, "start_s": _num(a.start_s),
                             "end_s": _num(a.end_s), "carbon_g": round(a.carbon_g, 6)}
                            for a in self.assignments],
            "carbon_g": round(self.carbon_g, 6),
            "makespan_s": _num(self.makespan_s),
            "deadline_misses": self.deadline_misses,
            "fell_back_to_fifo": self.fell_back_to_fifo,
        }


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else round(float(x), 6)


def plan(instance: Instance, policy: str, *, effort: int = DEFAULT_EFFORT, seed: int = 0) -> Plan:
    """Schedule every task of ``instance`` under ``policy`` (one of :data:`POLICIES`).

    Pure and deterministic: same instance, policy, ``effort`` and ``seed``, same plan.
    ``effort`` bounds the search of ``carbon-deadline`` beyond its first list schedule, in
    the work units of :data:`DEFAULT_EFFORT` (0: that schedule only); ``seed`` seeds its
    random choices. ``carbon-deadline`` never
    returns a plan with more carbon than ``fifo`` nor one missing a deadline ``fifo``
    meets; when its own schedule would, the ``fifo`` schedule is returned with
    ``fell_back_to_fifo=True``.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    integrator = CarbonIntegrator(instance)
    planner = _Planner(instance, integrator)
    if policy != "carbon-deadline" or not instance.tasks:
        planner.construct(policy)
        return _build(instance, integrator, policy, planner.snapshot())
    planner.construct("fifo")
    fifo_state = planner.snapshot()
    fifo_g = float(_carbon_of(instance, integrator, fifo_state).sum())
    fifo_late = planner.late()
    # starting points: list scheduling in several task orders when the budget allows, and
    # the fifo plan itself; the search starts from the cleanest one that misses no
    # deadline fifo meets (fifo always qualifies)
    best = (float(planner.carbon.sum()), fifo_state)
    slack = planner.latest_end_s - planner.release_s - planner.fastest_s
    cost = 0
    for k, priority in enumerate([None, -planner.energy_j, np.where(np.isfinite(slack), slack, np.inf)]):
        if k and effort < 4 * cost:  # other orders only when cheap next to the budget
            break
        begin = planner.work
        planner.construct("carbon-deadline", priority)
        cost = planner.work - begin
        if k:
            effort -= cost
        total = float(planner.carbon.sum())
        if total < best[0] * (1 - _REL_TOL) and not (planner.late() & ~fifo_late).any():
            best = (total, planner.snapshot())
    if not _same(best[1], planner.snapshot()):
        planner.load(best[1])
    planner.improve(effort, seed)
    result = _build(instance, integrator, "carbon-deadline", planner.snapshot())
    if result.carbon_g <= fifo_g and not (planner.late() & ~fifo_late).any():
        return result
    baseline = _build(instance, integrator, "fifo", fifo_state)
    return Plan("carbon-deadline", baseline.assignments, baseline.carbon_g, baseline.makespan_s,
                baseline.deadline_misses, fell_back_to_fifo=True)


def _same(a: tuple[np.ndarray, ...], b: tuple[np.ndarray, ...]) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b))


def _missed(instance: Instance, assignments: tuple[Assignment, ...]) -> set[str]:
    """Ids of tasks that end after their deadline (1 microsecond of float slack)."""
    return {a.task for a, t in zip(assignments, instance.tasks)
            if t.deadline_s is not None and a.end_s > t.deadline_s + _MISS_SLACK_S}


def _carbon_of(instance: Instance, integrator: CarbonIntegrator,
               state: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """Carbon of each task of a placement (lane, start, end per task), g."""
    lane_of, start, end = state
    lane_node = np.repeat(np.arange(len(instance.nodes)), [n.slots for n in instance.nodes])
    node = lane_node[lane_of]
    region_of = {r: i for i, r in enumerate(integrator.regions)}
    node_region = np.array([region_of[n.region] for n in instance.nodes])
    node_power = np.array([n.power_w for n in instance.nodes])
    return integrator.carbon_g(node_region[node], node_power[node], start, end - start)


def _build(instance: Instance, integrator: CarbonIntegrator, policy: str,
           state: tuple[np.ndarray, np.ndarray, np.ndarray]) -> Plan:
    lane_of, start, end = state
    if not len(lane_of):
        return Plan(policy, (), 0.0, 0.0, 0)
    node = np.repeat(np.arange(len(instance.nodes)), [n.slots for n in instance.nodes])[lane_of]
    carbon = _carbon_of(instance, integrator, state)
    assignments = tuple(Assignment(t.id, instance.nodes[n].id, s, e, c)
                        for t, n, s, e, c in zip(instance.tasks, node.tolist(), start.tolist(),
                                                 end.tolist(), carbon.tolist()))
    return Plan(policy, assignments, float(carbon.sum()), float(end.max()),
                len(_missed(instance, assignments)))


__all__ = ["DEFAULT_EFFORT", "POLICIES", "Assignment", "CarbonIntegrator", "Plan", "plan"]
