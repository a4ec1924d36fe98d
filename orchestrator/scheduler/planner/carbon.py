"""Carbon of runs: intensity integrated over time windows, exactly and fast.

:class:`CarbonIntegrator` is the public, instance-level view (any region, power and
window, vectorized). :class:`_LaneCarbon` is the planner's: the same integrals indexed
by slot lane, a scalar form for one run, and breakpoint tables that find a run's cheapest
start in a window without scanning every step. Both hold each series' last value past its
end and treat intensity as constant within a step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from orchestrator.scheduler.instance import Instance
from workers.util import J_PER_KWH as _J_PER_KWH

_TABLE_BYTES = 64 << 20  # cap on the cached breakpoint tables; past it, tables are per task
_WINDOW_SUM_STEPS = 64  # runs up to this many steps: carbon from plain window sums (exact ties)


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


class _LaneCarbon:
    """Carbon of runs on the planner's slot lanes and groups (lanes of one node type in one
    region), for the tasks of one instance.

    The integrator's prefix sums are flattened so that ``base + step`` (``base`` = region
    index x row width, :attr:`lane_base` per lane) reaches any region with one index; a
    copy as Python lists serves the scalar form, which the placement calls once per move.
    """

    def __init__(self, integrator: CarbonIntegrator, lane_region: np.ndarray, lane_power_w: np.ndarray,
                 group_region: np.ndarray, group_power_w: np.ndarray, group_type: np.ndarray,
                 dur_type: np.ndarray, horizon_s: float) -> None:
        self.step_s = float(integrator.step_s)
        # intensity integral, flat: _cum[r*w + k] = integral over [0, k*step) (gCO2/kWh * s)
        self._w = integrator._cum.shape[1]
        self._cum = integrator._cum.ravel()
        self._g_co2_per_kwh = np.concatenate([integrator._g_co2_per_kwh, integrator._g_co2_per_kwh[:, -1:]],
                                             axis=1).ravel()
        self._last = self._w - 2
        self.lane_base = lane_region * self._w
        self._cum_list, self._g_list = self._cum.tolist(), self._g_co2_per_kwh.tolist()
        self._lane_base_list, self._lane_power_list = self.lane_base.tolist(), lane_power_w.tolist()
        self.group_region, self.group_power_w, self.group_type = group_region, group_power_w, group_type
        self.dur_type = dur_type  # (tasks, node types): duration, NaN where the type cannot run it
        self.horizon_s = horizon_s
        self._intensity = integrator._g_co2_per_kwh
        self._log2 = np.array([max(k.bit_length() - 1, 0) for k in range(int(self.horizon_s // self.step_s) + 8)])
        self._cache: tuple[_Breakpoints, np.ndarray] | bool | None = None

    def integral(self, base: np.ndarray, t_s: np.ndarray) -> np.ndarray:
        """Intensity integrated over ``[0, t_s)`` in the regions at ``base`` (gCO2/kWh * s)."""
        k = np.minimum(np.floor_divide(t_s, self.step_s).astype(np.int64), self._last)
        idx = base + k
        return self._cum[idx] + (t_s - k * self.step_s) * self._g_co2_per_kwh[idx]

    def carbon_g(self, base: np.ndarray, power_w: np.ndarray, start_s: np.ndarray,
                 duration_s: np.ndarray) -> np.ndarray:
        """Grams for runs at ``power_w`` in the regions at ``base`` (region * row width)."""
        start_s = np.asarray(start_s, dtype=float)
        return power_w * (self.integral(base, start_s + duration_s) - self.integral(base, start_s)) / _J_PER_KWH

    def carbon_scalar(self, lane: int, start_s: float, end_s: float) -> float:
        """:meth:`carbon_g` for one run, in plain Python (no array overhead)."""
        base, step, last = self._lane_base_list[lane], self.step_s, self._last
        cum, g = self._cum_list, self._g_list
        k0 = min(int(start_s // step), last)
        k1 = min(int(end_s // step), last)
        f0 = cum[base + k0] + (start_s - k0 * step) * g[base + k0]
        f1 = cum[base + k1] + (end_s - k1 * step) * g[base + k1]
        return self._lane_power_list[lane] * (f1 - f0) / _J_PER_KWH

    def tables(self) -> "_Breakpoints | None":
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
                self._cache = (self.breakpoints(group, np.array([d for _, d in combos]), 0, width), task_combo)
        return self._cache or None

    def breakpoints(self, group: np.ndarray, dur: np.ndarray, k0: int, width: int) -> "_Breakpoints":
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


class _Breakpoints:
    """Rows of breakpoint carbon (see :meth:`_LaneCarbon.breakpoints`) with sparse tables of
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
