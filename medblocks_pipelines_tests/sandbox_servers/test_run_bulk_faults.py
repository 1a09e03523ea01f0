"""The wiring run.py does per org: Bulk Data $export and fault injection inside the EHR app.

A backend client registered through the admin API gets a token from the org's own authorization
server, kicks off a system export, polls and downloads; fault rules added over the fault admin API
hit FHIR calls but never the admin API, and `expire_token` expires the token in the AS for real.
"""

import json
import time
from collections.abc import Iterator

import httpx
import pytest

from medblocks_pipelines_tests.sandbox_servers.fixture_data import FakePopulation
from medblocks_pipelines_tests.sandbox_servers.helpers import (
    Server,
    backend_token,
    make_key,
)
from medblocks_sandbox.run import SandboxHandle, start_sandbox


@pytest.fixture(scope="module")
def sandbox() -> Iterator[SandboxHandle]:
    handle = start_sandbox(base_port=0, population=FakePopulation())
    handle.org_handles("mercy")["bulk"].config.export_seconds = 0.2
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture(scope="module")
def mercy(sandbox: SandboxHandle) -> Iterator[Server]:
    org = sandbox.org("mercy")
    with httpx.Client(timeout=10) as http:
        yield Server(org.base_url, sandbox.admin_secret, sandbox.org_handles("mercy")["app"], http)


@pytest.fixture(scope="module")
def backend(sandbox: SandboxHandle, mercy: Server) -> dict[str, str]:
    key = make_key("ES384", "bulk-key")
    sandbox.admin(
        "mercy",
        "clients",
        {
            "client_id": "bulk-app",
            "token_endpoint_auth_method": "private_key_jwt",
            "jwks": {"keys": [key.public_jwk]},
            "scopes": ["system/*.rs"],
        },
    )
    resp = backend_token(mercy, "bulk-app", key)
    assert resp.status_code == 200, resp.text
    return {"Authorization": f"Bearer {resp.json()['access_token']}"}


def test_system_export_through_the_ehr(mercy: Server, backend: dict) -> None:
    kick = mercy.http.get(
        f"{mercy.fhir}/$export?_type=Patient,Observation",
        headers={**backend, "Accept": "application/fhir+json", "Prefer": "respond-async"},
    )
    assert kick.status_code == 202, kick.text
    status_url = kick.headers["content-location"]
    for _ in range(50):
        status = mercy.http.get(status_url, headers=backend)
        if status.status_code == 200:
            break
        assert status.status_code == 202
        time.sleep(0.1)
    manifest = status.json()
    counts: dict[str, int] = {}
    for out in manifest["output"]:
        body = mercy.http.get(out["url"], headers={**backend, "Accept": "application/fhir+ndjson"})
        assert body.status_code == 200
        lines = [json.loads(x) for x in body.text.splitlines() if x]
        counts[out["type"]] = counts.get(out["type"], 0) + len(lines)
    assert counts == {"Patient": 2, "Observation": 10}


def test_patient_token_cannot_export(mercy: Server) -> None:
    from medblocks_pipelines_tests.sandbox_servers.helpers import register_public, standalone_token

    register_public(mercy, client_id="pat-app")
    from medblocks_pipelines_tests.sandbox_servers.helpers import AuthRequest

    token = standalone_token(mercy, AuthRequest(client_id="pat-app"))["access_token"]
    resp = mercy.http.get(
        f"{mercy.fhir}/$export",
        headers={
            "Authorization": f"Bearer {token}",
            "Accept": "application/fhir+json",
            "Prefer": "respond-async",
        },
    )
    assert resp.status_code == 403


def test_faults_hit_fhir_but_not_admin(
    sandbox: SandboxHandle, mercy: Server, backend: dict
) -> None:
    faults_url = f"{mercy.base}/_sandbox/faults"
    added = mercy.http.post(
        faults_url,
        json={"kind": "error_burst", "count": 2},
        headers={"X-Sandbox-Admin": sandbox.admin_secret},
    )
    assert added.status_code in (200, 201), added.text
    assert sandbox.admin("mercy", "grants")["grants"] is not None  # admin is exempt
    statuses = [
        mercy.http.get(f"{mercy.fhir}/Patient", headers=backend).status_code for _ in range(3)
    ]
    assert statuses == [503, 503, 200]


def test_expire_token_fault_expires_in_the_as(sandbox: SandboxHandle, mercy: Server) -> None:
    key = make_key("RS384", "k2")
    sandbox.admin(
        "mercy",
        "clients",
        {
            "client_id": "bulk-2",
            "token_endpoint_auth_method": "private_key_jwt",
            "jwks": {"keys": [key.public_jwk]},
            "scopes": ["system/*.rs"],
        },
    )
    token = backend_token(mercy, "bulk-2", key).json()["access_token"]
    mercy.http.post(
        f"{mercy.base}/_sandbox/faults",
        json={"kind": "expire_token", "client_id": "bulk-2", "after_requests": 1},
        headers={"X-Sandbox-Admin": sandbox.admin_secret},
    )
    auth = {"Authorization": f"Bearer {token}"}
    assert mercy.http.get(f"{mercy.fhir}/Patient", headers=auth).status_code == 200
    assert mercy.http.get(f"{mercy.fhir}/Patient", headers=auth).status_code == 401
    # Expired for real: introspection says inactive.
    assert mercy.auth.validate_access_token(token) is None


def test_revoke_refresh_fault_revokes_the_grant_in_the_as(
    sandbox: SandboxHandle, mercy: Server
) -> None:
    from medblocks_pipelines_tests.sandbox_servers.helpers import (
        AuthRequest,
        register_public,
        standalone_token,
    )

    register_public(mercy, client_id="pat-2")
    body = standalone_token(mercy, AuthRequest(client_id="pat-2"))
    added = mercy.http.post(
        f"{mercy.base}/_sandbox/faults",
        json={"kind": "revoke_refresh", "client_id": "pat-2", "count": 1},
        headers={"X-Sandbox-Admin": sandbox.admin_secret},
    )
    assert added.status_code in (200, 201), added.text
    refresh = {
        "grant_type": "refresh_token",
        "refresh_token": body["refresh_token"],
        "client_id": "pat-2",
    }
    first = mercy.http.post(mercy.smart()["token_endpoint"], data=refresh)
    assert first.status_code == 400 and first.json()["error"] == "invalid_grant"
    # The fault is gone, but the grant was revoked for real: the same token still fails.
    again = mercy.http.post(mercy.smart()["token_endpoint"], data=refresh)
    assert again.json()["error"] == "invalid_grant"
    auth = {"Authorization": f"Bearer {body['access_token']}"}
    assert mercy.http.get(f"{mercy.fhir}/Patient/p1", headers=auth).status_code == 401


def test_huge_page_fault_reaches_the_search(
    sandbox: SandboxHandle, mercy: Server, backend: dict
) -> None:
    mercy.http.post(
        f"{mercy.base}/_sandbox/faults",
        json={"kind": "huge_page", "page_size": 500, "count": 1},
        headers={"X-Sandbox-Admin": sandbox.admin_secret},
    )
    big = mercy.http.get(f"{mercy.fhir}/Observation?_count=2", headers=backend).json()
    assert len(big["entry"]) == 10 and not [lk for lk in big["link"] if lk["relation"] == "next"]
    # huge_page stays until the rules are cleared.
    cleared = mercy.http.delete(
        f"{mercy.base}/_sandbox/faults", headers={"X-Sandbox-Admin": sandbox.admin_secret}
    )
    assert cleared.status_code == 204
    small = mercy.http.get(f"{mercy.fhir}/Observation?_count=2", headers=backend).json()
    assert len(small["entry"]) == 2


def test_epic_profile_org_requires_a_jwks_url() -> None:
    handle = start_sandbox(
        base_port=0, population=FakePopulation(), roles=["ehr"], profiles={"mercy": "epic"}
    )
    try:
        key = make_key("RS384")
        with httpx.Client(timeout=10) as http:
            resp = http.post(
                f"{handle.org('mercy').admin_url}/clients",
                json={
                    "client_id": "svc",
                    "token_endpoint_auth_method": "private_key_jwt",
                    "jwks": {"keys": [key.public_jwk]},
                },
                headers={"X-Admin-Secret": handle.admin_secret},
            )
        assert resp.status_code == 400
        assert handle.org_handles("mercy")["auth"].config.require_jwks_url is True
    finally:
        handle.stop()
