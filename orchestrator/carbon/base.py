"""The carbon-intensity contract: one :class:`IntensityProvider` ABC, the
:class:`Intensity` figure it returns, and the accounting formula.

Every gram greensweep stores is ``energy_j / 3.6e6 * g_co2_per_kwh`` of the node's
region over the stage's meter window (DESIGN.md, "Carbon"). The intensity is never a
bare number: it travels with its source (which data set, which method, which year),
its kind (``average``, ``marginal`` or ``forecast``), the window it covers and whether
it is a fallback for a region the provider does not know. Figures from different
sources can differ several-fold for the same grid, so reports group by ``source`` and
never mix them silently.

Implementations are siblings named after the technology: :mod:`.static` (a table of
yearly averages), :mod:`.timeseries` (hourly CSV traces), :mod:`.electricitymaps` and
:mod:`.watttime` (HTTP APIs). Wrappers in :mod:`.wrappers` add region aliases and a
labelled fallback.
"""

from __future__ import annotations

import difflib
import math
from abc import ABC, abstractmethod
from bisect import bisect_right
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Literal, Sequence

from orchestrator.errors import GreensweepError
from workers.util import J_PER_KWH  # noqa: F401  (re-exported)

Kind = Literal["average", "marginal", "forecast"]
KINDS: tuple[Kind, ...] = ("average", "marginal", "forecast")

# How a provider stands towards a region, for the spec-time check (see check_regions):
# known -- answered from the provider's own data; fallback -- answered with the labelled
# fallback region's figure; unknown -- intensity() will raise; unchecked -- the provider
# cannot tell without asking a remote API (HTTP providers).
RegionStatus = Literal["known", "fallback", "unknown", "unchecked"]

_KNOWN_SHOWN = 12  # how many known regions an error message lists


class CarbonDataError(GreensweepError):
    """Carbon configuration or data is wrong: unknown region, bad table, window outside
    the data. The user fixes the spec or the data; nothing was written."""

    exit_code = 2


class UnknownRegionError(CarbonDataError):
    """A provider has no figure for the region (``region``, ``provider`` say which).

    Only this -- never a missing window or a failing API -- is what a configured
    fallback stands in for (:class:`~.wrappers.FallbackProvider`)."""

    def __init__(self, message: str, *, region: str, provider: str) -> None:
        super().__init__(message)
        self.region = region
        self.provider = provider


class CarbonProviderError(GreensweepError):
    """A remote intensity provider failed: network, timeout, authentication, HTTP 5xx,
    malformed answer. The message is one line and never contains a credential."""

    exit_code = 5


@dataclass(frozen=True)
class Intensity:
    """Grid carbon intensity of one region over one window.

    ``source`` names the data set and, for tables, its year (``static:google-cloud-2024``,
    ``timeseries:entso-e/wiesner2021:DE-2020-hourly (replayed)``,
    ``electricitymaps:lifecycle``, ``watttime:co2_moer``). ``region`` is the region the
    figure is *for* -- the fallback region when ``fallback`` is true. ``valid_from`` /
    ``valid_to`` are the UTC window the figure was computed for (None for a yearly
    average that is not tied to a window).
    """

    g_co2_per_kwh: float
    source: str
    kind: Kind
    region: str
    valid_from: datetime | None = None
    valid_to: datetime | None = None
    fallback: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.g_co2_per_kwh) and self.g_co2_per_kwh >= 0):
            raise ValueError(f"g_co2_per_kwh must be a finite number >= 0, got {self.g_co2_per_kwh!r}")
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not self.source or not self.region:
            raise ValueError("source and region must be non-empty")
        for name in ("valid_from", "valid_to"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, as_utc(value, name))


def carbon_g(energy_j: float, intensity: Intensity) -> float:
    """Grams of CO2eq for *energy_j* joules at *intensity*: ``energy_j / 3.6e6 * g/kWh``."""
    if not (math.isfinite(energy_j) and energy_j >= 0):
        raise ValueError(f"energy_j must be a finite number >= 0, got {energy_j!r}")
    return energy_j / J_PER_KWH * intensity.g_co2_per_kwh


def as_utc(value: datetime, name: str = "datetime") -> datetime:
    """*value* converted to UTC; a naive datetime is a programming error (ambiguous zone)."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware (UTC), got naive {value.isoformat()}")
    return value.astimezone(timezone.utc)


def parse_iso_utc(text: str) -> datetime:
    """An ISO 8601 timestamp as an aware UTC datetime; without a zone it is taken as UTC.

    Accepts the ``Z`` suffix on every supported Python (3.10's ``fromisoformat`` does
    not). Raises ValueError for anything else.
    """
    t = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
    return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)


def check_window(start: datetime, end: datetime) -> tuple[datetime, datetime]:
    """The window in UTC; ``end`` before ``start`` is a programming error.

    ``start == end`` is allowed and means the value at that instant.
    """
    start, end = as_utc(start, "start"), as_utc(end, "end")
    if end < start:
        raise ValueError(f"window ends before it starts: {start.isoformat()} > {end.isoformat()}")
    return start, end


def step_windows(start: datetime, end: datetime, step_s: float) -> list[tuple[datetime, datetime]]:
    """Consecutive ``[t, t + step_s)`` windows covering ``[start, end)``; the last one is cut at *end*."""
    if not (math.isfinite(step_s) and step_s > 0):
        raise ValueError(f"step_s must be a finite number > 0, got {step_s!r}")
    start, end = check_window(start, end)
    step = timedelta(seconds=step_s)
    out: list[tuple[datetime, datetime]] = []
    t = start
    while t < end:
        out.append((t, min(t + step, end)))
        t += step
    return out


def describe_known(known: set[str]) -> str:
    """The first known regions, sorted, with the total when truncated (for error messages)."""
    names = sorted(known)
    if not names:
        return "none"
    more = f", ... ({len(names)} in all)" if len(names) > _KNOWN_SHOWN else ""
    return ", ".join(names[:_KNOWN_SHOWN]) + more


def unknown_region(region: str, provider: str, known: set[str], fix: str) -> UnknownRegionError:
    """The error for a region *provider* has no figure for: names the region, the
    provider, the closest and the first known regions, and the fix."""
    close = difflib.get_close_matches(region, sorted(known), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return UnknownRegionError(
        f"carbon: unknown region {region!r} for provider {provider}{hint} (known: {describe_known(known)}) -- {fix}",
        region=region,
        provider=provider,
    )


def window_mean(
    points: Sequence[tuple[datetime, float]],
    start: datetime,
    end: datetime,
    *,
    period_s: float,
    edge_tolerance_s: float = 0.0,
) -> float | None:
    """Time-weighted mean of a step function over ``[start, end)``; None if not covered.

    *points* are sorted by time without duplicates. Each point ``(t, value)`` holds
    from ``t`` until the next point's time, the last one for ``period_s``; a gap between
    points longer than ``period_s`` is missing data. ``edge_tolerance_s`` lets the first
    and last values stretch that far beyond the data's edges -- remote APIs publish the
    current interval late or start a forecast at the next one. For ``start == end`` the
    value at ``start`` is returned.
    """
    if not points:
        return None
    times = [t for t, _ in points]
    period = timedelta(seconds=period_s)
    tolerance = timedelta(seconds=edge_tolerance_s)
    lo, hi = times[0] - tolerance, times[-1] + period + tolerance
    if start < lo or end > hi or (start == end and start >= hi):
        return None

    def segment(i: int) -> tuple[datetime, datetime]:
        seg_start = lo if i == 0 else times[i]
        seg_end = min(times[i + 1], times[i] + period) if i + 1 < len(times) else hi
        return seg_start, seg_end

    i = max(bisect_right(times, start) - 1, 0)
    if start == end:
        seg_start, seg_end = segment(i)
        return points[i][1] if seg_start <= start < seg_end else None

    weighted = covered_s = 0.0
    while i < len(points):
        seg_start, seg_end = segment(i)
        if seg_start >= end:
            break
        a, b = max(start, seg_start), min(end, seg_end)
        if b > a:
            span_s = (b - a).total_seconds()
            weighted += points[i][1] * span_s
            covered_s += span_s
        i += 1
    window_s = (end - start).total_seconds()
    if covered_s < window_s * (1 - 1e-9):
        return None
    return weighted / window_s


class IntensityProvider(ABC):
    """Where grid carbon intensity comes from. One instance serves one sweep.

    Contract: ``intensity`` returns the time-weighted mean intensity of *region* over
    the UTC window ``[start, end)`` (the value at *start* when ``start == end``), raises
    :class:`UnknownRegionError` for a region it has no figure for,
    :class:`CarbonDataError` when its data does not cover the window and
    :class:`CarbonProviderError` when a remote service fails. ``series`` serves the
    scheduler: one mean per ``step_s`` slice of a horizon. Naive datetimes are rejected.
    Providers keep no per-call state except caches of immutable data (and, for WattTime,
    a login token behind a lock), so two threads may call one provider at once: the
    placer's refresher (:mod:`.cache`) and carbon accounting do.
    """

    #: short technology name used in sources and messages ("static", "watttime", ...)
    name: str
    #: True when answers come over the network (may be slow, rate-limited or down):
    #: the placer then reads them through a background refresher, never on dispatch
    remote: bool = False

    @abstractmethod
    def intensity(self, region: str, start: datetime, end: datetime) -> Intensity:
        """Mean intensity of *region* over ``[start, end)``."""

    @abstractmethod
    def regions(self) -> set[str] | None:
        """Regions this provider has figures for; None when open-ended (remote APIs)."""

    @abstractmethod
    def series(self, region: str, start: datetime, end: datetime, step_s: float) -> list[float]:
        """Mean g/kWh for each slice of :func:`step_windows` ``(start, end, step_s)``.

        Same errors as :meth:`intensity`; remote providers fetch the whole horizon once.
        """

    def region_status(self, region: str) -> RegionStatus:
        """How :meth:`intensity` will treat *region* (see :data:`RegionStatus`)."""
        known = self.regions()
        if known is None:
            return "unchecked"
        return "known" if region in known else "unknown"
