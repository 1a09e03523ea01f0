"""The operator CLI is scoped to one tenant: listings show its rows, and another tenant's ids are
refused with one line ("not found for this tenant", the same line as an unknown id), nothing done.

Two tenants on one SQLite control plane, through click's CliRunner and the real ``medblocks`` group.
"""

import json
from typing import Any

import pytest
from click.testing import CliRunner

from medblocks_pipelines.cli import main
from medblocks_pipelines.lib.ops import exports as ex
from medblocks_pipelines.lib.ops import webhooks as wh
from medblocks_pipelines.lib.registry import ControlPlane, open_control_plane
from medblocks_pipelines.lib.settings import Settings


class Two:
    """Ids of tenant acme's and tenant rival's rows."""

    def __init__(self, cp: ControlPlane, settings: Settings) -> None:
        self.cp = cp
        cp.add_source("mercy", "Mercy EHR", "epic", "ehr", "http://127.0.0.1:1/fhir", ["backend"])
        self.conn: dict[str, str] = {}
        self.endpoint: dict[str, str] = {}
        for tenant in ("acme", "rival"):
            cp.add_tenant(tenant, tenant.title())
            cp.add_organization(f"{tenant}-org", tenant, "mercy", f"{tenant} org")
            cid = cp.create_connection(
                tenant_id=tenant,
                pattern="backend",
                source_id="mercy",
                organization_id=f"{tenant}-org",
                patient_ref=None,
            )
            cp.transition(cid, "active")
            self.conn[tenant] = cid
            cp.audit(
                tenant_id=tenant,
                actor=f"{tenant}-doctor",
                action="network.query",
                decision="refused",
                person_id=f"{tenant}-person",
                purpose="T-TREAT",
                reason="no_treatment_relationship",
            )
            self.endpoint[tenant], _ = wh.add_endpoint(
                cp, tenant_id=tenant, url="http://127.0.0.1:9/hook", event_types=["*"]
            )
            ex.add_destination(
                cp,
                id=f"{tenant}-dest",
                tenant_id=tenant,
                kind="parquet",
                url=str(settings.data_dir / f"out-{tenant}"),
            )


@pytest.fixture
def two(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Two:
    monkeypatch.setenv("MEDBLOCKS_WEBHOOK_ALLOW_PRIVATE", "1")  # receivers on loopback
    return Two(open_control_plane(settings), settings)


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def _refused(args: list[str], kind: str, id: str) -> None:
    code, out = _run(*args)
    assert code == 1, (args, out)
    lines = out.strip().splitlines()
    assert lines[0] == f"error: {kind} {id} not found for tenant acme", (args, out)
    assert "Traceback" not in out and len(lines) <= 2


def test_listings_show_only_the_tenants_rows(two: Two) -> None:
    code, out = _run("connections", "list", "--tenant", "acme")
    assert code == 0 and "acme-org" in out and "rival" not in out, out
    code, out = _run("orgs", "list", "--tenant", "acme")
    assert code == 0 and "acme-org" in out and "rival-org" not in out
    code, out = _run("audit", "list", "--tenant", "acme", "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and {r["tenant_id"] for r in rows} == {"acme"}
    code, out = _run("webhooks", "list", "--tenant", "acme", "--json")
    assert code == 0 and [json.loads(x)["id"] for x in out.splitlines()] == [two.endpoint["acme"]]
    code, out = _run("exports", "list", "--tenant", "acme")
    assert code == 0 and "acme-dest" in out and "rival-dest" not in out


@pytest.mark.parametrize(
    "args",
    [
        ["connections", "list"],
        ["orgs", "list"],
        ["audit", "list"],
        ["webhooks", "list"],
        ["exports", "list"],
        ["exports", "runs"],
    ],
)
def test_listings_need_an_explicit_tenant(two: Two, args: list[str]) -> None:
    code, out = _run(*args)
    assert code == 2 and "--tenant" in out, out


def test_another_tenants_connection_is_not_found(two: Two) -> None:
    rival = two.conn["rival"]
    for verb in ("show", "refresh"):
        _refused(["connections", verb, rival, "--tenant", "acme"], "connection", rival)
    _refused(
        ["connections", "revoke", rival, "--tenant", "acme", "--delete-data"], "connection", rival
    )
    assert two.cp.get_connection(rival).state == "active"
    # An unknown id reads exactly the same: no oracle of other tenants' ids.
    _refused(["connections", "show", "conn_nope", "--tenant", "acme"], "connection", "conn_nope")
    code, out = _run("connections", "show", two.conn["acme"], "--tenant", "acme")
    assert code == 0 and "active" in out, out


def test_another_tenants_webhook_endpoint_is_not_found(two: Two) -> None:
    rival = two.endpoint["rival"]
    for verb in ("disable", "enable", "test", "attempts"):
        _refused(["webhooks", verb, rival, "--tenant", "acme"], "webhook endpoint", rival)
    assert wh.get_endpoint(two.cp, rival).status == "enabled"
    code, out = _run("webhooks", "disable", two.endpoint["acme"], "--tenant", "acme")
    assert code == 0, out


def test_another_tenants_export_destination_is_not_found(two: Two) -> None:
    for args in (
        ["exports", "run", "rival-dest"],
        ["exports", "pause", "rival-dest"],
        ["exports", "resume", "rival-dest"],
        ["exports", "runs", "--destination", "rival-dest"],
    ):
        _refused([*args, "--tenant", "acme"], "export destination", "rival-dest")
    assert ex.get_destination(two.cp, "rival-dest").enabled
    assert ex.list_runs(two.cp, destination_id="rival-dest") == []
    code, out = _run("exports", "pause", "acme-dest", "--tenant", "acme")
    assert code == 0, out


def test_another_tenants_organization_cannot_be_synced(two: Two, monkeypatch: Any) -> None:
    # Refused before any Dagster run starts.
    import medblocks_pipelines.cli.runtime as runtime

    def no_run(*_a: Any, **_k: Any) -> None:
        raise AssertionError("a run started")

    monkeypatch.setattr(runtime, "run_job", no_run)
    _refused(
        ["sync", "backend", "--tenant", "acme", "--org", "rival-org"], "organization", "rival-org"
    )
