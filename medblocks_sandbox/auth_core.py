"""The state and the non-HTTP side of one SMART authorization server: discovery documents,
admin registration, launch and CDS tokens, grant revocation, token issuing and validation.

`auth.AuthServer` adds the endpoints (`auth_authorize`, `auth_token`) on top of `AuthCore`.
"""

import html
import json
import secrets
import threading
import time
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from string import Template
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from medblocks_sandbox.auth_model import (
    _NO_STORE,
    _PAGE_HEADERS,
    _TEMPLATES,
    ASSERTION_ALGS,
    DEFAULT_USER_CEILING,
    AuthConfig,
    ClientRegistration,
    Login,
    TokenInfo,
    _Code,
    _Grant,
    _Pending,
)
from medblocks_sandbox.errors import OAuthProtocolError
from medblocks_sandbox.smart_scopes import parse_scope


class AuthCore:
    """State of one SMART authorization server (in memory) for one organization's FHIR base."""

    def __init__(
        self,
        *,
        org_id: str,
        org_name: str,
        fhir_base: str,
        auth_base: str,
        logins: Iterable[Login] = (),
        config: AuthConfig | None = None,
        clock: Any = time.time,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        self.org_id = org_id
        self.org_name = org_name
        self.fhir_base = fhir_base.rstrip("/")
        self.auth_base = auth_base.rstrip("/")
        self.config = config or AuthConfig()
        self.clock = clock
        self.logins = {login.username: login for login in logins}
        self._http = http_client
        self._lock = threading.RLock()
        self._clients: dict[str, ClientRegistration] = {}
        self._pending: dict[str, _Pending] = {}
        self._codes: dict[str, _Code] = {}
        self._grants: dict[str, _Grant] = {}
        self._access: dict[str, TokenInfo] = {}
        self._refresh: dict[str, str] = {}  # refresh token -> grant id (current and rotated-out)
        self._launches: dict[str, tuple[float, dict[str, Any]]] = {}
        self._jtis: dict[tuple[str, str], float] = {}
        self._jwks_cache: dict[str, tuple[float, dict[str, Any]]] = {}
        self._signing_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._signing_kid = secrets.token_hex(8)
        self.patient_names: dict[str, str] = {}

    # -- URLs ----------------------------------------------------------------------------------
    @property
    def issuer(self) -> str:
        """OIDC issuer (id_token `iss`): the authorization server base."""
        return self.auth_base

    @property
    def token_endpoint(self) -> str:
        """Absolute token endpoint URL (the `aud` of client assertions)."""
        return f"{self.auth_base}/token"

    def smart_configuration(self) -> dict[str, Any]:
        """The `.well-known/smart-configuration` document (SPECS §1.1)."""
        methods = ["private_key_jwt", "client_secret_basic"]
        caps = [
            "launch-standalone",
            "launch-ehr",
            "authorize-post",
            "client-confidential-asymmetric",
            "client-confidential-symmetric",
            "context-standalone-patient",
            "context-ehr-patient",
            "context-ehr-encounter",
            "context-banner",
            "permission-offline",
            "permission-online",
            "permission-patient",
            "permission-user",
            "permission-v1",
            "permission-v2",
            "sso-openid-connect",
        ]
        if self.config.allow_public_clients:
            caps.insert(3, "client-public")
        return {
            "issuer": self.issuer,
            "jwks_uri": f"{self.auth_base}/jwks",
            "authorization_endpoint": f"{self.auth_base}/authorize",
            "token_endpoint": self.token_endpoint,
            "token_endpoint_auth_methods_supported": methods,
            "token_endpoint_auth_signing_alg_values_supported": list(ASSERTION_ALGS),
            "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials"],
            "introspection_endpoint": f"{self.auth_base}/introspect",
            "revocation_endpoint": f"{self.auth_base}/revoke",
            "scopes_supported": [
                "openid",
                "fhirUser",
                "launch",
                "launch/patient",
                "launch/encounter",
                "offline_access",
                "online_access",
                "patient/*.rs",
                "patient/*.read",
                "user/*.rs",
                "user/*.read",
                "system/*.rs",
                "system/*.read",
            ],
            "response_types_supported": ["code"],
            "capabilities": caps,
            "code_challenge_methods_supported": ["S256"],
        }

    def openid_configuration(self) -> dict[str, Any]:
        """The OIDC discovery document for id_token validation (SPECS §1.9)."""
        return {
            "issuer": self.issuer,
            "authorization_endpoint": f"{self.auth_base}/authorize",
            "token_endpoint": self.token_endpoint,
            "jwks_uri": f"{self.auth_base}/jwks",
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "scopes_supported": ["openid", "fhirUser"],
            "claims_supported": ["iss", "sub", "aud", "exp", "iat", "fhirUser", "nonce"],
        }

    def jwks(self) -> dict[str, Any]:
        """The public key set that signs id_tokens."""
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self._signing_key.public_key()))
        jwk.update({"kid": self._signing_kid, "alg": "RS256", "use": "sig"})
        return {"keys": [jwk]}

    # -- registration and admin ----------------------------------------------------------------
    def register_client(self, body: Mapping[str, Any]) -> tuple[ClientRegistration, str | None]:
        """Register (or replace) a client from admin JSON; returns it and a new secret if made.

        Raises ValueError with a readable reason on an invalid registration.
        """
        method = body.get("token_endpoint_auth_method", "none")
        if method not in ("none", "private_key_jwt", "client_secret_basic"):
            raise ValueError(
                "token_endpoint_auth_method must be none, private_key_jwt or client_secret_basic"
            )
        if method == "none" and not self.config.allow_public_clients:
            raise ValueError("this server accepts confidential clients only")
        redirect_uris = body.get("redirect_uris") or []
        if not isinstance(redirect_uris, list) or not all(
            isinstance(u, str)
            and urllib.parse.urlsplit(u).scheme in ("http", "https")
            and "#" not in u
            for u in redirect_uris
        ):
            raise ValueError("redirect_uris must be absolute http(s) URLs without fragments")
        jwks = body.get("jwks")
        jwks_uri = body.get("jwks_uri")
        if method == "private_key_jwt":
            if jwks is None and not jwks_uri:
                raise ValueError("private_key_jwt needs jwks or jwks_uri")
            if self.config.require_jwks_url and (jwks is not None or not jwks_uri):
                raise ValueError("this server requires a JWKS URL; inline keys are refused")
        if jwks is not None:
            keys = jwks.get("keys") if isinstance(jwks, dict) else None
            if not isinstance(keys, list) or not all(
                isinstance(k, dict) and k.get("kty") and k.get("kid") for k in keys
            ):
                raise ValueError("jwks must be {keys: [...]} and every key needs kty and kid")
            if any("d" in k for k in keys):
                raise ValueError("jwks must hold public keys only")
        scopes = body.get("scopes")
        if isinstance(scopes, str):
            scopes = scopes.split()
        if scopes is None:
            scopes = list(DEFAULT_USER_CEILING) + (
                ["system/*.rs"] if method == "private_key_jwt" else []
            )
        client_id = body.get("client_id") or f"client-{secrets.token_hex(6)}"
        secret = body.get("client_secret")
        new_secret = None
        if method == "client_secret_basic" and not secret:
            secret = new_secret = secrets.token_urlsafe(24)
        allow = list(body.get("jku_allowlist") or [])
        if jwks_uri and jwks_uri not in allow:
            allow.insert(0, jwks_uri)
        reg = ClientRegistration(
            client_id=str(client_id),
            token_endpoint_auth_method=method,
            redirect_uris=tuple(redirect_uris),
            scopes=tuple(scopes),
            jwks=jwks,
            jwks_uri=jwks_uri,
            jku_allowlist=tuple(allow),
            client_secret=secret,
            name=str(body.get("name") or client_id),
        )
        with self._lock:
            self._clients[reg.client_id] = reg
        return reg, new_secret

    def get_client(self, client_id: str) -> ClientRegistration | None:
        """A registered client, or None."""
        with self._lock:
            return self._clients.get(client_id)

    def mint_launch(
        self,
        *,
        patient: str | None = None,
        encounter: str | None = None,
        user: str | None = None,
        fhir_context: Sequence[Mapping[str, Any]] | None = None,
        intent: str | None = None,
        need_patient_banner: bool = False,
        smart_style_url: str | None = None,
        auto_approve: bool = False,
    ) -> str:
        """Mint an opaque EHR `launch` id carrying launch context (SPECS §1.2, §1.6).

        `user` is the EHR user's relative reference (e.g. "Practitioner/9"): the EHR session, so
        the authorize step skips the login page. `auto_approve` also skips consent, as EHRs do for
        apps an organization has enabled.
        """
        launch_id = secrets.token_urlsafe(24)
        ctx: dict[str, Any] = {
            "patient": patient,
            "encounter": encounter,
            "user": user,
            "fhirContext": [dict(c) for c in fhir_context or []],
            "intent": intent,
            "need_patient_banner": need_patient_banner,
            "smart_style_url": smart_style_url,
            "auto_approve": auto_approve,
        }
        with self._lock:
            self._launches[launch_id] = (self.clock() + self.config.launch_lifetime, ctx)
        return launch_id

    def mint_cds_token(
        self, *, client_id: str, patient: str, scopes: Sequence[str], user: str | None = None
    ) -> dict[str, Any]:
        """An access token for a CDS service, as an EHR puts in a hook's ``fhirAuthorization``
        (CDS Hooks 2.0 §3.2.2): read-only patient scopes, no refresh token, normal lifetime.

        Answers the ``fhirAuthorization`` object: ``access_token``, ``token_type``,
        ``expires_in``, ``scope``, ``subject`` (the CDS client id) and ``patient``.
        """
        granted = [s for s in scopes if s.startswith("patient/")]
        if not granted or any(
            (parsed := parse_scope(s)) is None or not parsed.perms <= frozenset("rs")
            for s in granted
        ):
            raise ValueError("CDS tokens carry read/search patient scopes only")
        grant = _Grant(
            grant_id=secrets.token_hex(8),
            client_id=client_id,
            scopes=tuple(granted),
            patient=patient,
            encounter=None,
            fhir_user=user,
            context={},
            refresh_expires_at=None,
        )
        with self._lock:
            self._grants[grant.grant_id] = grant
        body = self._issue(grant, granted, with_refresh=False)
        return {
            "access_token": body["access_token"],
            "token_type": "Bearer",
            "expires_in": body["expires_in"],
            "scope": body["scope"],
            "subject": client_id,
            "patient": patient,
        }

    def expire_tokens(self, *, client_id: str | None = None, grant_id: str | None = None) -> int:
        """Make matching access tokens expired now (not revoked); returns how many."""
        now = self.clock()
        n = 0
        with self._lock:
            for info in self._access.values():
                if (
                    (client_id is None or info.client_id == client_id)
                    and (grant_id is None or info.grant_id == grant_id)
                    and info.expires_at > now
                ):
                    info.expires_at = now - 1
                    n += 1
        return n

    def revoke_grants(
        self,
        *,
        grant_id: str | None = None,
        client_id: str | None = None,
        patient: str | None = None,
    ) -> int:
        """Revoke matching grants (their refresh and access tokens die); returns how many."""
        n = 0
        with self._lock:
            for grant in self._grants.values():
                if grant.revoked:
                    continue
                if (
                    (grant_id is None or grant.grant_id == grant_id)
                    and (client_id is None or grant.client_id == client_id)
                    and (patient is None or grant.patient == patient)
                ):
                    self._revoke_grant(grant)
                    n += 1
        return n

    def grants(self) -> list[dict[str, Any]]:
        """Live grants without secrets (admin view)."""
        with self._lock:
            return [
                {
                    "grant_id": g.grant_id,
                    "client_id": g.client_id,
                    "scope": " ".join(g.scopes),
                    "patient": g.patient,
                    "revoked": g.revoked,
                    "access_tokens": len(g.access_tokens),
                }
                for g in self._grants.values()
            ]

    def _revoke_grant(self, grant: _Grant) -> None:
        grant.revoked = True
        grant.current_refresh = None
        for token in grant.access_tokens:
            info = self._access.get(token)
            if info:
                info.revoked = True

    def client_of(self, token: str) -> str | None:
        """The client id an access token was issued to (live or not), or None."""
        with self._lock:
            info = self._access.get(token)
            return info.client_id if info else None

    def expire_access_token(self, token: str) -> None:
        """Make one access token expired now (the fault injector's `expire_token` seam)."""
        with self._lock:
            info = self._access.get(token)
            if info is not None:
                info.expires_at = min(info.expires_at, self.clock() - 1)

    def revoke_refresh_token(self, token: str) -> None:
        """Revoke the grant behind a refresh token (the `revoke_refresh` fault's seam)."""
        with self._lock:
            grant = self._grants.get(self._refresh.get(token, ""))
            if grant is not None:
                self._revoke_grant(grant)

    # -- token validation (the seam) ----------------------------------------------------------
    def validate_access_token(self, token: str) -> TokenInfo | None:
        """The live TokenInfo for a bearer token, or None if unknown, expired or revoked."""
        with self._lock:
            info = self._access.get(token)
            if info is None or info.revoked or info.expires_at <= self.clock():
                return None
            return info

    def _issue(self, grant: _Grant, scopes: Sequence[str], *, with_refresh: bool) -> dict[str, Any]:
        now = self.clock()
        token = secrets.token_urlsafe(32)
        info = TokenInfo(
            token=token,
            client_id=grant.client_id,
            scopes=tuple(scopes),
            expires_at=now + self.config.access_token_lifetime,
            issued_at=now,
            grant_id=grant.grant_id,
            patient=grant.patient,
            encounter=grant.encounter,
            fhir_user=grant.fhir_user,
            context=dict(grant.context),
        )
        body: dict[str, Any] = {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": self.config.access_token_lifetime,
            "scope": " ".join(scopes),
        }
        if grant.patient:
            body["patient"] = grant.patient
        if grant.encounter:
            body["encounter"] = grant.encounter
        body.update(grant.context)
        with self._lock:
            self._access[token] = info
            grant.access_tokens.add(token)
            if with_refresh:
                refresh = secrets.token_urlsafe(32)
                grant.current_refresh = refresh
                grant.refresh_tokens.add(refresh)
                self._refresh[refresh] = grant.grant_id
                body["refresh_token"] = refresh
        return body

    def _id_token(
        self,
        client: ClientRegistration,
        grant: _Grant,
        nonce: str | None,
        *,
        with_fhir_user: bool,
    ) -> str:
        now = int(self.clock())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": grant.fhir_user or grant.grant_id,
            "aud": client.client_id,
            "iat": now,
            "exp": now + self.config.access_token_lifetime,
        }
        if with_fhir_user and grant.fhir_user:
            claims["fhirUser"] = f"{self.fhir_base}/{grant.fhir_user}"
        if nonce:
            claims["nonce"] = nonce
        return jwt.encode(
            claims, self._signing_key, algorithm="RS256", headers={"kid": self._signing_kid}
        )

    def _purge(self) -> None:
        now = self.clock()
        self._pending = {
            k: v for k, v in self._pending.items() if v.created + self.config.pending_lifetime > now
        }
        self._codes = {
            k: v for k, v in self._codes.items() if v.expires_at + 600 > now
        }  # keep used codes a while to catch replays
        self._launches = {k: v for k, v in self._launches.items() if v[0] > now}


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------
def _is_form(request: Request) -> bool:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    return ctype == "application/x-www-form-urlencoded"


def _single_params(items: list[tuple[str, Any]]) -> dict[str, str] | None:
    # RFC 6749 §3.1: parameters MUST NOT be included more than once.
    out: dict[str, str] = {}
    for key, value in items:
        if key in out:
            return None
        out[key] = str(value)
    return out


def _redirect(uri: str, params: Mapping[str, str | None]) -> Response:
    clean = {k: v for k, v in params.items() if v is not None}
    parts = urllib.parse.urlsplit(uri)
    query = parts.query + ("&" if parts.query else "") + urllib.parse.urlencode(clean)
    return RedirectResponse(
        urllib.parse.urlunsplit(parts._replace(query=query)), status_code=302, headers=_NO_STORE
    )


def _error_page(error: str, description: str, status: int = 400) -> Response:
    page = Template((_TEMPLATES / "error.html").read_text()).substitute(
        error=html.escape(error), description=html.escape(description)
    )
    return HTMLResponse(page, status_code=status, headers=_PAGE_HEADERS)


def _oauth_error(exc: OAuthProtocolError) -> Response:
    return JSONResponse(
        {"error": exc.error, "error_description": exc.description},
        status_code=exc.status,
        headers={**_NO_STORE, **exc.headers},
    )


def _max_age(cache_control: str) -> int:
    directives = [d.strip().lower() for d in cache_control.split(",")]
    if "no-store" in directives or "no-cache" in directives:
        return 0
    for d in directives:
        if d.startswith("max-age="):
            try:
                return max(0, int(d.split("=", 1)[1]))
            except ValueError:
                return 0
    return 0
