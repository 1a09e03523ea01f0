"""SMART EHR launch against the real sandbox EHR, and the sandbox CDS client calling our service:
both directions over loopback sockets."""

from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

import medblocks_sandbox.cds_ehr  # noqa: F401  (registers the cds_ehr role)
from medblocks_pipelines.lib.cds.knowledge import PACKS_ENV
from medblocks_pipelines.lib.network.tables import network_relationship_events
from medblocks_pipelines.lib.registry import open_control_plane
from medblocks_pipelines.lib.settings import Settings
from medblocks_pipelines.lib.warehouse.build import warehouse_path
from medblocks_pipelines.web.app import create_app
from medblocks_pipelines_tests.clinician_workflow.cards_check import assert_valid_response
from medblocks_pipelines_tests.clinician_workflow.conftest import LOINC, RX, SCT, fact
from medblocks_pipelines_tests.support.cds_synthetic import write_warehouse
from medblocks_sandbox.cds_ehr.orders import demo_orders
from medblocks_sandbox.drivers.clinician import (
    first_patient,
    launch_in_browser,
    run_clinician_demo,
    setup_clinician_org,
)
from medblocks_sandbox.run import SandboxHandle, serve, start_sandbox

TENANT = "acme"
ORG = "mercy-general"


@pytest.fixture(scope="module")
def sandbox() -> Iterator[SandboxHandle]:
    handle = start_sandbox(base_port=0, persons=8, seed=7, roles=["ehr", "cds_ehr"])
    try:
        yield handle
    finally:
        handle.stop()


def _warehouse(settings: Settings, source: str, patient: str) -> None:
    """P1 is the sandbox patient at `source`, with records from another EHR and a payer."""
    today = date.today()
    person = "P1"
    facts = [
        fact(
            "f-dm",
            person,
            "condition",
            [f"{SCT}|44054006"],
            "Diabetes mellitus type 2",
            400,
            ["lakeside-clinic"],
            ["backend"],
            status="active",
        ),
        fact(
            "f-pen",
            person,
            "allergy",
            [f"{RX}|70618"],
            "penicillin",
            900,
            ["summit"],
            ["patient_access"],
            status="active",
        ),
        fact(
            "f-a1c",
            person,
            "result",
            [f"{LOINC}|4548-4"],
            "Hemoglobin A1c",
            300,
            ["lakeside-clinic"],
            ["network"],
            value_num=8.1,
            value_unit="%",
        ),
    ]
    for f in facts:  # dates relative to the real today (the sandbox EHR has no clock override)
        f["last_date"] = f["effective_date"] = today.fromordinal(
            today.toordinal() - (date(2026, 6, 1) - f["last_date"]).days
        )
    write_warehouse(
        warehouse_path(settings, TENANT),
        facts=facts,
        links=[
            {"patient_key": f"{source}/Patient/{patient}", "source": source, "person_id": person},
            {
                "patient_key": f"lakeside-clinic/Patient/x{patient}",
                "source": "lakeside-clinic",
                "person_id": person,
            },
        ],
    )


@pytest.fixture
def env(settings: Settings, sandbox: SandboxHandle) -> Iterator[dict[str, Any]]:
    cp = open_control_plane(settings)
    cp.add_tenant(TENANT, "Acme Health")
    with serve(lambda base: create_app(public_base_url=base, settings=settings)) as web:
        ids = setup_clinician_org(sandbox, cp, tenant=TENANT, org=ORG, web_base=web)
        patient = first_patient(sandbox, ORG)
        _warehouse(settings, ids["source_id"], patient)
        yield {"cp": cp, "web": web, "patient": patient, **ids}
    cp.engine.dispose()


def test_ehr_launch_opens_the_app_with_context(env: dict[str, Any], sandbox: SandboxHandle) -> None:
    cp = env["cp"]
    page = launch_in_browser(
        sandbox, org=ORG, patient=env["patient"], web_base=env["web"], encounter="enc-1"
    )
    assert page.status_code == 200, page.text
    assert page.url.path.startswith("/ehr/app/")
    assert 'id="patient-banner"' in page.text and 'id="record"' in page.text
    assert "Diabetes mellitus type 2" in page.text and "exchange network" in page.text
    conn = cp.get_connection(page.url.path.rsplit("/", 1)[-1])
    assert conn.pattern == "clinician_workflow" and conn.state == "active"
    assert conn.source_patient_id == env["patient"]
    assert conn.organization_id == env["organization_id"]
    launch_ctx = conn.context["launch_context"]
    assert launch_ctx["encounter"] == "enc-1"
    assert launch_ctx["fhirUser"].endswith("Practitioner/sandbox-clinician")
    assert "launch" in conn.scopes_granted.split()
    assert cp.vault.names(f"conn/{conn.id}/")  # tokens are in the vault
    events = [e.type for e in cp.list_events(tenant_id=TENANT)]
    assert "connection.activated" in events and "clinician.launch" in events
    with cp.engine.connect() as c:
        rel = c.execute(sa.select(network_relationship_events)).mappings().all()
    assert [(r["person_id"], r["kind"], r["organization_id"]) for r in rel] == [
        ("P1", "ehr_launch", env["organization_id"])
    ]


def test_unknown_iss_is_refused_without_redirect(env: dict[str, Any]) -> None:
    with httpx.Client(timeout=10) as browser:
        resp = browser.get(
            f"{env['web']}/ehr/launch",
            params={"iss": "https://attacker.example/fhir", "launch": "x"},
        )
    assert resp.status_code == 400 and "unknown_iss" in resp.text
    assert "location" not in resp.headers
    assert env["cp"].list_connections(pattern="clinician_workflow") == []
    with httpx.Client(timeout=10) as browser:
        resp = browser.get(f"{env['web']}/ehr/launch")
    assert resp.status_code == 400


def test_app_page_needs_the_launching_browser(env: dict[str, Any], sandbox: SandboxHandle) -> None:
    page = launch_in_browser(sandbox, org=ORG, patient=env["patient"], web_base=env["web"])
    assert page.status_code == 200
    with httpx.Client(timeout=10) as other_browser:
        resp = other_browser.get(str(page.url))
        assert resp.status_code == 403 and "Diabetes" not in resp.text
        resp = other_browser.get(f"{env['web']}/ehr/app/no-such-connection")
        assert resp.status_code == 403


def test_callback_replay_and_forged_state_are_refused(
    env: dict[str, Any], sandbox: SandboxHandle
) -> None:
    launcher = sandbox.role_urls["cds_ehr"]
    with httpx.Client(timeout=30, follow_redirects=False) as browser:
        r = browser.get(
            f"{launcher}/launch",
            params={"org": ORG, "patient": env["patient"], "app": f"{env['web']}/ehr/launch"},
        )
        hops = 0
        while r.status_code in (302, 303) and "/ehr/callback" not in r.headers["location"]:
            r = browser.get(r.headers["location"])
            hops += 1
            assert hops < 10
        callback = r.headers["location"]
        assert browser.get(callback).status_code == 302  # first use: to the app page
        replay = browser.get(callback)
        assert replay.status_code == 400 and "state_mismatch" in replay.text
        forged = browser.get(f"{env['web']}/ehr/callback", params={"code": "x", "state": "y"})
        assert forged.status_code == 400


def test_sandbox_ehr_fires_hooks_with_signed_jwt_and_prefetch(
    env: dict[str, Any], sandbox: SandboxHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The penicillin class comes from an operator's pack (a test fixture), not the shipped ones.
    monkeypatch.setenv(PACKS_ENV, str(Path(__file__).parent / "packs"))
    client = sandbox.roles["cds_ehr"].extra["client"]
    view = client.fire(
        org=ORG, service_base=env["web"], hook="patient-view", patient=env["patient"]
    )
    assert view["status"] == 200, view["body"]
    assert view["request"]["prefetch"]["patient"]["id"] == env["patient"]  # filled from the EHR
    cards = assert_valid_response(view["body"])
    topics = {c["source"]["topic"]["code"] for c in cards}
    assert topics == {"records-elsewhere", "care-gap"}
    select = client.fire(
        org=ORG,
        service_base=env["web"],
        hook="order-select",
        patient=env["patient"],
        orders=demo_orders(env["patient"]),
        selections=["MedicationRequest/draft-amox"],
    )
    cards = assert_valid_response(select["body"])
    assert [c["source"]["topic"]["code"] for c in cards] == ["allergy"]
    # Fault modes: an unknown patient with an OperationOutcome prefetch and no FHIR access: 412.
    bad = client.fire(
        org=ORG,
        service_base=env["web"],
        hook="patient-view",
        patient="nobody",
        prefetch_mode="outcome",
    )
    assert bad["status"] == 412
    nulls = client.fire(
        org=ORG,
        service_base=env["web"],
        hook="patient-view",
        patient="nobody",
        prefetch_mode="null",
    )
    assert nulls["status"] == 200 and nulls["body"] == {"cards": []}


def test_service_fetches_from_the_sandbox_ehr_with_fhir_authorization(
    env: dict[str, Any], sandbox: SandboxHandle
) -> None:
    """A patient the warehouse does not know at this source and no prefetch: the service must
    read the Patient (for its identifiers) from the EHR. With `fhirServer` and a
    `fhirAuthorization` token minted by the sandbox EHR it does; without them it answers 412."""
    client = sandbox.roles["cds_ehr"].extra["client"]
    store = sandbox.org_handles(ORG)["store"]
    other = next(p for p in store.patient_ids() if p != env["patient"])
    without = client.fire(
        org=ORG,
        service_base=env["web"],
        hook="patient-view",
        patient=other,
        prefetch_mode="omit",
    )
    assert without["status"] == 412
    fetched = client.fire(
        org=ORG,
        service_base=env["web"],
        hook="patient-view",
        patient=other,
        prefetch_mode="omit",
        fhir_authorization=True,
    )
    request = fetched["request"]
    assert "prefetch" not in request and request["fhirServer"].endswith(f"/{ORG}/fhir")
    auth = request["fhirAuthorization"]
    assert auth["token_type"] == "Bearer" and auth["patient"] == other
    assert auth["scope"] == "patient/*.rs" and auth["expires_in"] > 0
    assert fetched["status"] == 200 and fetched["body"] == {"cards": []}, fetched["body"]
    # The token is good for that patient's record and no one else's.
    base, bearer = request["fhirServer"], {"Authorization": f"Bearer {auth['access_token']}"}
    assert httpx.get(f"{base}/Patient/{other}", headers=bearer).status_code == 200
    assert httpx.get(f"{base}/Patient/{env['patient']}", headers=bearer).status_code in (403, 404)
    with pytest.raises(ValueError, match="read/search patient scopes only"):
        sandbox.org_handles(ORG)["auth"].mint_cds_token(
            client_id="cds-service", patient=other, scopes=["patient/*.cruds"]
        )


def test_admin_fire_over_http_needs_the_secret(env: dict[str, Any], sandbox: SandboxHandle) -> None:
    url = f"{sandbox.role_urls['cds_ehr']}/_admin/fire"
    body = {
        "org": ORG,
        "service_base": env["web"],
        "hook": "patient-view",
        "patient": env["patient"],
    }
    with httpx.Client(timeout=30) as http:
        assert http.post(url, json=body).status_code == 403
        resp = http.post(url, json=body, headers={"X-Admin-Secret": sandbox.admin_secret})
        assert resp.status_code == 200 and resp.json()["status"] == 200
        jwks = http.get(f"{sandbox.role_urls['cds_ehr']}/jwks.json").json()
        assert jwks["keys"][0]["kty"] == "EC" and "d" not in jwks["keys"][0]


def test_run_clinician_demo(
    settings: Settings, sandbox: SandboxHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PACKS_ENV, str(Path(__file__).parent / "packs"))  # the penicillin class
    cp = open_control_plane(settings)
    cp.add_tenant(TENANT, "Acme Health")
    patient = first_patient(sandbox, ORG)
    _warehouse(settings, f"{ORG}-cw", patient)
    result = run_clinician_demo(sandbox, cp, settings, tenant=TENANT, org=ORG)
    assert result["app_status"] == 200 and result["app_has_record"]
    assert result["connection_id"]
    assert result["patient_view"]["status"] == 200 and len(result["patient_view"]["cards"]) == 2
    assert result["order_select"]["status"] == 200
    assert {c["source"]["topic"]["code"] for c in result["order_select"]["cards"]} == {"allergy"}
    cp.engine.dispose()


def test_launch_sensor_dedupes_and_the_sync_lands_the_patient(
    env: dict[str, Any], sandbox: SandboxHandle, settings: Settings
) -> None:
    import dagster as dg

    from medblocks_pipelines.defs.clinician_workflow.assets import clinician_workflow_records
    from medblocks_pipelines.defs.clinician_workflow.sensors import clinician_launch_sensor
    from medblocks_pipelines.defs.shared.resources import PlatformResource

    for _ in range(2):  # the clinician opens the same chart twice
        page = launch_in_browser(sandbox, org=ORG, patient=env["patient"], web_base=env["web"])
        assert page.status_code == 200
    first_conn = env["cp"].list_connections(pattern="clinician_workflow")[0].id
    platform = PlatformResource(data_dir=str(settings.data_dir))
    with dg.instance_for_test() as instance:
        ctx = dg.build_sensor_context(instance=instance, resources={"platform": platform})
        result = clinician_launch_sensor(ctx)
        assert len(result.run_requests) == 1
        req = result.run_requests[0]
        key = f"{TENANT}.{env['organization_id']}"
        assert req.partition_key == key
        ids = req.run_config["ops"]["clinician_workflow__records"]["config"]["connection_ids"]
        assert ids == [first_conn]
        assert req.tags["medblocks/source"] == env["source_id"]
        # The next tick sees nothing new.
        again = clinician_launch_sensor(
            dg.build_sensor_context(
                instance=instance, resources={"platform": platform}, cursor=result.cursor
            )
        )
        assert not again.run_requests
        instance.add_dynamic_partitions("clinician_orgs", [key])
        out = dg.materialize(
            [clinician_workflow_records],
            partition_key=key,
            instance=instance,
            resources={"platform": platform},
            run_config=req.run_config,
        )
        assert out.success
        meta = out.asset_materializations_for_node("clinician_workflow__records")[0].metadata
        assert meta["connections_pulled"].value == 1
        assert meta["resources"].value > 0
    assert list(settings.lake_root.rglob("*.parquet"))


def test_plan_syncs_dedupes_per_patient_and_org() -> None:
    from medblocks_pipelines.defs.clinician_workflow.sensors import DEDUPE_SECONDS, plan_syncs
    from medblocks_pipelines.lib.registry.rows import Event
    from medblocks_pipelines_tests.support.rows import event_row

    def ev(cid: str, org: str = "o1", tenant: str = "t") -> Event:
        return event_row(
            type="clinician.launch",
            tenant_id=tenant,
            payload={
                "connection_id": cid,
                "organization_id": org,
                "pattern": "clinician_workflow",
            },
        )

    patient_of = {"c1": "p1", "c2": "p1", "c3": "p2", "c4": "p1", "c5": None}
    plan, recent, deduped = plan_syncs(
        [ev("c1"), ev("c2"), ev("c3"), ev("c4", org="o2"), ev("c5")],
        recent={},
        now=1000.0,
        patient_of=patient_of,
    )
    assert plan == {("t", "o1"): ["c1", "c3"], ("t", "o2"): ["c4"]} and deduped == 1
    # Within the window the same patient is skipped; after it, synced again.
    plan2, _, d2 = plan_syncs(
        [ev("c2")], recent=recent, now=1000.0 + DEDUPE_SECONDS - 1, patient_of=patient_of
    )
    assert plan2 == {} and d2 == 1
    plan3, _, _ = plan_syncs(
        [ev("c2")], recent=recent, now=1000.0 + DEDUPE_SECONDS + 1, patient_of=patient_of
    )
    assert plan3 == {("t", "o1"): ["c2"]}


def test_demo_setup_beside_an_existing_backend_source(
    settings: Settings, sandbox: SandboxHandle
) -> None:
    """The demo's registry already has the EHR as a backend source and organization."""
    cp = open_control_plane(settings)
    cp.add_tenant(TENANT, "Acme Health")
    endpoint = sandbox.org(ORG)
    cp.add_source(
        ORG,
        endpoint.name,
        "sandbox",
        "ehr",
        endpoint.fhir_base,
        ["backend"],
        config={"client_id": "backend-client"},
    )
    cp.add_organization(ORG, TENANT, ORG, endpoint.name)
    patient = first_patient(sandbox, ORG)
    _warehouse(settings, ORG, patient)  # the data arrived through the backend source
    result = run_clinician_demo(sandbox, cp, settings, tenant=TENANT, org=ORG)
    assert result["source_id"] == f"{ORG}-cw" and result["organization_id"] == f"{ORG}-cw"
    assert cp.get_source(ORG).config["client_id"] == "backend-client"  # untouched
    assert result["app_status"] == 200 and result["app_has_record"]
    assert len(result["patient_view"]["cards"]) == 2
    cp.engine.dispose()


def test_cli_cds_fire_and_sync_without_launch(
    env: dict[str, Any], sandbox: SandboxHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from medblocks_pipelines.cli.clinician_workflow import latest_launch
    from medblocks_pipelines.lib.errors import ConfigError
    from medblocks_sandbox.cli import cds

    monkeypatch.setenv(PACKS_ENV, str(Path(__file__).parent / "packs"))  # the penicillin class

    monkeypatch.setenv("MEDBLOCKS_SANDBOX_ADMIN_SECRET", sandbox.admin_secret)
    runner = CliRunner()
    out = runner.invoke(
        cds,
        [
            "fire",
            "--hook",
            "patient-view",
            "--org",
            ORG,
            "--patient",
            env["patient"],
            "--service-base",
            env["web"],
            "--sandbox-url",
            sandbox.role_urls["cds_ehr"],
        ],
    )
    assert out.exit_code == 0, out.output
    assert "HTTP 200" in out.output and "[warning] HbA1c overdue" in out.output
    out = runner.invoke(
        cds,
        [
            "fire",
            "--hook",
            "order-select",
            "--org",
            ORG,
            "--patient",
            env["patient"],
            "--service-base",
            env["web"],
            "--sandbox-url",
            sandbox.role_urls["cds_ehr"],
            "--prefetch",
            "outcome",
        ],
    )
    assert out.exit_code == 0 and "[critical] Allergy to penicillin" in out.output
    with pytest.raises(ConfigError):
        latest_launch(env["cp"], tenant=TENANT, org=env["organization_id"], patient="nobody")


@pytest.mark.parametrize(
    ("base", "expected", "absent"),
    [
        ("https://app.example", ["samesite=none", "secure", "partitioned", "httponly"], []),
        ("http://127.0.0.1:9", ["samesite=lax", "httponly"], ["secure", "partitioned"]),
    ],
)
def test_launch_cookie_works_inside_an_ehr_iframe_over_https(
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    base: str,
    expected: list[str],
    absent: list[str],
) -> None:
    """Over HTTPS the session cookie is third-party-safe (SameSite=None; Secure; Partitioned),
    because EHRs embed launched apps; on plain http it stays Lax (browsers drop None without
    Secure). The protocol itself is covered by the launch tests above; this checks the header."""
    from types import SimpleNamespace

    from medblocks_pipelines.web import ehr_launch

    def fake_start(cp: Any, **kwargs: Any) -> Any:
        return SimpleNamespace(method="GET", url="https://ehr.example/authorize?x=1")

    monkeypatch.setattr(ehr_launch, "start_ehr_launch", fake_start)
    open_control_plane(settings).engine.dispose()
    # Served on loopback http; the app believes it is reached at ``base`` (its public URL).
    with serve(lambda _b: create_app(public_base_url=base, settings=settings)) as web:
        resp = httpx.get(
            f"{web}/ehr/launch", params={"iss": "https://ehr.example/fhir", "launch": "l1"}
        )
    assert resp.status_code == 302
    cookie = resp.headers["set-cookie"].lower()
    assert cookie.startswith(f"{ehr_launch.SESSION_COOKIE}=")
    for attr in expected:
        assert attr in cookie
    for attr in absent:
        assert attr not in cookie
