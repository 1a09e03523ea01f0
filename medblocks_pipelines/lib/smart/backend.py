"""SMART Backend Services tokens: ``client_credentials`` with a ``private_key_jwt`` assertion.

:class:`BackendAuth` finds the token endpoint by discovery (``.well-known/smart-configuration``),
signs a fresh assertion per token request, and caches the access token until ``refresh_margin``
seconds before it expires. Backend tokens live about five minutes and have no refresh token
(SPECS §2), so a long bulk download calls :meth:`BackendAuth.token` before every request and gets
a new token whenever the cached one is near its end, or after :meth:`BackendAuth.invalidate`
when the server answered 401. Thread-safe: parallel downloads share one instance.

With ``shared=True`` the token lives in a process-wide :class:`TokenCache` keyed by token endpoint,
client id and scope, so the separate steps of one export (kick-off, every status poll of the
sensor, downloads) reuse one token until shortly before it expires instead of asking for a token per
step; the discovered token endpoint is cached the same way (:func:`cached_token_endpoint`). The
renewal margin scales with the token's lifetime (:func:`renewal_margin`).
"""

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from medblocks_pipelines.lib.errors import AuthError, ProtocolError, TransientError
from medblocks_pipelines.lib.smart.assertion import (
    SigningKey,
    assertion_form,
    make_client_assertion,
)
from medblocks_pipelines.lib.smart.discovery import fetch_smart_configuration

#: Renew this many seconds before ``expires_in`` runs out (never less than a tenth of the life).
DEFAULT_REFRESH_MARGIN = 30.0
#: How long a discovered token endpoint is reused (servers rarely move it; a 401 or a failed token
#: request forgets it early).
DISCOVERY_TTL = 3600.0


def renewal_margin(life: float) -> float:
    """Seconds before expiry to stop using a token: a tenth of its life, within 5..60 s, never
    more than half of it (a 300 s token renews 30 s early, a one-hour token 60 s early)."""
    return min(max(life / 10, 5.0), 60.0, life / 2)


@dataclass(frozen=True)
class BackendToken:
    """An access token and when it stops being used (epoch seconds)."""

    access_token: str
    expires_at: float
    scope: str

    def __repr__(self) -> str:
        return f"BackendToken(expires_at={self.expires_at:.0f}, scope={self.scope!r})"


class TokenCache:
    """Tokens and discovered token endpoints shared by the :class:`BackendAuth` instances of one
    process (thread-safe). Keys hold no secret; values are kept in memory only."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens: dict[tuple[str, str, str], BackendToken] = {}
        self._endpoints: dict[str, tuple[str, float]] = {}

    def get(self, key: tuple[str, str, str], now: float) -> BackendToken | None:
        with self._lock:
            tok = self._tokens.get(key)
            return tok if tok is not None and now < tok.expires_at else None

    def put(self, key: tuple[str, str, str], token: BackendToken) -> None:
        with self._lock:
            self._tokens[key] = token

    def drop(self, key: tuple[str, str, str], token: str | None = None) -> None:
        with self._lock:
            cached = self._tokens.get(key)
            if cached is not None and (token is None or cached.access_token == token):
                del self._tokens[key]

    def endpoint(self, fhir_base_url: str, now: float) -> str | None:
        with self._lock:
            hit = self._endpoints.get(fhir_base_url)
            return hit[0] if hit is not None and now < hit[1] else None

    def put_endpoint(self, fhir_base_url: str, endpoint: str, until: float) -> None:
        with self._lock:
            self._endpoints[fhir_base_url] = (endpoint, until)

    def forget_endpoint(self, fhir_base_url: str) -> None:
        with self._lock:
            self._endpoints.pop(fhir_base_url, None)

    def clear(self) -> None:
        """Forget everything (tests; a key rotation does not need it)."""
        with self._lock:
            self._tokens.clear()
            self._endpoints.clear()


#: The process-wide cache used by ``BackendAuth(shared=True)``.
SHARED_CACHE = TokenCache()


def discover_token_endpoint(fhir_base_url: str, *, client: httpx.Client) -> str:
    """The token endpoint advertised in the server's SMART configuration."""
    try:
        conf = fetch_smart_configuration(fhir_base_url, client=client)
    except httpx.TransportError as exc:
        raise TransientError(f"discovery failed: {type(exc).__name__}") from exc
    methods = conf.get("token_endpoint_auth_methods_supported")
    if isinstance(methods, list) and methods and "private_key_jwt" not in methods:
        raise ProtocolError("the server does not offer private_key_jwt client authentication")
    return str(conf["token_endpoint"])


class BackendAuth:
    """Hands out a valid backend access token, fetching a new one when needed."""

    def __init__(
        self,
        *,
        client_id: str,
        scope: str,
        key: SigningKey | Callable[[], SigningKey],
        http: httpx.Client,
        token_endpoint: str | None = None,
        fhir_base_url: str | None = None,
        jku: str | None = None,
        refresh_margin: float | None = None,
        clock: Callable[[], float] = time.time,
        shared: bool = False,
        cache: TokenCache | None = None,
    ) -> None:
        if token_endpoint is None and fhir_base_url is None:
            raise ValueError("give token_endpoint or fhir_base_url (for discovery)")
        self.client_id = client_id
        self.scope = scope
        self._key = key
        self.http = http
        self._token_endpoint = token_endpoint
        self.fhir_base_url = fhir_base_url
        self.jku = jku
        self.refresh_margin = refresh_margin
        self.clock = clock
        self._lock = threading.Lock()
        self._token: BackendToken | None = None
        #: Process-wide reuse of tokens and discovery (``shared``), or this instance only.
        self._cache = cache if cache is not None else (SHARED_CACHE if shared else None)
        #: How many tokens were fetched (reported as metadata; tests check renewal).
        self.tokens_fetched = 0

    def __repr__(self) -> str:
        return f"BackendAuth(client_id={self.client_id!r}, scope={self.scope!r})"

    @property
    def token_endpoint(self) -> str:
        """The token endpoint, discovered on first use."""
        if self._token_endpoint is None:
            assert self.fhir_base_url is not None
            cache, now = self._cache, self.clock()
            hit = cache.endpoint(self.fhir_base_url, now) if cache is not None else None
            if hit is None:
                hit = discover_token_endpoint(self.fhir_base_url, client=self.http)
                if cache is not None:
                    cache.put_endpoint(self.fhir_base_url, hit, now + DISCOVERY_TTL)
            self._token_endpoint = hit
        return self._token_endpoint

    def _cache_key(self) -> tuple[str, str, str]:
        return (self.token_endpoint, self.client_id, self.scope)

    def token(self) -> str:
        """A bearer token valid for at least the renewal margin more seconds."""
        with self._lock:
            tok = self._token
            now = self.clock()
            if tok is None or now >= tok.expires_at:
                cache = self._cache
                tok = cache.get(self._cache_key(), now) if cache is not None else None
                if tok is None:
                    tok = self._fetch()
                    if cache is not None:
                        cache.put(self._cache_key(), tok)
                self._token = tok
            return tok.access_token

    def headers(self) -> dict[str, str]:
        """``Authorization: Bearer ...`` with a valid token."""
        return {"Authorization": f"Bearer {self.token()}"}

    def invalidate(self, token: str | None = None) -> None:
        """Forget the cached token (after a 401); with ``token``, only if it is still cached."""
        with self._lock:
            if self._token is not None and (token is None or self._token.access_token == token):
                self._token = None
            if self._cache is not None and self._token_endpoint is not None:
                self._cache.drop(self._cache_key(), token)

    def _signing_key(self) -> SigningKey:
        return self._key if isinstance(self._key, SigningKey) else self._key()

    def _fetch(self) -> BackendToken:
        endpoint = self.token_endpoint
        assertion = make_client_assertion(
            client_id=self.client_id,
            token_endpoint=endpoint,
            key=self._signing_key(),
            jku=self.jku,
        )
        form = {
            "grant_type": "client_credentials",
            "scope": self.scope,
            **assertion_form(assertion),
        }
        started = self.clock()
        try:
            resp = self.http.post(endpoint, data=form, headers={"Accept": "application/json"})
        except httpx.TransportError as exc:
            raise TransientError(f"token request failed: {type(exc).__name__}") from exc
        if resp.status_code == 404 and self._cache is not None and self.fhir_base_url:
            # The endpoint moved since discovery: discover again next time.
            self._cache.forget_endpoint(self.fhir_base_url)
            self._token_endpoint = None
        if resp.status_code == 429 or resp.status_code >= 500:
            raise TransientError(f"token endpoint answered HTTP {resp.status_code}")
        body = _json_or_none(resp)
        if resp.status_code != 200:
            error = body.get("error") if isinstance(body, dict) else None
            # RFC 6749 §5.2 codes only: descriptions may echo request content.
            raise AuthError(
                f"token request refused: HTTP {resp.status_code} {error or 'no error code'}",
                hint="check the client registration (client id, JWKS/kid, scopes)",
            )
        if not isinstance(body, dict) or not isinstance(body.get("access_token"), str):
            raise ProtocolError("token response has no access_token")
        if str(body.get("token_type", "")).lower() != "bearer":
            raise ProtocolError("token response token_type is not bearer")
        try:
            life = float(body.get("expires_in", 300))
        except (TypeError, ValueError):
            life = 300.0
        margin = (
            renewal_margin(life)
            if self.refresh_margin is None
            else min(self.refresh_margin, life / 10)
        )
        self.tokens_fetched += 1
        return BackendToken(
            access_token=body["access_token"],
            expires_at=started + max(life - margin, 1.0),
            scope=str(body.get("scope", self.scope)),
        )


def _json_or_none(resp: httpx.Response) -> Any:
    try:
        return resp.json()
    except ValueError:
        return None
