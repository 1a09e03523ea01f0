"""SMART App Launch for user-authorised connections: links, authorization requests, callbacks (SPECS §1).

The flow, as the web surface (``web/connect.py``) and the CLI drive it::

    link = create_connect_link(cp, tenant_id=..., source_id=..., patient_ref=..., return_url=...,
                               public_base_url="https://us.example")        # pending connection
    req = begin_authorization(cp, link.connection_id, redirect_uri=CALLBACK)   # discovery + PKCE + state
    ... browser goes to req.url (or POSTs req.form when the scope list is long) ...
    outcome = complete_authorization(cp, params=callback_query)              # state, code, tokens
    outcome.redirect_url                                                     # back to the tenant

The **EHR launch** (clinician workflow) is the same two calls with the launch parameters::

    conn_id = cp.create_connection(tenant_id=..., pattern="clinician_workflow", source_id=...)
    req = begin_authorization(cp, conn_id, redirect_uri=CALLBACK, launch=launch, iss=iss,
                              scopes=[...])   # adds `launch` scope + parameter, aud = iss (allow-listed)
    outcome = complete_authorization(cp, params=callback_query)   # outcome.context has encounter etc.

Security rules we apply (SPECS §1.2-1.4, §1.9): ``state`` has 256 bits from :mod:`secrets`, only its
SHA-256 is stored, bound to one pending connection and consumed once (a replayed callback is refused);
PKCE ``S256`` always (the verifier lives in the vault); ``aud`` is the source's FHIR base; an EHR
``iss`` must be the registered FHIR base of the source; an ``id_token`` is verified (signature, ``iss``,
``aud`` = client_id, ``exp``, ``nonce``) before its ``fhirUser`` is trusted.
"""

import base64
import hashlib
import hmac
import json
import secrets
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import jwt

from medblocks_pipelines.lib.errors import (
    AuthError,
    InvalidTransition,
    LaunchError,
    MedblocksError,
    ProtocolError,
    TransientError,
)
from medblocks_pipelines.lib.registry import ControlPlane
from medblocks_pipelines.lib.registry.rows import Source
from medblocks_pipelines.lib.smart.discovery import (
    fetch_capability_statement,
    fetch_smart_configuration,
)
from medblocks_pipelines.lib.smart.scopes import ScopeSet, build_scopes, choose_v2
from medblocks_pipelines.lib.smart.tokens import (
    ClientAuth,
    TokenResponse,
    oauth_error_of,
    parse_token_response,
    store_tokens,
    token_blob,
)

#: US Core types a patient-access pull asks for when the server supports them (SPECS §1.11;
#: the searches are in ``lib.fhir.search_plan.US_CORE_SEARCHES``).
US_CORE_PATIENT_TYPES: tuple[str, ...] = (
    "Patient",
    "AllergyIntolerance",
    "CarePlan",
    "CareTeam",
    "Condition",
    "Device",
    "DiagnosticReport",
    "DocumentReference",
    "Encounter",
    "Goal",
    "Immunization",
    "MedicationRequest",
    "Observation",
    "Procedure",
    "Provenance",
    # US Core 4-7 additions, asked for only where the server offers them.
    "ServiceRequest",
    "Specimen",
    "QuestionnaireResponse",
    "MedicationDispense",
    "RelatedPerson",
    "Coverage",
    # Referenced types a patient app needs to resolve (SPECS §1.11 last bullet) and Binary content.
    "Practitioner",
    "PractitionerRole",
    "Organization",
    "Location",
    "Medication",
    "Binary",
)
#: CMS Patient Access API types of a payer (SPECS §1.10).
PAYER_TYPES: tuple[str, ...] = (
    "Patient",
    "Coverage",
    "ExplanationOfBenefit",
    "Organization",
    "Practitioner",
)
#: How long a started authorization may take before its callback is refused.
PENDING_TTL_SECONDS = 15 * 60
#: Discovery documents are reused for this long before they are fetched again.
DISCOVERY_MAX_AGE = timedelta(hours=1)
#: URLs longer than this use POST authorization when the server offers it (SPECS §1.3).
MAX_GET_URL = 2000


def state_secret_name(state: str) -> str:
    """Vault name of a pending authorization, keyed by the SHA-256 of its ``state``."""
    return "launch_state/" + hashlib.sha256(state.encode()).hexdigest()


def link_secret_name(link_token: str) -> str:
    """Vault name of a connect link, keyed by the SHA-256 of its token."""
    return "connect_link/" + hashlib.sha256(link_token.encode()).hexdigest()


def pkce_pair() -> tuple[str, str]:
    """A PKCE ``(code_verifier, code_challenge)`` for S256 (RFC 7636; 86-character verifier)."""
    verifier = secrets.token_urlsafe(64)  # 86 chars of [A-Za-z0-9_-], 512 bits
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def new_state() -> str:
    """An unguessable ``state``: 256 random bits (the spec asks for at least 122)."""
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class ConnectLink:
    """A link a tenant's app sends its patient to; opening it starts the launch."""

    connection_id: str
    url: str = field(repr=False)
    expires_at: datetime


@dataclass(frozen=True)
class AuthorizationRequest:
    """Where to send the browser: ``GET url``, or ``POST form`` to ``endpoint`` when ``method`` is POST."""

    connection_id: str
    method: str
    url: str = field(repr=False)
    endpoint: str
    form: dict[str, str] = field(repr=False, default_factory=dict)
    scopes: tuple[str, ...] = ()


@dataclass(frozen=True)
class LaunchOutcome:
    """The result of a callback: the connection, its state and where to send the browser next."""

    connection_id: str | None
    ok: bool
    reason: str | None
    redirect_url: str | None
    patient: str | None = None
    scopes_granted: str | None = None
    context: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Discovery (cached on the source)
# ---------------------------------------------------------------------------------------------
def source_discovery(
    cp: ControlPlane, source_id: str, *, http: httpx.Client, refresh: bool = False
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The source's ``(smart_config, capability_statement)``, fetched when older than an hour."""
    source = cp.get_source(source_id)
    base = source.fhir_base_url
    if not base:
        raise LaunchError(f"source {source_id} has no FHIR base URL", reason="config")
    discovered = source.discovered_at
    smart_config, capability = source.smart_config, source.capability_statement
    if (
        not refresh
        and smart_config
        and capability
        and discovered is not None
        and datetime.now(UTC) - discovered < DISCOVERY_MAX_AGE
    ):
        return dict(smart_config), dict(capability)
    try:
        smart = fetch_smart_configuration(base, client=http)
        cap = fetch_capability_statement(base, client=http)
    except httpx.TransportError as exc:
        raise TransientError(f"discovery of {source_id} failed: {type(exc).__name__}") from exc
    cp.update_source_discovery(source_id, smart_config=smart, capability_statement=cap)
    return smart, cap


def supported_types(capability_statement: Mapping[str, Any]) -> set[str]:
    """Resource types the CapabilityStatement lists for server mode with ``search-type`` or ``read``."""
    out: set[str] = set()
    for rest in capability_statement.get("rest") or []:
        if rest.get("mode", "server") != "server":
            continue
        for res in rest.get("resource") or []:
            codes = {i.get("code") for i in res.get("interaction") or []}
            if res.get("type") and (not codes or codes & {"search-type", "read"}):
                out.add(res["type"])
    return out


def default_scopes(
    source: Source, smart_config: Mapping[str, Any], capability: Mapping[str, Any]
) -> list[str]:
    """The scope request for a patient standalone launch at ``source`` (SPECS §1.5, §1.12)."""
    cfg = source.config or {}
    wanted = PAYER_TYPES if source.kind == "payer" else US_CORE_PATIENT_TYPES
    offered = supported_types(capability)
    # Binary is fetched through DocumentReference attachment URLs; it needs read only, but v1 has no
    # read-only spelling, so it rides on the same .rs/.read scope as the others.
    types = [t for t in wanted if not offered or t in offered or t == "Binary"]
    if cfg.get("resource_types"):
        types = [t for t in types if t in set(cfg["resource_types"])]
    return build_scopes(
        types,
        v2=choose_v2(dict(smart_config), cfg.get("scope_syntax")),
        template=cfg.get("scopes"),
    )


# ---------------------------------------------------------------------------------------------
# Links and authorization requests
# ---------------------------------------------------------------------------------------------
def create_connect_link(
    cp: ControlPlane,
    *,
    tenant_id: str,
    source_id: str,
    patient_ref: str,
    public_base_url: str,
    return_url: str | None = None,
    ttl: timedelta = timedelta(days=7),
    pattern: str = "patient_access",
) -> ConnectLink:
    """Create a ``pending`` connection and a one-connection link ``{base}/connect/start/<token>``."""
    source = cp.get_source(source_id)
    if pattern not in source.patterns:
        raise LaunchError(f"source {source_id} does not offer {pattern}", reason="config")
    token = secrets.token_urlsafe(32)
    expires = datetime.now(UTC) + ttl
    conn_id = cp.create_connection(
        tenant_id=tenant_id,
        pattern=pattern,
        source_id=source_id,
        patient_ref=patient_ref,
        context={"return_url": return_url} if return_url else {},
    )
    cp.vault.put(
        link_secret_name(token),
        json.dumps({"connection_id": conn_id, "expires_at": expires.timestamp()}),
        tenant_id=tenant_id,
    )
    cp.record_event(conn_id, "link.created", {"expires_at": expires.isoformat()})
    url = f"{public_base_url.rstrip('/')}/connect/start/{token}"
    return ConnectLink(connection_id=conn_id, url=url, expires_at=expires)


def resolve_link(cp: ControlPlane, link_token: str) -> str:
    """The connection id a link token stands for; :class:`LaunchError` when unknown or expired."""
    secret = cp.vault.get(link_secret_name(link_token))
    if secret is None:
        raise LaunchError("unknown connect link", reason="unknown_link")
    data = json.loads(secret.reveal())
    if float(data["expires_at"]) < time.time():
        raise LaunchError(
            "the connect link has expired", reason="link_expired", hint="ask the app for a new link"
        )
    return str(data["connection_id"])


def begin_authorization(
    cp: ControlPlane,
    connection_id: str,
    *,
    redirect_uri: str,
    http: httpx.Client,
    scopes: Sequence[str] | None = None,
    launch: str | None = None,
    iss: str | None = None,
    extra_params: Mapping[str, str] | None = None,
    session_binding: str | None = None,
) -> AuthorizationRequest:
    """Build the authorization request of a pending connection and remember its state.

    Standalone launch: ``aud`` is the source's FHIR base. EHR launch: pass ``launch`` and ``iss``;
    ``iss`` must equal the source's registered FHIR base (our allowlist), the ``launch`` scope is
    added and ``launch`` is sent back unchanged. ``session_binding`` (a random value the web layer
    also sets as a cookie in the user's browser) ties the state to that browser session: the
    callback must present the same value. Every step is a connection event.
    """
    conn = cp.get_connection(connection_id)
    if conn.state != "pending":
        raise LaunchError(
            f"connection {connection_id} is {conn.state}, not pending", reason="not_pending"
        )
    source = cp.get_source(conn.source_id)
    base = str(source.fhir_base_url or "").rstrip("/")
    if iss is not None and iss.rstrip("/") != base:
        # An unknown iss would send the user (and later our token) to an attacker (SPECS §1.2).
        _fail(cp, connection_id, "unknown_iss")
        raise LaunchError(
            "iss is not the registered FHIR base of this source", reason="unknown_iss"
        )
    try:
        smart, cap = source_discovery(cp, conn.source_id, http=http)
    except (ProtocolError, TransientError) as exc:
        cp.record_event(connection_id, "launch.discovery_failed", {"error": type(exc).__name__})
        raise
    caps = set(smart.get("capabilities") or [])
    needed = "launch-ehr" if launch is not None else "launch-standalone"
    if needed not in caps or not smart.get("authorization_endpoint"):
        _fail(cp, connection_id, f"source_lacks_{needed}")
        raise LaunchError(f"source {source.id} does not offer {needed}", reason="unsupported")
    methods = smart.get("code_challenge_methods_supported")
    if methods is not None and "S256" not in methods:
        _fail(cp, connection_id, "no_pkce_s256")
        raise LaunchError(f"source {source.id} does not support PKCE S256", reason="unsupported")
    client = ClientAuth.from_source(source, cp, pattern=conn.pattern)

    scope_list = list(scopes) if scopes is not None else default_scopes(source, smart, cap)
    if launch is not None and "launch" not in scope_list:
        scope_list.insert(0, "launch")
    verifier, challenge = pkce_pair()
    state = new_state()
    nonce = secrets.token_urlsafe(16)
    params: dict[str, str] = {
        "response_type": "code",
        "client_id": client.client_id,
        "redirect_uri": redirect_uri,
        "scope": " ".join(scope_list),
        "state": state,
        "aud": base,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    if "openid" in scope_list:
        params["nonce"] = nonce
    if launch is not None:
        params["launch"] = launch
    params.update(extra_params or {})
    endpoint = str(smart["authorization_endpoint"])
    url = endpoint + ("&" if "?" in endpoint else "?") + urllib.parse.urlencode(params)
    method = "GET"
    if len(url) > MAX_GET_URL and "authorize-post" in caps:
        method = "POST"

    # A new start replaces an earlier one of the same connection (the patient clicked twice).
    old = (conn.context or {}).get("state_hash")
    if old:
        cp.vault.delete("launch_state/" + old)
    cp.vault.put(
        state_secret_name(state),
        json.dumps(
            {
                "connection_id": connection_id,
                "code_verifier": verifier,
                "redirect_uri": redirect_uri,
                "nonce": params.get("nonce"),
                "created_at": time.time(),
                "token_endpoint": smart["token_endpoint"],
                "session_sha256": (
                    hashlib.sha256(session_binding.encode()).hexdigest()
                    if session_binding
                    else None
                ),
            }
        ),
        tenant_id=conn.tenant_id,
    )
    context = dict(conn.context or {})
    context.update(
        {
            "state_hash": state_secret_name(state).split("/", 1)[1],
            "aud": base,
            "launch_kind": "ehr" if launch is not None else "standalone",
        }
    )
    cp.update_connection(connection_id, scopes_requested=" ".join(scope_list), context=context)
    cp.record_event(
        connection_id,
        "launch.authorize_redirect",
        {
            "method": method,
            "scope_count": len(scope_list),
            "scope_syntax": "v2" if any(".rs" in s for s in scope_list) else "v1",
            "client_auth": client.method,
            "launch_kind": context["launch_kind"],
        },
    )
    return AuthorizationRequest(
        connection_id=connection_id,
        method=method,
        url=url,
        endpoint=endpoint,
        form=params if method == "POST" else {},
        scopes=tuple(scope_list),
    )


# ---------------------------------------------------------------------------------------------
# Callback
# ---------------------------------------------------------------------------------------------
def complete_authorization(
    cp: ControlPlane,
    *,
    params: Mapping[str, str],
    http: httpx.Client,
    session_binding: str | None = None,
) -> LaunchOutcome:
    """Handle the redirect back from the authorization server.

    Raises :class:`LaunchError` (``state_mismatch``) when ``state`` is missing, unknown or already used,
    or (``session_mismatch``) when the authorization was started with a session binding and this
    browser does not present it: no connection can be blamed then, and the state stays usable by
    the browser that started it. Everything else ends in an outcome: ``active`` on success, or a
    ``failed`` connection with the reason (``access_denied``, ``invalid_grant``, ``no_patient``...).
    """
    state = params.get("state")
    if not state:
        raise LaunchError("callback without state", reason="state_mismatch")
    name = state_secret_name(state)
    secret = cp.vault.get(name)
    if secret is None:
        raise LaunchError("callback state is unknown or was already used", reason="state_mismatch")
    pending = json.loads(secret.reveal())
    expected = pending.get("session_sha256")
    if expected and not hmac.compare_digest(
        expected, hashlib.sha256((session_binding or "").encode()).hexdigest()
    ):
        # Another browser brought this code and state (login CSRF): refuse, keep the state.
        raise LaunchError("callback comes from another browser session", reason="session_mismatch")
    # Consume the state at once: a second callback with the same state finds nothing.
    if not cp.vault.delete(name):
        raise LaunchError("callback state is unknown or was already used", reason="state_mismatch")
    conn_id: str = pending["connection_id"]
    conn = cp.get_connection(conn_id)
    if conn.state != "pending":
        raise LaunchError(
            f"connection {conn_id} is {conn.state}, not pending", reason="not_pending"
        )
    return_url = (conn.context or {}).get("return_url")

    def failed(reason: str, detail: Mapping[str, Any] | None = None) -> LaunchOutcome:
        _fail(cp, conn_id, reason, detail)
        return LaunchOutcome(
            conn_id, False, reason, _return_to(return_url, conn_id, "failed", reason)
        )

    if time.time() - float(pending["created_at"]) > PENDING_TTL_SECONDS:
        return failed("launch_expired")
    if params.get("error"):
        error = str(params["error"])[:64]
        cp.record_event(
            conn_id,
            "launch.error_redirect",
            {"error": error, "description": str(params.get("error_description") or "")[:200]},
        )
        return failed(error)
    code = params.get("code")
    if not code:
        return failed("no_code")
    cp.record_event(conn_id, "launch.callback", {"has_code": True})

    source = cp.get_source(conn.source_id)
    try:
        client = ClientAuth.from_source(source, cp, pattern=conn.pattern)
        token_endpoint = str(pending["token_endpoint"])
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": pending["redirect_uri"],
            "code_verifier": pending["code_verifier"],
        }
        headers = client.apply(form, token_endpoint=token_endpoint)
        headers["Accept"] = "application/json"
        try:
            resp = http.post(token_endpoint, data=form, headers=headers, timeout=20.0)
        except httpx.TransportError as exc:
            # Not retried: a code is single use, and a replay makes servers revoke what it issued.
            return failed("token_endpoint_unreachable", {"error": type(exc).__name__})
        if resp.status_code >= 400 and resp.status_code not in (429,) and resp.status_code < 500:
            error, desc = oauth_error_of(resp)
            return failed(error, {"status": resp.status_code, "description": desc})
        tokens = parse_token_response(resp, what="code exchange")
    except (MedblocksError, jwt.PyJWTError) as exc:
        return failed("token_exchange_failed", {"error": type(exc).__name__})

    smart = cp.get_source(conn.source_id).smart_config or {}
    try:
        claims = (
            verify_id_token(
                tokens.id_token,
                smart_config=smart,
                client_id=client.client_id,
                nonce=pending.get("nonce"),
                http=http,
            )
            if tokens.id_token
            else {}
        )
    except AuthError as exc:
        return failed("id_token_invalid", {"error": str(exc)[:200]})

    requested = ScopeSet.parse(conn.scopes_requested)
    granted_text = tokens.scope
    if granted_text is None:
        # `scope` is required in the response; without it we can only assume what we asked for.
        cp.record_event(conn_id, "token.scope_missing", {})
        granted_text = conn.scopes_requested or ""
    granted = ScopeSet.parse(granted_text)
    patient = patient_from(tokens, claims)
    if conn.pattern == "patient_access" and not patient:
        return failed("no_patient")

    now = time.time()
    blob = token_blob(tokens, token_endpoint=token_endpoint, now=now)
    blob["scope"] = granted_text
    store_tokens(cp, conn_id, blob, tenant_id=conn.tenant_id)
    context = dict(conn.context or {})
    context.pop("state_hash", None)
    launch_context = {k: v for k, v in tokens.context.items() if k not in ("patient",)}
    if claims.get("fhirUser"):
        launch_context["fhirUser"] = claims["fhirUser"]
    context["launch_context"] = launch_context
    cp.update_connection(
        conn_id,
        source_patient_id=patient,
        scopes_granted=str(granted),
        token_expires_at=(
            datetime.fromtimestamp(now + tokens.expires_in, UTC) if tokens.expires_in else None
        ),
        has_refresh_token=tokens.refresh_token is not None,
        context=context,
        next_pull_due=datetime.now(UTC),
    )
    cp.record_event(
        conn_id,
        "token.received",
        {
            "scope_count": len(granted.normalised()),
            "granted_differs": set(granted.normalised()) != set(requested.normalised()),
            "has_refresh_token": tokens.refresh_token is not None,
            "expires_in": tokens.expires_in,
            "id_token_verified": bool(claims),
        },
    )
    try:
        cp.transition(conn_id, "active", reason="authorized")
    except InvalidTransition:
        # Revoked while the patient was on the consent page: keep the revocation, drop the tokens.
        cp.vault.delete_prefix(f"conn/{conn_id}/")
        return LaunchOutcome(
            conn_id, False, "revoked", _return_to(return_url, conn_id, "failed", "revoked")
        )
    return LaunchOutcome(
        conn_id,
        True,
        None,
        _return_to(return_url, conn_id, "active", None),
        patient=patient,
        scopes_granted=str(granted),
        context=launch_context,
    )


def patient_from(tokens: TokenResponse, claims: Mapping[str, Any]) -> str | None:
    """The patient id: ``patient`` first, then a Patient ``fhirUser`` (SPECS §1.12: MEDENT)."""
    patient = tokens.context.get("patient")
    if isinstance(patient, str) and patient:
        return patient
    fhir_user = claims.get("fhirUser") or tokens.context.get("fhirUser")
    if isinstance(fhir_user, str):
        parts = fhir_user.rstrip("/").split("/")
        if len(parts) >= 2 and parts[-2] == "Patient" and parts[-1]:
            return parts[-1]
    return None


def verify_id_token(
    id_token: str,
    *,
    smart_config: Mapping[str, Any],
    client_id: str,
    nonce: str | None,
    http: httpx.Client,
) -> dict[str, Any]:
    """Verify an OIDC id_token (SPECS §1.9): issuer discovery, JWKS signature, aud, exp, nonce."""
    try:
        unverified = jwt.decode(id_token, options={"verify_signature": False})
        header = jwt.get_unverified_header(id_token)
    except jwt.PyJWTError as exc:
        raise AuthError("id_token is not a JWT") from exc
    issuer = unverified.get("iss")
    expected = smart_config.get("issuer")
    if not isinstance(issuer, str) or (
        expected and issuer.rstrip("/") != str(expected).rstrip("/")
    ):
        raise AuthError("id_token iss does not match the server's issuer")
    try:
        oidc = http.get(issuer.rstrip("/") + "/.well-known/openid-configuration", timeout=10.0)
        oidc.raise_for_status()
        jwks_uri = oidc.json().get("jwks_uri") or smart_config.get("jwks_uri")
        algs = oidc.json().get("id_token_signing_alg_values_supported") or ["RS256"]
        jwks = http.get(str(jwks_uri), timeout=10.0)
        jwks.raise_for_status()
        keyset = jwt.PyJWKSet.from_dict(jwks.json())
    except (httpx.HTTPError, ValueError, jwt.PyJWTError) as exc:
        raise AuthError(f"id_token keys could not be fetched ({type(exc).__name__})") from exc
    allowed = [a for a in algs if a in ("RS256", "RS384", "RS512", "ES256", "ES384", "PS256")]
    alg = str(header.get("alg"))
    if alg not in allowed:
        raise AuthError(f"id_token alg {alg!r} is not allowed")
    keys = [k for k in keyset.keys if header.get("kid") in (None, k.key_id)]
    if not keys:
        raise AuthError("id_token kid is not in the issuer's JWKS")
    try:
        claims = jwt.decode(
            id_token,
            key=keys[0].key,
            algorithms=[alg],
            audience=client_id,
            issuer=issuer,
            options={"require": ["exp", "iss", "aud", "sub"]},
            leeway=30,
        )
    except jwt.PyJWTError as exc:
        raise AuthError(f"id_token failed verification ({type(exc).__name__})") from exc
    if nonce is not None and claims.get("nonce") != nonce:
        raise AuthError("id_token nonce does not match")
    return claims


def _fail(
    cp: ControlPlane, conn_id: str, reason: str, detail: Mapping[str, Any] | None = None
) -> None:
    try:
        cp.transition(conn_id, "failed", reason=reason, detail=detail)
    except InvalidTransition:
        cp.record_event(conn_id, "launch.failed_late", {"reason": reason})
    # Nothing of a failed launch may stay usable.
    cp.vault.delete_prefix(f"conn/{conn_id}/")


def _return_to(return_url: str | None, conn_id: str, status: str, reason: str | None) -> str | None:
    if not return_url:
        return None
    parts = urllib.parse.urlsplit(return_url)
    extra = {"connection_id": conn_id, "status": status}
    if reason:
        extra["reason"] = reason
    query = parts.query + ("&" if parts.query else "") + urllib.parse.urlencode(extra)
    return urllib.parse.urlunsplit(parts._replace(query=query))
