"""Edge cases of the sandbox authorization server: cross-client misuse, missing fields, JWKS
failures, includes that obey scopes, introspection by client authentication, role checks."""

from typing import Any

import pytest

from medblocks_pipelines_tests.sandbox_servers.fixture_data import FakePopulation
from medblocks_pipelines_tests.sandbox_servers.helpers import (
    JWT_BEARER,
    REDIRECT,
    AuthRequest,
    Server,
    assertion,
    backend_token,
    exchange,
    get_code,
    make_key,
    redirect_params,
    register_public,
    standalone_token,
)
from medblocks_sandbox.errors import SandboxConfigError
from medblocks_sandbox.run import start_sandbox
from medblocks_sandbox.smart_scopes import narrow_scopes, parse_scope


@pytest.mark.parametrize(
    ("scope", "parsed"),
    [
        ("patient/Observation.rs", ("patient", "Observation", "rs")),
        ("user/*.read", ("user", "*", "rs")),
        ("system/*.*", ("system", "*", "cruds")),
        ("patient/Observation.write", ("patient", "Observation", "cud")),
        ("patient/Observation.sr", None),  # letters out of order
        ("patient/Observation.", None),
        ("patient/observation.rs", None),  # not a resource type
        ("launch/patient", None),
    ],
)
def test_parse_scope(scope: str, parsed: tuple | None) -> None:
    got = parse_scope(scope)
    if parsed is None:
        assert got is None
    else:
        assert got is not None
        letters = "".join(c for c in "cruds" if c in got.perms)
        assert (got.context, got.resource_type, letters) == parsed


def test_narrow_scopes_keeps_syntax_and_cuts_permissions() -> None:
    ceiling = ["patient/*.rs", "openid", "patient/Observation.rs?category=laboratory"]
    got = narrow_scopes(
        [
            "openid",
            "fhirUser",
            "patient/*.read",
            "patient/Condition.cruds",
            "user/*.rs",
            "patient/Observation.rs?category=laboratory",
            "system/*.rs",
        ],
        ceiling,
        contexts=("patient", "user"),
    )
    assert got == [
        "openid",
        "patient/*.read",
        "patient/Condition.rs",
        "patient/Observation.rs?category=laboratory",
    ]


def test_code_of_one_client_cannot_be_redeemed_by_another(ehr: Server) -> None:
    register_public(ehr, client_id="a")
    register_public(ehr, client_id="b")
    req = AuthRequest(client_id="a")
    code = get_code(ehr, req)
    stolen = exchange(ehr, req, code, client_id="b")
    assert stolen.status_code == 400 and stolen.json()["error"] == "invalid_grant"


def test_refresh_token_is_bound_to_its_client(ehr: Server) -> None:
    register_public(ehr, client_id="a")
    register_public(ehr, client_id="b")
    body = standalone_token(ehr, AuthRequest(client_id="a"))
    resp = ehr.http.post(
        ehr.smart()["token_endpoint"],
        data={
            "grant_type": "refresh_token",
            "refresh_token": body["refresh_token"],
            "client_id": "b",
        },
    )
    assert resp.json()["error"] == "invalid_grant"


def test_missing_state_and_missing_verifier(ehr: Server) -> None:
    register_public(ehr)
    req = AuthRequest()
    params = req.params(ehr)
    params.pop("state")
    resp = ehr.http.get(ehr.smart()["authorization_endpoint"], params=params)
    assert redirect_params(resp)["error"] == "invalid_request"
    code = get_code(ehr, req)
    no_verifier = ehr.http.post(
        ehr.smart()["token_endpoint"],
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT,
            "client_id": "app",
        },
    )
    assert no_verifier.json()["error"] == "invalid_grant"


def test_unsupported_grant_and_response_types(ehr: Server) -> None:
    register_public(ehr)
    resp = ehr.http.post(
        ehr.smart()["token_endpoint"],
        data={"grant_type": "password", "username": "alice", "password": "x", "client_id": "app"},
    )
    assert resp.json()["error"] == "unsupported_grant_type"
    token_req = AuthRequest(extra={"response_type": "token"})
    resp = ehr.http.get(ehr.smart()["authorization_endpoint"], params=token_req.params(ehr))
    assert redirect_params(resp)["error"] == "unsupported_response_type"


def test_unreadable_jwks_url_is_invalid_client(ehr: Server) -> None:
    key = make_key("RS384")
    ehr.admin(
        "clients",
        {
            "client_id": "svc",
            "token_endpoint_auth_method": "private_key_jwt",
            "jwks_uri": "http://127.0.0.1:9/jwks.json",
        },
    )
    resp = backend_token(ehr, "svc", key)
    assert resp.status_code == 401 and resp.json()["error"] == "invalid_client"


def test_include_obeys_scopes(ehr: Server) -> None:
    register_public(ehr)
    body = standalone_token(ehr, AuthRequest(scope="launch/patient patient/MedicationRequest.rs"))
    auth = {"Authorization": f"Bearer {body['access_token']}"}
    bundle = ehr.http.get(
        f"{ehr.fhir}/MedicationRequest?_include=MedicationRequest:medication", headers=auth
    ).json()
    modes = [e["search"]["mode"] for e in bundle["entry"]]
    assert modes == ["match"]  # no Medication scope: the include is left out


def test_introspection_with_client_assertion(ehr: Server) -> None:
    key = make_key("ES384")
    ehr.admin(
        "clients",
        {
            "client_id": "rs",
            "token_endpoint_auth_method": "private_key_jwt",
            "jwks": {"keys": [key.public_jwk]},
        },
    )
    token = backend_token(ehr, "rs", key).json()["access_token"]
    url = ehr.smart()["introspection_endpoint"]
    resp = ehr.http.post(
        url,
        data={
            "token": token,
            "client_assertion_type": JWT_BEARER,
            "client_assertion": assertion(key, "rs", ehr.smart()["token_endpoint"]),
        },
    )
    info = resp.json()
    assert info["active"] is True and info["client_id"] == "rs" and info["scope"] == "system/*.rs"
    assert "patient" not in info


def test_patient_token_cannot_ask_for_other_patient_by_id(ehr: Server) -> None:
    register_public(ehr)
    auth = {"Authorization": f"Bearer {standalone_token(ehr)['access_token']}"}
    assert ehr.http.get(f"{ehr.fhir}/Patient?_id=p2", headers=auth).status_code == 403
    assert ehr.http.get(f"{ehr.fhir}/Patient?_id=p1", headers=auth).json()["total"] == 1


def test_confidential_only_server_refuses_public_clients(payer: Server) -> None:
    register_public(payer, client_id="early")  # registered before the policy changed
    payer.auth.config.allow_public_clients = False
    req = AuthRequest(client_id="early")
    resp = payer.http.get(payer.smart()["authorization_endpoint"], params=req.params(payer))
    assert resp.status_code == 400 and "location" not in resp.headers
    resp = payer.admin(
        "clients",
        {"client_id": "pub", "token_endpoint_auth_method": "none", "redirect_uris": [REDIRECT]},
    )
    assert resp.status_code == 400
    assert "client-public" not in payer.smart()["capabilities"]


def test_unknown_role_is_refused() -> None:
    with pytest.raises(SandboxConfigError, match="unknown sandbox roles"):
        start_sandbox(base_port=0, population=object(), roles=["spaceship"])


def test_busy_port_is_a_clear_config_error() -> None:
    from medblocks_sandbox.run import bind_socket

    busy = bind_socket("127.0.0.1", 0)
    try:
        port = busy.getsockname()[1]
        with pytest.raises(SandboxConfigError, match=f"127.0.0.1:{port}") as err:
            start_sandbox(base_port=port, population=FakePopulation(), roles=["ehr"])
        assert err.value.hint and "--port" in err.value.hint
    finally:
        busy.close()


@pytest.mark.parametrize(
    ("peer", "loopback"),
    [
        (("127.0.0.1", 5), True),
        (("::1", 5), True),
        (("203.0.113.9", 5), False),
        (("testclient", 5), False),
        (None, False),
    ],
)
def test_admin_guard_checks_the_socket_peer(peer: tuple | None, loopback: bool) -> None:
    from starlette.requests import Request

    from medblocks_sandbox.ehr_admin import _is_loopback

    scope: dict[str, Any] = {
        "type": "http",
        "method": "GET",
        "path": "/",
        "headers": [],
        "client": peer,
    }
    assert _is_loopback(Request(scope)) is loopback


def test_admin_ignores_forwarded_headers(ehr: Server) -> None:
    # A proxy header cannot make a call loopback or not: only the socket peer counts.
    ok = ehr.http.get(
        f"{ehr.base}/_admin/grants",
        headers={"X-Forwarded-For": "203.0.113.9", "X-Admin-Secret": ehr.admin_secret},
    )
    assert ok.status_code == 200
