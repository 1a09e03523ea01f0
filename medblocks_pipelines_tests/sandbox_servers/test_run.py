"""start_sandbox(): every role on ephemeral loopback ports, generator data, admin calls, stop().

Also drives one patient-access flow end to end on the generated population (a generated login at
the first EHR org), and applies one evolve() step through the admin API.
"""

import time
from collections.abc import Iterator

import httpx
import pytest

from medblocks_pipelines_tests.sandbox_servers.fixture_data import FakePopulation
from medblocks_pipelines_tests.sandbox_servers.helpers import (
    REDIRECT,
    AuthRequest,
    Server,
    standalone_token,
)
from medblocks_sandbox.run import SandboxHandle, start_sandbox


@pytest.fixture(scope="module")
def sandbox() -> Iterator[SandboxHandle]:
    began = time.monotonic()
    handle = start_sandbox(base_port=0, persons=20, seed=7)
    handle.started_wall = time.monotonic() - began  # type: ignore[attr-defined]
    try:
        yield handle
    finally:
        handle.stop()


def test_starts_fast_and_describes_itself(sandbox: SandboxHandle) -> None:
    assert sandbox.started_wall < 10  # type: ignore[attr-defined]
    rows = sandbox.describe()
    assert {r["role"] for r in rows} >= {"ehr", "payer"}
    assert all(r["url"].startswith("http://127.0.0.1:") for r in rows)
    for row in rows:
        # FHIR bases for EHR and payer orgs; gateway communities have no FHIR base.
        assert row["url"].endswith("/fhir") == (row["kind"] in ("ehr", "payer"))
    kinds = {o.kind for o in sandbox.orgs}
    assert {"ehr", "payer"} <= kinds
    assert len(sandbox.orgs_of("ehr")) == 2 and len(sandbox.orgs_of("payer")) == 1
    for org in [*sandbox.orgs_of("ehr"), *sandbox.orgs_of("payer")]:
        conf = httpx.get(org.smart_configuration_url, timeout=10).json()
        assert conf["token_endpoint"].startswith(org.base_url)
        assert httpx.get(f"{org.fhir_base}/metadata", timeout=10).status_code == 200


def test_generated_login_standalone_flow_and_evolve(sandbox: SandboxHandle) -> None:
    org = sandbox.orgs_of("ehr")[0]
    login = next(lg for lg in sandbox.population.logins if lg.org_id == org.org_id)
    sandbox.register_client(
        {"client_id": "demo-app", "token_endpoint_auth_method": "none", "redirect_uris": [REDIRECT]}
    )
    with httpx.Client(timeout=10) as http:
        server = Server(org.base_url, sandbox.admin_secret, None, http)
        body = standalone_token(
            server,
            AuthRequest(client_id="demo-app"),
            username=login.username,
            password=login.password,
        )
        assert body["patient"] == login.patient_id
        auth = {"Authorization": f"Bearer {body['access_token']}"}
        obs = http.get(
            f"{org.fhir_base}/Observation", params={"patient": login.patient_id}, headers=auth
        ).json()
        assert obs["total"] >= 1
        category = obs["entry"][0]["resource"]["category"][0]["coding"][0]["code"]
        same_cat = http.get(
            f"{org.fhir_base}/Observation",
            params={"patient": login.patient_id, "category": category, "_count": "5"},
            headers=auth,
        ).json()
        assert 1 <= same_cat["total"] <= obs["total"]
        everything = http.get(
            f"{org.fhir_base}/Patient/{login.patient_id}/$everything", headers=auth
        ).json()
        assert everything["total"] > obs["total"]
    store = sandbox.org_handles(org.org_id)["store"]
    mark = store.now()
    applied = sandbox.apply_changes(1)
    assert set(applied) == {o.org_id for o in sandbox.orgs if o.kind in ("ehr", "payer")}
    assert sum(a["upserted"] + a["deleted"] for a in applied.values()) > 0
    changed, deleted = store.changes_since(mark)
    assert len(changed) == applied[org.org_id]["upserted"]
    assert len(deleted) == applied[org.org_id]["deleted"]
    # The same step applied again is idempotent in content but makes new versions: the
    # generator's step is cached, so the org sees exactly the same change set.
    again = sandbox.apply_changes(1)
    assert again == applied


def test_fixed_population_and_port_plan() -> None:
    handle = start_sandbox(base_port=0, population=FakePopulation())
    try:
        assert [o.org_id for o in handle.orgs] == ["mercy", "acme-health"]
        mercy = handle.org("mercy")
        assert mercy.fhir_base.endswith("/mercy/fhir")
        answer = handle.admin("mercy", "launch", {"patient": "p1"})
        assert answer["iss"] == mercy.fhir_base
        # The admin API refuses callers without the secret.
        resp = httpx.post(f"{mercy.admin_url}/launch", json={}, timeout=10)
        assert resp.status_code == 403
    finally:
        handle.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{mercy.fhir_base}/metadata", timeout=2)


def test_custom_role_sees_earlier_roles_and_mints_launches(monkeypatch: pytest.MonkeyPatch) -> None:
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from medblocks_sandbox import run

    seen: dict = {}

    def cds_ehr(ctx: run.RoleContext) -> run.RoleApp:
        auth = ctx.built_roles["ehr"].extra["orgs"]["mercy"]["auth"]
        seen["ehr_url"] = ctx.role_urls["ehr"]

        async def launch(request: object) -> JSONResponse:
            return JSONResponse(
                {
                    "launch": auth.mint_launch(patient="p1", user="Practitioner/dr1"),
                    "iss": auth.fhir_base,
                }
            )

        return run.RoleApp(app=Starlette(routes=[Route("/launch", launch)]))

    monkeypatch.setitem(run._ROLES, "cds_ehr", cds_ehr)
    handle = start_sandbox(base_port=0, population=FakePopulation(), roles=["ehr", "cds_ehr"])
    try:
        assert [r["role"] for r in handle.describe()] == ["ehr", "cds_ehr"]
        answer = httpx.get(f"{handle.role_urls['cds_ehr']}/launch", timeout=10).json()
        assert answer["iss"] == handle.org("mercy").fhir_base
        assert seen["ehr_url"] == handle.role_urls["ehr"]
    finally:
        handle.stop()
