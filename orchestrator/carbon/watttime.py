"""WattTime API v3 (https://api.watttime.org): marginal operating emissions rate (MOER).

A marginal rate answers a different question from an average one: how much CO2 the
generator that follows a change in load emits, i.e. what *adding or shifting* this
load does. It is the right signal for scheduling decisions and is reported here as
``kind="marginal"`` (``"forecast"`` when any part of the window is still ahead); it is
not interchangeable with the average figures of the other providers (docs/carbon.md).

Authentication: ``GET /login`` with HTTP Basic auth (``WATTTIME_USERNAME`` /
``WATTTIME_PASSWORD``) returns a bearer token valid for 30 minutes; it is renewed before
it expires and once more if a data call answers 401. Data: ``GET /v3/historical``
(``region``, ``signal_type=co2_moer``, ``start``, ``end``; fetched in 30-day chunks) for
the past, ``GET /v3/forecast`` (``horizon_hours`` up to 72) for the future. Answers are
``{"data": [{"point_time", "value"}], "meta": {"units", "data_point_period_seconds"}}``;
``lbs_co2_per_mwh`` is converted to g/kWh (1 lb/MWh = 0.453592 g/kWh) and any other
unit is refused rather than guessed. ``/v3/signal-index`` is not used: it is a 0-100
percentile of the region's recent MOER, not an emission rate, so it cannot yield grams.
"""

from __future__ import annotations

import base64
import math
import os
import threading
from datetime import datetime, timedelta
from typing import Any, Callable, Mapping

from orchestrator.carbon._http import (
    DEFAULT_RETRY,
    JsonClient,
    Points,
    PointsProvider,
    ProviderHTTPError,
    RetryPolicy,
    chunks,
    iso_utc,
    parse_time,
    parse_value,
    utc_now,
)
from orchestrator.carbon.base import CarbonDataError, CarbonProviderError, Kind

DEFAULT_BASE_URL = "https://api.watttime.org"
USERNAME_ENV = "WATTTIME_USERNAME"
PASSWORD_ENV = "WATTTIME_PASSWORD"
SIGNAL_TYPE = "co2_moer"
G_PER_KWH_PER_LB_PER_MWH = 0.453592  # 1 lb = 453.592 g; 1 MWh = 1000 kWh
UNITS_TO_G_PER_KWH = {"lbs_co2_per_mwh": G_PER_KWH_PER_LB_PER_MWH}
TOKEN_LIFETIME = timedelta(minutes=30)
TOKEN_MARGIN = timedelta(minutes=2)
HISTORICAL_CHUNK = timedelta(days=30)
MAX_HORIZON_H = 72
DEFAULT_PERIOD_S = 300.0
EDGE_TOLERANCE_S = 900.0  # historical data lags a few 5-minute intervals behind now

class WattTimeProvider(PointsProvider):
    """Marginal (MOER) intensity from WattTime; regions (``CAISO_NORTH``, ...) are open-ended."""

    name = "watttime"
    edge_tolerance_s = EDGE_TOLERANCE_S
    no_data_what, no_data_place = f"{SIGNAL_TYPE} data", "region"
    no_data_fix = "the account lacks access to this region"

    def __init__(
        self,
        username: str,
        password: str,
        *,
        base_url: str = DEFAULT_BASE_URL,
        timeout_s: float = 10.0,
        clock: Callable[[], datetime] = utc_now,
        retry: RetryPolicy = DEFAULT_RETRY,
    ) -> None:
        if not username or not password:
            raise CarbonDataError(f"carbon: provider watttime needs credentials -- set {USERNAME_ENV} and {PASSWORD_ENV}")
        basic = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
        self._basic_auth = f"Basic {basic}"
        self._clock = clock
        self._token: str | None = None
        self._token_expires: datetime | None = None
        self._login_lock = threading.Lock()  # the refresher and carbon accounting may both need a token
        self._client = JsonClient(
            self.name,
            base_url,
            timeout_s=timeout_s,
            auth_hint=f"check {USERNAME_ENV} and {PASSWORD_ENV}",
            secrets=(password, basic, f"{username}:{password}"),
            retry=retry,
        )

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ, **kwargs: Any) -> WattTimeProvider:
        """Build with credentials from ``WATTTIME_USERNAME`` / ``WATTTIME_PASSWORD``; missing ones are named."""
        missing = [name for name in (USERNAME_ENV, PASSWORD_ENV) if not env.get(name)]
        if missing:
            raise CarbonDataError(
                f"carbon: provider watttime needs {' and '.join(missing)} in the environment -- "
                "export them (the spec never holds credentials)"
            )
        return cls(env[USERNAME_ENV], env[PASSWORD_ENV], **kwargs)

    def regions(self) -> None:
        return None

    def _fetch(self, region: str, start: datetime, end: datetime) -> tuple[Points, float, Kind, str]:
        now = self._clock()
        bodies: list[Any] = []
        if start < now or end <= now:
            # from one interval before *start*: the point that contains it may begin earlier
            for a, b in chunks(start - timedelta(seconds=DEFAULT_PERIOD_S), min(end, now), HISTORICAL_CHUNK):
                bodies.append(self._get("/v3/historical", region=region, start=iso_utc(a), end=iso_utc(b)))
        if end > now:
            horizon_h = math.ceil((end - now) / timedelta(hours=1))
            if horizon_h > MAX_HORIZON_H:
                raise CarbonDataError(
                    f"carbon: watttime forecasts reach {MAX_HORIZON_H} h ahead; the window ends {horizon_h} h from now -- "
                    "shorten the horizon or the deadline"
                )
            bodies.append(self._get("/v3/forecast", region=region, horizon_hours=str(horizon_h)))
        by_time: dict[datetime, float] = {}
        period_s = DEFAULT_PERIOD_S
        for body in bodies:
            factor, period_s = self._meta(body)
            for point in body["data"]:
                if not isinstance(point, dict):
                    raise CarbonProviderError("watttime: malformed answer: a data point is not an object")
                t = parse_time(point.get("point_time"), self.name)
                by_time.setdefault(t, parse_value(point.get("value"), self.name, "value") * factor)
        kind: Kind = "forecast" if end > now else "marginal"
        return sorted(by_time.items()), period_s, kind, f"{self.name}:{SIGNAL_TYPE}"

    def _meta(self, body: Any) -> tuple[float, float]:
        """(g/kWh per unit, period in seconds) from an answer's ``meta``; the answer's shape is checked."""
        if not isinstance(body, dict) or not isinstance(body.get("data"), list) or not isinstance(body.get("meta"), dict):
            raise CarbonProviderError("watttime: malformed answer: expected an object with 'data' (list) and 'meta' (object)")
        meta = body["meta"]
        units = meta.get("units")
        if units not in UNITS_TO_G_PER_KWH:
            raise CarbonProviderError(
                f"watttime: unexpected units {str(units)[:40]!r} for {SIGNAL_TYPE} (expected {', '.join(UNITS_TO_G_PER_KWH)})"
            )
        period_s = parse_value(meta.get("data_point_period_seconds", DEFAULT_PERIOD_S), self.name, "data_point_period_seconds")
        if period_s <= 0:
            raise CarbonProviderError("watttime: malformed answer: data_point_period_seconds must be > 0")
        return UNITS_TO_G_PER_KWH[units], period_s

    def _get(self, path: str, **params: str) -> Any:
        params = {"signal_type": SIGNAL_TYPE, **params}
        bearer = self._bearer()
        try:
            return self._client.get(path, params, {"Authorization": f"Bearer {bearer}"})
        except ProviderHTTPError as e:
            if e.status != 401:
                raise
            return self._client.get(path, params, {"Authorization": f"Bearer {self._bearer(rejected=bearer)}"})

    def _bearer(self, rejected: str | None = None) -> str:
        """A valid token, logging in when there is none, it is about to expire, or the
        API just *rejected* it (expired or revoked early: log in again, once). One login
        at a time: a second thread waiting here reuses the token the first one got."""
        with self._login_lock:
            now = self._clock()
            if (self._token is None or self._token_expires is None or now >= self._token_expires
                    or self._token == rejected):
                body = self._client.get("/login", headers={"Authorization": self._basic_auth})
                token = body.get("token") if isinstance(body, dict) else None
                if not isinstance(token, str) or not token:
                    raise CarbonProviderError(
                        f"watttime: login answered without a token -- check {USERNAME_ENV} and {PASSWORD_ENV}"
                    )
                self._client.add_secret(token)
                self._token, self._token_expires = token, now + TOKEN_LIFETIME - TOKEN_MARGIN
            return self._token

