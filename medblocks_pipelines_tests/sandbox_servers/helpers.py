"""Test helpers: a client's side of SMART (PKCE, the login + consent forms, client assertions).

Written from the spec (SPECS §1, §2), independent of the server code under test.
"""

import base64
import hashlib
import json
import re
import secrets
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
REDIRECT = "http://127.0.0.1:9/callback"


@dataclass
class Server:
    """A running org app: its base URL, admin secret, in-process app and an HTTP client."""

    base: str
    admin_secret: str
    app: Any
    http: httpx.Client

    @property
    def fhir(self) -> str:
        return f"{self.base}/fhir"

    @property
    def auth(self) -> Any:
        return self.app.state.auth_server

    def admin(
        self, path: str, body: dict[str, Any] | None = None, secret: str | None = None
    ) -> httpx.Response:
        headers = {"X-Admin-Secret": self.admin_secret if secret is None else secret}
        url = f"{self.base}/_admin/{path}"
        if body is None:
            return self.http.get(url, headers=headers)
        return self.http.post(url, json=body, headers=headers)

    def smart(self) -> dict[str, Any]:
        return self.http.get(f"{self.fhir}/.well-known/smart-configuration").json()


def pkce() -> tuple[str, str]:
    """(verifier, S256 challenge) per RFC 7636."""
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def register_public(server: Server, client_id: str = "app", **extra: Any) -> dict[str, Any]:
    body = {
        "client_id": client_id,
        "token_endpoint_auth_method": "none",
        "redirect_uris": [REDIRECT],
        **extra,
    }
    resp = server.admin("clients", body)
    assert resp.status_code == 201, resp.text
    return resp.json()


def hidden(page: str, name: str) -> str:
    match = re.search(rf'name="{name}" value="([^"]*)"', page)
    assert match, f"no hidden field {name}"
    return match.group(1)


def checked_scopes(page: str) -> list[str]:
    return re.findall(r'name="scope" value="([^"]*)" checked', page)


@dataclass
class AuthRequest:
    client_id: str = "app"
    scope: str = "launch/patient openid fhirUser offline_access patient/*.rs"
    redirect_uri: str = REDIRECT
    state: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    verifier: str = ""
    challenge: str = ""
    method: str = "S256"
    aud: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.verifier:
            self.verifier, self.challenge = pkce()

    def params(self, server: Server) -> dict[str, str]:
        return {
            "response_type": "code",
            "client_id": self.client_id,
            "redirect_uri": self.redirect_uri,
            "scope": self.scope,
            "state": self.state,
            "aud": self.aud if self.aud is not None else server.fhir,
            "code_challenge": self.challenge,
            "code_challenge_method": self.method,
            **self.extra,
        }


def redirect_params(resp: httpx.Response) -> dict[str, str]:
    assert resp.status_code == 302, (resp.status_code, resp.text[:300])
    location = resp.headers["location"]
    assert location.startswith(REDIRECT), location
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(location).query))


def authorize_until_login(server: Server, req: AuthRequest) -> httpx.Response:
    """GET authorize; returns the login page (after following the redirect to it)."""
    resp = server.http.get(server.smart()["authorization_endpoint"], params=req.params(server))
    assert resp.status_code == 302, (resp.status_code, resp.text[:300])
    page = server.http.get(resp.headers["location"])
    assert page.status_code == 200 and "password" in page.text
    return page


def login(server: Server, page: httpx.Response, username: str, password: str) -> httpx.Response:
    action = re.search(r'<form method="post" action="([^"]+)"', page.text)
    assert action
    return server.http.post(
        action.group(1),
        data={
            "request_id": hidden(page.text, "request_id"),
            "username": username,
            "password": password,
            "decision": "login",
        },
    )


def consent(
    server: Server, page: httpx.Response, decision: str = "approve", scopes: list[str] | None = None
) -> httpx.Response:
    action = re.search(r'<form method="post" action="([^"]+)"', page.text)
    assert action
    chosen = checked_scopes(page.text) if scopes is None else scopes
    data = {
        "request_id": hidden(page.text, "request_id"),
        "consent_token": hidden(page.text, "consent_token"),
        "decision": decision,
        "scope": chosen,
    }
    return server.http.post(action.group(1), data=data)


def get_code(
    server: Server,
    req: AuthRequest,
    username: str = "alice",
    password: str = "alice-pw-123",
    scopes: list[str] | None = None,
) -> str:
    page = authorize_until_login(server, req)
    consent_page = login(server, page, username, password)
    assert consent_page.status_code == 200, consent_page.text[:300]
    params = redirect_params(consent(server, consent_page, scopes=scopes))
    assert params["state"] == req.state
    return params["code"]


def exchange(server: Server, req: AuthRequest, code: str, **override: str) -> httpx.Response:
    data = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": req.redirect_uri,
        "code_verifier": req.verifier,
        "client_id": req.client_id,
        **override,
    }
    return server.http.post(server.smart()["token_endpoint"], data=data)


def standalone_token(server: Server, req: AuthRequest | None = None, **kw: Any) -> dict[str, Any]:
    req = req or AuthRequest()
    code = get_code(server, req, **kw)
    resp = exchange(server, req, code)
    assert resp.status_code == 200, resp.text
    return resp.json()


# -- backend services ----------------------------------------------------------------------------
@dataclass
class KeyPair:
    alg: str
    kid: str
    private: Any

    @property
    def public_jwk(self) -> dict[str, Any]:
        algo = (
            jwt.algorithms.RSAAlgorithm if self.alg.startswith("RS") else jwt.algorithms.ECAlgorithm
        )
        jwk = json.loads(algo.to_jwk(self.private.public_key()))
        jwk.update({"kid": self.kid, "alg": self.alg})
        return jwk


def make_key(alg: str = "RS384", kid: str | None = None) -> KeyPair:
    if alg.startswith("RS"):
        private: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        private = ec.generate_private_key(ec.SECP384R1())
    return KeyPair(alg, kid or secrets.token_hex(4), private)


def assertion(
    key: KeyPair,
    client_id: str,
    aud: str,
    *,
    exp_in: int = 240,
    jti: str | None = None,
    headers: dict[str, Any] | None = None,
    claims: dict[str, Any] | None = None,
    alg: str | None = None,
    signing_key: Any = None,
) -> str:
    now = int(time.time())
    body = {
        "iss": client_id,
        "sub": client_id,
        "aud": aud,
        "exp": now + exp_in,
        "iat": now,
        "jti": jti or secrets.token_hex(12),
        **(claims or {}),
    }
    head = {"kid": key.kid, "typ": "JWT", **(headers or {})}
    return jwt.encode(
        body,
        signing_key if signing_key is not None else key.private,
        algorithm=alg or key.alg,
        headers=head,
    )


def backend_token(
    server: Server, client_id: str, key: KeyPair, scope: str = "system/*.rs", **kw: Any
) -> httpx.Response:
    token_url = server.smart()["token_endpoint"]
    return server.http.post(
        token_url,
        data={
            "grant_type": "client_credentials",
            "scope": scope,
            "client_assertion_type": JWT_BEARER,
            "client_assertion": assertion(key, client_id, token_url, **kw),
        },
    )
