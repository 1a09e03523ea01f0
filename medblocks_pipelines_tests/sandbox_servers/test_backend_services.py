"""SMART Backend Services (client_credentials + private_key_jwt) against the sandbox AS.

Keys come from an inline JWKS or from a JWKS URL served by a second real server; the server must
refuse what SPECS §2 says it must: expired or too long-lived assertions, reused jti, wrong aud,
HS256/none/RS256, unknown kid, jku off the allowlist, scopes beyond the registration.
"""

import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from medblocks_pipelines_tests.sandbox_servers.helpers import (
    JWT_BEARER,
    KeyPair,
    Server,
    assertion,
    backend_token,
    make_key,
)
from medblocks_sandbox.run import serve


@pytest.fixture(scope="module")
def rsa_key() -> KeyPair:
    return make_key("RS384", "rsa-1")


@pytest.fixture(scope="module")
def ec_key() -> KeyPair:
    return make_key("ES384", "ec-1")


class JwksHost:
    """A real JWKS URL: serves `keys`, counts fetches, with a settable Cache-Control."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.fetches = 0
        self.cache_control = "max-age=0"
        self.url = ""

    def app(self, base: str) -> Starlette:
        self.url = f"{base}/jwks.json"

        async def jwks(request: Any) -> JSONResponse:
            self.fetches += 1
            return JSONResponse({"keys": self.keys}, headers={"Cache-Control": self.cache_control})

        return Starlette(routes=[Route("/jwks.json", jwks)])


@pytest.fixture
def jwks_host() -> Iterator[JwksHost]:
    host = JwksHost()
    with serve(host.app):
        yield host


def _register(ehr: Server, client_id: str, **fields: Any) -> Any:
    return ehr.admin(
        "clients",
        {
            "client_id": client_id,
            "token_endpoint_auth_method": "private_key_jwt",
            "scopes": ["system/*.rs"],
            **fields,
        },
    )


def test_inline_jwks_rs384_and_es384(ehr: Server, rsa_key: KeyPair, ec_key: KeyPair) -> None:
    assert (
        _register(ehr, "svc", jwks={"keys": [rsa_key.public_jwk, ec_key.public_jwk]}).status_code
        == 201
    )
    for key in (rsa_key, ec_key):
        resp = backend_token(ehr, "svc", key, scope="system/Patient.rs system/Observation.read")
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["token_type"].lower() == "bearer" and body["expires_in"] <= 300
        assert body["scope"] == "system/Patient.rs system/Observation.read"
        assert "refresh_token" not in body
        auth = {"Authorization": f"Bearer {body['access_token']}"}
        # System scope: every patient; but only the granted types.
        pats = ehr.http.get(f"{ehr.fhir}/Patient", headers=auth).json()
        assert pats["total"] == 2
        assert ehr.http.get(f"{ehr.fhir}/Condition", headers=auth).status_code == 403


@pytest.mark.parametrize(
    ("case", "kwargs"),
    [
        ("expired", {"exp_in": -5}),
        ("too long-lived", {"exp_in": 600}),
        ("wrong aud", {"claims": {"aud": "http://127.0.0.1:1/token"}}),
        ("sub differs", {"claims": {"sub": "someone"}}),
        ("no typ", {"headers": {"typ": None}}),
        ("unknown kid", {"headers": {"kid": "nope"}}),
        ("jku not allow-listed", {"headers": {"jku": "http://127.0.0.1:9/evil.json"}}),
    ],
)
def test_bad_assertions_are_invalid_client(
    ehr: Server, rsa_key: KeyPair, case: str, kwargs: dict
) -> None:
    _register(ehr, "svc", jwks={"keys": [rsa_key.public_jwk]})
    if kwargs.get("headers", {}).get("typ", "x") is None:
        token_url = ehr.smart()["token_endpoint"]
        now = int(time.time())
        raw = jwt.encode(
            {"iss": "svc", "sub": "svc", "aud": token_url, "exp": now + 60, "jti": f"j-{now}"},
            rsa_key.private,
            algorithm="RS384",
            headers={"kid": rsa_key.kid, "typ": None},
        )
        resp = ehr.http.post(
            token_url,
            data={
                "grant_type": "client_credentials",
                "scope": "system/*.rs",
                "client_assertion_type": JWT_BEARER,
                "client_assertion": raw,
            },
        )
    else:
        resp = backend_token(ehr, "svc", rsa_key, **kwargs)
    assert resp.status_code == 401, (case, resp.text)
    assert resp.json()["error"] == "invalid_client"


def test_reused_jti_is_refused(ehr: Server, rsa_key: KeyPair) -> None:
    _register(ehr, "svc", jwks={"keys": [rsa_key.public_jwk]})
    assert backend_token(ehr, "svc", rsa_key, jti="once").status_code == 200
    again = backend_token(ehr, "svc", rsa_key, jti="once")
    assert again.status_code == 401 and again.json()["error"] == "invalid_client"


@pytest.mark.parametrize("alg", ["HS256", "none", "RS256"])
def test_wrong_algorithms_are_refused(ehr: Server, rsa_key: KeyPair, alg: str) -> None:
    _register(ehr, "svc", jwks={"keys": [rsa_key.public_jwk]})
    token_url = ehr.smart()["token_endpoint"]
    now = int(time.time())
    claims = {"iss": "svc", "sub": "svc", "aud": token_url, "exp": now + 60, "jti": f"{alg}-j"}
    if alg == "HS256":
        # The classic confusion attack: HMAC keyed with the public key's bytes.
        raw = jwt.encode(
            claims,
            "a-shared-secret-that-is-long-enough-for-hs256",
            algorithm=alg,
            headers={"kid": rsa_key.kid, "typ": "JWT"},
        )
    elif alg == "none":
        # An unsigned token: header.payload. with an empty signature (RFC 7519 §6).
        raw = jwt.encode(claims, "", algorithm="none", headers={"kid": rsa_key.kid, "typ": "JWT"})
    else:
        raw = assertion(rsa_key, "svc", token_url, alg="RS256")
    resp = ehr.http.post(
        token_url,
        data={
            "grant_type": "client_credentials",
            "scope": "system/*.rs",
            "client_assertion_type": JWT_BEARER,
            "client_assertion": raw,
        },
    )
    assert resp.status_code == 401 and resp.json()["error"] == "invalid_client"


def test_key_of_the_wrong_client_fails_signature(ehr: Server, rsa_key: KeyPair) -> None:
    _register(ehr, "svc", jwks={"keys": [rsa_key.public_jwk]})
    impostor = make_key("RS384", rsa_key.kid)  # same kid, different key
    resp = backend_token(ehr, "svc", impostor)
    assert resp.status_code == 401 and resp.json()["error"] == "invalid_client"


def test_scope_beyond_registration_is_invalid_scope(ehr: Server, rsa_key: KeyPair) -> None:
    _register(ehr, "svc", jwks={"keys": [rsa_key.public_jwk]}, scopes=["system/Patient.rs"])
    resp = backend_token(ehr, "svc", rsa_key, scope="system/Patient.rs system/Observation.rs")
    assert resp.status_code == 400 and resp.json()["error"] == "invalid_scope"
    patient_scope = backend_token(ehr, "svc", rsa_key, scope="patient/*.rs")
    assert patient_scope.json()["error"] == "invalid_scope"


def test_public_client_cannot_use_client_credentials(ehr: Server) -> None:
    ehr.admin(
        "clients",
        {
            "client_id": "pub",
            "token_endpoint_auth_method": "none",
            "redirect_uris": ["http://127.0.0.1:9/cb"],
        },
    )
    resp = ehr.http.post(
        ehr.smart()["token_endpoint"],
        data={"grant_type": "client_credentials", "scope": "system/*.rs", "client_id": "pub"},
    )
    assert resp.json()["error"] == "unauthorized_client"


def test_jwks_url_and_jku_with_cache_control(
    ehr: Server, jwks_host: JwksHost, rsa_key: KeyPair, ec_key: KeyPair
) -> None:
    jwks_host.keys = [rsa_key.public_jwk]
    assert _register(ehr, "svc", jwks_uri=jwks_host.url).status_code == 201
    assert backend_token(ehr, "svc", rsa_key).status_code == 200
    assert backend_token(ehr, "svc", rsa_key).status_code == 200
    assert jwks_host.fetches == 2  # max-age=0: no caching
    # Key rotation: publish the new kid first, then use it.
    jwks_host.keys = [rsa_key.public_jwk, ec_key.public_jwk]
    jwks_host.cache_control = "max-age=120"
    assert backend_token(ehr, "svc", ec_key).status_code == 200
    assert backend_token(ehr, "svc", ec_key).status_code == 200
    assert jwks_host.fetches == 3  # cached for the allowed time
    # jku equal to the registered JWKS URL is allowed.
    with_jku = backend_token(ehr, "svc", rsa_key, headers={"jku": jwks_host.url})
    assert with_jku.status_code == 200


def test_epic_like_profile_requires_jwks_url(ehr: Server, rsa_key: KeyPair) -> None:
    ehr.auth.config.require_jwks_url = True
    refused = _register(ehr, "svc", jwks={"keys": [rsa_key.public_jwk]})
    assert refused.status_code == 400
    assert "JWKS URL" in refused.json()["issue"][0]["diagnostics"]


def test_registration_refuses_private_keys_and_keys_without_kid(
    ehr: Server, rsa_key: KeyPair
) -> None:
    import json as _json

    private = _json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.private))
    private["kid"] = "k"
    assert _register(ehr, "svc", jwks={"keys": [private]}).status_code == 400
    no_kid = dict(rsa_key.public_jwk)
    no_kid.pop("kid")
    assert _register(ehr, "svc", jwks={"keys": [no_kid]}).status_code == 400


def test_asymmetric_client_in_authorization_code_flow(ehr: Server, rsa_key: KeyPair) -> None:
    from medblocks_pipelines_tests.sandbox_servers.helpers import REDIRECT, AuthRequest, get_code

    _register(
        ehr,
        "conf",
        jwks={"keys": [rsa_key.public_jwk]},
        redirect_uris=[REDIRECT],
        scopes=["launch/patient", "patient/*.rs", "offline_access"],
    )
    req = AuthRequest(client_id="conf", scope="launch/patient patient/*.rs offline_access")
    code = get_code(ehr, req)
    token_url = ehr.smart()["token_endpoint"]
    base = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT,
        "code_verifier": req.verifier,
    }
    # Without its assertion the confidential client is not authenticated.
    no_auth = ehr.http.post(token_url, data={**base, "client_id": "conf"})
    assert no_auth.status_code == 401
    code = get_code(ehr, req)
    ok = ehr.http.post(
        token_url,
        data={
            **base,
            "code": code,
            "client_assertion_type": JWT_BEARER,
            "client_assertion": assertion(rsa_key, "conf", token_url),
        },
    )
    assert ok.status_code == 200, ok.text
    assert ok.json()["patient"] == "p1" and ok.json()["refresh_token"]


def test_symmetric_client_basic_auth(ehr: Server) -> None:
    import base64

    from medblocks_pipelines_tests.sandbox_servers.helpers import REDIRECT, AuthRequest, get_code

    reg = ehr.admin(
        "clients",
        {
            "client_id": "sym",
            "token_endpoint_auth_method": "client_secret_basic",
            "redirect_uris": [REDIRECT],
        },
    ).json()
    secret = reg["client_secret"]
    req = AuthRequest(client_id="sym")
    code = get_code(ehr, req)
    data = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT,
        "code_verifier": req.verifier,
    }
    wrong = base64.b64encode(b"sym:wrong").decode()
    resp = ehr.http.post(
        ehr.smart()["token_endpoint"], data=data, headers={"Authorization": f"Basic {wrong}"}
    )
    assert resp.status_code == 401 and resp.headers["www-authenticate"].startswith("Basic")
    code = get_code(ehr, req)
    good = base64.b64encode(f"sym:{secret}".encode()).decode()
    resp = ehr.http.post(
        ehr.smart()["token_endpoint"],
        data={**data, "code": code},
        headers={"Authorization": f"Basic {good}"},
    )
    assert resp.status_code == 200, resp.text
