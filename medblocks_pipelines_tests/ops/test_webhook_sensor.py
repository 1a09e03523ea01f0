"""The webhook sensor delivers through the platform resource, and the CLI manages endpoints."""

import json

import dagster as dg
from click.testing import CliRunner

from medblocks_pipelines.cli.ops import webhooks as webhooks_cli
from medblocks_pipelines.defs.shared.resources import PlatformResource
from medblocks_pipelines.defs.shared.webhooks import webhook_delivery_sensor
from medblocks_pipelines.lib.ops import webhooks as wh
from medblocks_pipelines.lib.registry import ControlPlane
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
    assert wh.get_endpoint(cp, added["id"])["status"] == "disabled"
    res = runner.invoke(webhooks_cli, ["enable", added["id"], "--tenant", "acme"])
    assert res.exit_code == 0
    assert wh.get_endpoint(cp, added["id"])["status"] == "enabled"
    res = runner.invoke(webhooks_cli, ["attempts", added["id"], "--tenant", "acme"])
    assert res.exit_code == 0
