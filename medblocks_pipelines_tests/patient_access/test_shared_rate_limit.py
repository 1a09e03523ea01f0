"""One rate limit per source across processes: two real pulling processes share the source's
limit through Redis, stay under it together (the sandbox answers 429 above it) and use most of it.

Counts only: the sandbox's rate_limit rule reports how many requests it accepted and refused and
the most it ever saw in one window; no assertion on how long anything took.
"""

import multiprocessing as mp
import secrets
import uuid

import pytest

from medblocks_pipelines.lib.fhir.shared_limit import SharedRateLimiter
from medblocks_pipelines_tests.patient_access._pull_child import pull_in_child
from medblocks_pipelines_tests.patient_access.conftest import PatientAccessEnv
from medblocks_pipelines_tests.patient_access.test_pull import connect_n

REDIS_URL = "redis://127.0.0.1:6379/0"
LIMIT, WINDOW = 10, 2.0
SPAN = 3  # windows: "most of the limit used" is judged over the densest span this long


def _redis_or_skip() -> object:
    import os

    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2.0)
    try:
        client.ping()
    except redis.RedisError:
        if os.environ.get("CI"):
            pytest.fail("Redis is required in CI (.ci/run starts it) but not reachable")
        pytest.skip("Redis is not reachable on 127.0.0.1:6379")
    return client


def test_two_processes_share_one_source_limit(pa_env: PatientAccessEnv) -> None:
    _redis_or_skip()
    org = pa_env.org("ehr")
    # A source id of its own: the Redis schedule is keyed by source and Redis outlives the test.
    sid = pa_env.add_source(
        org,
        source_id=f"rl-{secrets.token_hex(4)}",
        config={"rate_limit": {"requests": LIMIT, "per_seconds": WINDOW}},
    )
    ids = connect_n(pa_env, sid, org, 4)
    faults = pa_env.faults(org)
    rule = faults.add(
        "rate_limit", client_id=pa_env.clients[sid], limit=LIMIT, window=WINDOW, path="/fhir/"
    )
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(
            target=pull_in_child,
            args=(
                pa_env.settings,
                ids[i::2],
                f"p{i}-{uuid.uuid4().hex[:6]}",
                REDIS_URL,
                barrier,
                out,
            ),
        )
        for i in range(2)
    ]
    try:
        for p in procs:
            p.start()
        reports = [out.get(timeout=300) for _ in procs]
        for p in procs:
            p.join(timeout=60)
        stats = faults.rate_stats(rule)
    finally:
        faults.clear()
    assert all(s == "success" for r in reports for s in r["statuses"]), reports
    sent = sum(r["requests"] for r in reports)
    # Together, under the limit: the server never had to refuse one, and never saw more than
    # LIMIT in a window.
    assert sum(r["http_429"] for r in reports) == 0 and stats["refused"] == 0, (reports, stats)
    assert stats["peak"] <= LIMIT
    assert stats["accepted"] == sent and sent >= 4 * LIMIT
    assert {r["limiter"] for r in reports} == {"SharedRateLimiter"}
    # And most of it used: in the busiest SPAN windows (by the server's clock) the server
    # accepted at least 90 % of what the limit allows.
    times = stats["times"]
    densest = max(
        sum(1 for t in times[i:] if t < start + SPAN * WINDOW) for i, start in enumerate(times)
    )
    assert densest >= 0.9 * SPAN * LIMIT, (densest, reports)


def test_a_429_pauses_every_process_of_the_source() -> None:
    """backoff() in one limiter (process) moves the schedule of every limiter of the source."""
    client = _redis_or_skip()
    key = f"test-{secrets.token_hex(4)}"
    slept: list[float] = []
    a = SharedRateLimiter(client, key, 100, 1.0, sleep=slept.append)
    b = SharedRateLimiter(client, key, 100, 1.0, sleep=slept.append)
    a.acquire()
    b.backoff(30.0)
    a.acquire()  # must wait out the pause b stored, though a itself never saw a 429
    assert slept and slept[-1] > 25.0
    assert a.backoffs == 0 and b.backoffs == 1
    client.delete(a.key)  # type: ignore[attr-defined]


def test_processes_take_turns_on_one_schedule() -> None:
    """Every reservation, from either limiter, moves the one schedule by exactly one interval."""
    client = _redis_or_skip()
    key = f"test-{secrets.token_hex(4)}"
    a = SharedRateLimiter(client, key, 50, 1.0, sleep=lambda s: None)
    b = SharedRateLimiter(client, key, 50, 1.0, sleep=lambda s: None)
    a.acquire()
    first = int(client.hget(a.key, "next"))  # type: ignore[attr-defined]
    for i in range(20):
        (a if i % 2 else b).acquire()
    last = int(client.hget(a.key, "next"))  # type: ignore[attr-defined]
    interval = int(1.0 / 50 * (1 + a.margin) * 1e6)
    assert last - first == 20 * interval
    assert a.sent + b.sent == 21
    client.delete(a.key)  # type: ignore[attr-defined]


def test_a_late_wake_up_gives_its_slot_up() -> None:
    """Overslept past the tolerance: the slot is dropped and a later one taken (no bunching)."""
    client = _redis_or_skip()
    now = [1000.0]
    overslept = [False]

    def sleep(seconds: float) -> None:
        now[0] += seconds
        if not overslept[0]:
            overslept[0] = True
            now[0] += 0.5  # a busy machine: woke up half a second late

    limiter = SharedRateLimiter(
        client, f"test-{secrets.token_hex(4)}", 10, 1.0, sleep=sleep, clock=lambda: now[0]
    )
    limiter.acquire()  # first slot is now: no sleep, not late
    limiter.acquire()  # sleeps to its slot, oversleeps, takes another
    assert limiter.late == 1 and limiter.sent == 2
    client.delete(limiter.key)  # type: ignore[attr-defined]


def test_redis_down_degrades_to_a_local_share_of_the_limit() -> None:
    """A real client pointed at a closed port: no exception reaches the pull, the process paces
    itself at half the limit (the per-source run limit is 2) and asks Redis again later."""
    import redis

    now = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    client = redis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=1.0)
    limiter = SharedRateLimiter(
        client, "down", 10, 1.0, sleep=sleep, clock=lambda: now[0], retry_after=30.0
    )
    for _ in range(11):
        limiter.acquire()
    assert limiter.sent == 11 and limiter.degraded == 1
    assert limiter.fallback.limit == 5
    # 11 sends at 5 per second locally: at least two seconds of pacing, never a burst.
    assert sum(slept) >= 2.0
    limiter.backoff(3.0)  # a 429 while degraded pauses the local pacer, without touching Redis
    before = sum(slept)
    limiter.acquire()
    assert sum(slept) - before >= 3.0 - 1e-9
    # After retry_after, Redis is asked again (still down: one more degradation, still no error).
    now[0] += 31.0
    limiter.acquire()
    assert limiter.degraded == 2 and limiter.sent == 13


def test_redis_back_after_an_outage_is_used_again() -> None:
    """Down, then reachable: after retry_after the shared schedule is used again."""
    client = _redis_or_skip()
    now = [0.0]

    class Flaky:
        """The real client, refusing until switched on (a Redis restart)."""

        up = False

        def register_script(self, script: str) -> object:
            real = client.register_script(script)  # type: ignore[attr-defined]

            def call(**kwargs: object) -> object:
                if not Flaky.up:
                    raise redis_exc.ConnectionError("connection refused")
                return real(**kwargs)

            return call

    from redis import exceptions as redis_exc

    key = f"test-{secrets.token_hex(4)}"
    limiter = SharedRateLimiter(
        Flaky(), key, 50, 1.0, sleep=lambda s: None, clock=lambda: now[0], retry_after=10.0
    )
    limiter.acquire()
    assert limiter.degraded == 1 and not client.exists(f"medblocks:ratelimit:{key}")  # type: ignore[attr-defined]
    Flaky.up = True
    now[0] += 11.0
    limiter.acquire()
    assert limiter.degraded == 1 and client.exists(f"medblocks:ratelimit:{key}")  # type: ignore[attr-defined]
    client.delete(limiter.key)  # type: ignore[attr-defined]
