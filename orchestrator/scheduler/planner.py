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
    Spatial and temporal shifting: a flexible task may start later, in a cleaner window,
    as long as it ends by its latest safe end (its own deadline and, through a critical-
    path backward pass on fastest durations, its descendants' deadlines). Non-flexible
    tasks behave as in ``greedy-carbon``. The result is compared with the ``fifo`` plan
    and the ``fifo`` plan is returned instead (``fell_back_to_fifo``) unless the candidate
    emits no more carbon and misses no deadline that ``fifo`` meets -- so this policy never
    does worse than the baseline, by construction.

Model: a node runs at most ``slots`` tasks at once (each slot is a lane of busy intervals;
a task takes one lane for its whole run); a task starts no earlier than the end of all its
dependencies; energy is ``power_w`` x duration; carbon integrates the region's intensity
over the run, piecewise constant per step, holding each series' last value past its end.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from orchestrator.scheduler.instance import Instance, horizon_s

POLICIES = ("fifo", "greedy-carbon", "carbon-deadline")

_J_PER_KWH = 3.6e6
_REL_TOL = 1e-9  # carbon values closer than this (relative) count as a tie -> earlier wins


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


class CarbonIntegrator:
    """Window carbon in O(1) per window, vectorized, from per-region prefix sums.

    All regions are padded to a common length with their last value (which is exactly the
    "hold the last value" rule) so one fancy-indexing pass serves windows in many regions.
    """

    def __init__(self, instance: Instance) -> None:
        self.step_s = instance.step_s
        self.regions = sorted(instance.intensity_g_co2_per_kwh)
        length = max(len(v) for v in instance.intensity_g_co2_per_kwh.values())
        self._g_co2_per_kwh = np.empty((len(self.regions), length))
        for r, name in enumerate(self.regions):
            series = np.asarray(instance.intensity_g_co2_per_kwh[name], dtype=float)
            self._g_co2_per_kwh[r, : len(series)] = series
            self._g_co2_per_kwh[r, len(series):] = series[-1]
        # _cum[r, k] = integral of intensity over [0, k*step_s) in gCO2/kWh * s
        self._cum = np.zeros((len(self.regions), length + 1))
        np.cumsum(self._g_co2_per_kwh * self.step_s, axis=1, out=self._cum[:, 1:])
        self._last = length - 1

    def _integral(self, region: np.ndarray, t_s: np.ndarray) -> np.ndarray:
        k = np.minimum((t_s // self.step_s).astype(np.int64), self._last)
        return self._cum[region, k] + (t_s - k * self.step_s) * self._g_co2_per_kwh[region, k]

    def carbon_g(self, region: np.ndarray | int, power_w: np.ndarray | float,
                 start_s: np.ndarray | float, duration_s: np.ndarray | float) -> np.ndarray:
        """Grams of CO2 for running at ``power_w`` during ``[start_s, start_s + duration_s)``.

        Arguments broadcast; ``region`` holds indices into :attr:`regions`; times are >= 0.
        """
        start = np.asarray(start_s, dtype=float)
        end = start + np.asarray(duration_s, dtype=float)
        reg = np.asarray(region)
        return np.asarray(power_w) * (self._integral(reg, end) - self._integral(reg, start)) / _J_PER_KWH


class _Timeline:
    """Free intervals ("holes") of every slot lane of every node, as flat numpy arrays.

    Each lane starts as one hole ``[0, inf)``. Occupying ``[a, b)`` inside a hole splits it;
    pieces shorter than the shortest task of the instance can never be used and are dropped.
    Hole order carries no meaning; callers break ties by node index.
    """

    def __init__(self, slots: list[int], capacity: int, min_duration_s: float) -> None:
        lanes = sum(slots)
        self.start_s = np.zeros(capacity + lanes)
        self.end_s = np.full(capacity + lanes, np.inf)
        self.node = np.zeros(capacity + lanes, dtype=np.int64)
        self.node[:lanes] = np.repeat(np.arange(len(slots)), slots)
        self.n = lanes
        self._min_s = min_duration_s

    def occupy(self, hole: int, start_s: float, end_s: float) -> None:
        gs, ge, node = self.start_s[hole], self.end_s[hole], self.node[hole]
        if ge - end_s >= self._min_s:
            self.start_s[hole] = end_s
        else:  # swap-remove
            self.n -= 1
            self.start_s[hole], self.end_s[hole], self.node[hole] = (
                self.start_s[self.n], self.end_s[self.n], self.node[self.n])
        if start_s - gs >= self._min_s:
            self.start_s[self.n], self.end_s[self.n], self.node[self.n] = gs, start_s, node
            self.n += 1


class _Planner:
    """List scheduling in topological order; one instance per (instance, policy) run."""

    def __init__(self, instance: Instance, integrator: CarbonIntegrator) -> None:
        self.inst = instance
        self.carbon = integrator
        nodes = instance.nodes
        types = sorted({n.node_type for n in nodes})
        type_of = {t: i for i, t in enumerate(types)}
        self.node_type = np.array([type_of[n.node_type] for n in nodes])
        region_of = {r: i for i, r in enumerate(integrator.regions)}
        self.node_region = np.array([region_of[n.region] for n in nodes])
        self.node_power_w = np.array([n.power_w for n in nodes])
        groups: dict[tuple[int, int], int] = {}
        for i in range(len(nodes)):
            groups.setdefault((int(self.node_type[i]), int(self.node_region[i])), len(groups))
        self.node_group = np.array([groups[(int(self.node_type[i]), int(self.node_region[i]))]
                                    for i in range(len(nodes))])
        self.n_groups = len(groups)
        # duration of each task on each node; NaN where the node type cannot run it, so
        # every comparison involving it is False
        dur_by_type = np.full((len(instance.tasks), len(types)), np.nan)
        for i, t in enumerate(instance.tasks):
            for name, d in t.durations_s.items():
                if name in type_of:
                    dur_by_type[i, type_of[name]] = d
        self.duration_s = dur_by_type[:, self.node_type]
        has_tasks = len(instance.tasks) > 0
        self.min_duration_s = float(np.nanmin(dur_by_type)) if has_tasks else 1.0
        self.latest_end_s = self._latest_ends(np.nanmin(dur_by_type, axis=1) if has_tasks else np.zeros(0))
        self.horizon_s = horizon_s(instance)

    def _latest_ends(self, fastest_s: np.ndarray) -> np.ndarray:
        """Latest end of each task that leaves every descendant's deadline feasible.

        Backward pass over the DAG on fastest durations: ``L[i] = min(deadline_i,
        min over children c of L[c] - fastest_c)``; ``inf`` where nothing bounds it.
        """
        tasks = self.inst.tasks
        latest = np.array([t.deadline_s if t.deadline_s is not None else np.inf for t in tasks], dtype=float)
        for i in reversed(self.inst.topo_order):
            for d in tasks[i].depends_on:
                latest[d] = min(latest[d], latest[i] - fastest_s[i])
        return latest

    def run(self, policy: str) -> list[tuple[int, float, float]]:
        """(node index, start_s, end_s) per task, in input order."""
        tl = _Timeline([n.slots for n in self.inst.nodes], len(self.inst.tasks), self.min_duration_s)
        out: list[tuple[int, float, float]] = [(0, 0.0, 0.0)] * len(self.inst.tasks)
        end_s = np.zeros(len(self.inst.tasks))
        for i in self.inst.topo_order:
            task = self.inst.tasks[i]
            ready_s = float(end_s[list(task.depends_on)].max()) if task.depends_on else 0.0
            hs, he, hn = tl.start_s[: tl.n], tl.end_s[: tl.n], tl.node[: tl.n]
            d = self.duration_s[i, hn]
            lo = np.maximum(hs, ready_s)
            valid = lo + d <= he
            choice = None
            if policy == "carbon-deadline" and task.flexible:
                choice = self._shifted(i, ready_s, lo, he, hn, d, valid)
            if choice is None:
                choice = self._earliest(lo, hn, d, valid, carbon_aware=policy != "fifo")
            hole, start = choice
            node = int(hn[hole])
            end = start + float(d[hole])
            tl.occupy(hole, start, end)
            end_s[i] = end
            out[i] = (node, start, end)
        return out

    def _earliest(self, lo: np.ndarray, hn: np.ndarray, d: np.ndarray, valid: np.ndarray,
                  carbon_aware: bool) -> tuple[int, float]:
        t0 = float(lo[valid].min())
        cand = np.flatnonzero(valid & (lo == t0))
        if carbon_aware and len(cand) > 1:
            nodes = hn[cand]
            c = self.carbon.carbon_g(self.node_region[nodes], self.node_power_w[nodes], t0, d[cand])
            cand = cand[c <= c.min() * (1 + _REL_TOL)]
        return int(cand[np.argmin(hn[cand])]), t0

    def _shifted(self, i: int, ready_s: float, lo: np.ndarray, he: np.ndarray, hn: np.ndarray,
                 d: np.ndarray, valid: np.ndarray) -> tuple[int, float] | None:
        """Minimum-carbon (node, start) within the task's safe window; None if the window
        has no free slot (the caller then takes the earliest start).

        Nodes of one (type, region) group share duration and intensity, so candidates are
        generated per group on the union of its free intervals: interval ends, step
        boundaries, and starts that end on a step boundary -- the breakpoints of the
        piecewise-linear carbon(start) curve, so the minimum over each interval is exact.
        """
        # past the series' end intensity is constant, so waiting longer than that gains nothing
        latest_start = np.minimum(self.latest_end_s[i] - d, max(self.horizon_s, ready_s))
        hi = np.minimum(he - d, latest_start)
        ok = valid & (lo <= hi)
        if not ok.any():
            return None
        step = self.carbon.step_s
        groups = self.node_group[hn]
        best: tuple[float, float, int] | None = None  # (carbon_g, start_s, group)
        for g in np.unique(groups[ok]):
            m = ok & (groups == g)
            glo, ghi = lo[m], hi[m]
            dur = float(d[m][0])
            node = int(hn[m][0])
            a, b = float(glo.min()), float(ghi.max())
            grid = np.arange(np.ceil(a / step), np.floor(b / step) + 1) * step
            grid_end = np.arange(np.ceil((a + dur) / step), np.floor((b + dur) / step) + 1) * step - dur
            t = np.concatenate([glo, ghi, grid, grid_end])
            order = np.argsort(glo)
            starts, reach = glo[order], np.maximum.accumulate(ghi[order])
            j = np.searchsorted(starts, t, side="right") - 1
            t = t[(j >= 0) & (reach[np.maximum(j, 0)] >= t)]
            c = self.carbon.carbon_g(self.node_region[node], self.node_power_w[node], t, dur)
            near = c <= c.min() * (1 + _REL_TOL)
            k = int(np.argmin(np.where(near, t, np.inf)))
            cand = (float(c[k]), float(t[k]), int(g))
            if best is None or cand[0] < best[0] * (1 - _REL_TOL) or (
                    cand[0] <= best[0] * (1 + _REL_TOL) and cand[1] < best[1]):
                best = cand
        assert best is not None
        _, start, g = best
        fits = np.flatnonzero(ok & (groups == g) & (lo <= start) & (start <= hi))
        return int(fits[np.argmin(hn[fits])]), start


def plan(instance: Instance, policy: str) -> Plan:
    """Schedule every task of ``instance`` under ``policy`` (one of :data:`POLICIES`).

    Pure and deterministic: same instance and policy, same plan. ``carbon-deadline`` never
    returns a plan with more carbon than ``fifo`` nor one missing a deadline ``fifo``
    meets; when its own schedule would, the ``fifo`` schedule is returned with
    ``fell_back_to_fifo=True``.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    integrator = CarbonIntegrator(instance)
    planner = _Planner(instance, integrator)
    result = _build(instance, integrator, policy, planner.run(policy))
    if policy != "carbon-deadline":
        return result
    baseline = _build(instance, integrator, "fifo", planner.run("fifo"))
    if result.carbon_g <= baseline.carbon_g and _missed(instance, result.assignments) <= _missed(instance, baseline.assignments):
        return result
    return Plan("carbon-deadline", baseline.assignments, baseline.carbon_g, baseline.makespan_s,
                baseline.deadline_misses, fell_back_to_fifo=True)


def _missed(instance: Instance, assignments: tuple[Assignment, ...]) -> set[str]:
    """Ids of tasks that end after their deadline (1 microsecond of float slack)."""
    return {a.task for a, t in zip(assignments, instance.tasks)
            if t.deadline_s is not None and a.end_s > t.deadline_s + 1e-6}


def _build(instance: Instance, integrator: CarbonIntegrator, policy: str,
           placed: list[tuple[int, float, float]]) -> Plan:
    if not placed:
        return Plan(policy, (), 0.0, 0.0, 0)
    node = np.array([p[0] for p in placed])
    start = np.array([p[1] for p in placed])
    end = np.array([p[2] for p in placed])
    region_of = {r: i for i, r in enumerate(integrator.regions)}
    region = np.array([region_of[instance.nodes[n].region] for n in node])
    power = np.array([instance.nodes[n].power_w for n in node])
    carbon = integrator.carbon_g(region, power, start, end - start)
    assignments = tuple(Assignment(t.id, instance.nodes[n].id, float(s), float(e), float(c))
                        for t, n, s, e, c in zip(instance.tasks, node, start, end, carbon))
    return Plan(policy, assignments, float(carbon.sum()), float(end.max()),
                len(_missed(instance, assignments)))


__all__ = ["POLICIES", "Assignment", "CarbonIntegrator", "Plan", "plan"]
