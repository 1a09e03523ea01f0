"""SMART standalone launch over real sockets: discovery, login + consent, token, refresh, revoke.

Each test drives the sandbox authorization server the way a browser and an app would (plain HTTP
forms), and checks the spec's MUSTs: PKCE S256 only, exact redirect_uri and aud, state echo,
single-use codes, refresh rotation with reuse detection, expiry, introspection and revocation.
"""

import time
import urllib.parse

import jwt
import pytest

from medblocks_pipelines_tests.sandbox_servers.helpers import (
    REDIRECT,
    AuthRequest,
    Server,
    authorize_until_login,
    consent,
    exchange,
    get_code,
    login,
    redirect_params,
    register_public,
    standalone_token,
)


def test_smart_configuration_is_json_whatever_accept(ehr: Server) -> None:
    resp = ehr.http.get(
        f"{ehr.fhir}/.well-known/smart-configuration", headers={"Accept": "text/html"}
    )
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("application/json")
    conf = resp.json()
    for cap in (
        "launch-standalone",
        "launch-ehr",
        "client-public",
        "client-confidential-asymmetric",
        "context-standalone-patient",
        "permission-offline",
        "permission-v1",
        "permission-v2",
    ):
        assert cap in conf["capabilities"]
    assert conf["code_challenge_methods_supported"] == ["S256"]
    assert conf["token_endpoint"].startswith("http://127.0.0.1:")
    assert set(conf["token_endpoint_auth_signing_alg_values_supported"]) >= {"RS384", "ES384"}


def test_full_standalone_launch_through_consent_page(ehr: Server) -> None:
    register_public(ehr)
    req = AuthRequest()
    page = authorize_until_login(ehr, req)
    bad = login(ehr, page, "alice", "wrong")
    assert bad.status_code == 401 and "Wrong username or password" in bad.text
    consent_page = login(ehr, page, "alice", "alice-pw-123")
    assert consent_page.status_code == 200
    assert "Alice Smith" in consent_page.text
    assert consent_page.headers["x-frame-options"] == "DENY"
    assert "Read, search all record types of this patient" in consent_page.text
    assert consent_page.headers["cache-control"] == "no-store"
    params = redirect_params(consent(ehr, consent_page))
    assert params["state"] == req.state and "code" in params
    resp = exchange(ehr, req, params["code"])
    assert resp.status_code == 200, resp.text
    assert resp.headers["cache-control"] == "no-store" and resp.headers["pragma"] == "no-cache"
    body = resp.json()
    assert body["token_type"] == "Bearer" and body["patient"] == "p1"
    assert set(body["scope"].split()) == set(req.scope.split())
    assert body["expires_in"] > 0 and body["refresh_token"]
    # id_token: RS256, verifiable with the published JWKS, fhirUser of the logged-in patient.
    oidc = ehr.http.get(f"{ehr.smart()['issuer']}/.well-known/openid-configuration").json()
    jwks = ehr.http.get(oidc["jwks_uri"]).json()
    header = jwt.get_unverified_header(body["id_token"])
    key = next(k for k in jwks["keys"] if k["kid"] == header["kid"])
    claims = jwt.decode(
        body["id_token"],
        jwt.PyJWK(key).key,
        algorithms=["RS256"],
        audience="app",
        issuer=oidc["issuer"],
    )
    assert claims["fhirUser"] == f"{ehr.fhir}/Patient/p1"
    # The token works, for this patient.
    auth = {"Authorization": f"Bearer {body['access_token']}"}
    assert ehr.http.get(f"{ehr.fhir}/Patient/p1", headers=auth).status_code == 200


def test_user_can_narrow_scopes_on_consent_page(ehr: Server) -> None:
    register_public(ehr)
    req = AuthRequest(scope="launch/patient patient/Patient.rs patient/Observation.rs")
    body = standalone_token(ehr, req, scopes=["launch/patient", "patient/Patient.rs"])
    assert body["scope"] == "launch/patient patient/Patient.rs"
    assert "refresh_token" not in body  # no offline_access/online_access asked
    auth = {"Authorization": f"Bearer {body['access_token']}"}
    denied = ehr.http.get(f"{ehr.fhir}/Observation", headers=auth)
    assert denied.status_code == 403
    assert 'error="insufficient_scope"' in denied.headers["www-authenticate"]


def test_deny_redirects_with_access_denied_and_state(ehr: Server) -> None:
    register_public(ehr)
    req = AuthRequest()
    consent_page = login(ehr, authorize_until_login(ehr, req), "alice", "alice-pw-123")
    params = redirect_params(consent(ehr, consent_page, decision="deny"))
    assert params["error"] == "access_denied" and params["state"] == req.state
    assert "code" not in params


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"method": "plain"}, "invalid_request"),  # plain PKCE refused
        ({"method": ""}, "invalid_request"),  # PKCE is required
        ({"aud": "http://127.0.0.1:1/other/fhir"}, "invalid_request"),  # wrong aud
        ({"aud": "__BASE__/"}, "invalid_request"),  # aud must match exactly
        ({"scope": "nonsense/scope"}, "invalid_scope"),  # nothing grantable
    ],
)
def test_authorize_rejections_redirect_with_error_and_state(
    ehr: Server, change: dict, error: str
) -> None:
    register_public(ehr)
    if change.get("aud") == "__BASE__/":
        change = {"aud": ehr.fhir + "/"}
    req = AuthRequest(**change)
    if req.method == "plain":
        req.challenge = req.verifier[:43]
    resp = ehr.http.get(ehr.smart()["authorization_endpoint"], params=req.params(ehr))
    params = redirect_params(resp)
    assert params["error"] == error and params["state"] == req.state


def test_wrong_redirect_uri_or_client_never_redirects(ehr: Server) -> None:
    register_public(ehr)
    for req in (
        AuthRequest(redirect_uri=REDIRECT + "/evil"),
        AuthRequest(redirect_uri="http://127.0.0.1:9/call"),
        AuthRequest(client_id="nobody"),
    ):
        resp = ehr.http.get(ehr.smart()["authorization_endpoint"], params=req.params(ehr))
        assert resp.status_code == 400 and "location" not in resp.headers


def test_authorize_post_is_supported(ehr: Server) -> None:
    register_public(ehr)
    req = AuthRequest()
    resp = ehr.http.post(ehr.smart()["authorization_endpoint"], data=req.params(ehr))
    assert resp.status_code == 302 and "/login?" in resp.headers["location"]


def test_bad_verifier_wrong_redirect_and_reused_code(ehr: Server) -> None:
    register_public(ehr)
    req = AuthRequest()
    code = get_code(ehr, req)
    other_verifier = AuthRequest().verifier
    bad = exchange(ehr, req, code, code_verifier=other_verifier)
    assert bad.status_code == 400 and bad.json()["error"] == "invalid_grant"
    # The code was burnt by the failed attempt: even the right verifier fails now.
    assert exchange(ehr, req, code).json()["error"] == "invalid_grant"

    code2 = get_code(ehr, req)
    wrong_redirect = exchange(ehr, req, code2, redirect_uri=REDIRECT + "x")
    assert wrong_redirect.json()["error"] == "invalid_grant"

    code3 = get_code(ehr, req)
    first = exchange(ehr, req, code3)
    assert first.status_code == 200
    again = exchange(ehr, req, code3)
    assert again.status_code == 400 and again.json()["error"] == "invalid_grant"
    # A replayed code revokes what it issued (RFC 6749 §4.1.2).
    auth = {"Authorization": f"Bearer {first.json()['access_token']}"}
    assert ehr.http.get(f"{ehr.fhir}/Patient/p1", headers=auth).status_code == 401


def test_expired_code_is_refused(ehr: Server) -> None:
    register_public(ehr)
    ehr.auth.config.code_lifetime = 0
    req = AuthRequest()
    code = get_code(ehr, req)
    assert exchange(ehr, req, code).json()["error"] == "invalid_grant"


def test_token_endpoint_needs_form_and_known_public_client(ehr: Server) -> None:
    register_public(ehr)
    req = AuthRequest()
    code = get_code(ehr, req)
    url = ehr.smart()["token_endpoint"]
    as_json = ehr.http.post(url, json={"grant_type": "authorization_code", "code": code})
    assert as_json.status_code == 400 and as_json.json()["error"] == "invalid_request"
    unknown = exchange(ehr, req, code, client_id="someone-else")
    assert unknown.status_code == 401 and unknown.json()["error"] == "invalid_client"


def test_refresh_rotation_and_reuse_detection_revokes_grant(ehr: Server) -> None:
    register_public(ehr)
    first = standalone_token(ehr)
    url = ehr.smart()["token_endpoint"]

    def refresh(token: str, **extra: str) -> dict:
        return ehr.http.post(
            url,
            data={
                "grant_type": "refresh_token",
                "refresh_token": token,
                "client_id": "app",
                **extra,
            },
        ).json()

    second = refresh(first["refresh_token"])
    assert second["refresh_token"] != first["refresh_token"] and second["expires_in"] > 0
    assert second["patient"] == "p1"
    narrower = refresh(second["refresh_token"], scope="patient/*.rs")
    assert narrower["scope"] == "patient/*.rs"
    wider = refresh(narrower["refresh_token"], scope="patient/*.rs user/*.rs")
    assert wider["error"] == "invalid_scope"
    # Replay of a rotated-out token: invalid_grant and the whole grant dies.
    replay = refresh(first["refresh_token"])
    assert replay["error"] == "invalid_grant"
    assert refresh(narrower["refresh_token"])["error"] == "invalid_grant"
    auth = {"Authorization": f"Bearer {narrower['access_token']}"}
    assert ehr.http.get(f"{ehr.fhir}/Patient/p1", headers=auth).status_code == 401


def test_expired_access_token_gets_401_with_invalid_token(ehr: Server) -> None:
    register_public(ehr)
    ehr.auth.config.access_token_lifetime = 1
    body = standalone_token(ehr)
    auth = {"Authorization": f"Bearer {body['access_token']}"}
    assert ehr.http.get(f"{ehr.fhir}/Patient/p1", headers=auth).status_code == 200
    time.sleep(1.1)
    resp = ehr.http.get(f"{ehr.fhir}/Patient/p1", headers=auth)
    assert resp.status_code == 401
    assert 'error="invalid_token"' in resp.headers["www-authenticate"]
    assert resp.json()["resourceType"] == "OperationOutcome"


def test_admin_expire_tokens_and_revoke_grant(ehr: Server) -> None:
    register_public(ehr)
    body = standalone_token(ehr)
    auth = {"Authorization": f"Bearer {body['access_token']}"}
    assert ehr.admin("expire-tokens", {"client_id": "app"}).json() == {"expired": 1}
    assert ehr.http.get(f"{ehr.fhir}/Patient/p1", headers=auth).status_code == 401
    assert ehr.admin("revoke-grant", {"client_id": "app"}).json() == {"revoked": 1}
    refreshed = ehr.http.post(
        ehr.smart()["token_endpoint"],
        data={
            "grant_type": "refresh_token",
            "refresh_token": body["refresh_token"],
            "client_id": "app",
        },
    )
    assert refreshed.json()["error"] == "invalid_grant"


def test_admin_api_needs_secret(ehr: Server) -> None:
    assert ehr.admin("grants", secret="wrong").status_code == 403
    assert ehr.admin("grants", secret="").status_code == 403
    assert ehr.admin("grants").status_code == 200


def test_introspection_and_revocation(ehr: Server) -> None:
    register_public(ehr)
    body = standalone_token(ehr)
    smart = ehr.smart()
    bearer = {"Authorization": f"Bearer {body['access_token']}"}
    # Introspection needs an authorised caller.
    anon = ehr.http.post(smart["introspection_endpoint"], data={"token": body["access_token"]})
    assert anon.status_code == 401
    info = ehr.http.post(
        smart["introspection_endpoint"], data={"token": body["access_token"]}, headers=bearer
    ).json()
    assert info["active"] is True and info["client_id"] == "app" and info["patient"] == "p1"
    assert info["scope"] == body["scope"] and info["exp"] > time.time()
    assert ehr.http.post(
        smart["introspection_endpoint"], data={"token": "nope"}, headers=bearer
    ).json() == {"active": False}
    # Revoking the refresh token ends the grant (and its access tokens).
    rv = ehr.http.post(
        smart["revocation_endpoint"], data={"token": body["refresh_token"], "client_id": "app"}
    )
    assert rv.status_code == 200
    assert ehr.http.get(f"{ehr.fhir}/Patient/p1", headers=bearer).status_code == 401
    # Unknown tokens still answer 200 (RFC 7009 §2.2).
    assert (
        ehr.http.post(
            smart["revocation_endpoint"], data={"token": "whatever", "client_id": "app"}
        ).status_code
        == 200
    )


def test_v1_scopes_and_wildcards_are_understood(ehr: Server) -> None:
    register_public(ehr)
    req = AuthRequest(scope="launch/patient patient/Observation.read patient/Patient.read")
    body = standalone_token(ehr, req)
    assert body["scope"] == "launch/patient patient/Observation.read patient/Patient.read"
    auth = {"Authorization": f"Bearer {body['access_token']}"}
    assert ehr.http.get(f"{ehr.fhir}/Observation", headers=auth).status_code == 200
    assert ehr.http.get(f"{ehr.fhir}/Condition", headers=auth).status_code == 403


def test_write_scopes_are_cut_down_to_read(ehr: Server) -> None:
    register_public(ehr)
    req = AuthRequest(scope="launch/patient patient/*.cruds patient/Observation.write")
    body = standalone_token(ehr, req)
    # The server is read-only: .cruds is narrowed to .rs; .write has nothing left.
    assert body["scope"] == "launch/patient patient/*.rs"


def test_ehr_launch_with_context(ehr: Server) -> None:
    register_public(ehr)
    minted = ehr.admin(
        "launch",
        {
            "patient": "p2",
            "encounter": "enc1",
            "user": "Practitioner/dr1",
            "need_patient_banner": False,
        },
    )
    assert minted.status_code == 201
    launch = minted.json()["launch"]
    assert minted.json()["iss"] == ehr.fhir
    req = AuthRequest(scope="launch openid fhirUser patient/*.rs", extra={"launch": launch})
    resp = ehr.http.get(ehr.smart()["authorization_endpoint"], params=req.params(ehr))
    # The EHR user is signed in already: straight to consent.
    assert resp.status_code == 200 and "Allow" in resp.text
    params = redirect_params(consent(ehr, resp))
    body = exchange(ehr, req, params["code"]).json()
    assert body["patient"] == "p2" and body["encounter"] == "enc1"
    assert body["need_patient_banner"] is False and body["tenant"] == "mercy"
    claims = jwt.decode(body["id_token"], options={"verify_signature": False})
    assert claims["fhirUser"].endswith("/Practitioner/dr1")
    # The launch id is single use.
    again = ehr.http.get(
        ehr.smart()["authorization_endpoint"],
        params=AuthRequest(scope="launch patient/*.rs", extra={"launch": launch}).params(ehr),
    )
    assert redirect_params(again)["error"] == "invalid_request"


def test_ehr_launch_auto_approve_and_missing_launch_scope(ehr: Server) -> None:
    register_public(ehr)
    launch = ehr.admin(
        "launch", {"patient": "p1", "user": "Practitioner/dr1", "auto_approve": True}
    ).json()["launch"]
    no_scope = AuthRequest(scope="patient/*.rs", extra={"launch": launch})
    resp = ehr.http.get(ehr.smart()["authorization_endpoint"], params=no_scope.params(ehr))
    assert redirect_params(resp)["error"] == "invalid_request"
    req = AuthRequest(scope="launch patient/*.rs", extra={"launch": launch})
    resp = ehr.http.get(ehr.smart()["authorization_endpoint"], params=req.params(ehr))
    params = redirect_params(resp)
    assert params["state"] == req.state
    assert exchange(ehr, req, params["code"]).json()["patient"] == "p1"


def test_repeated_parameter_is_refused(ehr: Server) -> None:
    register_public(ehr)
    req = AuthRequest()
    query = urllib.parse.urlencode(list(req.params(ehr).items()) + [("state", "x")])
    resp = ehr.http.get(f"{ehr.smart()['authorization_endpoint']}?{query}")
    assert resp.status_code == 400
