"""Placing tasks: the planning state, one task's best place, and list scheduling.

:class:`_ListScheduler` holds where every task is (lane, start, end, carbon) and the free
time of every lane. :meth:`~_ListScheduler._choose` finds one task's place in a window
under a mode (earliest for ``fifo`` and ``greedy-carbon``, least carbon for
``carbon-deadline``, packed against a neighbour for the search);
:meth:`~_ListScheduler.construct` places every task once, in topological order by a
priority -- the first schedule of every policy, and a starting point of the search.
"""

from __future__ import annotations

import heapq
import math

import numpy as np

from orchestrator.scheduler.instance import Instance, horizon_s
from orchestrator.scheduler.planner.carbon import _J_PER_KWH, CarbonIntegrator, _LaneCarbon
from orchestrator.scheduler.planner.lanes import _Lanes

_REL_TOL = 1e-9  # carbon values closer than this (relative) count as a tie -> earlier wins
_MISS_SLACK_S = 1e-6  # an end this close past a deadline still meets it

_FIFO, _GREEDY, _SHIFT, _PACK = 0, 1, 2, 3  # how _ListScheduler._choose picks a start
_HOLES_PER_UNIT = 64  # free intervals one unit of effort scans


class _ListScheduler:
    """The planning state of one instance (lanes and task placements), how one task is
    placed, and list scheduling from empty lanes; :class:`~.search._Planner` adds the
    search on top."""

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
        group_region = np.array([rg for _, rg in groups], dtype=np.int64)

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
        self.lane_carbon = _LaneCarbon(integrator, lane_region, self.lane_power_w, group_region,
                                       type_power_w[group_type], group_type, self.dur_type, self.horizon_s)
        self.lane_base = self.lane_carbon.lane_base

        self.lane_of = np.full(n_tasks, -1, dtype=np.int64)
        self.start_s = np.zeros(n_tasks)
        self.end_s = np.zeros(n_tasks)
        self.carbon = np.zeros(n_tasks)  # decision-time carbon of each placed task, g
        self.lanes = _Lanes(self.lane_free_from_s, self.lane_type, self.n_types, self.min_len_s, n_tasks)
        self._due_s = self.deadline_s
        self.work = 0  # effort spent: see _choose

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
                carbon = [self.lane_carbon.carbon_g(self.lane_base[tl.sets[y].lane[k]],
                                                    self.lane_power_w[tl.sets[y].lane[k]], t0, dy)
                          for y, k, dy in cand]
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
            c = self.lane_carbon.carbon_g(_twice(self.lane_base[lane]), _twice(self.lane_power_w[lane]), t, _twice(d))
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
        f = self.lane_carbon.integral(np.concatenate((base, base, base, base)),
                                      np.concatenate((lo, hi, lo + d, hi + d)))
        c_lo = (f[2 * n: 3 * n] - f[:n]) * power / _J_PER_KWH
        c_hi = (f[3 * n:] - f[n: 2 * n]) * power / _J_PER_KWH
        best = np.minimum(c_lo, c_hi)
        # breakpoints inside [lo, hi]; none past the horizon (hi <= max(lo, horizon) there)
        tables = self.lane_carbon.tables()
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
            bp = self.lane_carbon.breakpoints(groups, gd, k0, max(int(math.floor(last / self.step_s)) - k0 + 3, 1))
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
        self.carbon[i] = self.lane_carbon.carbon_scalar(lane, start_s, end_s)

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


def _twice(x: np.ndarray) -> np.ndarray:
    return np.concatenate([x, x])
