"""What the SMART authorization server remembers: registrations, tokens, grants, pending
authorizations, codes, portal logins and the server's knobs (split from `auth`).
"""

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from medblocks_sandbox.smart_scopes import AccessGrant, ResourceScope, parse_scope

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
