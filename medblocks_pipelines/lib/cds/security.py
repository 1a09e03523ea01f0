"""Verify the EHR's JWT on every CDS Hooks call (SPECS §4.6, CDS Hooks 2.0 "Trusting CDS Clients").

Rules, each refused with a :class:`CdsRequestError` (401) and a reason code:

* header: ``typ`` JWT, ``kid`` present, ``alg`` asymmetric (RS/PS/ES 256-512); ``none`` and HMAC refused;
* ``iss`` must be an issuer some organization allow-lists in its registry config
  (``{"cds": {"iss": ..., "jwks_url": ..., "jku": [...], "jwks": {...}}}``): an unknown issuer never
  reaches any tenant's data; an issuer shared by several organizations must name one with ``tenant``;
* keys only from the organization's ``jwks_url``, an allow-listed ``jku``, or an inline ``jwks``
  exchanged out of band: a ``jku`` header that is not on the list is refused before any fetch;
* ``aud`` (string or array) must contain the exact URL called;
* ``exp``, ``iat`` and ``jti`` required; ``exp``/``iat`` checked with a small skew (60 s), a token
  living longer than ``MAX_LIFETIME`` refused;
* ``jti`` replay refused: every accepted ``(iss, jti)`` goes into a shared store
  (:mod:`lib.cds.jti_store`: Redis ``SET NX EX`` when ``MEDBLOCKS_REDIS_URL`` is set, else the
  ``cds_jti`` table's primary key), so a replay fails across workers, processes and machines.

:meth:`CdsAuthenticator.verify_async` makes the same checks on the event loop (the jti awaited;
:mod:`lib.cds.inline`): whatever would block there (a registry re-read, a JWKS fetch, the SQL
jti store, a refusal's audit row) is done in a thread, never skipped.

JWKS documents are cached per URL (``JWKS_TTL``), inline ones per organization (parsed once, not
per call); an unknown ``kid`` refetches at most once per
``KID_REFETCH_INTERVAL`` (key rotation), so a flood of forged kids cannot hammer the EHR.
"""

import base64
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
import jwt

from medblocks_pipelines.lib.cds.inline import MustOffload, inline_mode, may_block
from medblocks_pipelines.lib.cds.jti_store import JtiStore, SqlJtiStore, open_jti_store
from medblocks_pipelines.lib.errors import CdsRequestError
from medblocks_pipelines.lib.registry.rows import Organization

if TYPE_CHECKING:
    from medblocks_pipelines.lib.registry import ControlPlane

log = logging.getLogger(__name__)

ALLOWED_ALGS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"}
)
SKEW = 60
MAX_LIFETIME = 3600
JWKS_TTL = 300.0
KID_REFETCH_INTERVAL = 30.0
ORG_CACHE_TTL = 10.0
ORG_MISS_RECHECK = 1.0


@dataclass(frozen=True)
class CdsClient:
    """The organization a verified call comes from, and its tenant."""

    organization_id: str
    tenant_id: str
    source_id: str
    iss: str
    claims: Mapping[str, Any]


def _refuse(message: str, reason: str) -> CdsRequestError:
    return CdsRequestError(message, status=401, reason=reason)


def _jti_unavailable(exc: Exception) -> CdsRequestError:
    log.warning("cds jti store unavailable (%s)", type(exc).__name__)
    return CdsRequestError(
        "the replay check is unavailable; try again", status=503, reason="jti_unavailable"
    )


def _unverified_claims(token: str) -> dict[str, Any]:
    """The payload of a compact JWS, unverified: only to find the issuer (and so the keys).

    The signature and every claim are checked by the full ``jwt.decode`` afterwards; decoding the
    payload by hand here spares a third parse of the token on every call.
    """
    parts = token.split(".")
    if len(parts) != 3:
        raise ValueError("not a compact JWS")
    segment = parts[1]
    claims = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    if not isinstance(claims, dict):
        raise ValueError("the JWT payload is not a JSON object")
    return claims


class CdsAuthenticator:
    """Verifies CDS Hooks bearer JWTs against the registry's per-organization allowlists."""

    def __init__(
        self,
        cp: "ControlPlane",
        *,
        http: httpx.Client | None = None,
        clock: Callable[[], float] = time.time,
        jti_store: JtiStore | None = None,
    ) -> None:
        self.cp = cp
        self.jtis = jti_store or open_jti_store(cp.engine)
        self.http = http or httpx.Client(timeout=5.0)
        self.clock = clock
        self._lock = threading.Lock()
        self._orgs: tuple[float, list[Organization]] | None = None
        self._jwks: dict[str, tuple[float, jwt.PyJWKSet]] = {}
        self._last_refetch: dict[str, float] = {}
        # Inline JWKS parsed once per organization record (the org cache hands out new dicts
        # when the registry is re-read, so identity tells when to parse again).
        self._inline: dict[str, tuple[Any, jwt.PyJWKSet]] = {}

    # -- registry -------------------------------------------------------------------------------
    def _organizations(self, *, max_age: float = ORG_CACHE_TTL) -> list[Organization]:
        now = time.monotonic()
        cached = self._orgs
        if cached is not None and now - cached[0] < max_age:
            return cached[1]
        may_block("registry")
        orgs = [o for o in self.cp.list_organizations() if (o.config or {}).get("cds")]
        self._orgs = (now, orgs)
        return orgs

    def _matches(self, orgs: list[Organization], iss: str, tenant_claim: Any) -> list[Organization]:
        matches = [
            o
            for o in orgs
            if str((o.config["cds"] or {}).get("iss", "")).rstrip("/") == iss.rstrip("/")
        ]
        if len(matches) > 1:
            # One issuer for several organizations (a vendor cloud): the `tenant` claim picks one.
            if not isinstance(tenant_claim, str) or not tenant_claim:
                return []
            matches = [
                o for o in matches if tenant_claim in (o.id, (o.config["cds"] or {}).get("tenant"))
            ]
        return matches

    def organization_for(self, iss: str, tenant_claim: Any) -> Organization:
        """The one organization allow-listing ``iss`` (``tenant`` claim picks among several)."""
        matches = self._matches(self._organizations(), iss, tenant_claim)
        if len(matches) != 1:
            # An organization configured moments ago: look again, at most once a second.
            matches = self._matches(
                self._organizations(max_age=ORG_MISS_RECHECK), iss, tenant_claim
            )
        if len(matches) != 1:
            raise _refuse("the JWT issuer is not allow-listed", "unknown_issuer")
        return matches[0]

    # -- keys -------------------------------------------------------------------------------------
    def _fetch_jwks(self, url: str) -> jwt.PyJWKSet:
        may_block("jwks")
        try:
            resp = self.http.get(url, headers={"Accept": "application/json"}, timeout=5.0)
            resp.raise_for_status()
            keyset = jwt.PyJWKSet.from_dict(resp.json())
        except (httpx.HTTPError, ValueError, jwt.PyJWTError) as exc:
            raise _refuse(
                f"the issuer's JWKS is unavailable ({type(exc).__name__})", "jwks_unavailable"
            ) from exc
        with self._lock:
            self._jwks[url] = (time.monotonic(), keyset)
        return keyset

    def _key(self, org: Organization, header: Mapping[str, Any]) -> Any:
        cfg = org.config["cds"]
        kid = header["kid"]
        jku = header.get("jku")
        if jku is not None:
            allowed = list(cfg.get("jku") or [])
            if cfg.get("jwks_url"):
                allowed.append(cfg["jwks_url"])
            if not isinstance(jku, str) or jku not in allowed:
                raise _refuse("the JWT jku is not allow-listed for this issuer", "jku_not_allowed")
            url: str | None = jku
        else:
            url = cfg.get("jwks_url")
        if url is None:
            inline = cfg.get("jwks")
            if not inline:
                raise _refuse("no keys are configured for this issuer", "no_keys")
            cached_inline = self._inline.get(org.id)
            if cached_inline is not None and cached_inline[0] is inline:
                return self._pick(cached_inline[1], kid)
            try:
                keyset = jwt.PyJWKSet.from_dict(inline)
            except jwt.PyJWTError as exc:
                raise _refuse("the configured JWKS is not valid", "no_keys") from exc
            self._inline[org.id] = (inline, keyset)
            return self._pick(keyset, kid)
        now = time.monotonic()
        cached = self._jwks.get(url)
        keyset = cached[1] if cached and now - cached[0] < JWKS_TTL else self._fetch_jwks(url)
        try:
            return self._pick(keyset, kid)
        except CdsRequestError:
            # A new kid may mean the EHR rotated keys: refetch, but not more than once in a while.
            last = self._last_refetch.get(url)
            if last is not None and now - last < KID_REFETCH_INTERVAL:
                raise
            may_block("jwks")  # before the refetch is counted: the thread's retry must fetch
            self._last_refetch[url] = now
            return self._pick(self._fetch_jwks(url), kid)

    @staticmethod
    def _pick(keyset: jwt.PyJWKSet, kid: str) -> Any:
        for k in keyset.keys:
            if k.key_id == kid:
                return k
        raise _refuse("the JWT kid is not in the issuer's JWKS", "unknown_kid")

    # -- the check --------------------------------------------------------------------------------
    def verify(self, authorization: str | None, *, url: str) -> CdsClient:
        """Verify ``Authorization: Bearer <JWT>`` for a call to ``url``; returns the caller."""
        org, token, header, alg, iss = self._prepare(authorization)
        try:
            client, forget_after = self._verify_for(org, token, header, alg, iss, url)
            try:
                new = self.jtis.remember(iss, client.claims["jti"], forget_after)
            except Exception as exc:  # noqa: BLE001 - Redis or the database is down: fail closed
                raise _jti_unavailable(exc) from exc
            if not new:
                raise _refuse("the JWT jti was already used", "replayed_jti")
            return client
        except CdsRequestError as exc:
            # The issuer is one of the tenant's organizations: its refusals belong in its audit
            # log (replays, expired or misaddressed tokens are how a leaked token shows up).
            self._audit_refusal(org, exc.reason)
            raise

    async def verify_async(
        self,
        authorization: str | None,
        *,
        url: str,
        offload: Callable[..., Awaitable[Any]],
    ) -> CdsClient:
        """:meth:`verify` on the event loop: the same checks in the same order, the jti awaited.

        Raises :class:`MustOffload` (having remembered nothing) when a check would block: the
        caller then runs :meth:`verify` in a thread. A refusal's audit row is written through
        ``offload`` (a thread) before the refusal is raised, as :meth:`verify` does.
        """
        if not getattr(self.jtis, "has_async", False):
            raise MustOffload("jti store")  # the SQL table: a blocking transaction
        with inline_mode():
            org, token, header, alg, iss = self._prepare(authorization)
        try:
            with inline_mode():
                client, forget_after = self._verify_for(org, token, header, alg, iss, url)
            try:
                new = await self.jtis.remember_async(iss, client.claims["jti"], forget_after)  # type: ignore[attr-defined]
            except Exception as exc:  # noqa: BLE001 - Redis is down: fail closed
                raise _jti_unavailable(exc) from exc
            if not new:
                raise _refuse("the JWT jti was already used", "replayed_jti")
            return client
        except CdsRequestError as exc:
            await offload(self._audit_refusal, org, exc.reason)
            raise

    def _prepare(
        self, authorization: str | None
    ) -> tuple[Organization, str, dict[str, Any], str, str]:
        """The header checks and the issuer's organization: (org, token, header, alg, iss)."""
        if not authorization or not authorization[:7].lower() == "bearer ":
            raise _refuse("a bearer JWT is required", "missing_token")
        token = authorization[7:].strip()
        try:
            header = jwt.get_unverified_header(token)
            unverified = _unverified_claims(token)
        except (jwt.PyJWTError, ValueError) as exc:
            raise _refuse("the bearer token is not a JWT", "malformed_token") from exc
        alg = header.get("alg")
        if alg not in ALLOWED_ALGS:
            # `none` and HMAC (a shared secret anyone holding the JWKS could forge) are refused.
            raise _refuse("the JWT alg is not an allowed asymmetric algorithm", "alg_not_allowed")
        if str(header.get("typ", "")).upper() != "JWT":
            raise _refuse("the JWT header typ must be JWT", "bad_typ")
        if not isinstance(header.get("kid"), str) or not header["kid"]:
            raise _refuse("the JWT header has no kid", "missing_kid")
        iss = unverified.get("iss")
        if not isinstance(iss, str) or not iss:
            raise _refuse("the JWT has no iss", "missing_claim")
        org = self.organization_for(iss, unverified.get("tenant"))
        return org, token, header, alg, iss

    def _audit_refusal(self, org: Organization, reason: str) -> None:
        may_block("audit")  # never reached inline: verify_async writes it through a thread
        try:
            self.cp.audit(
                tenant_id=org.tenant_id,
                actor=f"cds:{org.id}",
                action="cds.authenticate",
                decision="refused",
                reason=reason,
            )
        except Exception:  # noqa: BLE001 - an audit failure must not turn a 401 into a 500
            log.warning("cds refusal could not be audited")

    def _verify_for(
        self,
        org: Organization,
        token: str,
        header: Mapping[str, Any],
        alg: str,
        iss: str,
        url: str,
    ) -> tuple[CdsClient, float]:
        """Every check but the jti's: (the caller, when its jti may be forgotten)."""
        key = self._key(org, header)
        if key.algorithm_name != alg and "alg" in getattr(key, "_jwk_data", {}):
            # A key published for one algorithm is not used with another (RFC 7517 §4.4).
            raise _refuse("the JWT alg does not match its key", "alg_not_allowed")
        now = self.clock()
        try:
            claims = jwt.decode(
                token,
                key=key.key,
                algorithms=[alg],
                audience=url,
                issuer=iss,
                leeway=SKEW,
                options={"require": ["iss", "aud", "exp", "iat", "jti"], "verify_iat": False},
            )
        except jwt.ExpiredSignatureError as exc:
            raise _refuse("the JWT has expired", "expired") from exc
        except jwt.InvalidAudienceError as exc:
            raise _refuse("the JWT aud is not the URL called", "wrong_audience") from exc
        except jwt.MissingRequiredClaimError as exc:
            raise _refuse(f"the JWT lacks the {exc.claim} claim", "missing_claim") from exc
        except jwt.InvalidSignatureError as exc:
            raise _refuse("the JWT signature does not verify", "bad_signature") from exc
        except jwt.PyJWTError as exc:
            raise _refuse(f"the JWT is not valid ({type(exc).__name__})", "invalid_token") from exc
        iat, exp = claims["iat"], claims["exp"]
        if not isinstance(iat, int | float) or iat > now + SKEW:
            raise _refuse("the JWT iat is in the future", "iat_in_future")
        if exp - iat > MAX_LIFETIME:
            raise _refuse("the JWT lives too long", "lifetime_too_long")
        jti = claims["jti"]
        if not isinstance(jti, str) or not jti or len(jti) > 200:
            raise _refuse("the JWT jti is not a usable string", "missing_claim")
        client = CdsClient(
            organization_id=org.id,
            tenant_id=org.tenant_id,
            source_id=org.source_id,
            iss=iss,
            claims=claims,
        )
        return client, float(exp) + SKEW

    def purge_expired(self) -> int:
        """Delete remembered jtis whose token has expired (the SQL store; Redis keys expire)."""
        if isinstance(self.jtis, SqlJtiStore):
            return self.jtis.purge_expired()
        return 0

    def close(self) -> None:
        """Release the jti store's connections."""
        self.jtis.close()
