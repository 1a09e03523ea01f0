"""Webhooks over real sockets: Standard Webhooks signatures, retry schedule, auto-disable, outbox safety.

The receiver (conftest) verifies every request with the ``standardwebhooks`` library. The delivery
schedule runs on a fake clock passed as ``now``; the signed timestamp is the wall clock.
"""

import os
import subprocess
import sys
from datetime import datetime, timedelta

import httpx
import pytest
import sqlalchemy as sa

from medblocks_pipelines.lib.errors import ConfigError
from medblocks_pipelines.lib.ops import tables as ot
from medblocks_pipelines.lib.ops import webhooks as wh
from medblocks_pipelines.lib.registry import ControlPlane, open_control_plane, utcnow
from medblocks_pipelines.lib.registry import schema as rt
from medblocks_pipelines.lib.settings import Settings
from medblocks_pipelines_tests.ops.conftest import Receiver


def _endpoint(cp: ControlPlane, receiver: Receiver, name: str, **kw: object) -> str:
    endpoint_id, secret = wh.add_endpoint(
        cp,
        tenant_id=kw.pop("tenant_id", "acme"),
        url=f"{receiver.url}/hook/{name}",
        **kw,  # type: ignore[arg-type]
    )
    receiver.secrets[name] = secret
    return endpoint_id


def _activate(cp: ControlPlane) -> str:
    conn_id = cp.create_connection(
        tenant_id="acme", pattern="backend", source_id="mercy", organization_id="mercy-general"
    )
    cp.transition(conn_id, "active")
    return conn_id


def test_signed_delivery_verifies_and_carries_the_event(
    cp: ControlPlane, receiver: Receiver
) -> None:
    _endpoint(cp, receiver, "a")
    conn_id = _activate(cp)
    pull = cp.start_pull(tenant_id="acme", pattern="backend", source_id="mercy")
    cp.finish_pull(pull, status="success", counts={"Patient": 3})
    with httpx.Client() as http:
        report = wh.deliver_due(cp, now=utcnow(), http=http)
    assert report.succeeded == 2 and report.failed_attempts == 0
    got = receiver.on("a")
    assert [r.verified for r in got] == [True, True]
    assert [r.payload["type"] for r in got] == ["connection.activated", "sync.completed"]
    assert got[0].payload["data"]["connection_id"] == conn_id
    assert got[1].payload["data"]["counts"] == {"Patient": 3}
    for r in got:
        assert r.headers["webhook-id"].startswith("msg_")
        assert r.headers["webhook-signature"].startswith("v1,")
        assert abs(int(r.headers["webhook-timestamp"]) - utcnow().timestamp()) < 60
    # Nothing is delivered twice.
    with httpx.Client() as http:
        again = wh.deliver_due(cp, now=utcnow() + timedelta(hours=1), http=http)
    assert again.attempted == 0 and len(receiver.on("a")) == 2


def test_a_wrong_secret_fails_verification_and_is_retried(
    cp: ControlPlane, receiver: Receiver
) -> None:
    # The receiver knows a different secret: it answers 401, the delivery stays pending.
    _endpoint(cp, receiver, "b")
    receiver.secrets["b"] = wh.new_secret()
    _activate(cp)
    now = utcnow()
    with httpx.Client() as http:
        report = wh.deliver_due(cp, now=now, http=http)
    assert report.failed_attempts == 1 and receiver.on("b")[0].verified is False
    (delivery,) = wh.list_deliveries(cp)
    assert delivery.status == "pending" and delivery.last_status_code == 401


def test_filters_and_tenants(cp: ControlPlane, receiver: Receiver) -> None:
    _endpoint(cp, receiver, "conn", event_types=["connection.*"])
    _endpoint(cp, receiver, "sync", event_types=["sync.failed"])
    _endpoint(cp, receiver, "other", tenant_id="other")
    _activate(cp)
    pull = cp.start_pull(tenant_id="acme", pattern="backend", source_id="mercy")
    cp.finish_pull(pull, status="failed", counts={}, error="TransientError")
    with httpx.Client() as http:
        wh.deliver_due(cp, now=utcnow(), http=http)
    assert [r.payload["type"] for r in receiver.on("conn")] == ["connection.activated"]
    assert [r.payload["type"] for r in receiver.on("sync")] == ["sync.failed"]
    assert receiver.on("other") == []


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/hook",  # loopback
        "http://10.1.2.3/hook",  # private
        "http://169.254.169.254/latest/meta-data",  # cloud metadata (link-local)
        "http://[::1]/hook",  # IPv6 loopback
        "http://localhost/hook",  # a name resolving to loopback
    ],
)
def test_private_receivers_are_refused_by_default(
    cp: ControlPlane, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MEDBLOCKS_WEBHOOK_ALLOW_PRIVATE")
    with pytest.raises(ConfigError, match="non-public"):
        wh.add_endpoint(cp, tenant_id="acme", url=url)
    assert wh.list_endpoints(cp) == []


def test_unknown_filter_and_bad_url_are_refused(cp: ControlPlane) -> None:
    with pytest.raises(ConfigError):
        wh.add_endpoint(cp, tenant_id="acme", url="http://127.0.0.1/x", event_types=["nope"])
    with pytest.raises(ConfigError):
        wh.add_endpoint(cp, tenant_id="acme", url="ftp://127.0.0.1/x")


def test_retries_follow_the_schedule(cp: ControlPlane, receiver: Receiver) -> None:
    _endpoint(cp, receiver, "flaky")
    receiver.script["flaky"] = [500, 503, 500]
    _activate(cp)
    t0 = utcnow()
    expected = [
        t0,
        t0 + timedelta(seconds=5),
        t0 + timedelta(seconds=5, minutes=5),
        t0 + timedelta(seconds=5, minutes=35),
    ]
    with httpx.Client() as http:
        for when in expected:
            # One second early: not due yet.
            if when != t0:
                assert wh.deliver_due(cp, now=when - timedelta(seconds=1), http=http).attempted == 0
            assert wh.deliver_due(cp, now=when, http=http).attempted == 1
    attempts = wh.list_attempts(cp)
    assert [a.at for a in attempts] == expected
    assert [a.outcome for a in attempts] == ["http_error"] * 3 + ["success"]
    assert [a.status_code for a in attempts] == [500, 503, 500, 204]
    # Every attempt carried the same webhook-id, so the receiver can deduplicate.
    assert len({r.headers["webhook-id"] for r in receiver.on("flaky")}) == 1
    (delivery,) = wh.list_deliveries(cp)
    assert delivery.status == "succeeded" and delivery.attempts == 4
    assert wh.get_endpoint(cp, delivery.endpoint_id).consecutive_failures == 0


def test_exhausted_schedule_disables_the_endpoint(cp: ControlPlane, receiver: Receiver) -> None:
    ep = _endpoint(cp, receiver, "down")
    watcher = _endpoint(cp, receiver, "watch", event_types=["webhook.*"])
    receiver.script["down"] = [500] * 100
    _activate(cp)
    now = utcnow()
    with httpx.Client() as http:
        for delay in (timedelta(0), *wh.DEFAULT_SCHEDULE):
            now += delay
            assert wh.deliver_due(cp, now=now, http=http).attempted >= 1
        assert len(receiver.on("down")) == 8
        endpoint = wh.get_endpoint(cp, ep)
        assert endpoint.status == "disabled" and "every attempt" in endpoint.disabled_reason
        (failed,) = wh.list_deliveries(cp, endpoint_id=ep)
        assert failed.status == "failed" and failed.attempts == 8
        # The schedule spans days: the last attempt comes ~27.6 hours after the first.
        attempts = wh.list_attempts(cp, endpoint_id=ep)
        assert attempts[-1].at - attempts[0].at == sum(wh.DEFAULT_SCHEDULE, timedelta())
        # The disabled endpoint hears nothing more; the tenant's other endpoint hears why.
        _activate(cp)
        wh.deliver_due(cp, now=now + timedelta(days=3), http=http)
    assert len(receiver.on("down")) == 8
    assert [r.payload["type"] for r in receiver.on("watch")] == ["webhook.endpoint_disabled"]
    assert receiver.on("watch")[0].payload["data"]["endpoint_id"] == ep
    assert watcher != ep


def test_disabled_endpoint_receives_nothing_until_enabled(
    cp: ControlPlane, receiver: Receiver
) -> None:
    ep = _endpoint(cp, receiver, "paused")
    receiver.script["paused"] = [500]
    _activate(cp)
    now = utcnow()
    with httpx.Client() as http:
        assert wh.deliver_due(cp, now=now, http=http).failed_attempts == 1
        wh.set_endpoint_status(cp, ep, "disabled", reason="operator")
        _activate(cp)
        assert wh.deliver_due(cp, now=now + timedelta(days=2), http=http).attempted == 0
        assert len(receiver.on("paused")) == 1
        # Re-enabling resumes the delivery that was pending (events while disabled are not sent).
        wh.set_endpoint_status(cp, ep, "enabled", now=now + timedelta(days=2))
        assert wh.deliver_due(cp, now=now + timedelta(days=2), http=http).succeeded == 1
    assert len(receiver.on("paused")) == 2


def test_max_consecutive_failures_disables(cp: ControlPlane, receiver: Receiver) -> None:
    ep = _endpoint(cp, receiver, "bad")
    receiver.script["bad"] = [500] * 10
    for _ in range(3):
        _activate(cp)
    policy = wh.DeliveryPolicy(max_consecutive_failures=3)
    with httpx.Client() as http:
        report = wh.deliver_due(cp, now=utcnow(), http=http, policy=policy)
    assert report.failed_attempts == 3 and report.disabled_endpoints == [ep]
    assert wh.get_endpoint(cp, ep).status == "disabled"


def test_connection_refused_is_recorded(cp: ControlPlane, receiver: Receiver) -> None:
    endpoint_id, _ = wh.add_endpoint(cp, tenant_id="acme", url="http://127.0.0.1:9/nothing")
    _activate(cp)
    with httpx.Client() as http:
        wh.deliver_due(cp, now=utcnow(), http=http)
    (attempt,) = wh.list_attempts(cp, endpoint_id=endpoint_id)
    assert attempt.outcome == "connection_error" and attempt.error == "ConnectError"


_CRASH_SCRIPT = """
import os, sys
from medblocks_pipelines.lib.registry import open_control_plane
from medblocks_pipelines.lib.settings import get_settings
cp = open_control_plane(get_settings())
ids = []
for i in range(5):
    c = cp.create_connection(tenant_id="acme", pattern="backend", source_id="mercy")
    cp.transition(c, "active")
    ids.append(c)
print(",".join(ids), flush=True)
os._exit(9)  # dies after the commits, before anything could deliver
"""


def test_no_event_lost_when_the_process_dies_after_commit(
    cp: ControlPlane, receiver: Receiver, settings: Settings
) -> None:
    _endpoint(cp, receiver, "crash")
    proc = subprocess.run(
        [sys.executable, "-c", _CRASH_SCRIPT],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        timeout=60,
    )
    assert proc.returncode == 9, proc.stderr[-2000:]
    conn_ids = proc.stdout.strip().split(",")
    # A new process picks up the committed outbox.
    fresh = open_control_plane(settings)
    with httpx.Client() as http:
        wh.deliver_due(fresh, now=utcnow(), http=http)
    got = [r.payload["data"]["connection_id"] for r in receiver.on("crash")]
    assert got == conn_ids


class _Crash(BaseException):
    """Stands in for the process dying (not caught by the delivery code)."""


def test_crash_between_claim_and_post_redelivers_after_the_lease(
    cp: ControlPlane, receiver: Receiver
) -> None:
    _endpoint(cp, receiver, "lease")
    _activate(cp)

    def die(request: httpx.Request) -> httpx.Response:
        raise _Crash()

    now = utcnow()
    with pytest.raises(_Crash), httpx.Client(transport=httpx.MockTransport(die)) as dying:
        wh.deliver_due(cp, now=now, http=dying)
    assert receiver.on("lease") == []
    with httpx.Client() as http:
        # The claim's lease still holds: nobody else sends it meanwhile.
        assert wh.deliver_due(cp, now=now + timedelta(seconds=30), http=http).attempted == 0
        assert wh.deliver_due(cp, now=now + wh.DeliveryPolicy().lease, http=http).succeeded == 1
    assert len(receiver.on("lease")) == 1


def test_crash_after_receipt_redelivers_with_the_same_id(
    cp: ControlPlane, receiver: Receiver
) -> None:
    _endpoint(cp, receiver, "twice")
    _activate(cp)

    def die_after(response: httpx.Response) -> None:
        raise _Crash()

    now = utcnow()
    with pytest.raises(_Crash), httpx.Client(event_hooks={"response": [die_after]}) as dying:
        wh.deliver_due(cp, now=now, http=dying)
    with httpx.Client() as http:
        wh.deliver_due(cp, now=now + timedelta(minutes=3), http=http)
    got = receiver.on("twice")
    assert len(got) == 2 and got[0].headers["webhook-id"] == got[1].headers["webhook-id"]


def test_late_commit_below_the_newest_id_is_not_skipped(
    cp: ControlPlane, receiver: Receiver
) -> None:
    # PostgreSQL hands out ids before commit: id 5 may commit after id 10 was fanned out.
    _endpoint(cp, receiver, "late")
    now = utcnow()
    with cp.engine.begin() as conn:
        conn.execute(
            rt.events.insert().values(
                id=10, tenant_id="acme", type="sync.completed", payload={"n": 10}, created_at=now
            )
        )
    with httpx.Client() as http:
        wh.deliver_due(cp, now=now, http=http)
        with cp.engine.begin() as conn:
            conn.execute(
                rt.events.insert().values(
                    id=5, tenant_id="acme", type="sync.completed", payload={"n": 5}, created_at=now
                )
            )
        wh.deliver_due(cp, now=now, http=http)
        # Once settled, the cursor moves past both and nothing is sent again.
        wh.deliver_due(cp, now=now + timedelta(hours=1), http=http)
    assert [r.payload["data"]["n"] for r in receiver.on("late")] == [10, 5]
    with cp.engine.connect() as conn:
        assert conn.execute(sa.select(ot.webhook_cursor.c.last_event_id)).scalar() == 10


def test_send_test_message(cp: ControlPlane, receiver: Receiver) -> None:
    ep = _endpoint(cp, receiver, "t")
    with httpx.Client() as http:
        code, outcome = wh.send_test(cp, ep, http=http)
    assert code == 204 and outcome == "success"
    assert receiver.on("t")[0].payload["type"] == "webhook.test"


@pytest.mark.postgres
def test_delivery_on_postgresql(
    settings: Settings, pg_database_url: str, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEDBLOCKS_DATABASE_URL", pg_database_url)
    from medblocks_pipelines.lib.settings import get_settings

    pg = open_control_plane(get_settings())
    pg.add_tenant("acme", "Acme")
    pg.add_source("mercy", "Mercy", "epic", "ehr", None, ["backend"])
    pg.add_organization("mercy-general", "acme", "mercy", "Mercy General")
    _endpoint(pg, receiver, "pg")
    receiver.script["pg"] = [500]
    _activate(pg)
    now = datetime.now().astimezone()
    with httpx.Client() as http:
        wh.deliver_due(pg, now=now, http=http)
        wh.deliver_due(pg, now=now + timedelta(seconds=5), http=http)
    assert [r.verified for r in receiver.on("pg")] == [True, True]
    assert [a.outcome for a in wh.list_attempts(pg)][-2:] == ["http_error", "success"]


@pytest.mark.postgres
def test_concurrent_workers_deliver_each_message_once_on_postgresql(
    settings: Settings, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Three sensor ticks racing on PostgreSQL: the fan-out table and the claim keep it to one send.
    import threading

    from medblocks_pipelines.lib.settings import get_settings
    from medblocks_pipelines_tests.conftest import fresh_pg_database

    with fresh_pg_database("webhooks_race") as url:
        monkeypatch.setenv("MEDBLOCKS_DATABASE_URL", url)
        pg = open_control_plane(get_settings())
        pg.add_tenant("acme", "Acme")
        _endpoint(pg, receiver, "race")
        for i in range(20):
            pg.emit_event("acme", "sync.completed", {"n": i})
        barrier = threading.Barrier(3)
        errors: list[BaseException] = []
        now = utcnow()

        def tick() -> None:
            try:
                barrier.wait()
                with httpx.Client() as http:
                    wh.deliver_due(pg, now=now, http=http)
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=tick) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        # A tick that lost every race leaves nothing behind for the next one to send twice.
        with httpx.Client() as http:
            wh.deliver_due(pg, now=now + timedelta(minutes=5), http=http)
        pg.engine.dispose()
    assert errors == []
    got = sorted(r.payload["data"]["n"] for r in receiver.on("race"))
    assert got == list(range(20))


@pytest.mark.postgres
def test_fan_out_loses_a_race_cleanly_on_postgresql(
    settings: Settings, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another worker holds an uncommitted fan-out of the same event: ours waits, then backs off.
    import threading
    import time

    from medblocks_pipelines.lib.settings import get_settings
    from medblocks_pipelines_tests.conftest import fresh_pg_database

    with fresh_pg_database("webhooks_fanout") as url:
        monkeypatch.setenv("MEDBLOCKS_DATABASE_URL", url)
        pg = open_control_plane(get_settings())
        pg.add_tenant("acme", "Acme")
        _endpoint(pg, receiver, "f")
        event_id = pg.emit_event("acme", "sync.completed", {"n": 1})
        now = utcnow()
        out: dict[str, tuple[int, int]] = {}
        with pg.engine.connect() as other:
            tx = other.begin()
            other.execute(ot.webhook_fanout.insert().values(event_id=event_id, at=now))
            worker = threading.Thread(target=lambda: out.setdefault("r", wh.fan_out(pg, now=now)))
            worker.start()
            time.sleep(0.5)
            tx.commit()
            worker.join(timeout=30)
        assert out["r"] == (0, 0)
        assert wh.list_deliveries(pg) == []  # the winner (here: the bare insert) owns it
        pg.engine.dispose()
