"""Improving a complete plan: local search, simulated annealing, exact lane re-plans.

The search behind ``carbon-deadline`` (see :meth:`_Planner.improve`). Every move keeps
every constraint and every met deadline, so the plan is valid at all times and the best
one seen can be returned whenever the work budget runs out; the random choices come from
one seeded generator, so a (seed, effort) pair always yields the same plan.
"""

from __future__ import annotations

import math
import random

import numpy as np

from orchestrator.scheduler.planner.construct import _PACK, _REL_TOL, _SHIFT, _ListScheduler

_ROUNDS = 3  # annealing rounds, each reheated from the best plan so far
_T0_SHARE, _T_END = 0.01, 1e-5  # start temperature (share of mean task carbon), end/start ratio
_PATIENCE = (100, 40)  # a round ends after a + b * (flexible tasks) units without a new best
_DP_SHARE = 0.35  # share of annealing moves that re-plan a lane (the rest ruin and recreate)
_DP_TASKS = 8  # most tasks one lane re-plan handles (its programme has 2**tasks states a step)
_DP_PULL = (0, 1, 1, 2)  # how many tasks it pulls in from other lanes (drawn uniformly)
_DP_PUSH = (0, 1)  # how many of the lane's tasks it pushes out when not guided (drawn uniformly)


class _Planner(_ListScheduler):
    """A :class:`_ListScheduler` that can also improve its complete placement."""

    def improve(self, effort: int, seed: int) -> None:
        """Local search on the current (complete) placement, moving flexible tasks only.

        Never breaks a constraint and never makes a task miss a deadline it meets (a task
        already late may not end later than it does). Spends ``effort`` work units (see
        :data:`~orchestrator.scheduler.planner.DEFAULT_EFFORT`) on:

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
            out[ok] = self.lane_carbon.carbon_g(self.lane_base[on[0]], self.lane_power_w[on[0]], ks[ok], d)
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
