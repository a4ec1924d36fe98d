"""Hourly intensity traces from CSV files (``clusters/carbon/<REGION>-<YEAR>-hourly.csv``).

The shipped traces are Germany, Great Britain and France, 2019-12-20 to 2021-01-10, one
average (location-based) value per hour, from the data sets of Wiesner et al.,
Middleware 2021 (ENTSO-E generation data, IPCC per-source factors); provenance in
``clusters/carbon/README.md``. A CSV has two columns, ``time`` and ``g_co2_per_kwh``; a
time without a zone is UTC (ENTSO-E publishes in UTC, and UTC has no DST, so every day
has 24 rows). Each value holds for its whole interval: ``[time, time + step)``.

``intensity`` is the exact time-weighted mean over ``[start, end)``. A window outside
the trace is a :class:`~.base.CarbonDataError`, unless the provider was built with
``replay=True``: then the window's start is moved onto the same calendar date and UTC
time in the trace's last complete calendar year (2020 for the shipped traces) and the
window keeps its length -- a sweep run in 2026 can use real 2020 diurnal and seasonal
patterns for demos and scheduling experiments. A replayed figure says so in its source
(``timeseries:entso-e/wiesner2021:DE-2020-hourly (replayed)``); windows inside the trace
are never replayed. 2020 is a leap year, so every calendar date of any year has its
counterpart there (a replay year without 29 February would take the 28th); a window of
a non-leap year that runs past midnight of 28 February continues into 29 February 2020,
because the shift is constant over the window.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Mapping

from orchestrator.carbon.base import (
    CarbonDataError,
    Intensity,
    IntensityProvider,
    check_window,
    parse_iso_utc,
    step_windows,
    unknown_region,
)
from orchestrator.carbon.static import DATA_DIR

DEFAULT_LABEL = "entso-e/wiesner2021"  # provenance of the traces shipped in DATA_DIR
FILE_GLOB = "*-hourly.csv"
COLUMNS = ("time", "g_co2_per_kwh")


@dataclass(frozen=True)
class Trace:
    """One region's regular series: ``values[i]`` holds over ``[start + i*step, start + (i+1)*step)``."""

    name: str  # file stem, e.g. DE-2020-hourly
    start: datetime
    step_s: float
    values: tuple[float, ...]

    @property
    def end(self) -> datetime:
        return self.start + timedelta(seconds=self.step_s * len(self.values))

    @property
    def replay_year(self) -> int | None:
        """The last calendar year the trace covers completely (None if it covers none)."""
        for year in range(self.end.year, self.start.year - 1, -1):
            first, after = datetime(year, 1, 1, tzinfo=timezone.utc), datetime(year + 1, 1, 1, tzinfo=timezone.utc)
            if self.start <= first and after <= self.end:
                return year
        return None

    def covers(self, start: datetime, end: datetime) -> bool:
        return self.start <= start and end <= self.end and start < self.end

    def mean(self, start: datetime, end: datetime) -> float:
        """Time-weighted mean over ``[start, end)`` (the value at *start* if equal); the window must be covered.

        Summed with ``math.fsum`` over the intervals the window touches, so an aligned
        one-hour window returns the published value exactly.
        """
        a = (start - self.start).total_seconds() / self.step_s
        first = int(a)
        if start == end:
            return self.values[first]
        b = (end - self.start).total_seconds() / self.step_s
        last = min(math.ceil(b), len(self.values))
        weighted = math.fsum(self.values[k] * (min(b, k + 1) - max(a, k)) for k in range(first, last))
        return weighted / (b - a)


def _parse_time(text: str, where: str) -> datetime:
    try:
        return parse_iso_utc(text)
    except ValueError:
        raise CarbonDataError(f"carbon trace {where}: time {text!r} is not ISO 8601 (e.g. 2020-01-01T00:00:00)") from None


def load_trace(path: Path) -> Trace:
    """Read a ``time,g_co2_per_kwh`` CSV; the times must be increasing on a regular grid without gaps."""
    times: list[datetime] = []
    values: list[float] = []
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = tuple(next(reader, ()))
            if header != COLUMNS:
                got = ",".join(header) or "(empty)"
                raise CarbonDataError(f"carbon trace {path}: header must be {','.join(COLUMNS)}, got {got}")
            for record in reader:
                where = f"{path}:{reader.line_num}"
                if len(record) != 2:
                    raise CarbonDataError(f"carbon trace {where}: expected 2 fields (time,g_co2_per_kwh), got {len(record)}")
                t = _parse_time(record[0].strip(), where)
                try:
                    v = float(record[1])
                except ValueError:
                    raise CarbonDataError(f"carbon trace {where}: g_co2_per_kwh {record[1]!r} is not a number") from None
                if not (math.isfinite(v) and v >= 0):
                    raise CarbonDataError(f"carbon trace {where}: g_co2_per_kwh must be >= 0, got {record[1]!r}")
                if len(times) >= 2 and t - times[-1] != times[1] - times[0]:
                    raise CarbonDataError(
                        f"carbon trace {where}: {t.isoformat()} breaks the regular {times[1] - times[0]} grid "
                        f"(previous row {times[-1].isoformat()}) -- fill the gap or remove the duplicate"
                    )
                if len(times) == 1 and t <= times[0]:
                    raise CarbonDataError(f"carbon trace {where}: times must increase")
                times.append(t)
                values.append(v)
    except OSError as e:
        raise CarbonDataError(f"carbon trace {path}: cannot read it ({e.strerror or e})") from None
    if len(times) < 2:
        raise CarbonDataError(f"carbon trace {path}: needs at least two rows to know its step")
    step_s = (times[1] - times[0]).total_seconds()
    return Trace(path.stem, times[0], step_s, tuple(values))


def discover(data_dir: Path) -> dict[str, Path]:
    """``{region: path}`` for every ``<REGION>-...-hourly.csv`` in *data_dir*."""
    files: dict[str, Path] = {}
    for path in sorted(Path(data_dir).glob(FILE_GLOB)):
        region = path.name.split("-", 1)[0]
        if region in files:
            raise CarbonDataError(
                f"carbon traces in {data_dir}: two files for region {region}: {files[region].name}, {path.name} -- keep one"
            )
        files[region] = path
    if not files:
        raise CarbonDataError(f"carbon traces: no {FILE_GLOB} files in {data_dir} -- fix carbon.data_dir")
    return files


def _same_calendar_time(t: datetime, year: int) -> datetime:
    try:
        return t.replace(year=year)
    except ValueError:  # 29 February onto a year without one
        return t.replace(year=year, day=28)


class TimeSeriesProvider(IntensityProvider):
    """Time-weighted means over hourly traces, optionally replayed onto other years.

    *files* maps region names to CSV paths; *label* names the data's provenance and
    goes into every source string. All files are read and checked here, so a broken
    trace fails when the sweep is configured, not in the middle of it.
    """

    name = "timeseries"

    def __init__(self, files: Mapping[str, Path], *, label: str, replay: bool = False) -> None:
        if not files:
            raise CarbonDataError("carbon traces: no files given")
        self.label = label
        self.replay = replay
        self._traces = {region: load_trace(Path(path)) for region, path in files.items()}

    @classmethod
    def from_dir(cls, data_dir: Path = DATA_DIR, *, label: str, replay: bool = False) -> TimeSeriesProvider:
        return cls(discover(data_dir), label=label, replay=replay)

    def trace(self, region: str) -> Trace:
        try:
            return self._traces[region]
        except KeyError:
            raise unknown_region(
                region,
                self.name,
                set(self._traces),
                "add a <REGION>-<YEAR>-hourly.csv trace, map the region with carbon.regions, or set carbon.fallback",
            ) from None

    def regions(self) -> set[str]:
        return set(self._traces)

    def intensity(self, region: str, start: datetime, end: datetime) -> Intensity:
        start, end = check_window(start, end)
        trace = self.trace(region)
        shift = self._shift(trace, start, end)
        value = trace.mean(start + shift, end + shift)
        return Intensity(value, self._source(trace, shift), "average", region, start, end)

    def series(self, region: str, start: datetime, end: datetime, step_s: float) -> list[float]:
        windows = step_windows(start, end, step_s)
        trace = self.trace(region)
        shift = self._shift(trace, *check_window(start, end))
        return [trace.mean(a + shift, b + shift) for a, b in windows]

    def _source(self, trace: Trace, shift: timedelta) -> str:
        source = f"timeseries:{self.label}:{trace.name}"
        return f"{source} (replayed)" if shift else source

    def _shift(self, trace: Trace, start: datetime, end: datetime) -> timedelta:
        """How far to move the window into the trace: zero inside it, else the replay offset."""
        if trace.covers(start, end):
            return timedelta(0)
        span = f"{trace.start:%Y-%m-%dT%H:%MZ}..{trace.end:%Y-%m-%dT%H:%MZ}"
        window = f"{start:%Y-%m-%dT%H:%M:%SZ}..{end:%Y-%m-%dT%H:%M:%SZ}"
        if not self.replay:
            raise CarbonDataError(
                f"carbon: trace {trace.name} covers {span}; the window {window} is outside it -- "
                "set carbon.replay: true to replay the trace onto the same calendar hours (labelled 'replayed'), "
                "or use a provider with data for that time"
            )
        year = trace.replay_year
        if year is None:
            raise CarbonDataError(
                f"carbon: trace {trace.name} ({span}) covers no complete calendar year, so it cannot be replayed"
            )
        shift = _same_calendar_time(start, year) - start
        if not trace.covers(start + shift, end + shift):
            raise CarbonDataError(
                f"carbon: the window {window} is too long to replay on trace {trace.name} ({span}) -- shorten it"
            )
        return shift
