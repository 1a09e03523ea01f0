"""FHIR client error paths with httpx.MockTransport: retries, Retry-After, 401 refresh, HTML pages,
OperationOutcome errors, paging loops, origin checks, exact decimals, and the rate limiter's bound.

The same behaviours are exercised over real sockets against the sandbox in test_pull_faults.py.
"""

import email.utils
from collections import deque
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from medblocks_pipelines.lib.errors import AuthError, PagingLoopError, ProtocolError, TransientError
from medblocks_pipelines.lib.fhir.client import (
    FhirClient,
    FhirRequestError,
    RateLimiter,
    dumps_exact,
    loads_exact,
    parse_retry_after,
)

BASE = "https://ehr.example/fhir"


class FakeTokens:
    """A token provider that hands out t1, then t2 after a refresh."""

    def __init__(self) -> None:
        self.tokens = deque(["t1", "t2", "t3"])
        self.current = self.tokens.popleft()
        self.refreshed_with: list[str | None] = []

    def access_token(self) -> str:
        return self.current

    def refresh(self, *, stale: str | None = None) -> str:
        self.refreshed_with.append(stale)
        self.current = self.tokens.popleft()
        return self.current


def make(handler, **kw):  # type: ignore[no-untyped-def]
    sleeps: list[float] = []
    client = FhirClient(
        BASE, http=httpx.Client(transport=httpx.MockTransport(handler)), sleep=sleeps.append, **kw
    )
    return client, sleeps


def fhir(body: dict, status: int = 200, headers: dict | None = None) -> httpx.Response:
    return httpx.Response(
        status, json=body, headers={"content-type": "application/fhir+json", **(headers or {})}
    )


def test_retries_5xx_then_succeeds_with_backoff() -> None:
    calls = []

    def handler(req: httpx.Request) -> httpx.Response:
        calls.append(req)
        if len(calls) < 3:
            return fhir({"resourceType": "OperationOutcome", "issue": [{"code": "transient"}]}, 503)
        return fhir({"resourceType": "Patient", "id": "p1"})

    client, sleeps = make(handler)
    assert client.read("Patient", "p1")["id"] == "p1"
    assert len(calls) == 3 and len(sleeps) == 2
    assert client.stats.retry_reasons["http_503"] == 2


@pytest.mark.parametrize("form", ["seconds", "http-date"])
def test_retry_after_is_honoured(form: str) -> None:
    calls = []
    when = datetime.now(UTC) + timedelta(seconds=7)
    value = "7" if form == "seconds" else email.utils.format_datetime(when, usegmt=True)

    def handler(req: httpx.Request) -> httpx.Response:
        calls.append(req)
        if len(calls) == 1:
            return fhir({"resourceType": "OperationOutcome"}, 429, {"Retry-After": value})
        return fhir({"resourceType": "Patient", "id": "p1"})

    client, sleeps = make(handler)
    client.read("Patient", "p1")
    assert 5.0 <= sleeps[0] <= 7.0


def test_gives_up_after_max_retries() -> None:
    client, sleeps = make(
        lambda req: fhir({"resourceType": "OperationOutcome"}, 502), max_retries=2
    )
    with pytest.raises(TransientError):
        client.read("Patient", "p1")
    assert len(sleeps) == 2


def test_dropped_connection_is_retried() -> None:
    calls = []

    def handler(req: httpx.Request) -> httpx.Response:
        calls.append(req)
        if len(calls) == 1:
            raise httpx.RemoteProtocolError("peer closed connection", request=req)
        return fhir({"resourceType": "Patient", "id": "p1"})

    client, _ = make(handler)
    assert client.read("Patient", "p1")["id"] == "p1"


def test_401_refreshes_once_and_retries_with_new_token() -> None:
    seen = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(req.headers["authorization"])
        if req.headers["authorization"] == "Bearer t1":
            return fhir({"resourceType": "OperationOutcome"}, 401)
        return fhir({"resourceType": "Patient", "id": "p1"})

    tokens = FakeTokens()
    client, sleeps = make(handler, tokens=tokens)
    client.read("Patient", "p1")
    assert seen == ["Bearer t1", "Bearer t2"]
    assert tokens.refreshed_with == ["t1"]  # the stale token is named, so racers can skip
    assert sleeps == []  # no backoff for an auth retry


def test_second_401_after_refresh_is_an_auth_error() -> None:
    tokens = FakeTokens()
    client, _ = make(lambda req: fhir({"resourceType": "OperationOutcome"}, 401), tokens=tokens)
    with pytest.raises(AuthError):
        client.read("Patient", "p1")
    assert len(tokens.refreshed_with) == 1


def test_html_page_with_200_is_retried_then_refused() -> None:
    page = httpx.Response(
        200,
        text="<!DOCTYPE html><html><body>maintenance</body></html>",
        headers={"content-type": "text/html"},
    )
    client, sleeps = make(lambda req: page, max_retries=2)
    with pytest.raises(ProtocolError, match="HTML instead of FHIR JSON"):
        client.read("Patient", "p1")
    assert len(sleeps) == 2


def test_operation_outcome_codes_in_error_without_diagnostics() -> None:
    body = {
        "resourceType": "OperationOutcome",
        "issue": [
            {
                "severity": "error",
                "code": "not-supported",
                "diagnostics": "Jane Doe born 1970 cannot be searched",
            }
        ],
    }
    client, _ = make(lambda req: fhir(body, 400))
    with pytest.raises(FhirRequestError) as info:
        list(client.search("Observation", {"patient": "p1"}))
    assert info.value.status == 400
    assert info.value.issue_codes == ("not-supported",)
    assert "Jane" not in str(info.value) and "p1" not in str(info.value)


def test_paging_follows_next_and_detects_a_loop() -> None:
    pages = {
        "1": {
            "resourceType": "Bundle",
            "type": "searchset",
            "link": [{"relation": "next", "url": f"{BASE}/Observation?page=2"}],
            "entry": [],
        },
        "2": {
            "resourceType": "Bundle",
            "type": "searchset",
            "link": [{"relation": "next", "url": f"{BASE}/Observation?page=1"}],
            "entry": [],
        },
    }

    def handler(req: httpx.Request) -> httpx.Response:
        return fhir(pages[req.url.params.get("page", "1")])

    client, _ = make(handler)
    got = []
    with pytest.raises(PagingLoopError):
        for page in client.search("Observation", {"page": "1"}):
            got.append(page.number)
    assert got == [1, 2]


def test_next_link_to_another_origin_is_refused() -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "searchset",
        "link": [{"relation": "next", "url": "https://evil.example/fhir/Observation?p=2"}],
    }
    client, _ = make(lambda req: fhir(bundle), tokens=FakeTokens())
    with pytest.raises(PagingLoopError, match="another server"):
        list(client.search("Observation"))


def test_token_never_goes_to_another_origin() -> None:
    client, _ = make(lambda req: fhir({}), tokens=FakeTokens())
    with pytest.raises(ProtocolError):
        client.request("GET", "https://elsewhere.example/Binary/1")


def test_decimals_survive_round_trip_exactly() -> None:
    text = (
        '{"resourceType":"Observation","id":"o1","valueQuantity":{"value":7.10,"unit":"mmol/L"},'
        '"component":[{"valueQuantity":{"value":1E-7}},{"valueInteger":3}],"x":true,"y":null}'
    )
    assert dumps_exact(loads_exact(text)) == text
    assert '"value":7.10' in dumps_exact(loads_exact(text))


def test_parse_retry_after_forms() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert parse_retry_after("12") == 12.0
    date = email.utils.format_datetime(now + timedelta(seconds=30), usegmt=True)
    assert parse_retry_after(date, now=now) == 30.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


@pytest.mark.parametrize(("limit", "per"), [(20, 1.0), (5, 1.0), (3, 0.5)])
def test_rate_limiter_never_puts_more_than_limit_in_any_window(limit: int, per: float) -> None:
    now = [0.0]
    sends: list[float] = []

    def sleep(s: float) -> None:
        now[0] += s

    limiter = RateLimiter(limit, per, clock=lambda: now[0], sleep=sleep)
    for _ in range(200):
        limiter.acquire()
        sends.append(now[0])
    # Sliding windows as the server counts them: (t - per, t].
    worst = max(sum(1 for s in sends if t - per < s <= t) for t in sends)
    assert worst <= limit - 1  # one request of room left for network jitter
    rate = (len(sends) - 1) / (sends[-1] - sends[0])
    assert rate >= 0.9 * limit / per * (limit - 1) / limit  # close to the bound, not timid


def test_rate_limiter_pause_holds_everyone() -> None:
    now = [0.0]
    limiter = RateLimiter(
        10, 1.0, clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s)
    )
    limiter.acquire()
    limiter.pause_for(5.0)
    limiter.acquire()
    assert now[0] >= 5.0


def test_rate_limiter_bound_holds_when_sleeps_overshoot() -> None:
    # On a busy machine a sleep returns late, by up to 80 ms here: the window rule is checked
    # against real departure times, so late wake-ups never bunch requests together.
    import random as _random

    rng = _random.Random(3)
    now = [0.0]
    sends: list[float] = []

    def sleep(s: float) -> None:
        now[0] += s + rng.uniform(0, 0.08)

    limiter = RateLimiter(20, 1.0, clock=lambda: now[0], sleep=sleep)
    for _ in range(400):
        limiter.acquire()
        sends.append(now[0])
        now[0] += rng.uniform(0, 0.03)  # work between requests
    worst = max(sum(1 for s in sends if t - 1.0 < s <= t) for t in sends)
    assert worst <= 19


def test_rate_limiter_widens_after_a_429_but_stays_bounded() -> None:
    now = [0.0]
    limiter = RateLimiter(
        20, 1.0, clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s)
    )
    base = limiter.interval
    for _ in range(50):
        limiter.backoff(0.0)
    widened = limiter.interval
    assert base < widened <= base * 1.15 + 1e-9
    # A calm stretch gives the widening back, so one bad second does not slow a whole run.
    for _ in range(limiter.recover_after * 8):
        limiter.acquire()
    assert limiter.interval < base + (widened - base) / 100
