"""The sandbox node's ``authorization_code`` flow (IAS Mode 1): authorize + PKCE S256 + code grant.

There is no login page: the sandbox stands in for the individual's login at the responder and
binds the code to ``login_hint`` (a patient id of the node) or to the node's first patient. It
refuses: an unknown client or one not registered for ``authorization_code``, a redirect_uri not
registered, a missing ``state``, no S256 challenge; at the token endpoint a reused or unknown
code, another redirect_uri, a wrong ``code_verifier``. The token it issues is bound to that
patient: the node refuses searches for anyone else.
"""

import base64
import hashlib
import secrets
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response

from medblocks_sandbox.udap.authz import IssuedToken, Refused, UdapAuthServer


@dataclass
class Code:
    """An issued authorization code."""

    client_id: str
    redirect_uri: str
    challenge: str
    patient: str
    scope: str
    expires_at: float


async def authorize(server: UdapAuthServer, request: Request, patients: list[str]) -> Response:
    """``GET /udap/authorize``: redirect back with a code (or a 400 for a bad client/redirect)."""
    q = request.query_params
    with server.state.lock:
        record = server.state.clients.get(q.get("client_id", ""))
    if record is None or "authorization_code" not in record["grant_types"]:
        return JSONResponse({"error": "unauthorized_client"}, status_code=400)
    redirect = q.get("redirect_uri", "")
    if redirect not in record.get("redirect_uris", []):
        return JSONResponse({"error": "invalid_request", "why": "redirect_uri"}, status_code=400)

    def back(**params: str) -> Response:
        sep = "&" if "?" in redirect else "?"
        return RedirectResponse(f"{redirect}{sep}{urllib.parse.urlencode(params)}", 302)

    state = q.get("state")
    if not state:
        return back(error="invalid_request")
    if q.get("response_type") != "code" or q.get("code_challenge_method") != "S256":
        return back(error="invalid_request", state=state)
    if not q.get("code_challenge"):
        return back(error="invalid_request", state=state)
    patient = q.get("login_hint") or (patients[0] if patients else "")
    if patient not in patients:
        return back(error="access_denied", state=state)
    code = secrets.token_urlsafe(24)
    with server.state.lock:
        server.state.codes[code] = Code(
            record["client_id"],
            redirect,
            q["code_challenge"],
            patient,
            q.get("scope", "patient/*.rs"),
            time.time() + 60,
        )
    return back(code=code, state=state)


def code_grant(server: UdapAuthServer, form: Any, record: dict[str, Any]) -> Response:
    """The token endpoint's ``authorization_code`` branch (the assertion is already checked)."""
    if "authorization_code" not in record["grant_types"]:
        raise Refused("unauthorized_client", "client not registered for authorization_code")
    with server.state.lock:
        code = server.state.codes.pop(str(form.get("code", "")), None)  # single use
    if code is None or code.expires_at < time.time() or code.client_id != record["client_id"]:
        raise Refused("invalid_grant", "unknown, used or expired code")
    if form.get("redirect_uri") != code.redirect_uri:
        raise Refused("invalid_grant", "redirect_uri differs")
    verifier = str(form.get("code_verifier", ""))
    digest = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=")
    if digest.decode() != code.challenge:
        raise Refused("invalid_grant", "PKCE verification failed")
    info = IssuedToken(
        record["client_id"],
        str(record["purpose"]),
        "",
        time.time() + server.token_lifetime,
        code.scope,
        patient=code.patient,
    )
    tok = server.new_token(info)
    server.state.bump("token")
    return JSONResponse(
        {
            "access_token": tok,
            "token_type": "Bearer",
            "expires_in": server.token_lifetime,
            "scope": code.scope,
            "patient": code.patient,
        },
        headers={"Cache-Control": "no-store"},
    )
