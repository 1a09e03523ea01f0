"""Token keeping for user-authorised SMART connections: client authentication, token responses, refresh.

Every connection's tokens live in the vault as one encrypted JSON blob, ``conn/<connection id>/tokens``::

    {"access_token", "refresh_token" | null, "expires_at" (epoch s) | null, "scope", "token_type",
     "token_endpoint", "obtained_at"}

One blob (not one secret per token) so a rotation stores the new access *and* refresh token in one
atomic write. Refresh follows SPECS §1.7:

- refresh shortly before expiry (a margin that scales with the token's lifetime, see
  :func:`refresh_margin_for`: a 60 s token is used for ~51 s, a one-hour token for 59 minutes),
  once after a 401, or when forced (``medblocks connections refresh``); each ``token.refreshed``
  event says which: ``reason`` = ``before_expiry`` | ``after_401`` | ``forced``;
- the refresh runs inside :meth:`Vault.update_with_lock` on the blob (``SELECT ... FOR UPDATE`` on
  PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite), so one process at a time refreshes a grant; a waiter that
  finds a fresh access token when it gets the lock uses it instead of refreshing again;
- a returned ``refresh_token`` replaces the old one in the same write (rotation); the old one is never
  sent again (servers revoke the whole grant on reuse);
- a refused refresh (``invalid_grant``...) moves the connection to ``refresh_failed`` and raises
  :class:`ConsentRevoked`; a connection without a refresh token whose token expired goes ``expired``.

Nothing in here logs or raises with a token, a key or patient data.
"""

import base64
import contextlib
import json
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import httpx

from medblocks_pipelines.lib.errors import (
    AuthError,
    ConfigError,
    ConsentRevoked,
    InvalidTransition,
    ProtocolError,
    TransientError,
)
from medblocks_pipelines.lib.registry import ControlPlane
from medblocks_pipelines.lib.registry.rows import Source
from medblocks_pipelines.lib.smart.scopes import ScopeSet

#: OAuth error codes that mean the grant itself is gone (RFC 6749 §5.2): stop, do not retry.
REFUSED_GRANT_ERRORS = frozenset({"invalid_grant", "invalid_client", "unauthorized_client"})
#: Token response keys that are not launch context (everything else is kept as context, SPECS §1.6).
TOKEN_KEYS = frozenset(
    {"access_token", "token_type", "expires_in", "scope", "refresh_token", "id_token"}
)


#: Why a grant was refreshed (the ``reason`` of a ``token.refreshed`` event).
REFRESH_REASONS = frozenset({"before_expiry", "after_401", "forced"})
#: Refresh-margin defaults: at most a minute, 15 % of the token's lifetime, at least 2 s.
MAX_REFRESH_MARGIN = 60.0
REFRESH_FRACTION = 0.15
MIN_REFRESH_MARGIN = 2.0


def refresh_margin_for(
    lifetime: float | None,
    *,
    cap: float = MAX_REFRESH_MARGIN,
    fraction: float = REFRESH_FRACTION,
    floor: float = MIN_REFRESH_MARGIN,
) -> float:
    """Seconds before expiry at which a token of ``lifetime`` seconds is refreshed.

    ``min(cap, max(floor, fraction * lifetime))``, and never more than half the lifetime: a fixed
    60 s margin made every request of a pull refresh a 60 s token (the token was never "fresh").
    An unknown lifetime (a blob written before ``obtained_at`` was kept) gets ``cap``.
    """
    if lifetime is None or lifetime <= 0:
        return cap
    return min(cap, max(floor, fraction * lifetime), lifetime / 2)


def tokens_secret_name(connection_id: str) -> str:
    """Vault name of a connection's token blob."""
    return f"conn/{connection_id}/tokens"


# ---------------------------------------------------------------------------------------------
# Client authentication at the token endpoint (SPECS §1.4)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClientAuth:
    """How we authenticate at one source's token endpoint.

    Secret material is loaded when this is built (outside any vault lock) and never shown in ``repr``.
    ``method``: ``none`` (public client: ``client_id`` in the form), ``client_secret_basic`` or
    ``private_key_jwt`` (a fresh assertion per request, from ``lib/smart/assertion.py``).
    """

    client_id: str
    method: str = "none"
    client_secret: str | None = field(default=None, repr=False)
    signing_key: Any = field(default=None, repr=False)
    jku: str | None = None

    @classmethod
    def from_source(
        cls, source: Source, control_plane: ControlPlane, *, pattern: str | None = None
    ) -> "ClientAuth":
        """Build from a source's ``config``: ``client_id``, ``client_auth`` and the vault names
        ``client_secret_secret`` (basic) or ``signing_key_secret`` (a SigningKey JSON; private_key_jwt).

        One EHR serves several patterns, each with its own app registration (a patient-facing app,
        an EHR-launched app, a backend client): ``<pattern>_client_id`` wins over ``client_id``.
        """
        cfg = source.config or {}
        client_id = (pattern and cfg.get(f"{pattern}_client_id")) or cfg.get("client_id")
        if not client_id:
            raise ConfigError(
                f"source {source.id} has no client_id",
                hint="register our app at the source and set config.client_id",
            )
        method = cfg.get("client_auth") or "none"
        if method == "none":
            return cls(client_id=client_id)
        if method == "client_secret_basic":
            name = cfg.get("client_secret_secret") or f"source/{source.id}/client_secret"
            secret = control_plane.vault.get(name)
            if secret is None:
                raise ConfigError(f"vault has no client secret {name!r} for source {source.id}")
            return cls(client_id=client_id, method=method, client_secret=secret.reveal())
        if method == "private_key_jwt":
            from medblocks_pipelines.lib.smart.assertion import SigningKey

            name = cfg.get("signing_key_secret") or f"source/{source.id}/signing_key"
            secret = control_plane.vault.get(name)
            if secret is None:
                raise ConfigError(f"vault has no signing key {name!r} for source {source.id}")
            return cls(
                client_id=client_id,
                method=method,
                signing_key=SigningKey.from_json(secret.reveal()),
                jku=cfg.get("jku"),
            )
        raise ConfigError(
            f"source {source.id}: unknown client_auth {method!r}",
            hint="one of none, client_secret_basic, private_key_jwt",
        )

    def apply(self, form: dict[str, str], *, token_endpoint: str) -> dict[str, str]:
        """Add client authentication to a token request ``form``; returns extra HTTP headers."""
        if self.method == "none":
            # Public clients identify themselves with client_id in the body (SPECS §1.4).
            form["client_id"] = self.client_id
            return {}
        if self.method == "client_secret_basic":
            # RFC 6749 §2.3.1: form-urlencode both parts before Base64.
            raw = (
                f"{urllib.parse.quote_plus(self.client_id)}:"
                f"{urllib.parse.quote_plus(self.client_secret or '')}"
            )
            return {"Authorization": "Basic " + base64.b64encode(raw.encode()).decode()}
        from medblocks_pipelines.lib.smart.assertion import assertion_form, make_client_assertion

        assertion = make_client_assertion(
            client_id=self.client_id,
            token_endpoint=token_endpoint,
            key=self.signing_key,
            jku=self.jku,
        )
        form.update(assertion_form(assertion))
        return {}


# ---------------------------------------------------------------------------------------------
# Token responses
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenResponse:
    """A parsed, validated token response (SPECS §1.4 / §1.7)."""

    access_token: str = field(repr=False)
    token_type: str
    expires_in: int | None
    scope: str | None
    refresh_token: str | None = field(default=None, repr=False)
    id_token: str | None = field(default=None, repr=False)
    context: dict[str, Any] = field(default_factory=dict)


def oauth_error_of(resp: httpx.Response) -> tuple[str, str]:
    """``(error, error_description)`` of an RFC 6749 §5.2 error response (best effort)."""
    try:
        body = resp.json()
    except ValueError:
        return f"http_{resp.status_code}", ""
    if not isinstance(body, dict):
        return f"http_{resp.status_code}", ""
    error = body.get("error")
    desc = body.get("error_description")
    return (
        str(error) if isinstance(error, str) and error else f"http_{resp.status_code}",
        str(desc)[:200] if isinstance(desc, str) else "",
    )


def parse_token_response(resp: httpx.Response, *, what: str) -> TokenResponse:
    """Check a token endpoint answer; raise :class:`AuthError`/:class:`TransientError` on failure.

    Refused grants raise :class:`ConsentRevoked` with the OAuth ``error`` as message suffix.
    """
    if resp.status_code == 429 or resp.status_code >= 500:
        raise TransientError(f"{what}: token endpoint answered HTTP {resp.status_code}")
    if resp.status_code != 200:
        error, _desc = oauth_error_of(resp)
        cls = ConsentRevoked if error in REFUSED_GRANT_ERRORS else AuthError
        exc = cls(f"{what} refused: {error}")
        exc.oauth_error = error  # type: ignore[attr-defined]
        raise exc
    try:
        body = resp.json()
    except ValueError as exc:
        ctype = resp.headers.get("content-type", "none")
        raise ProtocolError(f"{what}: token response is not JSON (content-type {ctype})") from exc
    if not isinstance(body, dict) or not isinstance(body.get("access_token"), str):
        raise ProtocolError(f"{what}: token response has no access_token")
    token_type = str(body.get("token_type") or "")
    # SPECS §1.4: compare without regard to case ("Bearer" / "bearer").
    if token_type.lower() != "bearer":
        raise ProtocolError(f"{what}: token_type {token_type or 'missing'!r} is not Bearer")
    expires_in = body.get("expires_in")
    if expires_in is not None:
        try:
            expires_in = int(expires_in)
        except (TypeError, ValueError):
            raise ProtocolError(f"{what}: expires_in is not a number") from None
    scope = body.get("scope")
    refresh = body.get("refresh_token")
    id_token = body.get("id_token")
    return TokenResponse(
        access_token=body["access_token"],
        token_type="Bearer",
        expires_in=expires_in,
        scope=scope if isinstance(scope, str) else None,
        refresh_token=refresh if isinstance(refresh, str) and refresh else None,
        id_token=id_token if isinstance(id_token, str) and id_token else None,
        context={k: v for k, v in body.items() if k not in TOKEN_KEYS},
    )


def token_blob(
    resp: TokenResponse,
    *,
    token_endpoint: str,
    now: float,
    previous_refresh: str | None = None,
    previous_scope: str | None = None,
) -> dict[str, Any]:
    """The vault blob for a token response (a missing ``refresh_token`` keeps the previous one)."""
    return {
        "access_token": resp.access_token,
        "refresh_token": resp.refresh_token or previous_refresh,
        "expires_at": (now + resp.expires_in) if resp.expires_in is not None else None,
        "scope": resp.scope if resp.scope is not None else previous_scope,
        "token_type": resp.token_type,
        "token_endpoint": token_endpoint,
        "obtained_at": now,
    }


def store_tokens(
    control_plane: ControlPlane, connection_id: str, blob: Mapping[str, Any], *, tenant_id: str
) -> None:
    """Write a connection's token blob (first issue, after the code exchange)."""
    control_plane.vault.put(
        tokens_secret_name(connection_id), json.dumps(dict(blob)), tenant_id=tenant_id
    )


def _expires_dt(blob: Mapping[str, Any]) -> datetime | None:
    exp = blob.get("expires_at")
    return datetime.fromtimestamp(float(exp), UTC) if exp is not None else None


# ---------------------------------------------------------------------------------------------
# Token manager
# ---------------------------------------------------------------------------------------------
class TokenProvider(Protocol):
    """What the FHIR client needs: a current token, and a refresh after a 401."""

    def access_token(self) -> str: ...

    def refresh(self, *, stale: str | None = None) -> str: ...


def _lifetime(blob: Mapping[str, Any]) -> float | None:
    exp, got = blob.get("expires_at"), blob.get("obtained_at")
    if exp is None or got is None:
        return None
    return float(exp) - float(got)


class StaticToken:
    """A fixed bearer token (tests, one-off reads): refresh is impossible."""

    def __init__(self, token: str) -> None:
        self._token = token

    def __repr__(self) -> str:
        return "StaticToken(***)"

    def access_token(self) -> str:
        return self._token

    def refresh(self, *, stale: str | None = None) -> str:
        raise AuthError("a static token cannot be refreshed")


class TokenManager:
    """Access tokens of one connection: cache, refresh before expiry, rotation, lifecycle updates.

    Thread-safe within a process (one lock per manager) and across processes (the vault row lock).
    """

    def __init__(
        self,
        control_plane: ControlPlane,
        connection_id: str,
        *,
        http: httpx.Client,
        client_auth: ClientAuth | None = None,
        refresh_margin: float = MAX_REFRESH_MARGIN,
        refresh_fraction: float = REFRESH_FRACTION,
        clock: Callable[[], float] = time.time,
        timeout: float = 20.0,
    ) -> None:
        self.cp = control_plane
        self.connection_id = connection_id
        self.http = http
        self.refresh_margin = refresh_margin  # the cap; see refresh_margin_for
        self.refresh_fraction = refresh_fraction
        self.clock = clock
        self.timeout = timeout
        self._client_auth = client_auth
        self._lock = threading.Lock()
        self._blob: dict[str, Any] | None = None
        self.refreshes = 0
        conn = control_plane.get_connection(connection_id)
        self.tenant_id: str = conn.tenant_id
        self.source_id: str = conn.source_id
        self.pattern: str = conn.pattern

    def __repr__(self) -> str:
        return f"TokenManager(connection={self.connection_id!r})"

    @property
    def client_auth(self) -> ClientAuth:
        if self._client_auth is None:
            self._client_auth = ClientAuth.from_source(
                self.cp.get_source(self.source_id), self.cp, pattern=self.pattern
            )
        return self._client_auth

    # -- reading -------------------------------------------------------------------------------
    def _load(self) -> dict[str, Any]:
        secret = self.cp.vault.get(tokens_secret_name(self.connection_id))
        if secret is None:
            raise AuthError(f"connection {self.connection_id} has no tokens in the vault")
        tokens: dict[str, Any] = json.loads(secret.reveal())
        return tokens

    def margin(self, blob: Mapping[str, Any]) -> float:
        """Seconds before this blob's expiry at which it is refreshed."""
        return refresh_margin_for(
            _lifetime(blob),
            cap=self.refresh_margin,
            fraction=self.refresh_fraction,
            floor=min(MIN_REFRESH_MARGIN, self.refresh_margin),
        )

    def _fresh(self, blob: Mapping[str, Any]) -> bool:
        exp = blob.get("expires_at")
        # Unknown expiry: use the token until the server says 401.
        return exp is None or float(exp) - self.margin(blob) > self.clock()

    @property
    def granted(self) -> ScopeSet:
        """The granted scopes of the current token."""
        with self._lock:
            blob = self._blob or self._load()
        return ScopeSet.parse(blob.get("scope"))

    def access_token(self) -> str:
        """A bearer token that is not about to expire (refreshing first if needed)."""
        with self._lock:
            if self._blob is None:
                self._blob = self._load()
            if self._fresh(self._blob):
                return str(self._blob["access_token"])
            current = str(self._blob["access_token"])
            return self._refresh_locked(current, "before_expiry")

    # -- refreshing ----------------------------------------------------------------------------
    def refresh(self, *, stale: str | None = None) -> str:
        """Refresh the grant after a 401 (one refresher per grant across processes).

        ``stale`` is the access token the server refused: if the stored token differs and is
        fresh, another thread or process refreshed already and that token is returned.
        """
        with self._lock:
            return self._refresh_locked(stale, "after_401")

    def force_refresh(self) -> str:
        """Refresh the grant now, whatever the current token's expiry (``reason: forced``)."""
        with self._lock:
            current = str((self._blob or self._load())["access_token"])
            return self._refresh_locked(current, "forced")

    def _refresh_locked(self, stale: str | None, reason: str) -> str:
        # Secret material (signing keys) is read now: nothing may touch the database under the
        # vault lock, because on SQLite that lock is the whole database's write lock.
        auth = self.client_auth
        outcome: dict[str, Any] = {}

        def rotate(current: Any) -> str | None:
            if current is None:
                raise AuthError(f"connection {self.connection_id} has no tokens in the vault")
            blob = json.loads(current.reveal())
            if blob.get("access_token") != stale and self._fresh(blob):
                outcome["blob"], outcome["refreshed"] = blob, False
                return None
            refresh_token = blob.get("refresh_token")
            if not refresh_token:
                outcome["expired"] = True
                raise AuthError(
                    f"connection {self.connection_id}: token expired and no refresh "
                    "token was granted"
                )
            endpoint = blob.get("token_endpoint")
            if not endpoint:
                raise ConfigError(f"connection {self.connection_id}: unknown token endpoint")
            resp = self._post_refresh(endpoint, refresh_token, auth)
            now = self.clock()
            new = token_blob(
                resp,
                token_endpoint=endpoint,
                now=now,
                previous_refresh=refresh_token,
                previous_scope=blob.get("scope"),
            )
            outcome["blob"], outcome["refreshed"] = new, True
            outcome["rotated"] = bool(resp.refresh_token) and resp.refresh_token != refresh_token
            return json.dumps(new)

        try:
            self.cp.vault.update_with_lock(
                tokens_secret_name(self.connection_id), rotate, tenant_id=self.tenant_id
            )
        except ConsentRevoked as exc:
            self._blob = None
            error = getattr(exc, "oauth_error", "invalid_grant")
            self._move("refresh_failed", reason=f"refresh refused: {error}")
            raise ConsentRevoked(
                f"connection {self.connection_id}: refresh refused ({error})",
                hint="the patient must connect again",
            ) from exc
        except AuthError:
            self._blob = None
            if outcome.get("expired"):
                self._move("expired", reason="access token expired without a refresh token")
            raise
        blob = outcome["blob"]
        self._blob = blob
        if outcome.get("refreshed"):
            self.refreshes += 1
            life = _lifetime(blob)
            self.cp.update_connection(
                self.connection_id,
                token_expires_at=_expires_dt(blob),
                has_refresh_token=bool(blob.get("refresh_token")),
            )
            self.cp.record_event(
                self.connection_id,
                "token.refreshed",
                {
                    "reason": reason,
                    "rotated": bool(outcome.get("rotated")),
                    # the new token's lifetime (s), or null when the server gave none
                    "expires_in": None if life is None else round(life),
                },
            )
        return str(blob["access_token"])

    def _post_refresh(self, endpoint: str, refresh_token: str, auth: ClientAuth) -> TokenResponse:
        form = {"grant_type": "refresh_token", "refresh_token": refresh_token}
        headers = auth.apply(form, token_endpoint=endpoint)
        headers["Accept"] = "application/json"
        try:
            resp = self.http.post(endpoint, data=form, headers=headers, timeout=self.timeout)
        except httpx.TransportError as exc:
            raise TransientError(f"refresh failed: {type(exc).__name__}") from exc
        return parse_token_response(resp, what="refresh")

    def _move(self, state: str, *, reason: str) -> None:
        # Already revoked/failed elsewhere: the lifecycle keeps the first verdict.
        with contextlib.suppress(InvalidTransition):
            self.cp.transition(self.connection_id, state, reason=reason)
