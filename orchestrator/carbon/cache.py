"""Intensity series for carbon-aware placement, kept off the dispatch path.

The placer (:class:`~orchestrator.scheduler.online.CarbonPlacer`) needs, at every
re-plan, one hourly series per node region from the start of the current hour. Asking
a remote API for it inside the coordinator's dispatch step would let a slow or
rate-limited Electricity Maps / WattTime stall dispatch. :class:`SeriesCache` keeps the
series per ``(region, hour)`` and, for remote providers (``provider.remote``), fills
and refreshes them from one background thread:

- a read never waits on the network, except the first read of a ``(region, hour)``
  nobody asked for before, which waits at most ``fill_wait_s`` (a healthy API answers
  well within it; afterwards the refresher fills the *next* hour ``prefetch_s`` before
  it begins, so an hour boundary costs nothing);
- what cannot be filled in time is answered with the region's last known series, moved
  onto the current hour and labelled ``stale``, or, with none, with a flat labelled
  ``fallback`` (the shipped table's world average) -- never with a silent guess;
- a failed fetch is retried by the refresher after ``retry_failed_s`` (the HTTP client
  has already retried 429/5xx with backoff within its own bound).

Local providers (tables, traces: in-memory data) are read inline, without a thread,
with the same labels when they fail. The refresher is a daemon thread, started on the
first remote read, stopped by :meth:`SeriesCache.close` or after ``idle_exit_s``
without reads (a later read starts it again); its work is bounded by the number of
regions read (at most ``KEEP_HOURS`` series are kept per region).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Callable, Iterable, Literal

from orchestrator.carbon.base import CarbonDataError, CarbonProviderError, IntensityProvider

Status = Literal["fresh", "stale", "fallback"]
FILL_WAIT_S = 2.0
PREFETCH_S = 600.0
RETRY_FAILED_S = 60.0
POLL_S = 5.0
IDLE_EXIT_S = 3 * 3600.0
KEEP_HOURS = 3
FALLBACK_REGION = "world"  # the shipped table's labelled fallback row


@dataclass(frozen=True)
class SeriesView:
    """What the placer plans with for one region: ``values[k]`` covers
    ``[origin + k*step, origin + (k+1)*step)`` of the hour it asked for.

    ``status`` says how far to trust it: ``fresh`` (fetched for this hour), ``stale``
    (the series fetched at ``fetched_at`` for an earlier hour, moved onto this one) or
    ``fallback`` (a flat ``source`` figure, no data for the region). ``reason`` says why
    it is not fresh (the provider's last error, or that the fetch is still under way).
    """

    region: str
    values: tuple[float, ...]
    status: Status
    source: str | None = None
    fetched_at: datetime | None = None
    reason: str | None = None

    @property
    def label(self) -> str:
        """``""`` for fresh data, else ``stale-intensity`` / ``fallback-intensity``: the
        marker stored with a decision planned on it."""
        return "" if self.status == "fresh" else f"{self.status}-intensity"


def world_fallback() -> tuple[float, str]:
    """(g/kWh, source) of the shipped table's ``world`` row, the figure a region without
    any data is planned with."""
    from orchestrator.carbon.static import DEFAULT_TABLE, load_table

    row = load_table(DEFAULT_TABLE).get(FALLBACK_REGION)
    if row is None:
        raise CarbonDataError(f"carbon table {DEFAULT_TABLE}: no {FALLBACK_REGION!r} row -- restore the shipped table")
    return row.g_co2_per_kwh, row.source_label


def hour_floor(t: datetime, step_s: float) -> datetime:
    """The start of the *step_s* slot (counted from the epoch) that contains *t*."""
    return datetime.fromtimestamp(math.floor(t.timestamp() / step_s) * step_s, timezone.utc)


@dataclass(frozen=True)
class _Entry:
    values: tuple[float, ...]
    fetched_at: datetime


class SeriesCache:
    """Hourly intensity series per ``(region, hour)``, refreshed off the caller's thread.

    Thread contract: :meth:`read` and :meth:`close` are called by the placer's thread
    (the coordinator); the refresher is the only other thread and the only one that
    calls the provider when ``background`` (default: ``provider.remote``). All shared
    state is guarded by one condition variable, never held during a provider call.
    """

    def __init__(self, provider: IntensityProvider, *, step_s: float,
                 clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
                 fallback: tuple[float, str] | None = None, background: bool | None = None,
                 fill_wait_s: float = FILL_WAIT_S, prefetch_s: float = PREFETCH_S,
                 retry_failed_s: float = RETRY_FAILED_S, poll_s: float = POLL_S, idle_exit_s: float = IDLE_EXIT_S) -> None:
        for name, value in (("step_s", step_s), ("poll_s", poll_s)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        self.provider, self.step_s, self.clock = provider, step_s, clock
        self.fallback = fallback if fallback is not None else world_fallback()
        self.background = bool(getattr(provider, "remote", False)) if background is None else background
        self.fill_wait_s, self.prefetch_s, self.retry_failed_s = fill_wait_s, prefetch_s, retry_failed_s
        self.poll_s, self.idle_exit_s = poll_s, idle_exit_s
        self._cond = threading.Condition()
        self._entries: dict[tuple[str, datetime], _Entry] = {}
        self._failed: dict[tuple[str, datetime], tuple[float, str]] = {}  # key -> (retry at, monotonic; message)
        self._wanted: dict[str, tuple[datetime, float]] = {}  # region -> (latest hour read, span in s)
        self._waited: dict[str, datetime] = {}  # region -> the hour a read last waited for
        self._busy: tuple[str, datetime] | None = None  # what the refresher is fetching now
        self._last_read = time.monotonic()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.fetches = 0  # provider calls made (for tests and diagnostics)

    # -- the placer's side -------------------------------------------------------------

    def read(self, regions: Iterable[str], origin: datetime, span_s: float) -> dict[str, SeriesView]:
        """The series of each region over ``[origin, origin + span_s)`` in ``step_s``
        slices, as fresh as is available now; see the module for what waits and how
        long."""
        regions = sorted(set(regions))
        with self._cond:
            self._last_read = time.monotonic()
            for region in regions:
                hour, span = self._wanted.get(region, (origin, span_s))
                self._wanted[region] = (origin, max(span, span_s) if hour == origin else span_s)
        if not self.background:
            for region in regions:
                if self._due((region, origin)):
                    self._fetch(region, origin, span_s)
        elif not self._closed:
            self._wait_first_fill(regions, origin)
        with self._cond:
            return {region: self._view(region, origin) for region in regions}

    def close(self, wait: bool = True, timeout_s: float = 5.0) -> None:
        """Stop the refresher (idempotent). Reads still answer from what is cached,
        stale or fallback, but nothing is fetched any more."""
        with self._cond:
            self._closed = True
            thread = self._thread
            self._cond.notify_all()
        if wait and thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)

    @property
    def refreshing(self) -> bool:
        """Whether the refresher thread is running."""
        return self._thread is not None and self._thread.is_alive()

    def _wait_first_fill(self, regions: list[str], origin: datetime) -> None:
        with self._cond:
            self._start_thread()
            self._cond.notify_all()
            first = [r for r in regions if (r, origin) not in self._entries and self._waited.get(r) != origin]
            for region in first:
                self._waited[region] = origin
            deadline = time.monotonic() + self.fill_wait_s
            while any((r, origin) not in self._entries and (r, origin) not in self._failed for r in first):
                left_s = deadline - time.monotonic()
                if left_s <= 0:
                    break
                self._cond.wait(left_s)

    def _view(self, region: str, origin: datetime) -> SeriesView:
        entry = self._entries.get((region, origin))
        if entry is not None:
            return SeriesView(region, entry.values, "fresh", fetched_at=entry.fetched_at)
        failed = self._failed.get((region, origin))
        reason = failed[1] if failed is not None else "not fetched yet: the provider has not answered"
        older = [hour for (r, hour) in self._entries if r == region and hour < origin]
        if older:
            hour = max(older)
            entry = self._entries[(region, hour)]
            shift = int((origin - hour).total_seconds() // self.step_s)
            values = entry.values[shift:] or entry.values[-1:]
            return SeriesView(region, values, "stale", fetched_at=entry.fetched_at, reason=reason)
        value, source = self.fallback
        return SeriesView(region, (value,), "fallback", source=source, reason=reason)

    # -- fetching ----------------------------------------------------------------------

    def _due(self, key: tuple[str, datetime]) -> bool:
        """Not cached, not being fetched and not failed recently. Caller holds the lock
        or is the only thread."""
        failed = self._failed.get(key)
        return key not in self._entries and key != self._busy and (failed is None or failed[0] <= time.monotonic())

    def _fetch(self, region: str, origin: datetime, span_s: float) -> None:
        """One provider call, outside the lock; its result or error stored under it."""
        end = origin + timedelta(seconds=span_s)
        try:
            values: tuple[float, ...] | None = tuple(self.provider.series(region, origin, end, self.step_s))
            message = ""
        except (CarbonDataError, CarbonProviderError) as e:
            values, message = None, " ".join(str(e).split())
        except Exception as e:  # noqa: BLE001 - a provider bug must not kill the refresher; it is labelled and warned
            values, message = None, f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
        with self._cond:
            self.fetches += 1
            key = (region, origin)
            if values:
                self._entries[key] = _Entry(values, self.clock())
                self._failed.pop(key, None)
                for old in sorted(h for (r, h) in self._entries if r == region)[:-KEEP_HOURS]:
                    del self._entries[(region, old)]
            else:
                self._failed[key] = (time.monotonic() + self.retry_failed_s, message or "the provider returned no values")
            now_hour = hour_floor(self.clock(), self.step_s)
            for old_key in [k for k in self._failed if k[1] < now_hour - timedelta(seconds=self.step_s)]:
                del self._failed[old_key]
            self._cond.notify_all()

    def _start_thread(self) -> None:
        """Start the refresher if it is not running. Caller holds the lock."""
        if self._closed or (self._thread is not None and self._thread.is_alive()):
            return
        self._thread = threading.Thread(target=self._run, name="greensweep-carbon-refresher", daemon=True)
        self._thread.start()

    def _next_job(self) -> tuple[str, datetime, float] | None:
        """The next ``(region, hour, span)`` to fetch: an hour a read asked for, the hour
        the clock is in now, or the next one once it is ``prefetch_s`` away. Caller holds the lock."""
        now = self.clock()
        current = hour_floor(now, self.step_s)
        ahead = hour_floor(now + timedelta(seconds=self.prefetch_s), self.step_s)
        for region, (hour, span_s) in sorted(self._wanted.items()):
            for candidate in sorted({hour, current, ahead}):
                if candidate >= current and self._due((region, candidate)):
                    return region, candidate, span_s
        return None

    def _run(self) -> None:
        while True:
            with self._cond:
                job = None
                while job is None:
                    if self._closed or time.monotonic() - self._last_read > self.idle_exit_s:
                        self._thread = None if self._thread is threading.current_thread() else self._thread
                        return
                    job = self._next_job()
                    if job is None:
                        self._cond.wait(self.poll_s)
                self._busy = job[:2]
            try:
                self._fetch(*job)
            finally:
                with self._cond:
                    self._busy = None
