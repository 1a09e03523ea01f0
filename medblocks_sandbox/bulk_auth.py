"""The bulk server's authentication seam: what a caller is (`TokenInfo`, `CallerInfo`), the
`Authenticator` it calls on every request, `StaticTokens` for tests, the adapter to the EHR's
SMART authorization server, and the `system/` scope checks.
"""

import re
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from starlette.requests import Request

from medblocks_sandbox.errors import FhirHttpError
from medblocks_sandbox.faults import jwt_client_resolver

_SCOPE_RE = re.compile(r"^system/(?P<type>\*|[A-Z][A-Za-z]+)\.(?P<perm>\*|read|write|[cruds]+)$")


# ---------------------------------------------------------------------------------------------
# Authentication seam
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenInfo:
    """Who is calling: the client id and the scopes its access token carries."""

    client_id: str
    scopes: frozenset[str]


class CallerInfo(Protocol):
    """What an authenticator returns: ``TokenInfo`` here, or the EHR's ``auth.TokenInfo``."""

    @property
    def client_id(self) -> str:
        """The client the token was issued to."""
        ...

    @property
    def scopes(self) -> Collection[str]:
        """The granted scopes."""
        ...


#: Validates the request's bearer token; raises ``FhirHttpError`` (401/403) when it fails.
Authenticator = Callable[[Request], "CallerInfo | Awaitable[CallerInfo]"]


class StaticTokens:
    """A tiny token issuer/validator for running the bulk server without the EHR's AS.

    Tokens are random strings mapped to :class:`TokenInfo` and an expiry; ``expire`` ends one
    early (the seam the ``expire_token`` fault calls).
    """

    def __init__(self) -> None:
        self._tokens: dict[str, tuple[TokenInfo, float]] = {}
        self._lock = threading.Lock()

    def issue(self, client_id: str, scopes: Iterable[str], *, ttl: float = 300.0) -> str:
        """Issue a bearer token for ``client_id`` with ``scopes`` valid for ``ttl`` seconds."""
        token = secrets.token_urlsafe(24)
        with self._lock:
            self._tokens[token] = (TokenInfo(client_id, frozenset(scopes)), time.time() + ttl)
        return token

    def expire(self, token: str) -> None:
        """Make ``token`` expire now."""
        with self._lock:
            if token in self._tokens:
                self._tokens[token] = (self._tokens[token][0], 0.0)

    def client_of(self, token: str) -> str | None:
        """The client id of a known token (the fault middleware's resolver)."""
        with self._lock:
            found = self._tokens.get(token)
        return found[0].client_id if found else jwt_client_resolver(token)

    def __call__(self, request: Request) -> TokenInfo:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise FhirHttpError(
                401,
                "login",
                "a bearer token is required",
                headers={"WWW-Authenticate": 'Bearer realm="sandbox"'},
            )
        with self._lock:
            found = self._tokens.get(token.strip())
        if found is None or found[1] <= time.time():
            raise FhirHttpError(
                401,
                "expired" if found else "login",
                "the access token is invalid or expired",
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        return found[0]


def auth_server_authenticator(auth_server: Any) -> Authenticator:
    """Adapt the EHR's authorization server (``sandbox.auth.AuthServer``) to the bulk seam.

    Uses its public ``validate_access_token``; answers 401 with an RFC 6750 challenge like the
    EHR's own ``require_token``.
    """

    def authenticate(request: Request) -> TokenInfo:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise FhirHttpError(
                401,
                "login",
                "a bearer access token is required",
                headers={"WWW-Authenticate": 'Bearer realm="bulk"'},
            )
        info = auth_server.validate_access_token(token.strip())
        if info is None:
            raise FhirHttpError(
                401,
                "login",
                "the access token is invalid, expired or revoked",
                headers={"WWW-Authenticate": 'Bearer realm="bulk", error="invalid_token"'},
            )
        return TokenInfo(str(info.client_id), frozenset(info.scopes))

    return authenticate


def can_read(scopes: Iterable[str], resource_type: str) -> bool:
    """Whether system scopes (SMART v1 ``.read``/``.*`` or v2 ``.rs``-style) allow reading a type.

    Granular v2 scopes with a query (``system/Observation.rs?category=...``) do not grant a
    whole-type bulk export, so they are not counted.
    """
    for scope in scopes:
        match = _SCOPE_RE.match(scope)
        if not match or match["type"] not in ("*", resource_type):
            continue
        perm = match["perm"]
        if perm in ("*", "read"):
            return True
        if perm != "write" and "r" in perm and "".join(c for c in "cruds" if c in perm) == perm:
            return True
    return False


def has_system_read(scopes: Iterable[str]) -> bool:
    """Whether any scope is a system-level read scope (bulk export needs one)."""
    return any(
        (m := _SCOPE_RE.match(scope)) is not None and can_read([scope], m["type"])
        for scope in scopes
    )
