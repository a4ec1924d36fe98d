"""The Electricity Maps and WattTime providers against a local HTTP server.

The server (``http.server`` on 127.0.0.1, an ephemeral port, one thread) answers with
canned bodies shaped like the APIs' documented answers and records every request, so
the tests check the endpoints, parameters and auth headers the clients send and how
each failure -- 401, timeout, 5xx, malformed body, refused connection, redirect --
becomes one line without a credential in it. 429 and 5xx answers are retried with
backoff under a bound (sleeps recorded, not slept, except where the real-time bound is
the point), and the carbon placer keeps dispatching, labelled, while the API is slow or
rate-limited.
"""

from __future__ import annotations

import base64
import json
import random
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator
from urllib.parse import parse_qs, urlsplit

import pytest

from orchestrator.carbon import (
    CarbonDataError,
    CarbonProviderError,
    ElectricityMapsProvider,
    WattTimeProvider,
    make_provider,
    parse_carbon_config,
)
from orchestrator.carbon._http import RetryPolicy, parse_retry_after

UTC = timezone.utc
NOW = datetime(2026, 3, 10, 12, 30, tzinfo=UTC)
TOKEN = "em-SECRET-token-1234"
USER, PASSWORD = "greensweep-bot", "wt-SECRET-pass-5678"
WT_TOKEN = "wt-SECRET-bearer-9999"
TIMEOUT_S = 0.3


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.000Z")


@dataclass
class Reply:
    status: int = 200
    body: Any = None  # JSON-encoded unless bytes
    delay_s: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Seen:
    path: str
    query: dict[str, str]
    headers: dict[str, str]


class FakeAPI:
    """Canned replies per path (a list is served in order, its last reply repeating)."""

    def __init__(self) -> None:
        self.routes: dict[str, list[Reply] | Callable[[Seen], Reply]] = {}
        self.seen: list[Seen] = []
        self.url = ""
        self.release = threading.Event()

    def on(self, path: str, *replies: Reply) -> None:
        self.routes[path] = list(replies)

    def paths(self) -> list[str]:
        return [s.path for s in self.seen]

    def reply(self, seen: Seen) -> Reply:
        route = self.routes.get(seen.path)
        if route is None:
            return Reply(404, {"message": f"no route {seen.path}"})
        if callable(route):
            return route(seen)
        return route.pop(0) if len(route) > 1 else route[0]


class Sleeps:
    """A RetryPolicy's sleep that records the waits instead of sleeping."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    def __call__(self, delay_s: float) -> None:
        self.delays.append(delay_s)


@pytest.fixture
def retry() -> RetryPolicy:
    """The default policy's numbers, a seeded jitter and recorded sleeps."""
    return RetryPolicy(attempts=4, base_delay_s=0.5, max_delay_s=8.0, total_s=20.0, sleep=Sleeps(), rng=random.Random(0))


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def api() -> Iterator[FakeAPI]:
    fake = FakeAPI()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            parts = urlsplit(self.path)
            headers = {name.lower(): value for name, value in self.headers.items()}  # HTTP names are case-insensitive
            seen = Seen(parts.path, {k: v[0] for k, v in parse_qs(parts.query).items()}, headers)
            fake.seen.append(seen)
            reply = fake.reply(seen)
            if reply.delay_s:
                fake.release.wait(reply.delay_s)
            body = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
            try:
                self.send_response(reply.status)
                for name, value in {"Content-Type": "application/json", **reply.headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except OSError:  # the client gave up (timeout test)
                pass

        def log_message(self, *args: Any) -> None:
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request: Any, client_address: Any) -> None:
            pass

    server = Server(("127.0.0.1", 0), Handler)
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        fake.release.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def assert_clean(message: str, *secrets: str) -> None:
    """One line, and no credential in any form."""
    assert "\n" not in message
    for secret in secrets:
        assert secret not in message, f"secret leaked into: {message}"


def hourly(zone: str, start: datetime, values: list[float], factor: str = "lifecycle") -> list[dict[str, Any]]:
    return [
        {"zone": zone, "carbonIntensity": v, "datetime": iso(start + timedelta(hours=i)), "updatedAt": iso(NOW),
         "createdAt": iso(NOW), "emissionFactorType": factor, "isEstimated": False, "estimationMethod": None}
        for i, v in enumerate(values)
    ]


# -- Electricity Maps ------------------------------------------------------------------


@pytest.fixture
def em(api: FakeAPI, retry: RetryPolicy) -> ElectricityMapsProvider:
    return ElectricityMapsProvider(TOKEN, base_url=api.url + "/v3", timeout_s=TIMEOUT_S, clock=lambda: NOW, retry=retry)


def test_em_latest_for_a_window_in_the_current_hour(api: FakeAPI, em: ElectricityMapsProvider) -> None:
    api.on("/v3/carbon-intensity/latest", Reply(body=hourly("DE", utc(2026, 3, 10, 12), [302.0])[0]))
    figure = em.intensity("DE", utc(2026, 3, 10, 12, 10), utc(2026, 3, 10, 12, 20))
    assert (figure.g_co2_per_kwh, figure.kind, figure.source, figure.region) == (302.0, "average", "electricitymaps:lifecycle", "DE")
    assert (figure.valid_from, figure.valid_to) == (utc(2026, 3, 10, 12, 10), utc(2026, 3, 10, 12, 20))
    (seen,) = api.seen
    assert seen.query == {"zone": "DE"}
    assert seen.headers["auth-token"] == TOKEN


def test_em_history_is_time_weighted_across_hours(api: FakeAPI, em: ElectricityMapsProvider) -> None:
    api.on("/v3/carbon-intensity/history", Reply(body={"zone": "FR", "history": hourly("FR", utc(2026, 3, 9, 13), [50.0] * 20 + [200.0, 400.0, 100.0, 80.0])}))
    # hours 09:00 -> 200, 10:00 -> 400
    figure = em.intensity("FR", utc(2026, 3, 10, 9, 45), utc(2026, 3, 10, 10, 30))
    assert figure.g_co2_per_kwh == pytest.approx((15 * 200 + 30 * 400) / 45)
    assert figure.kind == "average"
    assert api.paths() == ["/v3/carbon-intensity/history"]


def test_em_past_range_is_fetched_in_ten_day_chunks(api: FakeAPI, em: ElectricityMapsProvider) -> None:
    def past_range(seen: Seen) -> Reply:
        start = datetime.fromisoformat(seen.query["start"].replace("Z", "+00:00"))
        end = datetime.fromisoformat(seen.query["end"].replace("Z", "+00:00"))
        hours = int((end - start) / timedelta(hours=1)) + 1  # the API's end is inclusive
        return Reply(body={"zone": "DE", "data": hourly("DE", start, [100.0] * hours)})

    api.routes["/v3/carbon-intensity/past-range"] = past_range
    figure = em.intensity("DE", utc(2026, 1, 1, 0, 30), utc(2026, 1, 26))
    assert figure.g_co2_per_kwh == pytest.approx(100.0)
    assert [s.query["start"] for s in api.seen] == ["2026-01-01T00:00:00Z", "2026-01-11T00:00:00Z", "2026-01-21T00:00:00Z"]
    assert api.seen[-1].query["end"] == "2026-01-26T00:00:00Z"


def test_em_forecast_for_future_windows(api: FakeAPI, em: ElectricityMapsProvider) -> None:
    forecast = [{"carbonIntensity": v, "datetime": iso(utc(2026, 3, 10, 12) + timedelta(hours=i))} for i, v in enumerate([300, 250, 200, 150])]
    api.on("/v3/carbon-intensity/forecast", Reply(body={"zone": "DE", "forecast": forecast, "updatedAt": iso(NOW)}))
    figure = em.intensity("DE", utc(2026, 3, 10, 13), utc(2026, 3, 10, 15))
    assert (figure.g_co2_per_kwh, figure.kind, figure.source) == (225.0, "forecast", "electricitymaps")
    assert em.series("DE", NOW, utc(2026, 3, 10, 15, 30), 3600) == [pytest.approx(275.0), pytest.approx(225.0), pytest.approx(175.0)]
    assert api.paths() == ["/v3/carbon-intensity/forecast"] * 2


def test_em_window_straddling_now_joins_history_and_forecast(api: FakeAPI, em: ElectricityMapsProvider) -> None:
    api.on("/v3/carbon-intensity/history", Reply(body={"zone": "DE", "history": hourly("DE", utc(2026, 3, 9, 13), [100.0] * 24)}))
    forecast = [{"carbonIntensity": 500, "datetime": iso(utc(2026, 3, 10, 13) + timedelta(hours=i))} for i in range(3)]
    api.on("/v3/carbon-intensity/forecast", Reply(body={"zone": "DE", "forecast": forecast}))
    figure = em.intensity("DE", utc(2026, 3, 10, 11), utc(2026, 3, 10, 14))
    assert figure.g_co2_per_kwh == pytest.approx(700 / 3)  # 11:00 and 12:00 from history (100), 13:00 forecast (500)
    assert figure.kind == "forecast"
    assert sorted(api.paths()) == ["/v3/carbon-intensity/forecast", "/v3/carbon-intensity/history"]


def test_em_missing_data_is_a_provider_error(api: FakeAPI, em: ElectricityMapsProvider) -> None:
    records = hourly("DE", utc(2026, 3, 9, 13), [100.0] * 24)
    records[20]["carbonIntensity"] = None  # 09:00 unpublished
    api.on("/v3/carbon-intensity/history", Reply(body={"zone": "DE", "history": records}))
    with pytest.raises(CarbonProviderError, match="no data for zone DE covering 2026-03-10T08:30:00Z..2026-03-10T09:30:00Z"):
        em.intensity("DE", utc(2026, 3, 10, 8, 30), utc(2026, 3, 10, 9, 30))


def test_em_401_names_the_env_var_not_the_token(api: FakeAPI, em: ElectricityMapsProvider) -> None:
    api.on("/v3/carbon-intensity/latest", Reply(401, {"message": f"invalid token {TOKEN}"}))
    with pytest.raises(CarbonProviderError) as e:
        em.intensity("DE", utc(2026, 3, 10, 12, 10), utc(2026, 3, 10, 12, 20))
    msg = str(e.value)
    assert "electricitymaps: authentication failed (HTTP 401)" in msg and "check ELECTRICITYMAPS_TOKEN" in msg
    assert e.value.exit_code == 5
    assert_clean(msg, TOKEN)


def test_em_timeout(api: FakeAPI, em: ElectricityMapsProvider) -> None:
    api.on("/v3/carbon-intensity/latest", Reply(body={}, delay_s=TIMEOUT_S * 10))
    with pytest.raises(CarbonProviderError, match=f"no answer from {api.url}/v3/carbon-intensity/latest within {TIMEOUT_S:g} s") as e:
        em.intensity("DE", utc(2026, 3, 10, 12, 10), utc(2026, 3, 10, 12, 20))
    assert_clean(str(e.value), TOKEN)


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (Reply(body=f"<html>proxy error for {TOKEN}\n</html>".encode()), "malformed answer from"),
        (Reply(body=b""), "not JSON (empty body)"),
        (Reply(body={"zone": "DE"}), "expected an object with a 'history' list"),
        (Reply(body={"zone": "DE", "history": [{"carbonIntensity": "high", "datetime": iso(NOW)}]}), "carbonIntensity 'high' is not a non-negative number"),
        (Reply(body={"zone": "DE", "history": [{"carbonIntensity": 1, "datetime": "yesterday"}]}), "timestamp 'yesterday' is not ISO 8601"),
        (Reply(502, f"Bad gateway; request carried auth-token: {TOKEN}".encode()), "server error HTTP 502"),
        (Reply(400, {"error": f"zone XX unknown (token {TOKEN})"}), "HTTP 400 at"),
        (Reply(429, {}), "rate limited (HTTP 429)"),
    ],
)
def test_em_bad_answers_are_one_clean_line(api: FakeAPI, em: ElectricityMapsProvider, reply: Reply, message: str) -> None:
    api.on("/v3/carbon-intensity/history", reply)
    with pytest.raises(CarbonProviderError, match=re.escape(message)) as e:
        em.intensity("DE", utc(2026, 3, 10, 9), utc(2026, 3, 10, 10))
    assert_clean(str(e.value), TOKEN)
    retried = reply.status in (429, 502)
    assert len(api.seen) == (4 if retried else 1)  # only rate limits and server errors are retried
    assert ("gave up after 4 attempts" in str(e.value)) is retried
    if b"auth-token" in (reply.body if isinstance(reply.body, bytes) else b""):
        assert "***" in str(e.value)  # the echoed token was masked, the rest of the body kept


def test_em_redirects_are_refused_so_the_token_is_not_replayed(api: FakeAPI, em: ElectricityMapsProvider) -> None:
    api.on("/v3/carbon-intensity/latest", Reply(302, {}, headers={"Location": api.url + "/elsewhere"}))
    with pytest.raises(CarbonProviderError, match="HTTP 302 redirect .* refused") as e:
        em.intensity("DE", utc(2026, 3, 10, 12, 10), utc(2026, 3, 10, 12, 20))
    assert api.paths() == ["/v3/carbon-intensity/latest"]
    assert_clean(str(e.value), TOKEN)


def test_em_unreachable_server() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    provider = ElectricityMapsProvider(TOKEN, base_url=f"http://127.0.0.1:{port}/v3", timeout_s=TIMEOUT_S, clock=lambda: NOW)
    with pytest.raises(CarbonProviderError, match=f"electricitymaps: cannot reach http://127.0.0.1:{port}/v3/carbon-intensity/latest") as e:
        provider.intensity("DE", utc(2026, 3, 10, 12, 10), utc(2026, 3, 10, 12, 20))
    assert_clean(str(e.value), TOKEN)


def test_em_from_config_uses_env_token_and_base_url(api: FakeAPI) -> None:
    now = datetime.now(UTC)
    hour = now.replace(minute=0, second=0, microsecond=0)
    api.on("/v3/carbon-intensity/latest", Reply(body=hourly("FR", hour, [42.0])[0]))
    # in case the provider's clock has passed an hour boundary since *now*
    api.on("/v3/carbon-intensity/history", Reply(body={"zone": "FR", "history": hourly("FR", hour - timedelta(hours=23), [42.0] * 25)}))
    config = parse_carbon_config({"provider": "electricitymaps", "base_url": api.url + "/v3", "timeout_s": 2, "regions": {"local": "FR"}})
    provider = make_provider(config, env={"ELECTRICITYMAPS_TOKEN": TOKEN})
    figure = provider.intensity("local", now - timedelta(seconds=1), now - timedelta(seconds=1))
    assert (figure.region, figure.g_co2_per_kwh) == ("FR", 42.0)
    (seen,) = api.seen
    assert seen.query["zone"] == "FR" and seen.headers["auth-token"] == TOKEN
    with pytest.raises(CarbonDataError, match="carbon.base_url: 'ftp://x' is not an http"):
        make_provider(parse_carbon_config({"provider": "electricitymaps", "base_url": "ftp://x"}), env={"ELECTRICITYMAPS_TOKEN": TOKEN})


# -- WattTime --------------------------------------------------------------------------


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def moer(start: datetime, values: list[float], *, units: str = "lbs_co2_per_mwh", period_s: int = 300) -> dict[str, Any]:
    return {
        "data": [{"point_time": (start + timedelta(seconds=period_s * i)).isoformat(), "value": v} for i, v in enumerate(values)],
        "meta": {"region": "CAISO_NORTH", "signal_type": "co2_moer", "units": units, "data_point_period_seconds": period_s,
                 "model": {"date": "2026-03-01"}, "warnings": []},
    }


@pytest.fixture
def clock() -> Clock:
    return Clock(NOW)


@pytest.fixture
def wt(api: FakeAPI, clock: Clock, retry: RetryPolicy) -> WattTimeProvider:
    api.on("/login", Reply(body={"token": WT_TOKEN}))
    return WattTimeProvider(USER, PASSWORD, base_url=api.url, timeout_s=TIMEOUT_S, clock=clock, retry=retry)


def test_wt_login_then_historical_in_g_per_kwh(api: FakeAPI, wt: WattTimeProvider) -> None:
    api.on("/v3/historical", Reply(body=moer(utc(2026, 3, 10, 10, 55), [1000.0] * 7)))
    figure = wt.intensity("CAISO_NORTH", utc(2026, 3, 10, 11), utc(2026, 3, 10, 11, 30))
    assert figure.g_co2_per_kwh == pytest.approx(453.592)
    assert (figure.kind, figure.source, figure.region) == ("marginal", "watttime:co2_moer", "CAISO_NORTH")
    login, data = api.seen
    assert login.path == "/login"
    assert login.headers["authorization"] == "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    assert data.path == "/v3/historical" and data.headers["authorization"] == f"Bearer {WT_TOKEN}"
    assert data.query == {"signal_type": "co2_moer", "region": "CAISO_NORTH", "start": "2026-03-10T10:55:00Z", "end": "2026-03-10T11:30:00Z"}


def test_wt_unit_conversion_and_time_weighting(api: FakeAPI, wt: WattTimeProvider) -> None:
    assert WattTimeProvider.__module__ == "orchestrator.carbon.watttime"
    from orchestrator.carbon.watttime import G_PER_KWH_PER_LB_PER_MWH

    assert G_PER_KWH_PER_LB_PER_MWH == 0.453592  # 1 lb/MWh = 453.592 g / 1000 kWh
    api.on("/v3/historical", Reply(body=moer(utc(2026, 3, 10, 11), [100.0, 1100.0])))
    figure = wt.intensity("CAISO_NORTH", utc(2026, 3, 10, 11, 2), utc(2026, 3, 10, 11, 7))
    assert figure.g_co2_per_kwh == pytest.approx((3 * 100 + 2 * 1100) / 5 * 0.453592)


def test_wt_series_fetches_once(api: FakeAPI, wt: WattTimeProvider) -> None:
    api.on("/v3/historical", Reply(body=moer(utc(2026, 3, 10, 10, 55), [100.0, 100.0, 100.0, 300.0, 300.0, 300.0, 500.0])))
    series = wt.series("CAISO_NORTH", utc(2026, 3, 10, 11), utc(2026, 3, 10, 11, 30), 600)
    assert series == pytest.approx([v * 0.453592 for v in (100.0, 300.0, 400.0)])  # 11:20-11:30: 300 then 500
    assert api.paths() == ["/login", "/v3/historical"]


def test_wt_token_is_reused_then_renewed(api: FakeAPI, wt: WattTimeProvider, clock: Clock) -> None:
    api.on("/v3/historical", Reply(body=moer(utc(2026, 3, 10, 10), [500.0] * 36)))
    window = (utc(2026, 3, 10, 11), utc(2026, 3, 10, 11, 30))
    wt.intensity("CAISO_NORTH", *window)
    wt.intensity("CAISO_NORTH", *window)
    assert api.paths().count("/login") == 1
    clock.now += timedelta(minutes=29)  # within 2 minutes of the 30-minute expiry
    wt.intensity("CAISO_NORTH", *window)
    assert api.paths().count("/login") == 2


def test_wt_relogs_in_once_on_401(api: FakeAPI, wt: WattTimeProvider) -> None:
    api.on("/v3/historical", Reply(401, {"error": "token expired"}), Reply(body=moer(utc(2026, 3, 10, 10, 55), [10.0] * 10)))
    figure = wt.intensity("CAISO_NORTH", utc(2026, 3, 10, 11), utc(2026, 3, 10, 11, 30))
    assert figure.g_co2_per_kwh == pytest.approx(4.53592)
    assert api.paths() == ["/login", "/v3/historical", "/login", "/v3/historical"]


def test_wt_bad_credentials(api: FakeAPI, wt: WattTimeProvider) -> None:
    api.on("/login", Reply(401, f"no user {USER} with password {PASSWORD}".encode()))
    with pytest.raises(CarbonProviderError) as e:
        wt.intensity("CAISO_NORTH", utc(2026, 3, 10, 11), utc(2026, 3, 10, 11, 30))
    msg = str(e.value)
    assert "watttime: authentication failed (HTTP 401)" in msg and "check WATTTIME_USERNAME and WATTTIME_PASSWORD" in msg
    assert api.paths() == ["/login"]  # no retry loop on bad credentials
    assert_clean(msg, PASSWORD)


def test_wt_login_without_token(api: FakeAPI, wt: WattTimeProvider) -> None:
    api.on("/login", Reply(body={"detail": "ok"}))
    with pytest.raises(CarbonProviderError, match="login answered without a token"):
        wt.intensity("CAISO_NORTH", utc(2026, 3, 10, 11), utc(2026, 3, 10, 11, 30))


def test_wt_forecast_for_future_windows(api: FakeAPI, wt: WattTimeProvider) -> None:
    api.on("/v3/forecast", Reply(body=moer(utc(2026, 3, 10, 12, 30), [800.0] * 12 + [400.0] * 12)))
    figure = wt.intensity("CAISO_NORTH", utc(2026, 3, 10, 13), utc(2026, 3, 10, 14))
    assert figure.kind == "forecast" and figure.source == "watttime:co2_moer"
    assert figure.g_co2_per_kwh == pytest.approx((6 * 800 + 6 * 400) / 12 * 0.453592)
    assert api.seen[-1].query == {"signal_type": "co2_moer", "region": "CAISO_NORTH", "horizon_hours": "2"}
    with pytest.raises(CarbonDataError, match="forecasts reach 72 h ahead; the window ends 74 h from now"):
        wt.intensity("CAISO_NORTH", NOW, NOW + timedelta(hours=73, minutes=30))


def test_wt_refuses_unknown_units(api: FakeAPI, wt: WattTimeProvider) -> None:
    api.on("/v3/historical", Reply(body=moer(utc(2026, 3, 10, 10, 55), [1.0] * 10, units="percentile")))
    with pytest.raises(CarbonProviderError, match="unexpected units 'percentile' for co2_moer"):
        wt.intensity("CAISO_NORTH", utc(2026, 3, 10, 11), utc(2026, 3, 10, 11, 30))


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (Reply(body=b"not json at all"), "not JSON"),
        (Reply(body={"data": "x"}), "expected an object with 'data' \\(list\\) and 'meta'"),
        (Reply(400, b"echo: Authorization: Bearer " + WT_TOKEN.encode()), "HTTP 400 at"),
        (Reply(503, b"maintenance"), "server error HTTP 503"),
        (Reply(body={}, delay_s=TIMEOUT_S * 10), f"within {TIMEOUT_S:g} s"),
    ],
)
def test_wt_failures_never_show_credentials(api: FakeAPI, wt: WattTimeProvider, reply: Reply, message: str) -> None:
    api.on("/v3/historical", reply)
    with pytest.raises(CarbonProviderError, match=message) as e:
        wt.intensity("CAISO_NORTH", utc(2026, 3, 10, 11), utc(2026, 3, 10, 11, 30))
    basic = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    assert_clean(str(e.value), PASSWORD, WT_TOKEN, basic)


def test_wt_from_config(api: FakeAPI) -> None:
    api.on("/login", Reply(body={"token": WT_TOKEN}))
    now = datetime.now(UTC)
    api.on("/v3/historical", Reply(body=moer(now - timedelta(minutes=20), [200.0] * 6)))
    config = parse_carbon_config({"provider": "watttime", "base_url": api.url, "timeout_s": 2})
    provider = make_provider(config, env={"WATTTIME_USERNAME": USER, "WATTTIME_PASSWORD": PASSWORD})
    figure = provider.intensity("CAISO_NORTH", now - timedelta(minutes=15), now - timedelta(minutes=5))
    assert figure.g_co2_per_kwh == pytest.approx(200 * 0.453592) and figure.kind == "marginal"


def test_watttime_names_the_signal_and_region_when_data_are_missing() -> None:
    """The shared no-data message, in WattTime's words."""
    from orchestrator.carbon._http import PointsProvider
    from orchestrator.carbon.watttime import WattTimeProvider

    provider = WattTimeProvider("user", "pw")
    assert isinstance(provider, PointsProvider)
    with pytest.raises(CarbonProviderError, match=r"watttime: no co2_moer data for region CAISO_NORTH covering "
                                                  r".*\(the API returned nothing\) -- it may not be published yet, "
                                                  r"or the account lacks access to this region"):
        provider._mean([], 300.0, "CAISO_NORTH", datetime(2026, 1, 1, tzinfo=timezone.utc),
                       datetime(2026, 1, 1, 1, tzinfo=timezone.utc))


# -- retries: 429 and 5xx, with backoff, under a bound -----------------------------------


def test_429_and_503_are_retried_with_backoff_honouring_retry_after(api: FakeAPI, em: ElectricityMapsProvider,
                                                                    retry: RetryPolicy) -> None:
    body = {"zone": "DE", "history": hourly("DE", utc(2026, 3, 9, 13), [100.0] * 24)}
    api.on("/v3/carbon-intensity/history", Reply(429, {}, headers={"Retry-After": "3"}), Reply(503, b"busy"), Reply(body=body))
    figure = em.intensity("DE", utc(2026, 3, 10, 9), utc(2026, 3, 10, 10))
    assert figure.g_co2_per_kwh == 100.0
    assert api.paths() == ["/v3/carbon-intensity/history"] * 3
    assert all(s.headers["auth-token"] == TOKEN for s in api.seen)  # the same request again, same host
    first, second = retry.sleep.delays  # type: ignore[attr-defined]
    assert first == 3.0  # the server's Retry-After (longer than the jittered 0..0.5 s)
    assert 0.0 <= second <= 1.0  # full jitter under base * 2


def test_a_persistent_503_gives_up_after_the_attempts_with_a_clean_line(api: FakeAPI, em: ElectricityMapsProvider,
                                                                        retry: RetryPolicy) -> None:
    api.on("/v3/carbon-intensity/history", Reply(503, f"maintenance; echo auth-token: {TOKEN}".encode()))
    with pytest.raises(CarbonProviderError, match=r"server error HTTP 503 .* -- retry later \(gave up after 4 attempts in "
                                                  r"[0-9.]+ s\)$") as e:
        em.intensity("DE", utc(2026, 3, 10, 9), utc(2026, 3, 10, 10))
    assert len(api.seen) == 4 and e.value.exit_code == 5
    delays = retry.sleep.delays  # type: ignore[attr-defined]
    assert len(delays) == 3 and all(0.0 <= d <= cap for d, cap in zip(delays, (0.5, 1.0, 2.0)))
    assert_clean(str(e.value), TOKEN)


def test_a_retry_after_beyond_the_budget_gives_up_at_once(api: FakeAPI, em: ElectricityMapsProvider,
                                                          retry: RetryPolicy) -> None:
    api.on("/v3/carbon-intensity/history", Reply(429, {}, headers={"Retry-After": "120"}))
    with pytest.raises(CarbonProviderError, match=r"rate limited \(HTTP 429\) .* \(the server asks to wait 120 s is beyond "
                                                  r"the 20 s retry budget; gave up after 1 attempt\)"):
        em.intensity("DE", utc(2026, 3, 10, 9), utc(2026, 3, 10, 10))
    assert len(api.seen) == 1 and retry.sleep.delays == []  # type: ignore[attr-defined]


def test_retrying_is_bounded_in_real_time(api: FakeAPI) -> None:
    policy = RetryPolicy(attempts=50, base_delay_s=0.05, max_delay_s=0.1, total_s=0.6)
    provider = ElectricityMapsProvider(TOKEN, base_url=api.url + "/v3", timeout_s=TIMEOUT_S, clock=lambda: NOW, retry=policy)
    api.on("/v3/carbon-intensity/history", Reply(503, b"down"))
    began = time.monotonic()
    with pytest.raises(CarbonProviderError, match="retry budget"):
        provider.intensity("DE", utc(2026, 3, 10, 9), utc(2026, 3, 10, 10))
    assert time.monotonic() - began < 0.6 + 1.0  # the budget, plus one request's worth of slack
    assert 2 <= len(api.seen) < 50


def test_retry_after_forms() -> None:
    now = utc(2026, 3, 10, 12)
    assert parse_retry_after("7", now) == 7.0
    assert parse_retry_after("Tue, 10 Mar 2026 12:00:30 GMT", now) == 30.0
    assert parse_retry_after("Tue, 10 Mar 2026 11:00:00 GMT", now) == 0.0  # already past: no wait
    assert parse_retry_after("soon", now) is None and parse_retry_after(None, now) is None
    with pytest.raises(ValueError, match="attempts must be >= 1"):
        RetryPolicy(attempts=0)


def test_wt_data_calls_are_retried_after_a_429(api: FakeAPI, wt: WattTimeProvider) -> None:
    api.on("/v3/historical", Reply(429, {"error": "slow down"}), Reply(body=moer(utc(2026, 3, 10, 10, 55), [1000.0] * 7)))
    figure = wt.intensity("CAISO_NORTH", utc(2026, 3, 10, 11), utc(2026, 3, 10, 11, 30))
    assert figure.g_co2_per_kwh == pytest.approx(453.592)
    assert api.paths() == ["/login", "/v3/historical", "/v3/historical"]  # one login: the token was not the problem


# -- the carbon placer keeps dispatching while the API struggles -------------------------


def _placer_against(provider: ElectricityMapsProvider, *, fill_wait_s: float, warnings: list[str]):  # type: ignore[no-untyped-def]
    from orchestrator.carbon.cache import SeriesCache
    from orchestrator.catalog import load_catalog
    from orchestrator.scheduler.online import STEP_S, CarbonPlacer, Estimates

    cache = SeriesCache(provider, step_s=STEP_S, clock=lambda: NOW, fill_wait_s=fill_wait_s, retry_failed_s=0.05, poll_s=0.02)
    return CarbonPlacer(policy="greedy-carbon", provider=provider, estimates=Estimates([], load_catalog()),
                        warn=warnings.append, clock=lambda: NOW, intensity=cache)


def _place_train(p):  # type: ignore[no-untyped-def]
    from orchestrator.cluster import NodeInfo
    from orchestrator.plan import PlannedStage
    from orchestrator.scheduler import Slot

    train = PlannedStage(key="k-train", kind="train", params={}, parent_key=None, label="train")

    class Plan:
        stages = (train,)

        @staticmethod
        def stage(key: str) -> PlannedStage:
            return train

    node = NodeInfo(node_id="n-de", node_type="cpu-xeon", region="DE", num_cpus=1, num_gpus=0, address="127.0.0.1")
    slots = [Slot(node=node, handle=None)]
    p._dirty = True  # as after a finished stage: plan again
    began = time.monotonic()
    out = p.place([train], slots, slots, {"k-train": "pending"}, Plan())
    return out, time.monotonic() - began


def _serve_de(api: FakeAPI, value: float) -> None:
    api.on("/v3/carbon-intensity/latest", Reply(body=hourly("DE", utc(2026, 3, 10, 12), [value])[0]))
    forecast = [{"carbonIntensity": value, "datetime": iso(utc(2026, 3, 10, 13) + timedelta(hours=i))} for i in range(60)]
    api.on("/v3/carbon-intensity/forecast", Reply(body={"zone": "DE", "forecast": forecast}))


def test_placer_dispatches_on_the_labelled_fallback_while_rate_limited_then_on_fresh_data(
        api: FakeAPI, em: ElectricityMapsProvider) -> None:
    api.on("/v3/carbon-intensity/latest", Reply(429, {"message": "too many requests"}))
    warnings: list[str] = []
    p = _placer_against(em, fill_wait_s=2.0, warnings=warnings)
    try:
        ((_, _, d),) = _place_train(p)[0]
        assert d["estimate_source"] == "catalog+fallback-intensity"
        assert d["expected_intensity_g_per_kwh"] == pytest.approx(475.0)  # the world average, labelled
        (warning,) = warnings
        assert "no carbon intensity for region 'DE'" in warning and "rate limited (HTTP 429)" in warning
        assert "fallback 475 g/kWh (static:iea-2019), labelled fallback-intensity" in warning
        assert_clean(warning, TOKEN)
        _serve_de(api, 200.0)  # the API recovers: the refresher fills the hour, dispatch never waited for it
        deadline = time.monotonic() + 5
        while p.intensity.read(["DE"], utc(2026, 3, 10, 12), 3600.0)["DE"].status != "fresh":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        ((_, _, d),) = _place_train(p)[0]
        assert d["estimate_source"] == "catalog" and d["expected_intensity_g_per_kwh"] == pytest.approx(200.0)
        assert warnings[-1] == "carbon intensity for region 'DE' is current again"
    finally:
        p.close()
    assert not p.intensity.refreshing


def test_placer_does_not_wait_for_a_slow_api(api: FakeAPI, em: ElectricityMapsProvider) -> None:
    _serve_de(api, 200.0)
    latest = hourly("DE", utc(2026, 3, 10, 12), [200.0])[0]
    api.on("/v3/carbon-intensity/latest", Reply(503, b"overloaded", delay_s=TIMEOUT_S * 0.8), Reply(body=latest))
    warnings: list[str] = []
    p = _placer_against(em, fill_wait_s=0.2, warnings=warnings)
    try:
        (decision,), took_s = _place_train(p)
        assert took_s < 0.2 + 0.5  # the bounded first-fill wait, not the API's slow 503 and its retry
        assert decision[2]["estimate_source"] == "catalog+fallback-intensity"
        assert "not fetched yet" in warnings[0]
    finally:
        p.close()
