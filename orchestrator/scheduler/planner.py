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
    (``fifo``'s own, if need be). *Improvement* (:meth:`_Planner.improve`): a local search
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
"""

from __future__ import annotations

import bisect
import heapq
import math
import random
from dataclasses import dataclass

import numpy as np

from orchestrator.scheduler.instance import Instance, horizon_s

POLICIES = ("fifo", "greedy-carbon", "carbon-deadline")

DEFAULT_EFFORT = 3000
"""Default work budget of the ``carbon-deadline`` search beyond its first list schedule.
One unit is one candidate placement of one task that scans up to 64 free intervals; one
that scans more costs proportionally more, and a lane re-plan costs 2**tasks/16 more, so
the budget tracks running time: at most 0.2 s on the 8-task benchmark instances (plenty to
reach the optimum there), and a small share of planning 10,000 tasks, whose free intervals
number in the thousands."""

_J_PER_KWH = 3.6e6
_REL_TOL = 1e-9  # carbon values closer than this (relative) count as a tie -> earlier wins
_MISS_SLACK_S = 1e-6  # an end this close past a deadline still meets it

_FIFO, _GREEDY, _SHIFT, _PACK = 0, 1, 2, 3  # how _Planner._choose picks a start
_HOLES_PER_UNIT = 64  # free intervals one unit of effort scans
_TABLE_BYTES = 64 << 20  # cap on the cached breakpoint tables; past it, tables are per task
_WINDOW_SUM_STEPS = 64  # runs up to this many steps: carbon from plain window sums (exact ties)
# the search (see _Planner.improve)
_ROUNDS = 3  # annealing rounds, each reheated from the best plan so far
_T0_SHARE, _T_END = 0.01, 1e-5  # start temperature (share of mean task carbon), end/start ratio
_PATIENCE = (100, 40)  # a round ends after a + b * (flexible tasks) units without a new best
_DP_SHARE = 0.35  # share of annealing moves that re-plan a lane (the rest ruin and recreate)
_DP_TASKS = 8  # most tasks one lane re-plan handles (its programme has 2**tasks states a step)
_DP_PULL = (0, 1, 1, 2)  # how many tasks it pulls in from other lanes (drawn uniformly)
_DP_PUSH = (0, 1)  # how many of the lane's tasks it pushes out when not guided (drawn uniformly)


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
        k = np.minimum(np.floor_divide(t_s, self.step_s).astype(np.int64), self._last)
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


class _Holes:
    """Free intervals of the slot lanes of one node type, as flat numpy arrays sorted by
    end (the first ``n`` entries are live), so a query can skip every hole that ends too
    early for the task at hand with one binary search."""

    def __init__(self, capacity: int) -> None:
        self.start_s = np.zeros(capacity)
        self.end_s = np.full(capacity, np.inf)
        self.lane = np.zeros(capacity, dtype=np.int64)
        self.n = 0

    def add(self, start_s: float, end_s: float, lane: int) -> None:
        n = self.n
        if n == len(self.start_s):
            self.start_s = np.concatenate([self.start_s, np.zeros(n)])
            self.end_s = np.concatenate([self.end_s, np.full(n, np.inf)])
            self.lane = np.concatenate([self.lane, np.zeros(n, dtype=np.int64)])
        k = int(np.searchsorted(self.end_s[:n], end_s, side="right"))
        for a in (self.start_s, self.end_s, self.lane):
            a[k + 1: n + 1] = a[k:n]
        self.start_s[k], self.end_s[k], self.lane[k] = start_s, end_s, lane
        self.n = n + 1

    def drop(self, hole: int) -> None:
        n = self.n
        for a in (self.start_s, self.end_s, self.lane):
            a[hole: n - 1] = a[hole + 1: n]
        self.n = n - 1

    def first_ending_by(self, end_s: float) -> int:
        """Index of the first hole that ends at or after ``end_s``."""
        return int(np.searchsorted(self.end_s[: self.n], end_s))


class _Lanes:
    """Free intervals ("holes") of every slot lane, kept per node type (a task scans only
    the types that can run it), plus each lane's busy intervals in start order (so a hole
    can be merged back when a task leaves). A hole is named by (node type, index).

    A lane starts as one hole ``[free_from, inf)``. Occupying ``[a, b)`` inside a hole splits
    it; pieces shorter than the shortest task can never be used and are not kept (freeing
    a task rebuilds the whole gap between its lane neighbours, so nothing is lost). A hole's
    index is valid until the next change; callers break ties by lane index.
    """

    def __init__(self, free_from_s: np.ndarray, lane_kind: np.ndarray, n_kinds: int, min_len_s: float,
                 n_tasks: int) -> None:
        lanes = len(free_from_s)
        self.sets = [_Holes(lanes + n_tasks + 8) for _ in range(n_kinds)]
        self._lane_kind = [int(x) for x in lane_kind]
        for lane, (start, kind) in enumerate(zip(free_from_s.tolist(), self._lane_kind)):
            self.sets[kind].add(start, math.inf, lane)
        self._min_s = min_len_s
        self._free_from = [float(x) for x in free_from_s]
        self._busy_start: list[list[float]] = [[] for _ in range(lanes)]
        self._busy_end: list[list[float]] = [[] for _ in range(lanes)]

    def lane(self, hole: tuple[int, int]) -> int:
        return int(self.sets[hole[0]].lane[hole[1]])

    def occupy(self, hole: tuple[int, int], start_s: float, end_s: float) -> int:
        """Take ``[start_s, end_s)`` out of ``hole`` (which must contain it); its lane."""
        h, k = self.sets[hole[0]], hole[1]
        gs, ge, lane = float(h.start_s[k]), float(h.end_s[k]), int(h.lane[k])
        if ge - end_s >= self._min_s:
            h.start_s[k] = end_s
        else:
            h.drop(k)
        if start_s - gs >= self._min_s:
            h.add(gs, start_s, lane)
        k = bisect.bisect_left(self._busy_start[lane], start_s)
        self._busy_start[lane].insert(k, start_s)
        self._busy_end[lane].insert(k, end_s)
        return lane

    def free(self, lane: int, start_s: float, end_s: float) -> None:
        """Give ``[start_s, end_s)`` of ``lane`` back, merged with the gaps around it."""
        starts, ends = self._busy_start[lane], self._busy_end[lane]
        k = bisect.bisect_left(starts, start_s)
        prev_end = ends[k - 1] if k > 0 else self._free_from[lane]
        next_start = starts[k + 1] if k + 1 < len(starts) else math.inf
        del starts[k], ends[k]
        h = self.sets[self._lane_kind[lane]]
        n = h.n
        near = np.flatnonzero((h.lane[:n] == lane) & ((h.end_s[:n] == start_s) | (h.start_s[:n] == end_s)))
        for j in near[::-1]:
            h.drop(int(j))
        if next_start - prev_end >= self._min_s:
            h.add(prev_end, next_start, lane)

    def find(self, lane: int, start_s: float, end_s: float) -> tuple[int, int]:
        """The hole of ``lane`` that contains ``[start_s, end_s)``."""
        kind = self._lane_kind[lane]
        h = self.sets[kind]
        n = h.n
        return kind, int(np.flatnonzero((h.lane[:n] == lane) & (h.start_s[:n] <= start_s) & (h.end_s[:n] >= end_s))[0])

    def of_lanes(self, lanes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(starts, ends) of the holes of ``lanes``, all of one node type."""
        h = self.sets[self._lane_kind[int(lanes[0])]]
        mine = np.isin(h.lane[: h.n], lanes)
        return h.start_s[: h.n][mine], h.end_s[: h.n][mine]


class _Planner:
    """The planning state of one instance: lanes, task placements, and the search on them."""

    def __init__(self, instance: Instance, integrator: CarbonIntegrator) -> None:
        self.inst = instance
        self.step_s = float(instance.step_s)
        nodes, tasks = instance.nodes, instance.tasks
        types = sorted({n.node_type for n in nodes})
        type_of = {t: i for i, t in enumerate(types)}
        region_of = {r: i for i, r in enumerate(integrator.regions)}
        node_type = np.array([type_of[n.node_type] for n in nodes])
        node_region = np.array([region_of[n.region] for n in nodes])
        type_power_w = np.zeros(len(types))
        for n in nodes:
            type_power_w[type_of[n.node_type]] = n.power_w
        self.lane_node = np.repeat(np.arange(len(nodes)), [n.slots for n in nodes])
        self.lane_type = node_type[self.lane_node]
        self.lane_power_w = type_power_w[self.lane_type]
        self.lane_free_from_s = np.array([n.busy_until_s for n in nodes], dtype=float)[self.lane_node]
        groups: dict[tuple[int, int], int] = {}  # (node type, region) -> group
        lane_region = node_region[self.lane_node]
        for key in zip(self.lane_type.tolist(), lane_region.tolist()):
            groups.setdefault(key, len(groups))
        self.lane_group = np.array([groups[key] for key in zip(self.lane_type.tolist(), lane_region.tolist())],
                                   dtype=np.int64)
        group_type = np.array([ty for ty, _ in groups], dtype=np.int64)
        self.group_region = group_region = np.array([rg for _, rg in groups], dtype=np.int64)
        self.group_power_w = type_power_w[group_type]

        # intensity integral, flat: _cum[r*w + k] = integral over [0, k*step) (gCO2/kWh * s)
        self._w = integrator._cum.shape[1]
        self._cum = integrator._cum.ravel()
        self._g_co2_per_kwh = np.concatenate([integrator._g_co2_per_kwh, integrator._g_co2_per_kwh[:, -1:]],
                                             axis=1).ravel()
        self._last = self._w - 2
        self.lane_base = lane_region * self._w
        self.group_base = group_region * self._w
        self._cum_list, self._g_list = self._cum.tolist(), self._g_co2_per_kwh.tolist()
        self._lane_base_list, self._lane_power_list = self.lane_base.tolist(), self.lane_power_w.tolist()

        n_tasks = len(tasks)
        # duration of each task on each node type; NaN where the type cannot run it, so
        # every comparison involving it is False
        self.dur_type = np.full((n_tasks, len(types)), np.nan)
        for i, t in enumerate(tasks):
            for name, d in t.durations_s.items():
                if name in type_of:
                    self.dur_type[i, type_of[name]] = d
        self.n_types = len(types)
        patterns: dict[tuple[bool, ...], list[int]] = {}  # node types able to run each task
        self.task_kinds = [patterns.setdefault(row, [y for y, ok in enumerate(row) if ok])
                           for row in map(tuple, np.isfinite(self.dur_type).tolist())]
        self.fastest_s = np.nanmin(self.dur_type, axis=1) if n_tasks else np.zeros(0)
        self.energy_j = np.nanmin(self.dur_type * type_power_w, axis=1) if n_tasks else np.zeros(0)
        self.min_len_s = float(self.fastest_s.min()) if n_tasks else 1.0
        self.release_s = np.array([t.release_s for t in tasks], dtype=float)
        self.deadline_s = np.array([np.inf if t.deadline_s is None else t.deadline_s for t in tasks], dtype=float)
        self.flexible = np.array([t.flexible for t in tasks], dtype=bool)
        self.parents = [list(t.depends_on) for t in tasks]
        self.children: list[list[int]] = [[] for _ in tasks]
        for i, t in enumerate(tasks):
            for p in t.depends_on:
                self.children[p].append(i)
        self.topo_rank = np.empty(n_tasks, dtype=np.int64)
        self.topo_rank[list(instance.topo_order)] = np.arange(n_tasks)
        self.latest_end_s = self._latest_ends()
        self.horizon_s = horizon_s(instance)
        self.group_type = group_type
        self._intensity = integrator._g_co2_per_kwh
        self._log2 = np.array([max(k.bit_length() - 1, 0) for k in range(int(self.horizon_s // self.step_s) + 8)])
        self._cache: tuple[_Breakpoints, np.ndarray] | bool | None = None

        self.lane_of = np.full(n_tasks, -1, dtype=np.int64)
        self.start_s = np.zeros(n_tasks)
        self.end_s = np.zeros(n_tasks)
        self.carbon = np.zeros(n_tasks)  # decision-time carbon of each placed task, g
        self.lanes = _Lanes(self.lane_free_from_s, self.lane_type, self.n_types, self.min_len_s, n_tasks)
        self._due_s = self.deadline_s
        self.work = 0  # effort spent: see _choose

    # -- carbon -----------------------------------------------------------------------------

    def _integral(self, base: np.ndarray, t_s: np.ndarray) -> np.ndarray:
        k = np.minimum(np.floor_divide(t_s, self.step_s).astype(np.int64), self._last)
        idx = base + k
        return self._cum[idx] + (t_s - k * self.step_s) * self._g_co2_per_kwh[idx]

    def _carbon_g(self, base: np.ndarray, power_w: np.ndarray, start_s: np.ndarray,
                  duration_s: np.ndarray) -> np.ndarray:
        """Grams for runs at ``power_w`` in the regions at ``base`` (region * row width)."""
        start_s = np.asarray(start_s, dtype=float)
        return power_w * (self._integral(base, start_s + duration_s) - self._integral(base, start_s)) / _J_PER_KWH

    def _carbon_scalar(self, lane: int, start_s: float, end_s: float) -> float:
        """:meth:`_carbon_g` for one run, in plain Python (no array overhead)."""
        base, step, last = self._lane_base_list[lane], self.step_s, self._last
        cum, g = self._cum_list, self._g_list
        k0 = min(int(start_s // step), last)
        k1 = min(int(end_s // step), last)
        f0 = cum[base + k0] + (start_s - k0 * step) * g[base + k0]
        f1 = cum[base + k1] + (end_s - k1 * step) * g[base + k1]
        return self._lane_power_list[lane] * (f1 - f0) / _J_PER_KWH

    def _tables(self) -> "_Breakpoints | None":
        """The cached breakpoint tables of every (group, duration) pair, built on first use;
        None when they would not fit in :data:`_TABLE_BYTES` (then each task builds its own
        over its window)."""
        if self._cache is None:
            self._cache = False
            dur = self.dur_type[:, self.group_type]  # (tasks, groups)
            combos: list[tuple[int, float]] = []
            task_combo = np.full(dur.shape, -1, dtype=np.int64)
            for g in range(dur.shape[1]):
                col = dur[:, g]
                ok = np.isfinite(col)
                values = np.unique(col[ok])
                task_combo[ok, g] = len(combos) + np.searchsorted(values, col[ok])
                combos += [(g, float(v)) for v in values]
            width = int(math.ceil(self.horizon_s / self.step_s)) + 2
            if combos and 2 * len(combos) * width * (width.bit_length() + 1) * 12 <= _TABLE_BYTES:
                group = np.array([g for g, _ in combos], dtype=np.int64)
                self._cache = (self._breakpoints(group, np.array([d for _, d in combos]), 0, width), task_combo)
        return self._cache or None

    def _breakpoints(self, group: np.ndarray, dur: np.ndarray, k0: int, width: int) -> "_Breakpoints":
        """Carbon of the breakpoint starts of runs of ``dur[c]`` on group ``group[c]``:
        row ``2c`` holds starts ``(k0 + x)*step`` (column x), row ``2c+1`` starts ending on a
        boundary, ``(k0 + x + ceil(d/step))*step - d``.

        Each value is a plain window sum of the intensity over whole steps plus the partial
        step, computed alike for every column, so equal windows give bitwise equal carbon
        and ties between them resolve by time, not by rounding noise.
        """
        step = self.step_s
        full = np.floor(dur / step).astype(np.int64)  # whole steps in the run
        frac = dur / step - full
        off = np.ceil(dur / step).astype(np.int64)
        need = k0 + width + int(off.max()) + 2
        g = self._intensity
        series = np.empty((len(group), need))
        last = g.shape[1]
        for c, grp in enumerate(group.tolist()):
            row = g[self.group_region[grp]]
            series[c, : min(need, last)] = row[:need]
            series[c, last:] = row[-1]
        vals = np.empty((2 * len(group), width))
        cols = np.arange(width) + k0
        for c in range(len(group)):
            m, f = int(full[c]), float(frac[c])
            s = series[c]
            if m == 0:
                sums = np.zeros(need)
            elif m <= _WINDOW_SUM_STEPS:
                sums = np.lib.stride_tricks.sliding_window_view(s, m).sum(axis=1)
            else:  # long runs: prefix sums (equal windows may then differ by rounding)
                cum = np.concatenate([[0.0], np.cumsum(s)])
                sums = cum[m:] - cum[:-m]
            start_full = sums[cols]
            vals[2 * c] = start_full + f * s[cols + m]
            if f:  # ends on a boundary: partial first step, then m whole ones
                vals[2 * c + 1] = sums[cols + 1] + f * s[cols]
            else:
                vals[2 * c + 1] = start_full
        vals *= np.repeat(self.group_power_w[group], 2)[:, None] * step / _J_PER_KWH
        return _Breakpoints(vals, np.repeat(off, 2) * np.tile([0, 1], len(group)),
                            np.repeat(dur, 2) * np.tile([0.0, 1.0], len(group)), k0, step, self._log2)

    def _latest_ends(self) -> np.ndarray:
        """Latest end of each task that leaves every descendant's deadline feasible.

        Backward pass over the DAG on fastest durations: ``L[i] = min(deadline_i,
        min over children c of L[c] - fastest_c)``; ``inf`` where nothing bounds it.
        """
        latest = self.deadline_s.copy()
        for i in reversed(self.inst.topo_order):
            for d in self.parents[i]:
                latest[d] = min(latest[d], latest[i] - self.fastest_s[i])
        return latest

    # -- placing one task -------------------------------------------------------------------

    def _choose(self, i: int, lo_bound: float, hi_end: float, mode: int,
                exclude_lane: int = -1) -> tuple[tuple[int, int], float] | None:
        """(hole, start) for task ``i``: starting at or after ``lo_bound``, ending by
        ``hi_end``; None if no free slot allows it.

        ``_FIFO``: earliest start, then lowest lane. ``_GREEDY``: earliest start, then least
        carbon, then lowest lane. ``_SHIFT``: least carbon over every feasible start, then
        earliest, then lowest lane; starts past the end of the intensity series gain nothing
        (the last value holds), so a hole offers none later than ``max(its start, horizon)``.
        ``_PACK``: as ``_SHIFT`` but only at either end of a hole (touching a neighbour), so
        the lanes stay packed -- a move of the local search. Never on ``exclude_lane``.
        """
        tl = self.lanes
        shift = mode >= _SHIFT
        scanned = 0
        t0, cand = math.inf, []  # earliest start so far and the holes that have it
        parts = []  # per node type: holes that fit, their feasible starts [lo, hi], duration
        for y in self.task_kinds[i]:
            h = tl.sets[y]
            d = float(self.dur_type[i, y])
            a, n = h.first_ending_by(lo_bound + d), h.n  # holes ending sooner cannot fit
            scanned += n - a
            lo = np.maximum(h.start_s[a:n], lo_bound)
            hi = np.minimum(h.end_s[a:n], hi_end)
            hi -= d
            if shift:
                np.minimum(hi, np.maximum(lo, self.horizon_s), out=hi)
            if exclude_lane >= 0 and self.lane_type[exclude_lane] == y:
                hi[h.lane[a:n] == exclude_lane] = -np.inf
            ok = lo <= hi
            if shift:
                fits = np.flatnonzero(ok)
                if len(fits):
                    parts.append((y, fits + a, lo[fits], hi[fits], d))
                continue
            lo_ok = np.where(ok, lo, np.inf)
            first = float(lo_ok.min()) if n > a else math.inf
            if first < t0:
                t0, cand = first, []
            if first == t0 < math.inf:
                cand.append((y, np.flatnonzero(lo_ok == first) + a, d))
        self.work += 1 + scanned // _HOLES_PER_UNIT
        if not shift:
            if not cand:
                return None
            # among the holes where the task starts earliest: (least carbon,) lowest lane
            if mode == _GREEDY and (len(cand) > 1 or len(cand[0][1]) > 1):
                carbon = [self._carbon_g(self.lane_base[tl.sets[y].lane[k]], self.lane_power_w[tl.sets[y].lane[k]],
                                         t0, dy) for y, k, dy in cand]
                least = min(float(c.min()) for c in carbon)
                cand = [(y, k[c <= least + _REL_TOL * abs(least)], dy) for (y, k, dy), c in zip(cand, carbon)]
            best = min((int(tl.sets[y].lane[k].min()), y) for y, k, _ in cand if len(k))
            y, k, _ = next(c for c in cand if c[0] == best[1])
            return (y, int(k[np.argmin(tl.sets[y].lane[k])])), t0
        if not parts:
            return None
        if len(parts) == 1:
            y, fits, lo, hi, dy = parts[0]
            d, lane = np.full(len(fits), dy), tl.sets[y].lane[fits]
        else:
            lo = np.concatenate([p[2] for p in parts])
            hi = np.concatenate([p[3] for p in parts])
            d = np.concatenate([np.full(len(p[1]), p[4]) for p in parts])
            lane = np.concatenate([tl.sets[p[0]].lane[p[1]] for p in parts])
        if mode == _SHIFT:
            j, start = self._cleanest(i, lo, hi, d, lane)
        else:  # _PACK
            t = np.concatenate([lo, hi])
            c = self._carbon_g(_twice(self.lane_base[lane]), _twice(self.lane_power_w[lane]), t, _twice(d))
            tied = np.flatnonzero(c <= c.min() + _REL_TOL * abs(c.min()))
            j = int(tied[np.lexsort((_twice(lane)[tied], t[tied]))[0]])
            j, start = j % len(lo), float(t[j])
        for y, fits, *_ in parts:
            if j < len(fits):
                return (y, int(fits[j])), start
            j -= len(fits)
        raise AssertionError("unreachable: j indexes the concatenated holes")

    def _cleanest(self, i: int, lo: np.ndarray, hi: np.ndarray, d: np.ndarray,
                  lane: np.ndarray) -> tuple[int, float]:
        """Minimum-carbon start over holes whose feasible starts are ``[lo, hi]``.

        carbon(start) is piecewise linear with breakpoints where the start or the end
        crosses a step boundary, so each hole's minimum lies at ``lo``, ``hi`` or such a
        breakpoint; sparse tables of breakpoint carbon (:class:`_Breakpoints`) give every
        hole's least breakpoint and where it is in O(1), so the cost per task is a few
        vectorized passes over the holes, not one per group or step. Ties (within a
        relative 1e-9) go to the earlier start, then the lower lane.
        """
        n = len(lo)
        base, power = self.lane_base[lane], self.lane_power_w[lane]
        f = self._integral(np.concatenate((base, base, base, base)), np.concatenate((lo, hi, lo + d, hi + d)))
        c_lo = (f[2 * n: 3 * n] - f[:n]) * power / _J_PER_KWH
        c_hi = (f[3 * n:] - f[n: 2 * n]) * power / _J_PER_KWH
        best = np.minimum(c_lo, c_hi)
        # breakpoints inside [lo, hi]; none past the horizon (hi <= max(lo, horizon) there)
        tables = self._tables()
        if tables is not None:
            bp, task_combo = tables
            combo = task_combo[i][self.lane_group[lane]]
            rows = np.concatenate((2 * combo, 2 * combo + 1))
        else:  # too many distinct durations to tabulate them all: this task's window only
            groups, where = np.unique(self.lane_group[lane], return_inverse=True)
            gd = np.empty(len(groups))
            gd[where] = d
            k0 = math.ceil(float(lo.min()) / self.step_s)
            last = min(float(hi.max()), self.horizon_s)
            bp = self._breakpoints(groups, gd, k0, max(int(math.floor(last / self.step_s)) - k0 + 3, 1))
            rows = np.concatenate((2 * where, 2 * where + 1))
        q = bp.query(rows, np.concatenate((lo, lo)), np.concatenate((hi, hi)))
        np.minimum(best, np.minimum(q.value[:n], q.value[n:]), out=best)
        m = float(best.min())
        thr = m + _REL_TOL * abs(m)
        tied = np.flatnonzero(best <= thr)
        t = np.where(c_lo[tied] <= thr, lo[tied], np.inf)
        late = np.flatnonzero(t == np.inf)  # the earliest least start is not at lo
        if len(late):
            h = tied[late]
            t[late] = np.where(c_hi[h] <= thr, hi[h], np.inf)
            for at in (h, h + n):  # grid starts, then starts ending on the grid
                ok = q.value[at] <= thr
                t[late[ok]] = np.minimum(t[late[ok]], q.start_s(at[ok]))
        j = int(np.lexsort((lane[tied], t))[0])
        pick = int(tied[j])
        return pick, min(max(float(t[j]), float(lo[pick])), float(hi[pick]))

    def _place(self, i: int, hole: tuple[int, int], start_s: float) -> None:
        lane = self.lanes.lane(hole)
        duration_s = self._dur(i, lane)
        self.lanes.occupy(hole, start_s, start_s + duration_s)
        self._record(i, lane, start_s, start_s + duration_s)

    def _record(self, i: int, lane: int, start_s: float, end_s: float) -> None:
        self.lane_of[i] = lane
        self.start_s[i] = start_s
        self.end_s[i] = end_s  # exactly the value the lanes hold, so free() finds its holes
        self.carbon[i] = self._carbon_scalar(lane, start_s, end_s)

    def _dur(self, i: int, lane: int) -> float:
        return float(self.dur_type[i, self.lane_type[lane]])

    def _unplace(self, i: int) -> None:
        self.lanes.free(int(self.lane_of[i]), float(self.start_s[i]), float(self.end_s[i]))
        self.lane_of[i] = -1

    def _restore(self, i: int, lane: int, start_s: float, end_s: float, carbon_g: float) -> None:
        self.lanes.occupy(self.lanes.find(lane, start_s, end_s), start_s, end_s)
        self.lane_of[i], self.start_s[i], self.end_s[i], self.carbon[i] = lane, start_s, end_s, carbon_g

    def _ready_s(self, i: int) -> float:
        """Earliest start of ``i`` given its release and its (placed) dependencies."""
        p = self.parents[i]
        ready = float(self.release_s[i])
        if len(p) == 1:
            return max(ready, float(self.end_s[p[0]]))
        return max(ready, float(self.end_s[p].max())) if p else ready

    def _saved(self, tasks: list[int]) -> dict[int, tuple[int, float, float, float]]:
        return {i: (int(self.lane_of[i]), float(self.start_s[i]), float(self.end_s[i]), float(self.carbon[i]))
                for i in tasks}

    def _put_back(self, placed: list[int], old: dict[int, tuple[int, float, float, float]]) -> None:
        for i in placed:
            self._unplace(i)
        for i, where in old.items():
            self._restore(i, *where)

    # -- construction -----------------------------------------------------------------------

    def construct(self, policy: str, priority: np.ndarray | None = None) -> None:
        """List scheduling from empty lanes: ready tasks by ``priority`` (lowest first; default
        input order), so every task is placed after its dependencies."""
        self.lanes = _Lanes(self.lane_free_from_s, self.lane_type, self.n_types, self.min_len_s, len(self.inst.tasks))
        self.lane_of[:] = -1
        mode = _FIFO if policy == "fifo" else _GREEDY
        shift = policy == "carbon-deadline"
        for i in self._topological(priority):
            ready = self._ready_s(i)
            choice = None
            if shift and self.flexible[i]:
                choice = self._choose(i, ready, float(self.latest_end_s[i]), _SHIFT)
            if choice is None:
                choice = self._choose(i, ready, math.inf, mode)
            assert choice is not None  # an unbounded lane always fits
            self._place(i, *choice)

    def _topological(self, priority: np.ndarray | None) -> list[int]:
        if priority is None:
            return list(self.inst.topo_order)
        pending = [len(p) for p in self.parents]
        ready = [(float(priority[i]), i) for i, n in enumerate(pending) if n == 0]
        heapq.heapify(ready)
        order = []
        while ready:
            _, i = heapq.heappop(ready)
            order.append(i)
            for c in self.children[i]:
                pending[c] -= 1
                if pending[c] == 0:
                    heapq.heappush(ready, (float(priority[c]), c))
        return order

    def late(self) -> np.ndarray:
        """Which placed tasks end after their deadline."""
        return self.end_s > self.deadline_s + _MISS_SLACK_S

    def snapshot(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.lane_of.copy(), self.start_s.copy(), self.end_s.copy()

    def load(self, state: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
        """Rebuild the lanes from a snapshot."""
        lane_of, start, end = state
        self.lanes = _Lanes(self.lane_free_from_s, self.lane_type, self.n_types, self.min_len_s, len(lane_of))
        for i in np.argsort(start, kind="stable").tolist():
            lane, s, e = int(lane_of[i]), float(start[i]), float(end[i])
            self.lanes.occupy(self.lanes.find(lane, s, e), s, e)
            self._record(i, lane, s, e)

    # -- improvement ------------------------------------------------------------------------

    def improve(self, effort: int, seed: int) -> None:
        """Local search on the current (complete) placement, moving flexible tasks only.

        Never breaks a constraint and never makes a task miss a deadline it meets (a task
        already late may not end later than it does). Spends ``effort`` work units (see
        :data:`DEFAULT_EFFORT`) on:

        1. sweeps that move one task at a time (biggest energy first) to its cheapest
           feasible (node, start) given all others, until a sweep saves nothing;
        2. simulated annealing, in :data:`_ROUNDS` reheated rounds, over two larger moves:
           *ruin and recreate* (:meth:`_ruin_recreate`: remove 2-8 related tasks, insert
           them again one by one in another order, at their cheapest start or packed
           against a neighbour) and *lane re-plans* (:meth:`_resequence`: the exact best
           order and starts of up to 8 tasks on one slot lane, choosing which of them run
           elsewhere -- what packs a clean node tight). A worse result is kept with
           probability exp(-loss / T), T cooling geometrically; the best plan seen wins.
        """
        flex = np.flatnonzero(self.flexible)
        if effort <= 0 or not len(flex):
            return
        rng = random.Random(seed)
        self._due_s = np.where(self.late(), self.end_s, self.deadline_s)
        start = self.work
        by_energy = flex[np.argsort(-self.energy_j[flex], kind="stable")].tolist()
        improved = True
        while improved and self.work - start < effort:
            improved = False
            for i in by_energy:
                if self.work - start >= effort:
                    break
                improved |= self._relocate(i)
        if len(flex) < 2 or self.work - start >= effort:
            return
        k_max = min(len(flex), 8)
        total = float(self.carbon.sum())
        best_total, best = total, self.snapshot()
        t0 = _T0_SHARE * total / len(flex) + 1e-12
        patience = _PATIENCE[0] + _PATIENCE[1] * len(flex)
        for r in range(_ROUNDS):  # each round reheats and starts from the best plan so far
            budget = (effort - (self.work - start)) / (_ROUNDS - r)
            if r and float(self.carbon.sum()) > best_total * (1 + _REL_TOL):
                self.load(best)
                total = best_total
            begin = found = self.work
            while self.work - begin < budget and self.work - found < patience:
                temp = t0 * _T_END ** ((self.work - begin) / budget)
                if rng.random() < _DP_SHARE:
                    total -= self._resequence(rng, flex, temp)
                else:
                    total -= self._ruin_recreate(self._neighbourhood(rng, flex, rng.randint(2, k_max)), rng, temp)
                if total < best_total * (1 - _REL_TOL):
                    best_total, best, found = total, self.snapshot(), self.work
        if float(self.carbon.sum()) > best_total * (1 + _REL_TOL):
            self.load(best)

    def _relocate(self, i: int) -> bool:
        """Move ``i`` to its cheapest feasible (node, start); True if that saves carbon."""
        old = self._saved([i])
        self._unplace(i)
        lo = self._ready_s(i)
        hi = float(self._due_s[i])
        for c in self.children[i]:
            hi = min(hi, float(self.start_s[c]))
        choice = self._choose(i, lo, hi, _SHIFT)
        if choice is None:  # cannot happen (its old place is free and in the window); be safe
            self._put_back([], old)
            return False
        self._place(i, *choice)
        was = old[i][3]
        if self.carbon[i] > was + _REL_TOL * abs(was):
            self._put_back([i], old)
            return False
        return bool(self.carbon[i] < was - _REL_TOL * abs(was))

    def _neighbourhood(self, rng: random.Random, flex: np.ndarray, k: int) -> list[int]:
        """``k`` related flexible tasks around a random one: near it in time, in its family
        (dependencies), on its lane, or simply at random."""
        seed_task = int(flex[rng.randrange(len(flex))])
        kind = rng.randrange(4)
        if kind == 0:
            return rng.sample(flex.tolist(), k)
        if kind == 1:
            jitter = np.random.default_rng(rng.getrandbits(32)).random(len(flex)) * self.step_s
            gap = np.abs(self.start_s[flex] - self.start_s[seed_task]) + jitter
            return flex[np.argsort(gap, kind="stable")[:k]].tolist()
        if kind == 2:
            chosen, frontier = [seed_task], [seed_task]
            while frontier and len(chosen) < k:
                x = frontier.pop(rng.randrange(len(frontier)))
                for y in self.parents[x] + self.children[x]:
                    if self.flexible[y] and y not in chosen and len(chosen) < k:
                        chosen.append(y)
                        frontier.append(y)
        else:
            same_lane = flex[self.lane_of[flex] == self.lane_of[seed_task]]
            gap = np.abs(self.start_s[same_lane] - self.start_s[seed_task])
            chosen = same_lane[np.argsort(gap, kind="stable")[:k]].tolist()
        if len(chosen) < 2:
            others = [x for x in flex.tolist() if x not in chosen]
            chosen += rng.sample(others, min(len(others), k - len(chosen)))
        return chosen

    def _ruin_recreate(self, chosen: list[int], rng: random.Random, temp: float) -> float:
        """Remove ``chosen`` and insert them again one by one in one of several orders;
        keep the result if it emits no more or the annealing accepts it (return the saving,
        g, negative for a loss), else put everything back (return 0)."""
        chosen = sorted(chosen, key=lambda x: int(self.topo_rank[x]))
        old = self._saved(chosen)
        before = sum(v[3] for v in old.values())
        for i in chosen:
            self._unplace(i)
        est, lst = self._windows(chosen)  # what the removed tasks must leave each other
        how = rng.randrange(4)
        if how == 0:
            order = chosen
        elif how == 1:
            order = chosen[::-1]
        elif how == 2:
            order = sorted(chosen, key=lambda x: (-float(self.energy_j[x]), rng.random()))
        else:
            order = rng.sample(chosen, len(chosen))
        mode = _PACK if rng.random() < 0.5 else _SHIFT
        placed: list[int] = []
        for i in order:
            lo = float(self.release_s[i])
            for p in self.parents[i]:
                lo = max(lo, float(self.end_s[p]) if self.lane_of[p] >= 0 else est[p] + float(self.fastest_s[p]))
            hi = float(self._due_s[i])
            for c in self.children[i]:
                hi = min(hi, float(self.start_s[c]) if self.lane_of[c] >= 0 else lst[c] - float(self.fastest_s[c]))
            choice = self._choose(i, lo, hi, mode)
            if choice is None:
                break
            self._place(i, *choice)
            placed.append(i)
        else:
            after = float(self.carbon[chosen].sum())
            if after <= before + _REL_TOL * abs(before) or rng.random() < math.exp((before - after) / temp):
                return before - after
        self._put_back(placed, old)
        return 0.0

    def _resequence(self, rng: random.Random, flex: np.ndarray, temp: float) -> float:
        """Re-plan one lane exactly: a run of its flexible tasks (in start order) plus a few
        flexible tasks from other lanes that could run there. Some of them leave (or stay
        off) the lane, to their cheapest place between their dependencies; the others get
        the best order and step-boundary starts on the lane (:meth:`_lane_dp`). Everything
        else stays. Who leaves is drawn at random or, at even odds, chosen by a first
        programme in which each task may also leave at an estimated cost; its plan is
        tried as it is and with the leavers placed first, and the cheaper kept. Kept like a
        ruin-and-recreate result (returns the saving, g).
        """
        lane = int(self.lane_of[flex[rng.randrange(len(flex))]])
        here = self.lane_of[flex] == lane
        on_lane = flex[here][np.argsort(self.start_s[flex[here]], kind="stable")].tolist()
        outside = flex[~here & np.isfinite(self.dur_type[flex, self.lane_type[lane]])].tolist()
        pull = rng.sample(outside, min(len(outside), rng.choice(_DP_PULL)))
        if len(on_lane) + len(pull) > _DP_TASKS:
            first = rng.randrange(len(on_lane) - (_DP_TASKS - len(pull)) + 1)
            on_lane = on_lane[first:first + _DP_TASKS - len(pull)]
        moved = sorted(on_lane + pull, key=lambda i: int(self.topo_rank[i]))
        self.work += 1
        if not moved:
            return 0.0
        dp_cost = (1 << len(moved)) // 16
        self.work += dp_cost
        old = self._saved(moved)
        before = sum(v[3] for v in old.values())
        for i in moved:
            self._unplace(i)

        def lane_then_leavers(starts: dict[int, float], leavers: list[int], placed: list[int]) -> bool:
            self._put_on_lane(starts, lane, placed)
            return self._push(leavers, old, lane, placed)

        def leavers_then_lane(leavers: list[int], windows: tuple[dict[int, float], dict[int, float]] | None,
                              placed: list[int]) -> bool:
            if not self._push(leavers, old, lane, placed, windows):
                return False
            rest = [i for i in moved if i not in leavers]
            plan_ = self._lane_dp(lane, rest, old, leave=False) if rest else ({}, [])
            if plan_ is not None:
                self._put_on_lane(plan_[0], lane, placed)
            return plan_ is not None

        tries = []
        if rng.random() < 0.5:
            guess = self._lane_dp(lane, moved, old, leave=True)
            self.work += dp_cost
            if guess is not None:
                tries.append(lambda placed: lane_then_leavers(guess[0], guess[1], placed))
                if guess[1]:
                    windows = self._windows(moved)
                    tries.append(lambda placed: leavers_then_lane(guess[1], windows, placed))
        else:
            push = rng.sample(on_lane, min(len(on_lane), rng.choice(_DP_PUSH)))
            push.sort(key=lambda i: int(self.topo_rank[i]))
            if rng.random() < 0.5:
                tries.append(lambda placed: leavers_then_lane(push, None, placed))
            else:  # re-plan the lane first, leaving the pushed tasks room for their fastest run
                def lane_first(placed: list[int]) -> bool:
                    rest = [i for i in moved if i not in push]
                    plan_ = self._lane_dp(lane, rest, old, leave=False) if rest else ({}, [])
                    return plan_ is not None and lane_then_leavers(plan_[0], push, placed)
                tries.append(lane_first)
        best: dict[int, tuple[int, float, float, float]] | None = None
        for attempt in tries:
            placed: list[int] = []
            if attempt(placed) and (best is None or float(self.carbon[moved].sum()) < sum(v[3] for v in best.values())):
                best = self._saved(moved)
            for i in placed:
                self._unplace(i)
        if best is None:
            self._put_back([], old)
            return 0.0
        for i, where in sorted(best.items(), key=lambda x: x[1][1]):
            self._restore(i, *where)
        after = sum(v[3] for v in best.values())
        if after <= before + _REL_TOL * abs(before) or rng.random() < math.exp((before - after) / temp):
            return before - after
        self._put_back(moved, old)
        return 0.0

    def _put_on_lane(self, starts: dict[int, float], lane: int, placed: list[int]) -> None:
        tl = self.lanes
        for i, st in sorted(starts.items(), key=lambda x: x[1]):
            d = self._dur(i, lane)
            tl.occupy(tl.find(lane, st, st + d), st, st + d)
            self._record(i, lane, st, st + d)
            placed.append(i)

    def _lane_dp(self, lane: int, members: list[int], old: dict[int, tuple[int, float, float, float]],
                 leave: bool) -> tuple[dict[int, float], list[int]] | None:
        """Best order and step-boundary starts of ``members`` (unplaced) on ``lane``, all
        else where it is; with ``leave``, a member may instead go elsewhere. Returns (start
        of each member on the lane, members that leave), or None if nothing fits.

        Dynamic programme over (set S of members decided, step t by which those on the lane
        have all ended). A member may be decided once the members it depends on are; it
        runs on the lane ending by t (``f[S-i][t-e_i] + c_i(t-e_i)``: ``e_i`` its duration
        in whole steps, ``c_i`` its carbon there, inf where its window or the lane's free
        time forbids) or, with ``leave``, leaves (``f[S-i][t] + o_i(t)``: ``o_i(t)`` the
        least carbon of a step-boundary run on another lane's free time starting at t or
        later -- ending by t if members depend on it; an estimate, as members that leave
        may compete for it, so they are placed for real afterwards); ``f[S][t] <=
        f[S][t-1]``.
        Unplaced relatives that are not members (to be placed after) get room for their
        fastest run.
        """
        step = self.step_s
        m = len(members)
        index = {x: j for j, x in enumerate(members)}
        dur = np.array([self._dur(i, lane) for i in members])
        steps = np.ceil(dur / step).astype(np.int64)
        lo = np.empty(m)
        hi = np.empty(m)
        parent_mask = [0] * m
        child_mask = [0] * m
        for j, i in enumerate(members):
            lo[j] = self.release_s[i]
            for p in self.parents[i]:
                if p in index:
                    parent_mask[j] |= 1 << index[p]
                elif self.lane_of[p] >= 0:
                    lo[j] = max(lo[j], self.end_s[p])
                else:
                    lo[j] = max(lo[j], float(self.release_s[p]) + float(self.fastest_s[p]))
            hi[j] = self._due_s[i]
            for c in self.children[i]:
                if c in index:
                    child_mask[j] |= 1 << index[c]
                elif self.lane_of[c] >= 0:
                    hi[j] = min(hi[j], self.start_s[c])
                else:
                    hi[j] = min(hi[j], float(self._due_s[c]) - float(self.fastest_s[c]))
        tl = self.lanes
        last_start = max(self.horizon_s, max(old[i][1] for i in members))
        horizon = int(math.ceil(last_start / step)) + int(steps.sum()) + 1
        ks = np.arange(horizon + 1) * step

        def carbon_at(j: int, on: np.ndarray) -> np.ndarray:
            """Carbon of member j starting at each step on the lanes ``on`` (all of one
            group), inf where none of them is free for the run or its window forbids."""
            d = self._dur(members[j], int(on[0]))
            out = np.full(horizon + 1, np.inf)
            if not np.isfinite(d):
                return out
            hs, he = tl.of_lanes(on)
            ok = ((ks >= lo[j]) & (ks + d <= hi[j]) & ((hs[:, None] <= ks) & (ks + d <= he[:, None])).any(axis=0))
            out[ok] = self._carbon_g(self.lane_base[on[0]], self.lane_power_w[on[0]], ks[ok], d)
            return out

        here = np.array([lane])
        cost = np.stack([carbon_at(j, here) for j in range(m)])
        away = None
        if leave:
            # a member that leaves runs on another lane, starting at t or later -- or, if
            # members depend on it, ending by t, so that they (decided later) start after it
            others = np.flatnonzero(np.arange(len(self.lane_group)) != lane)
            by_group = [others[self.lane_group[others] == g] for g in np.unique(self.lane_group[others])]
            away = np.full((m, horizon + 1), np.inf)
            for j in range(m):
                by_end = bool(child_mask[j])
                for on in by_group:
                    c = carbon_at(j, on)
                    if by_end and np.isfinite(c).any():
                        e = int(math.ceil(self._dur(members[j], int(on[0])) / step))
                        c = np.concatenate([np.full(e, np.inf), c[: horizon + 1 - e]])
                    np.minimum(away[j], c, out=away[j])
                if by_end:
                    np.minimum.accumulate(away[j], out=away[j])
                else:
                    away[j] = np.minimum.accumulate(away[j][::-1])[::-1]
        full = (1 << m) - 1
        f = np.full((full + 1, horizon + 1), np.inf)
        f[0] = 0.0
        last = [[j for j in range(m) if s >> j & 1 and not s & child_mask[j] and not parent_mask[j] & ~s]
                for s in range(full + 1)]
        for s in range(1, full + 1):
            row = f[s]
            for j in last[s]:
                prev = f[s ^ 1 << j]
                e = int(steps[j])
                np.minimum(row[e:], prev[: horizon + 1 - e] + cost[j, : horizon + 1 - e], out=row[e:])
                if away is not None:
                    np.minimum(row, prev + away[j], out=row)
            np.minimum.accumulate(row, out=row)
        if not np.isfinite(f[full, horizon]):
            return None
        s, t = full, horizon
        starts: dict[int, float] = {}
        leaving: list[int] = []
        while s:
            if t > 0 and f[s, t] == f[s, t - 1]:
                t -= 1
                continue
            for j in last[s]:
                prev = f[s ^ 1 << j]
                e = int(steps[j])
                if t >= e and prev[t - e] + cost[j, t - e] == f[s, t]:
                    starts[members[j]] = float((t - e) * step)
                    s, t = s ^ 1 << j, t - e
                    break
                if away is not None and prev[t] + away[j, t] == f[s, t]:
                    leaving.append(members[j])
                    s ^= 1 << j
                    break
            else:  # unreachable: f[s, t] is one of these terms
                raise AssertionError("lane re-sequencing lost its way back")
        return starts, sorted(leaving, key=lambda i: int(self.topo_rank[i]))

    def _push(self, push: list[int], old: dict[int, tuple[int, float, float, float]], lane: int,
              placed: list[int], windows: tuple[dict[int, float], dict[int, float]] | None = None) -> bool:
        """Place each of ``push`` (dependencies first) at its cheapest start off ``lane``
        between its dependencies; an unplaced one counts where it was or, given
        ``windows`` (earliest start, latest end), by those and its fastest run. False if
        one does not fit."""
        for i in push:
            lo = float(self.release_s[i])
            for p in self.parents[i]:
                if self.lane_of[p] >= 0:
                    lo = max(lo, float(self.end_s[p]))
                else:
                    lo = max(lo, old[p][2] if windows is None else windows[0][p] + float(self.fastest_s[p]))
            hi = float(self._due_s[i])
            for c in self.children[i]:
                if self.lane_of[c] >= 0:
                    hi = min(hi, float(self.start_s[c]))
                else:
                    hi = min(hi, old[c][1] if windows is None else windows[1][c] - float(self.fastest_s[c]))
            choice = self._choose(i, lo, hi, _SHIFT, exclude_lane=lane)
            if choice is None:
                return False
            self._place(i, *choice)
            placed.append(i)
        return True

    def _windows(self, chosen: list[int]) -> tuple[dict[int, float], dict[int, float]]:
        """Earliest start and latest end of each unplaced task of ``chosen`` (in topological
        order) given the placed ones, on fastest durations: forward and backward passes."""
        out = set(chosen)
        est: dict[int, float] = {}
        lst: dict[int, float] = {}
        for i in chosen:
            e = float(self.release_s[i])
            for p in self.parents[i]:
                e = max(e, est[p] + float(self.fastest_s[p]) if p in out else float(self.end_s[p]))
            est[i] = e
        for i in reversed(chosen):
            latest = float(self._due_s[i])
            for c in self.children[i]:
                latest = min(latest, lst[c] - float(self.fastest_s[c]) if c in out else float(self.start_s[c]))
            lst[i] = latest
        return est, lst


def _twice(x: np.ndarray) -> np.ndarray:
    return np.concatenate([x, x])


class _Breakpoints:
    """Rows of breakpoint carbon (see :meth:`_Planner._breakpoints`) with sparse tables of
    range minima: ``val[l, r, x]`` is the least of ``row r, columns x .. x + 2**l - 1`` and
    ``arg[l, r, x]`` its leftmost column. Column x of row r is the start
    ``(x + k0 + off[r])*step - shift[r]``."""

    def __init__(self, vals: np.ndarray, off: np.ndarray, shift: np.ndarray, k0: int, step: float,
                 log2: np.ndarray) -> None:
        self.off, self.shift, self.k0, self.step, self.log2 = off, shift, k0, step, log2
        width = vals.shape[1]
        val = [vals]
        arg = [np.broadcast_to(np.arange(width, dtype=np.int32), vals.shape).copy()]
        span = 1
        while 2 * span <= width:
            v, a = val[-1], arg[-1]
            left = v[:, : width - span] <= v[:, span:]
            nv, na = np.full_like(v, np.inf), np.zeros_like(a)
            nv[:, : width - span] = np.where(left, v[:, : width - span], v[:, span:])
            na[:, : width - span] = np.where(left, a[:, : width - span], a[:, span:])
            val.append(nv)
            arg.append(na)
            span *= 2
        self.val, self.arg = np.stack(val), np.stack(arg)

    def query(self, row: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> "_Query":
        """Per entry, the least carbon of row ``row`` over starts in ``[lo, hi]`` (inf where
        the row has none there), and on demand the earliest start that has it."""
        width = self.val.shape[2]
        shift, off = self.shift[row], self.off[row] + self.k0
        a = np.maximum(np.ceil((lo + shift) / self.step) - off, 0).astype(np.int64)
        b = np.minimum(np.floor((hi + shift) / self.step) - off, width - 1).astype(np.int64)
        ok = a <= b
        a, b = np.where(ok, a, 0), np.where(ok, b, 0)
        lev = self.log2[b - a + 1]
        b += 1 - (1 << lev)
        flat = (lev * self.val.shape[1] + row) * width
        a += flat
        b += flat
        va, vb = self.val.take(a), self.val.take(b)
        return _Query(self, np.where(ok, np.minimum(va, vb), np.inf), np.where(va <= vb, a, b), off, shift)


@dataclass
class _Query:
    """Result of :meth:`_Breakpoints.query`: ``value`` per entry; ``start_s(j)`` for some."""

    table: _Breakpoints
    value: np.ndarray
    _at: np.ndarray  # flat index of the least value in the sparse table
    _off: np.ndarray
    _shift: np.ndarray

    def start_s(self, j: np.ndarray) -> np.ndarray:
        return (self.table.arg.take(self._at[j]) + self._off[j]) * self.table.step - self._shift[j]


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
