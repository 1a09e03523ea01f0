"""The webhook sensor delivers through the platform resource, and the CLI manages endpoints."""

import json
from datetime import timedelta

import dagster as dg
import httpx
import pytest
from click.testing import CliRunner

from medblocks_pipelines.cli.ops import webhooks as webhooks_cli
from medblocks_pipelines.defs.shared.resources import PlatformResource
from medblocks_pipelines.defs.shared.webhooks import WORKERS, webhook_delivery_sensor
from medblocks_pipelines.lib.ops import webhooks as wh
from medblocks_pipelines.lib.registry import ControlPlane, utcnow
from medblocks_pipelines.lib.settings import Settings
from medblocks_pipelines_tests.ops.conftest import Receiver


def test_sensor_tick_delivers(cp: ControlPlane, receiver: Receiver, settings: Settings) -> None:
    _, secret = wh.add_endpoint(cp, tenant_id="acme", url=f"{receiver.url}/hook/s")
    receiver.secrets["s"] = secret
    cp.emit_event("acme", "export.completed", {"destination_id": "d1", "counts": {"Patient": 1}})
    platform = PlatformResource(data_dir=str(settings.data_dir))
    with dg.build_sensor_context(resources={"platform": platform}) as ctx:
        result = webhook_delivery_sensor(ctx)
    assert isinstance(result, dg.SkipReason) and "1 delivered" in (result.skip_message or "")
    assert [r.payload["type"] for r in receiver.on("s")] == ["export.completed"]
    assert receiver.on("s")[0].verified


def test_sensor_tick_is_bounded_by_a_slow_receiver_and_loses_nothing(
    cp: ControlPlane, receiver: Receiver, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A receiver slower than the POST timeout: the tick starts no round that could end after
    its deadline, leaves the rest due, and later ticks deliver every event exactly once."""
    monkeypatch.setenv("MEDBLOCKS_WEBHOOK_TIMEOUT_S", "0.2")
    monkeypatch.setenv("MEDBLOCKS_WEBHOOK_DEADLINE_S", "0.5")
    endpoint_id, secret = wh.add_endpoint(cp, tenant_id="acme", url=f"{receiver.url}/hook/slow")
    receiver.secrets["slow"] = secret
    receiver.delays["slow"] = 1.0  # every POST times out
    events = 3 * WORKERS
    for i in range(events):
        cp.emit_event("acme", "export.completed", {"destination_id": f"d{i}", "counts": {}})
    platform = PlatformResource(data_dir=str(settings.data_dir))
    with dg.build_sensor_context(resources={"platform": platform}) as ctx:
        result = webhook_delivery_sensor(ctx)
    assert isinstance(result, dg.SkipReason) and "left for the next tick" in str(
        result.skip_message
    )
    # Each round lasts at least the timeout, so a 0.5 s deadline admits at most two rounds.
    attempts = wh.list_attempts(cp, endpoint_id=endpoint_id)
    assert len(attempts) <= 2 * WORKERS
    assert {a.outcome for a in attempts} <= {"timeout"}
    deliveries = wh.list_deliveries(cp, endpoint_id=endpoint_id)
    assert len(deliveries) == events and all(d.status == "pending" for d in deliveries)
    untouched = [d for d in deliveries if d.attempts == 0]
    assert len(untouched) >= events - 2 * WORKERS > 0  # deferred, still due, not claimed
    # The receiver recovers; the retries (and any lease that a straggler held) come due.
    receiver.delays["slow"] = 0
    with httpx.Client() as http:
        for _ in range(3):
            wh.deliver_due(cp, now=utcnow() + timedelta(hours=1), http=http)
    done = wh.list_deliveries(cp, endpoint_id=endpoint_id)
    assert [d.status for d in done] == ["succeeded"] * events
    delivered = {r.payload["data"]["destination_id"] for r in receiver.on("slow") if r.verified}
    assert delivered == {f"d{i}" for i in range(events)}
    successes = [a for a in wh.list_attempts(cp, endpoint_id=endpoint_id) if a.outcome == "success"]
    assert len(successes) == events  # one success per delivery: nothing doubled


def test_cli_add_list_test_disable(
    cp: ControlPlane, receiver: Receiver, settings: Settings
) -> None:
    runner = CliRunner()
    url = f"{receiver.url}/hook/cli"
    res = runner.invoke(
        webhooks_cli,
        ["add", "--tenant", "acme", "--url", url, "--events", "connection.*", "--json"],
    )
    assert res.exit_code == 0, res.output
    added = json.loads(res.output)
    receiver.secrets["cli"] = added["secret"]
    res = runner.invoke(webhooks_cli, ["list", "--tenant", "acme", "--json"])
    assert res.exit_code == 0
    (listed,) = [json.loads(line) for line in res.output.splitlines()]
    assert listed["id"] == added["id"] and listed["event_types"] == ["connection.*"]
    res = runner.invoke(webhooks_cli, ["list", "--tenant", "acme"])
    assert res.exit_code == 0 and "webhook endpoints" in res.output
    assert added["secret"] not in res.output
    res = runner.invoke(webhooks_cli, ["test", added["id"], "--tenant", "acme"])
    assert res.exit_code == 0 and "204" in res.output, res.output
    assert receiver.on("cli")[0].verified
    res = runner.invoke(
        webhooks_cli, ["disable", added["id"], "--tenant", "acme", "--reason", "maintenance"]
    )
    assert res.exit_code == 0
    assert wh.get_endpoint(cp, added["id"]).status == "disabled"
    res = runner.invoke(webhooks_cli, ["enable", added["id"], "--tenant", "acme"])
    assert res.exit_code == 0
    assert wh.get_endpoint(cp, added["id"]).status == "enabled"
    res = runner.invoke(webhooks_cli, ["attempts", added["id"], "--tenant", "acme"])
    assert res.exit_code == 0
