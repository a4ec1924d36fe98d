"""Static table of yearly average intensities per region (``clusters/carbon/regions.csv``).

The table is the offline default: no network, no credentials, one figure per region.
Each row keeps its own provenance -- ``source`` (a short slug), ``year`` (the year the
figure refers to, or ``unstated`` when the publisher gives none) and ``method`` (what
the figure measures and where it was copied from) -- because the shipped rows come from
different publishers and methods (Google Cloud 2024, Cloud Carbon Footprint's eGRID /
EEA / carbonfootprint.com factors, Our World in Data lifecycle figures, IEA's world
average). The :class:`~.base.Intensity` of a row names that row's source and year
(``static:google-cloud-2024``), so two regions answered from different publishers never
look alike in a report.

CSV columns: ``region, g_co2_per_kwh, kind, source, year, method``.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import cast

from orchestrator.carbon.base import (
    CarbonDataError,
    Intensity,
    IntensityProvider,
    Kind,
    check_window,
    step_windows,
    unknown_region,
)
from orchestrator.resources import shipped_dir

DATA_DIR = shipped_dir("clusters") / "carbon"  # the repository's clusters/carbon, shipped as package data
DEFAULT_TABLE = DATA_DIR / "regions.csv"
COLUMNS = ("region", "g_co2_per_kwh", "kind", "source", "year", "method")
UNSTATED_YEAR = "unstated"
_SOURCE_SLUG = re.compile(r"[a-z0-9][a-z0-9.\-]*")
_TABLE_KINDS: tuple[Kind, ...] = ("average", "marginal")  # a yearly figure is never a forecast


@dataclass(frozen=True)
class TableRow:
    """One region's yearly figure with its provenance."""

    region: str
    g_co2_per_kwh: float
    kind: Kind
    source: str
    year: int | None  # None: the publisher states no data year
    method: str

    @property
    def source_label(self) -> str:
        """``static:<source>-<year>``, or ``static:<source> (year unstated)``."""
        if self.year is None:
            return f"static:{self.source} (year unstated)"
        return f"static:{self.source}-{self.year}"


def load_table(path: Path) -> dict[str, TableRow]:
    """Read and validate a region table; every problem names the file, the line and the fix."""
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = tuple(reader.fieldnames or ())
            if header != COLUMNS:
                raise CarbonDataError(
                    f"carbon table {path}: header is {','.join(header) or '(empty)'}; "
                    f"it must be exactly {','.join(COLUMNS)}"
                )
            rows: dict[str, TableRow] = {}
            for record in reader:
                row = _parse_row(record, f"{path}:{reader.line_num}")
                if row.region in rows:
                    raise CarbonDataError(
                        f"carbon table {path}:{reader.line_num}: region {row.region!r} appears twice -- keep one row per region"
                    )
                rows[row.region] = row
    except OSError as e:
        raise CarbonDataError(f"carbon table {path}: cannot read it ({e.strerror or e}) -- fix carbon.table") from None
    if not rows:
        raise CarbonDataError(f"carbon table {path}: no rows -- add at least one region")
    return rows


def _parse_row(record: dict[str, str | None], where: str) -> TableRow:
    if None in record or any(record.get(c) is None for c in COLUMNS):
        raise CarbonDataError(f"carbon table {where}: expected {len(COLUMNS)} fields ({','.join(COLUMNS)})")
    region, value, kind, source, year, method = (str(record[c]).strip() for c in COLUMNS)
    if not region:
        raise CarbonDataError(f"carbon table {where}: empty region")
    try:
        g_co2_per_kwh = float(value)
    except ValueError:
        raise CarbonDataError(f"carbon table {where}: g_co2_per_kwh {value!r} is not a number") from None
    if not (math.isfinite(g_co2_per_kwh) and g_co2_per_kwh >= 0):
        raise CarbonDataError(f"carbon table {where}: g_co2_per_kwh must be >= 0, got {value!r}")
    if kind not in _TABLE_KINDS:
        raise CarbonDataError(f"carbon table {where}: kind must be {' or '.join(_TABLE_KINDS)}, got {kind!r}")
    if not _SOURCE_SLUG.fullmatch(source):
        raise CarbonDataError(
            f"carbon table {where}: source {source!r} must be a lower-case slug naming the publisher (e.g. google-cloud)"
        )
    if year == UNSTATED_YEAR:
        parsed_year = None
    elif year.isdigit() and 1990 <= int(year) <= 2100:
        parsed_year = int(year)
    else:
        raise CarbonDataError(f"carbon table {where}: year must be a year or {UNSTATED_YEAR!r}, got {year!r}")
    if not method:
        raise CarbonDataError(f"carbon table {where}: method is empty -- say what the figure measures and where it comes from")
    return TableRow(region, g_co2_per_kwh, cast(Kind, kind), source, parsed_year, method)


class StaticTableProvider(IntensityProvider):
    """Yearly figures from a CSV table; the same value for every window of a region."""

    name = "static"

    def __init__(self, table: Path = DEFAULT_TABLE) -> None:
        self.table = Path(table)
        self._rows = load_table(self.table)

    def row(self, region: str) -> TableRow:
        """The table row for *region* (its figure and full provenance)."""
        try:
            return self._rows[region]
        except KeyError:
            raise unknown_region(
                region,
                f"{self.name} ({self.table.name})",
                set(self._rows),
                f"add a row for it to {self.table}, map it with carbon.regions, or set carbon.fallback",
            ) from None

    def intensity(self, region: str, start: datetime, end: datetime) -> Intensity:
        start, end = check_window(start, end)
        row = self.row(region)
        return Intensity(row.g_co2_per_kwh, row.source_label, row.kind, region, start, end)

    def regions(self) -> set[str]:
        return set(self._rows)

    def series(self, region: str, start: datetime, end: datetime, step_s: float) -> list[float]:
        value = self.row(region).g_co2_per_kwh
        return [value] * len(step_windows(start, end, step_s))
