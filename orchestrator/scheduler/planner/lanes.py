"""Slot lanes: where on a node a task can still run.

A node with ``slots`` slots is that many lanes; a task takes one lane for its whole run,
so capacity is never checked by counting, only by finding a free interval ("hole") long
enough on some lane. The holes are what every placement scans, so they are kept in flat
numpy arrays per node type, sorted by end.
"""

from __future__ import annotations

import bisect
import math

import numpy as np


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
