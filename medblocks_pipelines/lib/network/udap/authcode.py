"""UDAP consumer-facing flow: ``authorization_code`` with PKCE (TEFCA IAS Mode 1).

The individual logs in at the responding node's authorization server (Facilitated FHIR "Mode 1":
the responder returns its endpoint, the patient authenticates there). We build the authorization
request (``response_type=code``, ``state``, PKCE S256) and exchange the code with ``udap=1`` and a
``private_key_jwt`` assertion that carries no extensions (UDAP Security 2.0 §4). The client must
have been registered with ``grant_types: ["authorization_code"]`` plus ``redirect_uris`` and
``logo_uri``. Serving the redirect URI is the web layer's job (not wired here).
"""

import base64
import hashlib
import secrets
import time
import urllib.parse
from dataclasses import dataclass

import httpx

from medblocks_pipelines.lib.errors import AuthError, ProtocolError
from medblocks_pipelines.lib.network.udap.certs import VaultSigner
from medblocks_pipelines.lib.network.udap.discovery import UdapMetadata
from medblocks_pipelines.lib.network.udap.registration import Registration
from medblocks_pipelines.lib.network.udap.token import JWT_BEARER, Token, client_assertion


@dataclass(frozen=True)
class AuthorizationRequest:
    """Where to send the user, and what to keep until the callback (never log ``verifier``)."""

    url: str
    state: str
    verifier: str
    redirect_uri: str

    def __repr__(self) -> str:
        return f"AuthorizationRequest(state={self.state[:6]}...)"


def authorization_request(
    meta: UdapMetadata, reg: Registration, *, redirect_uri: str, scope: str
) -> AuthorizationRequest:
    """The authorization URL with ``state`` and a PKCE S256 challenge."""
    if not meta.authorization_endpoint:
        raise ProtocolError("server has no authorization_endpoint")
    if "authorization_code" not in reg.grant_types:
        raise ProtocolError("this registration is not for authorization_code")
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=")
    state = secrets.token_urlsafe(24)
    query = {
        "response_type": "code",
        "client_id": reg.client_id,
        "redirect_uri": redirect_uri,
        "scope": scope,
        "state": state,
        "code_challenge": challenge.decode(),
        "code_challenge_method": "S256",
    }
    url = f"{meta.authorization_endpoint}?{urllib.parse.urlencode(query)}"
    return AuthorizationRequest(url, state, verifier, redirect_uri)


def exchange_code(
    http: httpx.Client,
    meta: UdapMetadata,
    signer: VaultSigner,
    reg: Registration,
    request: AuthorizationRequest,
    callback_url: str,
    *,
    timeout: float = 15.0,
) -> tuple[Token, str | None]:
    """Check ``state`` on the callback, exchange the code; returns (token, patient id or None)."""
    params = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(callback_url).query))
    if params.get("state") != request.state:
        raise AuthError("authorization callback state does not match")
    if "error" in params or not params.get("code"):
        raise AuthError(f"authorization refused: {params.get('error', 'no code')}")
    form = {
        "grant_type": "authorization_code",
        "code": params["code"],
        "redirect_uri": request.redirect_uri,
        "code_verifier": request.verifier,
        "udap": "1",
        "client_assertion_type": JWT_BEARER,
        "client_assertion": client_assertion(
            signer, client_id=reg.client_id, token_url=meta.token_endpoint, extensions=None
        ),
    }
    resp = http.post(meta.token_endpoint, data=form, timeout=timeout)
    doc = resp.json() if "json" in resp.headers.get("content-type", "") else {}
    if resp.status_code != 200 or not isinstance(doc.get("access_token"), str):
        raise AuthError(f"code exchange refused: HTTP {resp.status_code} {doc.get('error', '')}")
    now = time.time()
    life = float(doc.get("expires_in") or 300)
    tok = Token(doc["access_token"], now + min(life, 3600), str(doc.get("scope") or ""), "", now)
    patient = doc.get("patient")
    return tok, str(patient) if patient else None
