"""Refresh margins that scale with the token's lifetime, and why each refresh happened.

Against the sandbox EHR issuing 60 s access tokens (a fixed 60 s margin refreshed such a token on
every request): the margin table, a read loop over 75 simulated seconds on a clock shared by the
sandbox's authorization server and our token manager (one refresh, before expiry, no 401), a real
pull with the real clock (at most one refresh), and the ``reason`` of ``token.refreshed`` events
in each case: ``before_expiry``, ``after_401`` (the source expired the token early), ``forced``.
"""

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from medblocks_pipelines.lib.fhir.client import FhirClient
from medblocks_pipelines.lib.fhir.pull_batch import pull_batch
from medblocks_pipelines.lib.smart.tokens import TokenManager, refresh_margin_for
from medblocks_pipelines_tests.patient_access.conftest import PatientAccessEnv


class SharedClock:
    """Real time plus a simulated offset: ``advance`` jumps forward without sleeping."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


@contextmanager
def sixty_second_tokens(env: PatientAccessEnv, org: Any, clock: Any = time.time) -> Iterator[None]:
    """The org's authorization server issues 60 s access tokens (set over its admin API, as
    against ``medblocks-sandbox serve``) and reads ``clock`` (in-process: the one seam with no HTTP)."""
    auth = env.auth(org)
    saved_life, saved_clock = auth.config.access_token_lifetime, auth.clock
    env.sandbox.admin(org.org_id, "config", {"access_token_lifetime": 60})
    auth.clock = clock
    try:
        yield
    finally:
        auth.clock = saved_clock
        env.sandbox.admin(org.org_id, "config", {"access_token_lifetime": saved_life})


def connect_one(env: PatientAccessEnv, org: Any) -> tuple[str, str]:
    sid = env.add_source(org)
    conn_id, outcome = env.connect(sid, env.logins(org)[0])
    assert outcome.status == "active", outcome
    return conn_id, str(env.cp.get_connection(conn_id).source_patient_id)


def refresh_events(env: PatientAccessEnv, conn_id: str) -> list[dict[str, Any]]:
    return [
        e.detail for e in env.cp.connection_events(conn_id) if e.event_type == "token.refreshed"
    ]


@pytest.mark.parametrize(
    ("lifetime", "margin"),
    [
        (60, 9.0),  # 15 % of a minute: used for 51 s
        (3600, 60.0),  # capped at a minute
        (300, 45.0),  # 15 % of five minutes
        (10, 2.0),  # the floor
        (3, 1.5),  # never more than half the lifetime
        (None, 60.0),  # unknown lifetime (old blob without obtained_at): the cap
    ],
)
def test_margin_scales_with_lifetime(lifetime: float | None, margin: float) -> None:
    assert refresh_margin_for(lifetime) == pytest.approx(margin)


def test_sixty_second_tokens_refresh_once_before_expiry(pa_env: PatientAccessEnv) -> None:
    org = pa_env.org("ehr")
    clock = SharedClock()
    with sixty_second_tokens(pa_env, org, clock):
        conn_id, patient = connect_one(pa_env, org)
        manager = TokenManager(pa_env.cp, conn_id, http=pa_env.http, clock=clock)
        client = FhirClient(org.fhir_base, http=pa_env.http, tokens=manager)
        # 25 requests, 3 simulated seconds apart: 75 s, more than one token's lifetime.
        for _ in range(25):
            assert client.read("Patient", patient)["id"] == patient
            clock.advance(3)
    assert client.stats.requests == 25
    # One refresh, ahead of expiry: the sandbox (same clock) never had to refuse a token.
    assert manager.refreshes == 1 and client.stats.refreshes == 0
    assert client.stats.statuses.get(401, 0) == 0
    (event,) = refresh_events(pa_env, conn_id)
    assert event["reason"] == "before_expiry" and event["expires_in"] == 60
    assert "after_401" not in event


def test_a_real_pull_with_sixty_second_tokens_refreshes_at_most_once(
    pa_env: PatientAccessEnv,
) -> None:
    org = pa_env.org("ehr")
    with sixty_second_tokens(pa_env, org):
        conn_id, _patient = connect_one(pa_env, org)
        (res,) = pull_batch(
            pa_env.cp,
            [conn_id],
            lake_root=pa_env.settings.lake_root,
            run_id="r60",
            http=pa_env.http,
            client_options={"backoff": 0.05},
        ).results
    assert res.status == "success", res
    assert res.requests >= 10  # a real pull, not one read
    assert res.refreshes <= 1 and len(refresh_events(pa_env, conn_id)) <= 1


def test_a_token_the_source_expired_early_is_refreshed_after_401(pa_env: PatientAccessEnv) -> None:
    org = pa_env.org("ehr")
    clock = SharedClock()
    with sixty_second_tokens(pa_env, org, clock):
        conn_id, patient = connect_one(pa_env, org)
        manager = TokenManager(pa_env.cp, conn_id, http=pa_env.http, clock=clock)
        client = FhirClient(org.fhir_base, http=pa_env.http, tokens=manager)
        client.read("Patient", patient)
        # Ten seconds in, far from our margin, the source drops the token.
        clock.advance(10)
        pa_env.sandbox.admin(org.org_id, "expire-tokens", {"client_id": pa_env.clients[org.org_id]})
        assert client.read("Patient", patient)["id"] == patient
    assert client.stats.statuses[401] == 1 and manager.refreshes == 1
    assert [e["reason"] for e in refresh_events(pa_env, conn_id)] == ["after_401"]


def test_forced_refresh_says_forced(pa_env: PatientAccessEnv) -> None:
    org = pa_env.org("ehr")
    conn_id, _patient = connect_one(pa_env, org)
    manager = TokenManager(pa_env.cp, conn_id, http=pa_env.http)
    before = manager.access_token()
    assert manager.refreshes == 0  # an hour-long token is fresh: no refresh to read it
    after = manager.force_refresh()
    assert after != before and manager.refreshes == 1
    (event,) = refresh_events(pa_env, conn_id)
    assert event["reason"] == "forced" and event["expires_in"] == 3600
