"""The sandbox SMART authorization server (SMART App Launch 2.2 + Backend Services), one per org.

Written from SPECS.md §1 and §2 (SMART App Launch 2.x, RFC 6749, RFC 7636 PKCE, RFC 7009
revocation, RFC 7662 introspection, RFC 7523 client assertions), as strict as those texts:

- discovery: `{fhir}/.well-known/smart-configuration` (always `application/json`) and
  `{issuer}/.well-known/openid-configuration` + `jwks_uri` for id_token checks (RS256);
- `authorize` (GET and POST: `authorize-post`): registered `client_id`, exact `redirect_uri`,
  `response_type=code`, `aud` equal to the FHIR base, PKCE `S256` only, `state` required and echoed,
  scopes in v1 and v2 syntax, EHR `launch` ids minted by `AuthServer.mint_launch`;
- a login page and a consent page (plain HTML forms; deny -> `error=access_denied&state=...`);
- `token`: `authorization_code` (single use, short life, redirect_uri + code_verifier checked; a
  replayed code revokes what it issued), `refresh_token` (rotation; a rotated-out token used again
  revokes the whole grant), `client_credentials` with `private_key_jwt` (RS384/ES384, `kid`,
  `iss=sub=client_id`, `aud`=token URL, `exp` at most 5 minutes ahead, `jti` never reused, keys
  from the registered JWKS or an allow-listed `jku`/JWKS URL honouring Cache-Control);
- `revoke` (RFC 7009) and `introspect` (RFC 7662).

Access tokens are opaque random strings held in memory; `require_token` is the seam every FHIR
endpoint (ours and the Bulk Data helper's) calls to turn a request into a `TokenInfo`.
"""

import base64
import hashlib
import hmac
import html
import json
import re
import secrets
import threading
import time
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from string import Template
from typing import Any, Literal

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from medblocks_sandbox.errors import FhirHttpError, OAuthProtocolError

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_ALGS = ("RS384", "ES384")
_TEMPLATES = Path(__file__).with_name("templates")
_VERIFIER_RE = re.compile(r"^[A-Za-z0-9\-._~]{43,128}$")
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
# Login and consent pages must not be framed (clickjacking a consent is the classic attack).
_PAGE_HEADERS = {
    **_NO_STORE,
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
}

# Scopes that are not resource scopes but that the server understands (SPECS §1.5).
CONTEXT_SCOPES = frozenset(
    {
        "launch",
        "launch/patient",
        "launch/encounter",
        "openid",
        "fhirUser",
        "profile",
        "offline_access",
        "online_access",
    }
)

# ---------------------------------------------------------------------------------------------
# Scopes
# ---------------------------------------------------------------------------------------------
_SCOPE_RE = re.compile(
    r"^(?P<ctx>patient|user|system)/(?P<type>\*|[A-Z][A-Za-z]+)\."
    r"(?P<perm>read|write|\*|c?r?u?d?s?)(?:\?(?P<query>.+))?$"
)
_V1 = {"read": "rs", "write": "cud", "*": "cruds"}
_ORDER = "cruds"


@dataclass(frozen=True)
class ResourceScope:
    """A parsed SMART resource scope (v1 `.read` and v2 `.rs` normalised to permission letters)."""

    context: Literal["patient", "user", "system"]
    resource_type: str  # a type or "*"
    perms: frozenset[str]
    query: tuple[tuple[str, str], ...] = ()
    v1: bool = False

    def covers(self, other: "ResourceScope") -> bool:
        """Whether this scope grants everything `other` asks for."""
        return (
            self.context == other.context
            and self.resource_type in ("*", other.resource_type)
            and self.perms >= other.perms
            and (not self.query or self.query == other.query)
        )

    def render(self) -> str:
        """The scope string, v1 form if it came as v1 and still fits, else v2 letters in order."""
        letters = "".join(c for c in _ORDER if c in self.perms)
        perm = next((k for k, v in _V1.items() if v == letters), None) if self.v1 else None
        text = f"{self.context}/{self.resource_type}.{perm or letters}"
        if self.query:
            text += "?" + urllib.parse.urlencode(self.query, safe="|:/")
        return text


def parse_scope(text: str) -> ResourceScope | None:
    """Parse a SMART resource scope; None if it is not one (or its letters are out of order)."""
    match = _SCOPE_RE.match(text)
    if not match or match["perm"] == "":
        return None
    perm = match["perm"]
    v1 = perm in _V1
    letters = _V1.get(perm, perm)
    query = (
        tuple(urllib.parse.parse_qsl(match["query"], keep_blank_values=False))
        if match["query"]
        else ()
    )
    ctx: Any = match["ctx"]
    return ResourceScope(ctx, match["type"], frozenset(letters), query, v1)


_PLAIN_SCOPES = {
    "launch": "Open in the context of your current EHR session",
    "launch/patient": "Know which patient record is open",
    "launch/encounter": "Know which visit is open",
    "openid": "Know who you are",
    "fhirUser": "Know who you are",
    "profile": "Know who you are",
    "offline_access": "Keep access after you sign out, until you revoke it",
    "online_access": "Keep access while you stay signed in",
}
_VERBS = {"c": "create", "r": "read", "u": "update", "d": "delete", "s": "search"}


def describe_scope(text: str) -> str:
    """A plain-language description of a scope for the consent page."""
    if text in _PLAIN_SCOPES:
        return _PLAIN_SCOPES[text]
    scope = parse_scope(text)
    if scope is None:
        return "Other access"
    verbs = ", ".join(_VERBS[c] for c in _ORDER if c in scope.perms)
    what = "all record types" if scope.resource_type == "*" else f"{scope.resource_type} records"
    whose = {"patient": "of this patient", "user": "you can see", "system": "of everyone"}[
        scope.context
    ]
    filtered = " (only some)" if scope.query else ""
    return f"{verbs.capitalize()} {what} {whose}{filtered}"


def narrow_scopes(
    requested: Iterable[str], ceiling: Iterable[str], *, contexts: Iterable[str]
) -> list[str]:
    """The requested scopes the ceiling allows, each cut down to allowed permissions.

    Context scopes pass if the ceiling lists them; resource scopes pass (narrowed) if a ceiling
    scope of an allowed context covers their type. Unknown or malformed scopes are dropped: the
    granted set may be narrower than the request (SPECS §1.4).
    """
    allowed_ctx = set(contexts)
    ceiling = list(ceiling)
    ceiling_plain = set(ceiling)
    ceiling_res = [s for s in (parse_scope(c) for c in ceiling) if s is not None]
    out: list[str] = []
    for text in requested:
        if text in out:
            continue
        if text in CONTEXT_SCOPES:
            if text in ceiling_plain:
                out.append(text)
            continue
        scope = parse_scope(text)
        if scope is None or scope.context not in allowed_ctx:
            continue
        perms: set[str] = set()
        for c in ceiling_res:
            if (
                c.context == scope.context
                and c.resource_type in ("*", scope.resource_type)
                and (not c.query or c.query == scope.query)
            ):
                perms |= c.perms
        perms &= scope.perms
        if perms:
            out.append(replace(scope, perms=frozenset(perms)).render())
    return out


@dataclass(frozen=True)
class AccessGrant:
    """What one granted scope lets a token do with one resource type."""

    patient: str | None  # restrict to this patient's compartment (None: no compartment limit)
    filters: tuple[tuple[str, str], ...]  # v2 scope query: search params a resource must match


# ---------------------------------------------------------------------------------------------
# Registrations, tokens, grants
# ---------------------------------------------------------------------------------------------
AuthMethod = Literal["none", "private_key_jwt", "client_secret_basic"]
DEFAULT_USER_CEILING = (
    "launch",
    "launch/patient",
    "launch/encounter",
    "openid",
    "fhirUser",
    "profile",
    "offline_access",
    "online_access",
    "patient/*.rs",
    "user/*.rs",
)


@dataclass
class ClientRegistration:
    """A registered client (made through the admin API)."""

    client_id: str
    token_endpoint_auth_method: AuthMethod = "none"
    redirect_uris: tuple[str, ...] = ()
    scopes: tuple[str, ...] = DEFAULT_USER_CEILING
    jwks: Mapping[str, Any] | None = None
    jwks_uri: str | None = None
    jku_allowlist: tuple[str, ...] = ()
    client_secret: str | None = field(default=None, repr=False)
    name: str = ""

    def public_view(self) -> dict[str, Any]:
        """The registration as JSON (the secret is shown once, on creation, by the admin API)."""
        return {
            "client_id": self.client_id,
            "token_endpoint_auth_method": self.token_endpoint_auth_method,
            "redirect_uris": list(self.redirect_uris),
            "scopes": list(self.scopes),
            "jwks_uri": self.jwks_uri,
            "jku_allowlist": list(self.jku_allowlist),
            "has_inline_jwks": self.jwks is not None,
            "name": self.name,
        }


@dataclass
class TokenInfo:
    """A validated access token: who it was issued to and what it may see."""

    token: str = field(repr=False)
    client_id: str
    scopes: tuple[str, ...]
    expires_at: float
    issued_at: float
    grant_id: str | None = None
    patient: str | None = None
    encounter: str | None = None
    fhir_user: str | None = None  # relative reference, e.g. "Patient/123" or "Practitioner/9"
    context: dict[str, Any] = field(default_factory=dict)  # other launch context (fhirContext...)
    revoked: bool = False

    @property
    def resource_scopes(self) -> list[ResourceScope]:
        """The granted resource scopes, parsed."""
        return [s for s in (parse_scope(t) for t in self.scopes) if s is not None]

    def grants_for(self, resource_type: str, interaction: str) -> list[AccessGrant]:
        """How this token may apply `interaction` (one of c r u d s) to `resource_type`.

        Empty list: not allowed at all. A patient-context scope limits to the patient's
        compartment; a `user/` scope held by a patient user is limited the same way (the user's
        own permissions); `system/` and clinician `user/` scopes have no compartment limit.
        """
        user_patient = (
            self.fhir_user.split("/", 1)[1]
            if self.fhir_user and self.fhir_user.startswith("Patient/")
            else None
        )
        out = []
        for scope in self.resource_scopes:
            if scope.resource_type not in ("*", resource_type) or interaction not in scope.perms:
                continue
            if scope.context == "patient":
                out.append(AccessGrant(self.patient, scope.query))
            elif scope.context == "user":
                out.append(AccessGrant(user_patient, scope.query))
            else:
                out.append(AccessGrant(None, scope.query))
        return out

    def allows(self, resource_type: str, interaction: str = "r") -> bool:
        """Whether any granted scope allows `interaction` on `resource_type` (ignoring filters)."""
        return bool(self.grants_for(resource_type, interaction))

    def satisfies_any(self, required: Iterable[str]) -> bool:
        """Whether a granted scope covers one of the `required` scope strings."""
        wanted = [s for s in (parse_scope(r) for r in required) if s is not None]
        plain = set(self.scopes)
        return any(r in plain for r in required) or any(
            g.covers(w) for g in self.resource_scopes for w in wanted
        )

    @property
    def compartment_patient(self) -> str | None:
        """The patient every compartment-limited grant of this token is tied to, if any."""
        return self.patient or (
            self.fhir_user.split("/", 1)[1]
            if self.fhir_user and self.fhir_user.startswith("Patient/")
            else None
        )


@dataclass
class _Grant:
    grant_id: str
    client_id: str
    scopes: tuple[str, ...]
    patient: str | None
    encounter: str | None
    fhir_user: str | None
    context: dict[str, Any]
    refresh_expires_at: float | None
    current_refresh: str | None = field(default=None, repr=False)
    revoked: bool = False
    access_tokens: set[str] = field(default_factory=set, repr=False)
    refresh_tokens: set[str] = field(default_factory=set, repr=False)


@dataclass
class _Pending:
    request_id: str = field(repr=False)
    client: ClientRegistration
    redirect_uri: str
    state: str
    scopes: list[str]
    code_challenge: str
    nonce: str | None
    launch: dict[str, Any] | None
    created: float
    login: "Login | None" = None
    consent_token: str | None = field(default=None, repr=False)


@dataclass
class _Code:
    client_id: str
    redirect_uri: str
    code_challenge: str
    scopes: tuple[str, ...]
    patient: str | None
    encounter: str | None
    fhir_user: str | None
    context: dict[str, Any]
    nonce: str | None
    expires_at: float
    used: bool = False
    grant_id: str | None = None


@dataclass(frozen=True)
class Login:
    """A portal login of the sandbox: a patient user."""

    username: str
    password: str = field(repr=False)
    patient_id: str
    display: str = ""


@dataclass
class AuthConfig:
    """Knobs of one authorization server (tests change lifetimes to force expiry)."""

    access_token_lifetime: int = 3600
    backend_token_lifetime: int = 300
    code_lifetime: int = 60
    refresh_token_lifetime: int = 90 * 24 * 3600
    online_refresh_lifetime: int = 12 * 3600
    launch_lifetime: int = 300
    pending_lifetime: int = 600
    assertion_max_lifetime: int = 300
    allow_public_clients: bool = True
    require_jwks_url: bool = False  # Epic-like: backend clients must use a JWKS URL, no inline keys
    clock_skew: int = 30  # seconds tolerated on `iat`/`nbf` of assertions


# ---------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------
class AuthServer:
    """One SMART authorization server (state in memory) for one organization's FHIR base."""

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

    # -- routes --------------------------------------------------------------------------------
    def routes(self) -> list[Route]:
        """Starlette routes of the authorization server, relative to its mount (`/auth`)."""
        return [
            Route("/authorize", self._authorize, methods=["GET", "POST"]),
            Route("/login", self._login, methods=["GET", "POST"]),
            Route("/consent", self._consent, methods=["POST"]),
            Route("/token", self._token, methods=["POST"]),
            Route("/introspect", self._introspect, methods=["POST"]),
            Route("/revoke", self._revoke, methods=["POST"]),
            Route("/jwks", self._jwks_endpoint, methods=["GET"]),
            Route("/.well-known/openid-configuration", self._openid_endpoint, methods=["GET"]),
        ]

    async def _jwks_endpoint(self, request: Request) -> Response:
        return JSONResponse(self.jwks(), headers={"Cache-Control": "max-age=300"})

    async def _openid_endpoint(self, request: Request) -> Response:
        return JSONResponse(self.openid_configuration())

    # -- authorize -----------------------------------------------------------------------------
    async def _authorize(self, request: Request) -> Response:
        if request.method == "POST":
            if not _is_form(request):
                return _error_page("invalid_request", "POST authorize needs a form body")
            params = _single_params(list((await request.form()).multi_items()))
        else:
            params = _single_params(list(request.query_params.multi_items()))
        if params is None:
            return _error_page("invalid_request", "a parameter was sent more than once")
        client = self.get_client(params.get("client_id", ""))
        if client is None:
            return _error_page("invalid_client", "unknown client_id")
        if client.token_endpoint_auth_method == "none" and not self.config.allow_public_clients:
            return _error_page("unauthorized_client", "this server accepts confidential clients")
        redirect_uri = params.get("redirect_uri", "")
        # Exact string match against a pre-registered URI (no prefix or pattern matching).
        if redirect_uri not in client.redirect_uris:
            return _error_page("invalid_request", "redirect_uri is not registered for this client")
        state = params.get("state")

        def fail(error: str, description: str) -> Response:
            return _redirect(
                redirect_uri, {"error": error, "error_description": description, "state": state}
            )

        if not state:
            return fail("invalid_request", "state is required")
        if params.get("response_type") != "code":
            return fail("unsupported_response_type", "response_type must be code")
        if params.get("aud") != self.fhir_base:
            return fail("invalid_request", "aud must be this server's FHIR base URL")
        method = params.get("code_challenge_method")
        challenge = params.get("code_challenge", "")
        if method != "S256":
            return fail("invalid_request", "code_challenge_method must be S256")
        if not re.fullmatch(r"[A-Za-z0-9_-]{43}", challenge):
            return fail("invalid_request", "code_challenge must be a base64url SHA-256 digest")
        requested = params.get("scope", "").split()
        if not requested:
            return fail("invalid_scope", "scope is required")
        launch_ctx = None
        launch_id = params.get("launch")
        if launch_id is not None or "launch" in requested:
            if launch_id is None or "launch" not in requested:
                return fail(
                    "invalid_request",
                    "EHR launch needs both the launch parameter and the launch scope",
                )
            with self._lock:
                entry = self._launches.get(launch_id)
            if entry is None or entry[0] <= self.clock():
                return fail("invalid_request", "unknown or expired launch")
            launch_ctx = entry[1]
        scopes = narrow_scopes(requested, client.scopes, contexts=("patient", "user"))
        if not any(parse_scope(s) for s in scopes) and "openid" not in scopes:
            return fail("invalid_scope", "none of the requested scopes can be granted")
        pending = _Pending(
            request_id=secrets.token_urlsafe(24),
            client=client,
            redirect_uri=redirect_uri,
            state=state,
            scopes=scopes,
            code_challenge=challenge,
            nonce=params.get("nonce"),
            launch=launch_ctx,
            created=self.clock(),
        )
        with self._lock:
            self._purge()
            self._pending[pending.request_id] = pending
        if launch_ctx and launch_ctx.get("user"):
            # EHR launch: the user is already signed in to the EHR that minted the launch.
            if launch_ctx.get("auto_approve"):
                return self._approve(pending, scopes, launch_id)
            return self._consent_page(pending)
        query = urllib.parse.urlencode({"request_id": pending.request_id})
        return RedirectResponse(f"{self.auth_base}/login?{query}", status_code=302)

    async def _login(self, request: Request) -> Response:
        if request.method == "GET":
            pending = self._get_pending(request.query_params.get("request_id", ""))
            if pending is None:
                return _error_page("invalid_request", "unknown or expired authorization request")
            return self._login_page(pending, "")
        if not _is_form(request):
            return _error_page("invalid_request", "login needs a form body")
        form = await request.form()
        pending = self._get_pending(str(form.get("request_id", "")))
        if pending is None:
            return _error_page("invalid_request", "unknown or expired authorization request")
        if form.get("decision") == "deny":
            return self._deny(pending)
        login = self.logins.get(str(form.get("username", "")))
        password = str(form.get("password", ""))
        if login is None or not hmac.compare_digest(login.password.encode(), password.encode()):
            return self._login_page(pending, "Wrong username or password.", status=401)
        with self._lock:
            pending.login = login
            pending.consent_token = secrets.token_urlsafe(24)
        return self._consent_page(pending)

    async def _consent(self, request: Request) -> Response:
        if not _is_form(request):
            return _error_page("invalid_request", "consent needs a form body")
        form = await request.form()
        pending = self._get_pending(str(form.get("request_id", "")))
        token = str(form.get("consent_token", ""))
        if (
            pending is None
            or not pending.consent_token
            or not hmac.compare_digest(pending.consent_token.encode(), token.encode())
        ):
            return _error_page("invalid_request", "unknown or expired consent")
        if form.get("decision") != "approve":
            return self._deny(pending)
        chosen = [str(s) for s in form.getlist("scope")]
        # The user can only take scopes away; anything not offered is ignored.
        scopes = [s for s in pending.scopes if s in chosen]
        if not any(parse_scope(s) for s in scopes) and "openid" not in scopes:
            with self._lock:
                self._pending.pop(pending.request_id, None)
            return _redirect(
                pending.redirect_uri,
                {
                    "error": "access_denied",
                    "error_description": "no access was approved",
                    "state": pending.state,
                },
            )
        launch_id = None
        if pending.launch is not None:
            with self._lock:
                launch_id = next(
                    (k for k, v in self._launches.items() if v[1] is pending.launch), None
                )
        return self._approve(pending, scopes, launch_id)

    def _deny(self, pending: _Pending) -> Response:
        with self._lock:
            self._pending.pop(pending.request_id, None)
        return _redirect(
            pending.redirect_uri,
            {
                "error": "access_denied",
                "error_description": "the user denied access",
                "state": pending.state,
            },
        )

    def _approve(self, pending: _Pending, scopes: list[str], launch_id: str | None) -> Response:
        launch = pending.launch or {}
        patient = launch.get("patient")
        encounter = launch.get("encounter")
        fhir_user = launch.get("user")
        if pending.login is not None:
            fhir_user = fhir_user or f"Patient/{pending.login.patient_id}"
            patient = patient or pending.login.patient_id
        has_patient_scope = any(
            (s := parse_scope(t)) is not None and s.context == "patient" for t in scopes
        )
        if not (has_patient_scope or "launch/patient" in scopes or launch.get("patient")):
            patient = None
        if has_patient_scope and not patient:
            # A granted patient/ scope needs a patient context (SPECS §1.5).
            return _redirect(
                pending.redirect_uri,
                {
                    "error": "invalid_scope",
                    "error_description": "patient scopes need a patient",
                    "state": pending.state,
                },
            )
        context: dict[str, Any] = {}
        if pending.launch is not None:
            context["need_patient_banner"] = bool(launch.get("need_patient_banner"))
            context["tenant"] = self.org_id
            for key in ("intent", "smart_style_url"):
                if launch.get(key):
                    context[key] = launch[key]
            if launch.get("fhirContext"):
                context["fhirContext"] = launch["fhirContext"]
        code = secrets.token_urlsafe(32)
        record = _Code(
            client_id=pending.client.client_id,
            redirect_uri=pending.redirect_uri,
            code_challenge=pending.code_challenge,
            scopes=tuple(scopes),
            patient=patient,
            encounter=encounter,
            fhir_user=fhir_user,
            context=context,
            nonce=pending.nonce,
            expires_at=self.clock() + self.config.code_lifetime,
        )
        with self._lock:
            self._codes[code] = record
            self._pending.pop(pending.request_id, None)
            if launch_id:
                self._launches.pop(launch_id, None)  # a launch id is good for one authorization
        return _redirect(pending.redirect_uri, {"code": code, "state": pending.state})

    def _get_pending(self, request_id: str) -> _Pending | None:
        with self._lock:
            pending = self._pending.get(request_id)
            if pending is None or pending.created + self.config.pending_lifetime <= self.clock():
                return None
            return pending

    def _login_page(self, pending: _Pending, error: str, status: int = 200) -> Response:
        page = Template((_TEMPLATES / "login.html").read_text()).substitute(
            org_name=html.escape(self.org_name),
            client_name=html.escape(pending.client.name),
            error=html.escape(error),
            action=html.escape(f"{self.auth_base}/login"),
            request_id=html.escape(pending.request_id),
        )
        return HTMLResponse(page, status_code=status, headers=_PAGE_HEADERS)

    def _consent_page(self, pending: _Pending) -> Response:
        if pending.consent_token is None:
            pending.consent_token = secrets.token_urlsafe(24)
        user = (
            pending.login.username
            if pending.login
            else ((pending.launch or {}).get("user") or "EHR user")
        )
        patient = (
            pending.login.patient_id if pending.login else ((pending.launch or {}).get("patient"))
        )
        patient_line = ""
        if patient:
            name = self.patient_names.get(patient, f"Patient/{patient}")
            patient_line = f" to the record of <strong>{html.escape(name)}</strong>"
        items = "\n".join(
            f'  <li><label><input type="checkbox" name="scope" value="{html.escape(s)}" checked>'
            f" {html.escape(describe_scope(s))} <code>{html.escape(s)}</code></label></li>"
            for s in pending.scopes
        )
        page = Template((_TEMPLATES / "consent.html").read_text()).substitute(
            org_name=html.escape(self.org_name),
            client_name=html.escape(pending.client.name),
            user_display=html.escape(str(user)),
            patient_line=patient_line,
            action=html.escape(f"{self.auth_base}/consent"),
            scope_items=items,
            request_id=html.escape(pending.request_id),
            consent_token=html.escape(pending.consent_token),
        )
        return HTMLResponse(page, headers=_PAGE_HEADERS)

    # -- token endpoint ------------------------------------------------------------------------
    async def _token(self, request: Request) -> Response:
        try:
            if not _is_form(request):
                raise OAuthProtocolError(
                    "invalid_request", "the body must be application/x-www-form-urlencoded"
                )
            params = _single_params(list((await request.form()).multi_items()))
            if params is None:
                raise OAuthProtocolError("invalid_request", "a parameter was sent more than once")
            client = await self._authenticate_client(request, params)
            grant_type = params.get("grant_type")
            if grant_type == "authorization_code":
                body = self._grant_code(client, params)
            elif grant_type == "refresh_token":
                body = self._grant_refresh(client, params)
            elif grant_type == "client_credentials":
                body = self._grant_client_credentials(client, params)
            else:
                raise OAuthProtocolError("unsupported_grant_type", "grant_type is not supported")
        except OAuthProtocolError as exc:
            return _oauth_error(exc)
        return JSONResponse(body, headers=_NO_STORE)

    async def _authenticate_client(
        self, request: Request, params: Mapping[str, str]
    ) -> ClientRegistration:
        header = request.headers.get("authorization", "")
        assertion_type = params.get("client_assertion_type")
        used = [bool(header.lower().startswith("basic ")), assertion_type is not None]
        if sum(used) > 1:
            raise OAuthProtocolError("invalid_request", "use one client authentication method")
        if used[0]:
            return self._authenticate_basic(header)
        if assertion_type is not None:
            if assertion_type != JWT_BEARER:
                raise OAuthProtocolError(
                    "invalid_client", "unsupported client_assertion_type", status=401
                )
            client = await self.verify_client_assertion(params.get("client_assertion", ""))
            if params.get("client_id") not in (None, client.client_id):
                raise OAuthProtocolError(
                    "invalid_client", "client_id does not match the assertion", status=401
                )
            return client
        public = self.get_client(params.get("client_id", ""))
        if (
            public is None
            or public.token_endpoint_auth_method != "none"
            or not self.config.allow_public_clients
        ):
            raise OAuthProtocolError("invalid_client", "client authentication failed", status=401)
        return public

    def _authenticate_basic(self, header: str) -> ClientRegistration:
        challenge = {"WWW-Authenticate": f'Basic realm="{self.org_id}"'}
        try:
            raw = base64.b64decode(header.split(" ", 1)[1].strip(), validate=True).decode()
            cid, _, secret = raw.partition(":")
            cid, secret = urllib.parse.unquote_plus(cid), urllib.parse.unquote_plus(secret)
        except (ValueError, IndexError):
            raise OAuthProtocolError(
                "invalid_client", "malformed Basic credentials", status=401, headers=challenge
            ) from None
        client = self.get_client(cid)
        if (
            client is None
            or client.token_endpoint_auth_method != "client_secret_basic"
            or not client.client_secret
            or not hmac.compare_digest(client.client_secret.encode(), secret.encode())
        ):
            raise OAuthProtocolError(
                "invalid_client", "client authentication failed", status=401, headers=challenge
            )
        return client

    async def verify_client_assertion(self, assertion: str) -> ClientRegistration:
        """Check a private_key_jwt client assertion (SPECS §2); return the client it proves.

        Every failure is `invalid_client` (401), as the spec asks: bad signature, unknown `kid`,
        replayed `jti`, expired or too long-lived, wrong `aud`, disallowed `alg` or `jku`.
        """

        def bad(why: str) -> OAuthProtocolError:
            return OAuthProtocolError("invalid_client", why, status=401)

        try:
            header = jwt.get_unverified_header(assertion)
            claims = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise bad("client_assertion is not a JWT") from None
        alg = header.get("alg")
        if alg not in ASSERTION_ALGS:
            raise bad("client_assertion alg must be RS384 or ES384")
        if header.get("typ") != "JWT" or not header.get("kid"):
            raise bad("client_assertion header needs typ JWT and a kid")
        client_id = claims.get("iss")
        if not isinstance(client_id, str) or claims.get("sub") != client_id:
            raise bad("client_assertion iss and sub must both be the client_id")
        client = self.get_client(client_id)
        if client is None or client.token_endpoint_auth_method != "private_key_jwt":
            raise bad("unknown client or client not registered for private_key_jwt")
        jwks = await self._client_keys(client, header.get("jku"))
        kty = "RSA" if alg.startswith("RS") else "EC"
        candidates = [
            k
            for k in jwks.get("keys", [])
            if isinstance(k, dict)
            and k.get("kid") == header["kid"]
            and k.get("kty") == kty
            and (kty != "EC" or k.get("crv") == "P-384")
        ]
        if len(candidates) != 1:
            raise bad("the kid does not select exactly one key of the right type")
        try:
            key = jwt.PyJWK(candidates[0], algorithm=alg)
            verified = jwt.decode(
                assertion,
                key=key.key,
                algorithms=[alg],
                audience=self.token_endpoint,
                options={"require": ["exp", "iss", "sub", "aud", "jti"]},
            )
        except jwt.ExpiredSignatureError:
            raise bad("client_assertion has expired") from None
        except jwt.InvalidAudienceError:
            raise bad("client_assertion aud must be the token endpoint URL") from None
        except jwt.PyJWTError:
            raise bad("client_assertion failed verification") from None
        now = self.clock()
        exp = float(verified["exp"])
        if exp - now > self.config.assertion_max_lifetime:
            raise bad("client_assertion exp is more than five minutes ahead")
        iat = verified.get("iat")
        if isinstance(iat, int | float) and iat > now + self.config.clock_skew:
            raise bad("client_assertion iat is in the future")
        jti = verified["jti"]
        if not isinstance(jti, str) or not jti:
            raise bad("client_assertion jti must be a non-empty string")
        with self._lock:
            self._jtis = {k: v for k, v in self._jtis.items() if v > now}
            if (client_id, jti) in self._jtis:
                raise bad("client_assertion jti was already used")
            self._jtis[(client_id, jti)] = exp
        return client

    async def _client_keys(self, client: ClientRegistration, jku: str | None) -> dict[str, Any]:
        if jku is not None:
            if jku not in client.jku_allowlist:
                raise OAuthProtocolError(
                    "invalid_client", "jku is not allow-listed for this client", status=401
                )
            return await self._fetch_jwks(jku)
        if client.jwks_uri:
            return await self._fetch_jwks(client.jwks_uri)
        if client.jwks is not None and not self.config.require_jwks_url:
            return dict(client.jwks)
        raise OAuthProtocolError("invalid_client", "no keys registered for this client", status=401)

    async def _fetch_jwks(self, url: str) -> dict[str, Any]:
        now = self.clock()
        with self._lock:
            cached = self._jwks_cache.get(url)
        if cached and cached[0] > now:
            return cached[1]
        try:
            if self._http is not None:
                resp = await self._http.get(url, timeout=5)
            else:
                async with httpx.AsyncClient(timeout=5) as client:
                    resp = await client.get(url)
            resp.raise_for_status()
            body = resp.json()
        except (httpx.HTTPError, ValueError):
            raise OAuthProtocolError(
                "invalid_client", "the client's JWKS URL could not be read", status=401
            ) from None
        if not isinstance(body, dict) or not isinstance(body.get("keys"), list):
            raise OAuthProtocolError(
                "invalid_client", "the client's JWKS URL is not a JWK Set", status=401
            )
        # Cache no longer than the client's Cache-Control allows (SPECS §2).
        max_age = _max_age(resp.headers.get("cache-control", ""))
        if max_age > 0:
            with self._lock:
                self._jwks_cache[url] = (now + max_age, body)
        return body

    def _grant_code(self, client: ClientRegistration, params: Mapping[str, str]) -> dict[str, Any]:
        code = params.get("code", "")
        with self._lock:
            record = self._codes.get(code)
            if record is None or record.client_id != client.client_id:
                raise OAuthProtocolError("invalid_grant", "unknown authorization code")
            if record.used:
                # A replayed code: revoke what it issued (RFC 6749 §4.1.2).
                grant = self._grants.get(record.grant_id or "")
                if grant:
                    self._revoke_grant(grant)
                raise OAuthProtocolError("invalid_grant", "authorization code was already used")
            record.used = True
        if record.expires_at <= self.clock():
            raise OAuthProtocolError("invalid_grant", "authorization code has expired")
        if params.get("redirect_uri") != record.redirect_uri:
            raise OAuthProtocolError("invalid_grant", "redirect_uri does not match")
        verifier = params.get("code_verifier", "")
        if not _VERIFIER_RE.match(verifier):
            raise OAuthProtocolError("invalid_grant", "code_verifier is missing or malformed")
        digest = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode("ascii")).digest())
        if not hmac.compare_digest(digest.rstrip(b"=").decode(), record.code_challenge):
            raise OAuthProtocolError("invalid_grant", "code_verifier does not match")
        scopes = record.scopes
        refresh_life: float | None = None
        if "offline_access" in scopes:
            refresh_life = self.config.refresh_token_lifetime
        elif "online_access" in scopes:
            refresh_life = self.config.online_refresh_lifetime
        grant = _Grant(
            grant_id=secrets.token_hex(8),
            client_id=client.client_id,
            scopes=scopes,
            patient=record.patient,
            encounter=record.encounter,
            fhir_user=record.fhir_user,
            context=record.context,
            refresh_expires_at=None if refresh_life is None else self.clock() + refresh_life,
        )
        with self._lock:
            self._grants[grant.grant_id] = grant
            record.grant_id = grant.grant_id
        body = self._issue(grant, scopes, with_refresh=refresh_life is not None)
        if "openid" in scopes:
            body["id_token"] = self._id_token(
                client, grant, record.nonce, with_fhir_user="fhirUser" in scopes
            )
        return body

    def _grant_refresh(
        self, client: ClientRegistration, params: Mapping[str, str]
    ) -> dict[str, Any]:
        token = params.get("refresh_token", "")
        with self._lock:
            grant_id = self._refresh.get(token)
            grant = self._grants.get(grant_id or "")
            if grant is None or grant.client_id != client.client_id:
                raise OAuthProtocolError("invalid_grant", "unknown refresh token")
            if grant.revoked:
                raise OAuthProtocolError("invalid_grant", "the grant was revoked")
            if token != grant.current_refresh:
                # A rotated-out token came back: someone holds a copy. Kill the grant.
                self._revoke_grant(grant)
                raise OAuthProtocolError(
                    "invalid_grant", "refresh token reuse detected; the grant is revoked"
                )
            if grant.refresh_expires_at is not None and grant.refresh_expires_at <= self.clock():
                raise OAuthProtocolError("invalid_grant", "refresh token has expired")
            scopes = grant.scopes
            if "scope" in params:
                asked = params["scope"].split()
                if not asked or not set(asked) <= set(grant.scopes):
                    raise OAuthProtocolError(
                        "invalid_scope", "refresh scope must be a subset of the original grant"
                    )
                scopes = tuple(s for s in grant.scopes if s in asked)
            return self._issue(grant, scopes, with_refresh=True)

    def _grant_client_credentials(
        self, client: ClientRegistration, params: Mapping[str, str]
    ) -> dict[str, Any]:
        if client.token_endpoint_auth_method != "private_key_jwt":
            raise OAuthProtocolError(
                "unauthorized_client", "client_credentials needs private_key_jwt authentication"
            )
        asked = params.get("scope", "").split()
        if not asked:
            raise OAuthProtocolError("invalid_scope", "scope is required")
        granted = narrow_scopes(asked, client.scopes, contexts=("system",))
        # Backend Services: asking beyond what was pre-authorised fails (SPECS §2).
        if len(granted) != len(asked) or any(
            parse_scope(g) != parse_scope(a) for g, a in zip(granted, asked, strict=True)
        ):
            raise OAuthProtocolError("invalid_scope", "scope asks beyond what this client may have")
        now = self.clock()
        token = secrets.token_urlsafe(32)
        info = TokenInfo(
            token=token,
            client_id=client.client_id,
            scopes=tuple(granted),
            expires_at=now + self.config.backend_token_lifetime,
            issued_at=now,
        )
        with self._lock:
            self._access[token] = info
        return {
            "access_token": token,
            "token_type": "bearer",
            "expires_in": self.config.backend_token_lifetime,
            "scope": " ".join(granted),
        }

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

    # -- introspection and revocation ----------------------------------------------------------
    async def _introspect(self, request: Request) -> Response:
        try:
            if not _is_form(request):
                raise OAuthProtocolError("invalid_request", "form body required")
            params = _single_params(list((await request.form()).multi_items()))
            if params is None:
                raise OAuthProtocolError("invalid_request", "a parameter was sent more than once")
            # The caller must be authorised: a live bearer token or client authentication.
            auth = request.headers.get("authorization", "")
            if auth.lower().startswith("bearer "):
                if self.validate_access_token(auth[7:].strip()) is None:
                    return JSONResponse(
                        {"error": "invalid_token"},
                        status_code=401,
                        headers={"WWW-Authenticate": 'Bearer error="invalid_token"', **_NO_STORE},
                    )
            else:
                await self._authenticate_client(request, params)
        except OAuthProtocolError as exc:
            return _oauth_error(exc)
        info = self.validate_access_token(params.get("token", ""))
        if info is None:
            return JSONResponse({"active": False}, headers=_NO_STORE)
        body: dict[str, Any] = {
            "active": True,
            "scope": " ".join(info.scopes),
            "client_id": info.client_id,
            "exp": int(info.expires_at),
            "iat": int(info.issued_at),
            "token_type": "Bearer",
            "iss": self.issuer,
            "aud": self.fhir_base,
        }
        if info.fhir_user:
            body["sub"] = info.fhir_user
            body["fhirUser"] = f"{self.fhir_base}/{info.fhir_user}"
        if info.patient:
            body["patient"] = info.patient
        if info.encounter:
            body["encounter"] = info.encounter
        body.update(info.context)
        return JSONResponse(body, headers=_NO_STORE)

    async def _revoke(self, request: Request) -> Response:
        try:
            if not _is_form(request):
                raise OAuthProtocolError("invalid_request", "form body required")
            params = _single_params(list((await request.form()).multi_items()))
            if params is None:
                raise OAuthProtocolError("invalid_request", "a parameter was sent more than once")
            client = await self._authenticate_client(request, params)
        except OAuthProtocolError as exc:
            return _oauth_error(exc)
        token = params.get("token", "")
        with self._lock:
            info = self._access.get(token)
            if info is not None and info.client_id == client.client_id:
                info.revoked = True
            grant = self._grants.get(self._refresh.get(token, ""))
            if grant is not None and grant.client_id == client.client_id:
                self._revoke_grant(grant)
        # RFC 7009 §2.2: 200 whether or not the token was known.
        return Response(status_code=200, headers=_NO_STORE)

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
# require_token: the seam FHIR endpoints call
# ---------------------------------------------------------------------------------------------
def bearer_challenge(
    realm: str, error: str | None = None, description: str | None = None, scope: str | None = None
) -> str:
    """An RFC 6750 `WWW-Authenticate: Bearer ...` value."""
    parts = [f'realm="{realm}"']
    if error:
        parts.append(f'error="{error}"')
    if description:
        parts.append(f'error_description="{description}"')
    if scope:
        parts.append(f'scope="{scope}"')
    return "Bearer " + ", ".join(parts)


def require_token(request: Request, *, scopes_any_of: Iterable[str] = ()) -> TokenInfo:
    """Validate the bearer token of a FHIR request against this org's authorization server.

    Raises `FhirHttpError` 401 (no, unknown, expired or revoked token) with an RFC 6750
    `WWW-Authenticate` header, or 403 `insufficient_scope` when `scopes_any_of` is given and no
    granted scope covers any of them (e.g. `("system/*.rs", "system/Patient.rs")`).
    """
    server: AuthServer = request.app.state.auth_server
    realm = server.fhir_base
    header = request.headers.get("authorization", "")
    if not header.lower().startswith("bearer ") or not header[7:].strip():
        raise FhirHttpError(
            401,
            "login",
            "a bearer access token is required",
            headers={"WWW-Authenticate": bearer_challenge(realm)},
        )
    info = server.validate_access_token(header[7:].strip())
    if info is None:
        raise FhirHttpError(
            401,
            "login",
            "the access token is invalid, expired or revoked",
            headers={
                "WWW-Authenticate": bearer_challenge(
                    realm, "invalid_token", "The access token is invalid, expired or revoked"
                )
            },
        )
    required = list(scopes_any_of)
    if required and not info.satisfies_any(required):
        raise FhirHttpError(
            403,
            "forbidden",
            "the access token's scopes do not allow this request",
            headers={
                "WWW-Authenticate": bearer_challenge(
                    realm, "insufficient_scope", scope=" ".join(required)
                )
            },
        )
    return info


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
