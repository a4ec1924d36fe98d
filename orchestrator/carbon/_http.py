"""The border between the HTTP intensity providers and the network.

One small JSON-over-HTTPS GET client on the standard library (``urllib``), shared by
:mod:`.electricitymaps` and :mod:`.watttime`. It exists to make two promises in one
place: every failure -- refused connection, timeout, HTTP error, a body that is not
JSON -- becomes a one-line :class:`~.base.CarbonProviderError` naming the provider and
the fix, and no message ever contains a credential (tokens, passwords and the Basic
auth header are masked wherever they appear, including in a server's echoed error
body). Redirects are refused rather than followed, so a header carrying a credential is
never replayed to another host.

A rate limit (HTTP 429) or a transient server error (500, 502, 503, 504) is retried
under a :class:`RetryPolicy`: exponential backoff with full jitter, a server's
``Retry-After`` honoured, and a bound on the number of attempts and on the total time,
so a struggling API costs at most ``total_s`` more than one request, never an open-ended
stall. Other failures are not retried: a 4xx will not change, and a timeout has already
spent its time (the placer's refresher asks again later, see :mod:`.cache`).
"""

from __future__ import annotations

import email.utils
import http.client
import json
import math
import random
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timedelta, timezone
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

from orchestrator.carbon.base import (
    CarbonDataError,
    CarbonProviderError,
    Intensity,
    IntensityProvider,
    Kind,
    check_window,
    parse_iso_utc,
    step_windows,
    window_mean,
)

Points = list[tuple[datetime, float]]

MAX_BODY_BYTES = 16 * 1024 * 1024
_SNIPPET_CHARS = 200


RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


class ProviderHTTPError(CarbonProviderError):
    """The server answered with an HTTP error status (kept in ``status`` for retry logic;
    ``retry_after_s`` is the server's ``Retry-After`` in seconds, None without one)."""

    def __init__(self, message: str, *, status: int, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class RetryPolicy:
    """How :class:`JsonClient` retries 429 and 5xx answers.

    Attempt *n* (n >= 1 retries) waits a uniformly random time in
    ``[0, min(max_delay_s, base_delay_s * 2**(n-1))]`` ("full jitter": clients that were
    rate-limited together do not come back together), or the server's ``Retry-After`` if
    that is longer. At most ``attempts`` requests are made, and no retry starts whose
    wait would end later than ``total_s`` after the first request; a ``Retry-After``
    beyond that gives up at once. ``attempts=1`` disables retries. *sleep* and *rng* are
    seams for tests.
    """

    attempts: int = 4
    base_delay_s: float = 0.5
    max_delay_s: float = 8.0
    total_s: float = 20.0
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False, repr=False)
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {self.attempts!r}")
        for name in ("base_delay_s", "max_delay_s", "total_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")

    def delay_s(self, retry: int, retry_after_s: float | None) -> float:
        """The wait before retry number *retry* (1 for the first retry)."""
        cap = min(self.max_delay_s, self.base_delay_s * 2 ** (retry - 1))
        jittered = self.rng.uniform(0.0, cap)
        return max(jittered, retry_after_s) if retry_after_s is not None else jittered


DEFAULT_RETRY = RetryPolicy()


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """``Retry-After`` in seconds from now: delta-seconds or an HTTP date; None if absent or unreadable."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - (now or utc_now())).total_seconds())


def _gave_up(e: ProviderHTTPError, why: str) -> ProviderHTTPError:
    """*e* with the reason retrying stopped appended (its message is already scrubbed)."""
    return ProviderHTTPError(f"{e} ({why})", status=e.status, retry_after_s=e.retry_after_s)


class _RefuseRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        return None  # urllib then raises HTTPError for the 3xx


def check_base_url(base_url: str, provider: str) -> str:
    """*base_url* without a trailing slash; only http(s) URLs with a host are accepted."""
    parsed = urllib.parse.urlsplit(base_url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise CarbonDataError(f"carbon.base_url: {base_url!r} is not an http(s) URL for {provider} -- e.g. https://host/path")
    return base_url.rstrip("/")


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def iso_utc(t: datetime) -> str:
    """``2026-01-01T00:00:00Z``: the timestamp form both APIs accept in query strings."""
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def chunks(start: datetime, end: datetime, size: timedelta) -> Iterator[tuple[datetime, datetime]]:
    """Consecutive ``(a, b)`` pieces of at most *size* covering ``[start, end]``; one piece if ``start == end``."""
    t = start
    while True:
        b = min(t + size, end)
        yield t, b
        if b >= end:
            return
        t = b


def parse_time(text: Any, provider: str) -> datetime:
    """An ISO 8601 timestamp from an API answer as an aware UTC datetime."""
    if not isinstance(text, str):
        raise CarbonProviderError(f"{provider}: malformed answer: timestamp {text!r} is not a string")
    try:
        return parse_iso_utc(text)
    except ValueError:
        raise CarbonProviderError(f"{provider}: malformed answer: timestamp {text[:40]!r} is not ISO 8601") from None


def parse_value(value: Any, provider: str, field: str) -> float:
    """A finite, non-negative number from an API answer."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise CarbonProviderError(f"{provider}: malformed answer: {field} {str(value)[:40]!r} is not a non-negative number")
    return float(value)


class JsonClient:
    """GET JSON from one API; every failure is a :class:`CarbonProviderError` without secrets.

    *auth_hint* is appended to authentication failures (e.g. "check ELECTRICITYMAPS_TOKEN").
    Secrets given at construction or later with :meth:`add_secret` are masked in every
    message this client raises. 429 and transient 5xx answers are retried under *retry*.
    Safe to use from several threads (the placer's refresher and carbon accounting):
    a request keeps its state on the stack, and the secret list is replaced, not mutated.
    """

    def __init__(self, provider: str, base_url: str, *, timeout_s: float, auth_hint: str, secrets: tuple[str, ...] = (),
                 retry: RetryPolicy = DEFAULT_RETRY) -> None:
        if not (math.isfinite(timeout_s) and timeout_s > 0):
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        self.provider = provider
        self.base_url = check_base_url(base_url, provider)
        self.timeout_s = timeout_s
        self.auth_hint = auth_hint
        self.retry = retry
        self._secrets: tuple[str, ...] = tuple(s for s in secrets if s)
        self._opener = urllib.request.build_opener(_RefuseRedirect)

    def add_secret(self, secret: str) -> None:
        if secret:
            self._secrets = (*self._secrets, secret)

    def scrub(self, text: str) -> str:
        """*text* on one line with every known secret replaced by ``***``."""
        for secret in sorted(self._secrets, key=len, reverse=True):
            text = text.replace(secret, "***")
        return " ".join(text.split())

    def get(self, path: str, params: Mapping[str, str] | None = None, headers: Mapping[str, str] | None = None) -> Any:
        """GET ``base_url + path`` with *params* and *headers*; the decoded JSON body.

        429 and 500/502/503/504 are retried under :attr:`retry`; when it gives up, the
        last answer's error says how many attempts were made and over how long.
        """
        url = self.base_url + path
        full_url = url + ("?" + urllib.parse.urlencode(params) if params else "")
        all_headers = {"Accept": "application/json", **(headers or {})}
        policy = self.retry
        started = time.monotonic()
        timeout_s = self.timeout_s
        for attempt in range(1, policy.attempts + 1):
            try:
                return self._get_once(urllib.request.Request(full_url, headers=all_headers), url, timeout_s)
            except ProviderHTTPError as e:
                if e.status not in RETRY_STATUSES or policy.attempts == 1:
                    raise
                elapsed_s = time.monotonic() - started
                if attempt == policy.attempts:
                    raise _gave_up(e, f"gave up after {attempt} attempts in {elapsed_s:.1f} s") from None
                delay_s = policy.delay_s(attempt, e.retry_after_s)
                left_s = policy.total_s - elapsed_s - delay_s
                if left_s <= 0:
                    asked = e.retry_after_s is not None and e.retry_after_s >= delay_s
                    wait = f"the server asks to wait {e.retry_after_s:g} s" if asked else f"another wait of {delay_s:.1f} s"
                    raise _gave_up(e, f"{wait} is beyond the {policy.total_s:g} s retry budget; "
                                      f"gave up after {attempt} attempt{'s' if attempt > 1 else ''}") from None
                policy.sleep(delay_s)
                timeout_s = min(self.timeout_s, max(left_s, 0.1))  # the budget bounds the retried request too
        raise AssertionError("unreachable: the last attempt returns or raises")  # pragma: no cover

    def _get_once(self, request: urllib.request.Request, url: str, timeout_s: float) -> Any:
        try:
            with self._opener.open(request, timeout=timeout_s) as response:
                body = response.read(MAX_BODY_BYTES + 1)
        except urllib.error.HTTPError as e:
            raise self._status_error(e, url) from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, TimeoutError):
                raise self._timeout(url, timeout_s) from None
            raise self._fail(f"cannot reach {url}: {e.reason}") from None
        except TimeoutError:
            raise self._timeout(url, timeout_s) from None
        except (OSError, http.client.HTTPException) as e:
            raise self._fail(f"connection to {url} failed: {type(e).__name__}: {e}") from None
        if len(body) > MAX_BODY_BYTES:
            raise self._fail(f"answer from {url} is larger than {MAX_BODY_BYTES} bytes")
        try:
            return json.loads(body)
        except ValueError:
            raise self._fail(f"malformed answer from {url}: not JSON ({self._snippet(body)})") from None

    def _snippet(self, body: bytes) -> str:
        text = body[: _SNIPPET_CHARS * 4].decode("utf-8", errors="replace")
        text = self.scrub(text)
        return (text[:_SNIPPET_CHARS] + "...") if len(text) > _SNIPPET_CHARS else (text or "empty body")

    def _fail(self, message: str) -> CarbonProviderError:
        return CarbonProviderError(self.scrub(f"{self.provider}: {message}"))

    def _timeout(self, url: str, timeout_s: float) -> CarbonProviderError:
        return self._fail(f"no answer from {url} within {timeout_s:g} s -- the service is slow or unreachable; retry later")

    def _status_error(self, e: urllib.error.HTTPError, url: str) -> ProviderHTTPError:
        try:
            body = e.read(_SNIPPET_CHARS * 4)
        except (OSError, http.client.HTTPException):
            body = b""
        status = e.code
        if status in (401, 403):
            what = f"authentication failed (HTTP {status}) at {url} -- {self.auth_hint}"
        elif status == 429:
            what = f"rate limited (HTTP 429) at {url} -- slow down or retry later"
        elif status >= 500:
            what = f"server error HTTP {status} at {url} ({self._snippet(body)}) -- retry later"
        elif 300 <= status < 400:
            what = f"HTTP {status} redirect from {url} refused -- set carbon.base_url to the final address"
        else:
            what = f"HTTP {status} at {url}: {self._snippet(body)}"
        retry_after_s = parse_retry_after(e.headers.get("Retry-After")) if e.headers is not None else None
        return ProviderHTTPError(self.scrub(f"{self.provider}: {what}"), status=status, retry_after_s=retry_after_s)


class PointsProvider(IntensityProvider):
    """An HTTP provider whose answers are timestamped points: :meth:`intensity` and
    :meth:`series` are time-weighted means of what :meth:`_fetch` returns for the window.

    Subclasses set ``edge_tolerance_s`` (how late the newest point may be) and the words
    of the no-data message, and implement ``_fetch``.
    """

    remote = True
    edge_tolerance_s: float
    no_data_what: str  # e.g. "data", "co2_moer data"
    no_data_place: str  # e.g. "zone", "region"
    no_data_fix: str  # e.g. "the zone has gaps"

    def _fetch(self, region: str, start: datetime, end: datetime) -> tuple[Points, float, Kind, str]:
        """(points, period of one point in s, kind, source) covering [start, end)."""
        raise NotImplementedError

    def intensity(self, region: str, start: datetime, end: datetime) -> Intensity:
        start, end = check_window(start, end)
        points, period_s, kind, source = self._fetch(region, start, end)
        return Intensity(self._mean(points, period_s, region, start, end), source, kind, region, start, end)

    def series(self, region: str, start: datetime, end: datetime, step_s: float) -> list[float]:
        windows = step_windows(start, end, step_s)
        points, period_s, _, _ = self._fetch(region, *check_window(start, end))
        return [self._mean(points, period_s, region, a, b) for a, b in windows]

    def _mean(self, points: Points, period_s: float, region: str, start: datetime, end: datetime) -> float:
        value = window_mean(points, start, end, period_s=period_s, edge_tolerance_s=self.edge_tolerance_s)
        if value is None:
            have = f"{points[0][0]:%Y-%m-%dT%H:%MZ}..{points[-1][0]:%Y-%m-%dT%H:%MZ}" if points else "nothing"
            raise CarbonProviderError(
                f"{self.name}: no {self.no_data_what} for {self.no_data_place} {region} covering "
                f"{start:%Y-%m-%dT%H:%M:%SZ}..{end:%Y-%m-%dT%H:%M:%SZ} (the API returned {have}) -- "
                f"it may not be published yet, or {self.no_data_fix}"
            )
        return value
