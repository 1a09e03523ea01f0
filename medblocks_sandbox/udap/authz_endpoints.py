"""The registration and token endpoints of :class:`~.authz.UdapAuthServer` (strict checks)."""

import time
import uuid
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from medblocks_sandbox.udap.authz import (
    BASIC_APP,
    XP_OID,
    IssuedToken,
    Refused,
    UdapAuthServer,
)

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


def _fragment(uri: str) -> str | None:
    return uri.split("#", 1)[1] if "#" in uri else None


def _refusal(server: UdapAuthServer, exc: Refused) -> Response:
    server.state.bump(f"refused:{exc.error}")
    server.state.bump(f"why:{exc.description}")
    body: dict[str, Any] = {"error": exc.error, "error_description": exc.description}
    if exc.extensions:
        body["extensions"] = exc.extensions
    return JSONResponse(
        body,
        status_code=exc.status,
        headers={"Cache-Control": "no-store"},
    )


def _check_certifications(server: UdapAuthServer, body: dict[str, Any], san: str) -> None:
    certs = body.get("certifications") or []
    if not isinstance(certs, list):
        raise Refused("invalid_client_metadata", "certifications must be a list")
    found = False
    for token in certs:
        if not isinstance(token, str):
            raise Refused("invalid_client_metadata", "certification is not a JWT")
        try:
            claims, _uris = server._verify(token, audience=None)  # no aud on a certification
        except Refused as exc:
            raise Refused("unapproved_software_statement", exc.description) from None
        if claims["iss"] != san:
            raise Refused("invalid_client_metadata", "certification issued by another client")
        if BASIC_APP not in (claims.get("certification_uris") or []):
            continue
        purposes = claims.get("exchange_purposes")
        if not isinstance(purposes, list) or len(purposes) != 1:
            raise Refused("invalid_client_metadata", "exactly one exchange purpose required")
        if purposes[0] != _fragment(san):
            raise Refused("invalid_client_metadata", "exchange purpose differs from the SAN XP")
        found = True
    if server.require_certification and not found:
        raise Refused("unapproved_software_statement", "TEFCA Basic App Certification required")


def _check_statement(claims: dict[str, Any], uris: list[str]) -> list[str]:
    if claims["iss"] != claims["sub"] or claims["iss"] not in uris:
        raise Refused("invalid_software_statement", "iss must equal sub and a SAN URI")
    grants = claims.get("grant_types")
    if not isinstance(grants, list):
        raise Refused("invalid_client_metadata", "grant_types missing")
    if grants:
        flows = {"authorization_code", "client_credentials"} & set(grants)
        if len(flows) != 1:
            raise Refused("invalid_client_metadata", "authorization_code XOR client_credentials")
        if "refresh_token" in grants and "authorization_code" not in grants:
            raise Refused("invalid_client_metadata", "refresh_token only with authorization_code")
        if "authorization_code" in grants:
            if not claims.get("redirect_uris") or not claims.get("logo_uri"):
                raise Refused("invalid_client_metadata", "redirect_uris and logo_uri required")
            if claims.get("response_types") != ["code"]:
                raise Refused("invalid_client_metadata", "response_types must be ['code']")
        if claims.get("token_endpoint_auth_method") != "private_key_jwt":
            raise Refused("invalid_client_metadata", "token_endpoint_auth_method")
        if not claims.get("client_name"):
            raise Refused("invalid_client_metadata", "client_name required")
        contacts = claims.get("contacts")
        if not isinstance(contacts, list) or not any(
            isinstance(c, str) and c.startswith("mailto:") for c in contacts
        ):
            raise Refused("invalid_client_metadata", "contacts needs a mailto: URI")
    return grants


async def register(server: UdapAuthServer, request: Request) -> Response:
    """``POST /udap/register``: 201 new, 200 update (same client_id), empty grants cancel."""
    try:
        try:
            body = await request.json()
        except ValueError:
            raise Refused("invalid_client_metadata", "body is not JSON") from None
        if not isinstance(body, dict) or body.get("udap") != "1":
            raise Refused("invalid_client_metadata", "udap must be '1'")
        statement = body.get("software_statement")
        if not isinstance(statement, str):
            raise Refused("invalid_software_statement", "software_statement missing")
        try:
            claims, uris = server._verify(statement, server.register_url)
        except Refused as exc:
            raise Refused("unapproved_software_statement", exc.description) from None
        grants = _check_statement(claims, uris)
        if set(grants) - {"refresh_token"} - set(server.grant_types):
            raise Refused("invalid_client_metadata", "grant type not supported here")
        san = str(claims["iss"])
        with server.state.lock:
            existing = server.state.by_san.get(san)
        if not grants:
            if existing is None:
                raise Refused("invalid_client_metadata", "nothing to cancel")
            with server.state.lock:
                server.state.clients.pop(existing, None)
                server.state.by_san.pop(san, None)
            server.state.bump("cancelled")
            return JSONResponse({"client_id": existing, "grant_types": []}, status_code=200)
        _check_certifications(server, body, san)
    except Refused as exc:
        return _refusal(server, exc)
    client_id = existing or f"udap-{uuid.uuid4().hex[:16]}"
    record = {
        "client_id": client_id,
        "san": san,
        "grant_types": grants,
        "scope": claims.get("scope") or "system/*.rs",
        "client_name": claims.get("client_name"),
        "purpose": _fragment(san),
        "redirect_uris": list(claims.get("redirect_uris") or []),
    }
    with server.state.lock:
        server.state.clients[client_id] = record
        server.state.by_san[san] = client_id
    server.state.bump("updated" if existing else "registered")
    out = {k: record[k] for k in ("client_id", "grant_types", "scope", "client_name")}
    out["software_statement"] = statement
    return JSONResponse(out, status_code=200 if existing else 201)


def _b2b(extensions: Any, record: dict[str, Any], server: UdapAuthServer) -> tuple[str, str]:
    b2b = extensions.get("hl7-b2b") if isinstance(extensions, dict) else None
    if not isinstance(b2b, dict):
        raise Refused("invalid_grant", "hl7-b2b extension required")
    if b2b.get("version") != "1" or not b2b.get("organization_id"):
        raise Refused("invalid_grant", "hl7-b2b version and organization_id required")
    pou = b2b.get("purpose_of_use")
    if not isinstance(pou, list) or len(pou) != 1 or not isinstance(pou[0], str):
        raise Refused("invalid_grant", "exactly one purpose_of_use required")
    system, _, code = pou[0].partition("#")
    if system != XP_OID or not code:
        raise Refused("invalid_grant", "purpose_of_use not a TEFCA XP code")
    if code not in server.purposes:
        raise Refused("invalid_grant", "purpose_of_use not allowed here")
    if code != record["purpose"]:
        raise Refused("invalid_grant", "purpose_of_use differs from the certificate XP")
    policies = b2b.get("consent_policy") or []
    if server.consent_policy and server.consent_policy not in policies:
        raise Refused(
            "invalid_grant",
            "consent policy required",
            extensions={"hl7-b2b": {"consent_required": [server.consent_policy]}},
        )
    if code == "T-IAS":
        ias = extensions.get("tefca_ias")
        if not isinstance(ias, dict) or not ias.get("id_token"):
            raise Refused("invalid_grant", "tefca_ias with id_token required for T-IAS")
    return code, str(b2b["organization_id"])


async def token(server: UdapAuthServer, request: Request) -> Response:
    """``POST /udap/token``: client_credentials with a private_key_jwt assertion."""
    try:
        form = await request.form()
        grant = form.get("grant_type")
        if grant not in server.grant_types:
            raise Refused("unsupported_grant_type", "grant type not offered")
        if form.get("udap") != "1":
            raise Refused("invalid_request", "udap=1 required")
        if form.get("client_assertion_type") != JWT_BEARER:
            raise Refused("invalid_client", "client_assertion_type")
        assertion = form.get("client_assertion")
        if not isinstance(assertion, str):
            raise Refused("invalid_client", "client_assertion missing")
        claims, uris = server._verify(assertion, server.token_url)
        with server.state.lock:
            record = server.state.clients.get(str(claims["iss"]))
        if record is None or claims["sub"] != claims["iss"]:
            raise Refused("invalid_client", "unknown client")
        if record["san"] not in uris:
            raise Refused("invalid_client", "certificate does not carry the registered SAN")
        if grant == "authorization_code":
            from medblocks_sandbox.udap.authcode import code_grant

            return code_grant(server, form, record)
        if "client_credentials" not in record["grant_types"]:
            raise Refused("unauthorized_client", "client not registered for client_credentials")
        purpose, org = _b2b(claims.get("extensions"), record, server)
    except Refused as exc:
        return _refusal(server, exc)
    scope = str(form.get("scope") or record["scope"])
    tok = server.new_token(
        IssuedToken(record["client_id"], purpose, org, time.time() + server.token_lifetime, scope)
    )
    server.state.bump("token")
    return JSONResponse(
        {
            "access_token": tok,
            "token_type": "Bearer",
            "expires_in": server.token_lifetime,
            "scope": scope,
        },
        headers={"Cache-Control": "no-store"},
    )


def endpoints(server: UdapAuthServer, prefix: str) -> list[Route]:
    """Starlette routes of ``server`` under ``prefix`` (the node's FHIR mount)."""

    async def reg(request: Request) -> Response:
        return await register(server, request)

    async def tok(request: Request) -> Response:
        return await token(server, request)

    return [
        Route(f"{prefix}/.well-known/udap", server.discovery, methods=["GET"]),
        Route(f"{prefix}/udap/register", reg, methods=["POST"]),
        Route(f"{prefix}/udap/token", tok, methods=["POST"]),
    ]
