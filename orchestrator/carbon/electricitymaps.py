"""Electricity Maps API v3 (https://api.electricitymap.org/v3): hourly average intensity per zone.

Authentication is the ``auth-token`` header with the token from ``ELECTRICITYMAPS_TOKEN``
(never from the spec, so specs can be shared). The zone is the region name (``DE``,
``FR``, ``US-CAL-CISO``; map node labels onto zones with ``carbon.regions``). Which
endpoint answers depends on where the window lies relative to now:

- inside the current hour (a short evaluate window that just ended): ``/carbon-intensity/latest``;
- within the last 24 hours: ``/carbon-intensity/history``;
- further back: ``/carbon-intensity/past-range`` (``start``/``end``; the API serves at
  most 10 days of hourly data per request, so longer windows are fetched in chunks);
- reaching into the future: ``/carbon-intensity/forecast`` for the future part.

Every record is ``{"datetime": ..., "carbonIntensity": g/kWh, "emissionFactorType": ...}``
and holds for its hour. The figure is ``kind="average"`` for past windows and
``kind="forecast"`` once any part of the window is forecast. The source names the
emission factor type the API reports (``electricitymaps:lifecycle``), because lifecycle
and direct figures differ by tens of percent for the same hour.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from typing import Any, Callable, Mapping

from orchestrator.carbon._http import (
    DEFAULT_RETRY,
    JsonClient,
    Points,
    PointsProvider,
    RetryPolicy,
    chunks,
    iso_utc,
    parse_time,
    parse_value,
    utc_now,
)
from orchestrator.carbon.base import CarbonDataError, CarbonProviderError, Kind

DEFAULT_BASE_URL = "https://api.electricitymap.org/v3"
TOKEN_ENV = "ELECTRICITYMAPS_TOKEN"
PERIOD_S = 3600.0  # the API's default (hourly) granularity
EDGE_TOLERANCE_S = 3600.0  # the current hour may be published late; a forecast may start at the next hour
HISTORY_SPAN = timedelta(hours=24)
PAST_RANGE_CHUNK = timedelta(days=10)

class ElectricityMapsProvider(PointsProvider):
    """Average (or forecast) intensity from Electricity Maps; zones are open-ended."""

    name = "electricitymaps"
    edge_tolerance_s = EDGE_TOLERANCE_S
    no_data_what, no_data_place, no_data_fix = "data", "zone", "the zone has gaps"

    def __init__(
        self,
        token: str,
        *,
        base_url: str = DEFAULT_BASE_URL,
        timeout_s: float = 10.0,
        clock: Callable[[], datetime] = utc_now,
        retry: RetryPolicy = DEFAULT_RETRY,
    ) -> None:
        if not token:
            raise CarbonDataError(f"carbon: provider electricitymaps needs an API token -- set {TOKEN_ENV}")
        self._token = token
        self._clock = clock
        self._client = JsonClient(self.name, base_url, timeout_s=timeout_s, auth_hint=f"check {TOKEN_ENV}", secrets=(token,),
                                  retry=retry)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ, **kwargs: Any) -> ElectricityMapsProvider:
        """Build with the token from ``ELECTRICITYMAPS_TOKEN``; a missing one names the variable."""
        token = env.get(TOKEN_ENV, "")
        if not token:
            raise CarbonDataError(
                f"carbon: provider electricitymaps needs an API token in the environment variable {TOKEN_ENV} -- "
                "export it (the spec never holds credentials)"
            )
        return cls(token, **kwargs)

    def regions(self) -> None:
        return None

    def _fetch(self, zone: str, start: datetime, end: datetime) -> tuple[Points, float, Kind, str]:
        now = self._clock()
        records: list[Any] = []
        if start < now or end <= now:
            records += self._past(zone, start, min(end, now), now)
        if end > now:
            records += self._records(self._get("/carbon-intensity/forecast", zone), "forecast")
        by_time: dict[datetime, float] = {}
        factor_types: set[str] = set()
        for record in records:
            if not isinstance(record, dict):
                raise CarbonProviderError(f"electricitymaps: malformed answer: a {type(record).__name__} where a record belongs")
            if record.get("carbonIntensity") is None:  # a hole in the data: leaves the hour uncovered
                continue
            t = parse_time(record.get("datetime"), self.name)
            by_time.setdefault(t, parse_value(record["carbonIntensity"], self.name, "carbonIntensity"))
            if isinstance(record.get("emissionFactorType"), str):
                factor_types.add(record["emissionFactorType"])
        kind: Kind = "forecast" if end > now else "average"
        source = f"{self.name}:{'+'.join(sorted(factor_types))}" if factor_types else self.name
        return sorted(by_time.items()), PERIOD_S, kind, source

    def _past(self, zone: str, start: datetime, end: datetime, now: datetime) -> list[Any]:
        hour_start = now.replace(minute=0, second=0, microsecond=0)
        if start >= hour_start:
            return [self._get("/carbon-intensity/latest", zone)]
        if start >= now - HISTORY_SPAN:
            return self._records(self._get("/carbon-intensity/history", zone), "history")
        records: list[Any] = []
        # from the start of the hour that contains *start*: its record covers the window's head
        for a, b in chunks(start.replace(minute=0, second=0, microsecond=0), end, PAST_RANGE_CHUNK):
            body = self._get("/carbon-intensity/past-range", zone, start=iso_utc(a), end=iso_utc(b))
            records += self._records(body, "data")
        return records

    def _get(self, path: str, zone: str, **params: str) -> Any:
        return self._client.get(path, {"zone": zone, **params}, {"auth-token": self._token})

    def _records(self, body: Any, key: str) -> list[Any]:
        if not isinstance(body, dict) or not isinstance(body.get(key), list):
            raise CarbonProviderError(f"electricitymaps: malformed answer: expected an object with a {key!r} list")
        return body[key]

