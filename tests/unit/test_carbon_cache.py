"""orchestrator.carbon.cache: intensity series per (region, hour), refreshed off the caller's thread.

Providers here are fakes with a switch: they answer, fail, or block until released, so
each test knows what the refresher could have fetched, and asserts that a read never
waits longer than its bound and labels whatever is not fresh.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Iterator

import pytest

from orchestrator.carbon import CarbonDataError, CarbonProviderError
from orchestrator.carbon.cache import SeriesCache, hour_floor, world_fallback

T0 = datetime(2026, 3, 10, 12, 0, tzinfo=timezone.utc)
HOUR_S = 3600.0
SPAN_S = 4 * HOUR_S


class FakeProvider:
    """``value(region, hour index)`` per hour from T0; ``error`` raises, ``gate`` blocks."""

    def __init__(self, *, remote: bool = True) -> None:
        self.remote = remote
        self.name = "fake"
        self.error: Exception | None = None
        self.gate: threading.Event | None = None
        self.calls: list[tuple[str, datetime, datetime]] = []

    def series(self, region: str, start: datetime, end: datetime, step_s: float) -> list[float]:
        self.calls.append((region, start, end))
        if self.gate is not None:
            self.gate.wait(10)
        if self.error is not None:
            raise self.error
        first = int((start - T0).total_seconds() // step_s)
        n = int((end - start).total_seconds() // step_s)
        return [100.0 * (first + i + 1) + (1 if region == "FR" else 0) for i in range(n)]


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock(T0 + timedelta(minutes=30))


@pytest.fixture
def caches() -> Iterator[list[SeriesCache]]:
    made: list[SeriesCache] = []
    yield made
    for cache in made:
        cache.close()
        assert not cache.refreshing


def make(caches: list[SeriesCache], provider: FakeProvider, clock: Clock, **kwargs: float) -> SeriesCache:
    options = {"fill_wait_s": 1.0, "poll_s": 0.02, **kwargs}
    cache = SeriesCache(provider, step_s=HOUR_S, clock=clock, **options)  # type: ignore[arg-type]
    caches.append(cache)
    return cache


def wait_for(predicate, timeout_s: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_world_fallback_is_the_shipped_labelled_row() -> None:
    assert world_fallback() == (475.0, "static:iea-2019")


def test_hour_floor() -> None:
    assert hour_floor(T0 + timedelta(minutes=59, seconds=59), HOUR_S) == T0
    assert hour_floor(T0 + timedelta(hours=1), HOUR_S) == T0 + timedelta(hours=1)


def test_a_local_provider_is_read_inline_once_per_region_and_hour(caches: list[SeriesCache], clock: Clock) -> None:
    provider = FakeProvider(remote=False)
    cache = make(caches, provider, clock)
    assert cache.background is False
    views = cache.read(["DE", "FR"], T0, SPAN_S)
    assert views["DE"].values == (100.0, 200.0, 300.0, 400.0) and views["DE"].status == "fresh"
    assert views["FR"].values[0] == 101.0 and views["FR"].label == ""
    cache.read(["DE", "FR"], T0, SPAN_S)
    assert len(provider.calls) == 2 and provider.calls[0] == ("DE", T0, T0 + timedelta(seconds=SPAN_S))
    assert not cache.refreshing  # no thread for in-memory data


def test_a_failing_local_provider_gives_the_labelled_fallback_with_its_reason(caches: list[SeriesCache],
                                                                              clock: Clock) -> None:
    provider = FakeProvider(remote=False)
    provider.error = CarbonDataError("carbon: trace DE-2020-hourly covers 2019..2021; the window is outside it")
    view = make(caches, provider, clock).read(["DE"], T0, SPAN_S)["DE"]
    assert (view.status, view.values, view.source, view.label) == ("fallback", (475.0,), "static:iea-2019",
                                                                   "fallback-intensity")
    assert "the window is outside it" in (view.reason or "")


def test_a_slow_remote_provider_never_blocks_a_read_beyond_its_bound(caches: list[SeriesCache], clock: Clock) -> None:
    provider = FakeProvider()
    provider.gate = threading.Event()
    cache = make(caches, provider, clock, fill_wait_s=0.5)
    began = time.monotonic()
    view = cache.read(["DE"], T0, SPAN_S)["DE"]
    assert 0.5 <= time.monotonic() - began < 1.5
    assert view.status == "fallback" and "not fetched yet" in (view.reason or "")
    began = time.monotonic()
    assert cache.read(["DE"], T0, SPAN_S)["DE"].status == "fallback"  # the same miss waits only once
    assert time.monotonic() - began < 0.25
    provider.gate.set()
    wait_for(lambda: cache.read(["DE"], T0, SPAN_S)["DE"].status == "fresh")
    assert cache.read(["DE"], T0, SPAN_S)["DE"].values == (100.0, 200.0, 300.0, 400.0)
    assert len(provider.calls) == 1  # one fetch, by the refresher


def test_a_healthy_remote_provider_fills_the_first_read(caches: list[SeriesCache], clock: Clock) -> None:
    provider = FakeProvider()
    cache = make(caches, provider, clock)
    view = cache.read(["DE"], T0, SPAN_S)["DE"]
    assert view.status == "fresh" and view.fetched_at == clock.now
    assert cache.refreshing and provider.calls[0][0] == "DE"


def test_a_new_hour_that_cannot_be_fetched_plans_on_the_last_series_labelled_stale(caches: list[SeriesCache],
                                                                                  clock: Clock) -> None:
    provider = FakeProvider()
    cache = make(caches, provider, clock, prefetch_s=0.0)
    assert cache.read(["DE"], T0, SPAN_S)["DE"].status == "fresh"
    fetched_at = clock.now
    provider.error = CarbonProviderError("fake: rate limited (HTTP 429) at http://x -- slow down (gave up after 4 attempts in 9.0 s)")
    clock.now = T0 + timedelta(hours=2, minutes=5)
    view = cache.read(["DE"], T0 + timedelta(hours=2), SPAN_S)["DE"]
    assert view.status == "stale" and view.label == "stale-intensity"
    assert view.values == (300.0, 400.0)  # the old series from 14:00 on, not its 12:00 value
    assert view.fetched_at == fetched_at and "HTTP 429" in (view.reason or "")
    clock.now = T0 + timedelta(hours=5)
    view = cache.read(["DE"], T0 + timedelta(hours=5), SPAN_S)["DE"]
    assert view.status == "stale" and view.values == (400.0,)  # beyond the old series: its last value holds


def test_a_failed_fetch_is_retried_after_its_pause_not_on_every_read(caches: list[SeriesCache], clock: Clock) -> None:
    provider = FakeProvider()
    provider.error = CarbonProviderError("fake: server error HTTP 503")
    cache = make(caches, provider, clock, retry_failed_s=1.0, prefetch_s=0.0)
    assert cache.read(["DE"], T0, SPAN_S)["DE"].status == "fallback"
    time.sleep(0.1)
    assert len(provider.calls) == 1
    provider.error = None
    wait_for(lambda: cache.read(["DE"], T0, SPAN_S)["DE"].status == "fresh")
    assert len(provider.calls) == 2


def test_the_next_hour_is_fetched_before_it_begins(caches: list[SeriesCache], clock: Clock) -> None:
    provider = FakeProvider()
    clock.now = T0 + timedelta(minutes=55)
    cache = make(caches, provider, clock, prefetch_s=600.0)
    cache.read(["DE"], T0, SPAN_S)
    wait_for(lambda: len(provider.calls) == 2)
    assert provider.calls[1][1] == T0 + timedelta(hours=1)
    clock.now = T0 + timedelta(hours=1, seconds=1)
    provider.gate = threading.Event()  # the API is now slow: the read must not need it
    began = time.monotonic()
    view = cache.read(["DE"], T0 + timedelta(hours=1), SPAN_S)["DE"]
    assert view.status == "fresh" and view.values[0] == 200.0
    assert time.monotonic() - began < 0.5
    provider.gate.set()


def test_close_stops_the_refresher_and_reads_still_answer(caches: list[SeriesCache], clock: Clock) -> None:
    provider = FakeProvider()
    cache = make(caches, provider, clock)
    cache.read(["DE"], T0, SPAN_S)
    assert cache.refreshing
    cache.close()
    cache.close()
    assert not cache.refreshing
    calls = len(provider.calls)
    assert cache.read(["DE", "FR"], T0, SPAN_S)["FR"].status == "fallback"  # nothing fetched after close
    assert cache.read(["DE"], T0, SPAN_S)["DE"].status == "fresh"
    assert len(provider.calls) == calls


def test_an_idle_refresher_exits_and_a_read_starts_it_again(caches: list[SeriesCache], clock: Clock) -> None:
    provider = FakeProvider()
    cache = make(caches, provider, clock, idle_exit_s=0.1)
    cache.read(["DE"], T0, SPAN_S)
    wait_for(lambda: not cache.refreshing)
    assert cache.read(["FR"], T0, SPAN_S)["FR"].status == "fresh"


def test_a_provider_bug_is_labelled_not_fatal_to_the_refresher(caches: list[SeriesCache], clock: Clock) -> None:
    provider = FakeProvider()
    provider.error = KeyError("data")
    cache = make(caches, provider, clock, retry_failed_s=0.0, prefetch_s=0.0)
    view = cache.read(["DE"], T0, SPAN_S)["DE"]
    assert view.status == "fallback" and view.reason == "KeyError: 'data'"
    provider.error = None
    wait_for(lambda: cache.read(["DE"], T0, SPAN_S)["DE"].status == "fresh")
