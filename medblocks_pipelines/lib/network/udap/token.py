"""UDAP B2B tokens: ``client_credentials`` with a ``private_key_jwt`` assertion and extensions.

The assertion (UDAP Security 2.0 §5.2) carries ``x5c``, ``iss`` = ``sub`` = client_id, ``aud`` =
the token URL, a 5-minute ``exp`` and a ``jti``, and in ``extensions`` the ``hl7-b2b`` object
(organization, requestor, ``purpose_of_use``: TEFCA exactly one, the XP of the registration's SAN
URI) and, for T-IAS, ``tefca_ias`` (underscore; an ``id_token`` from the identity provider is
required). A token is bound to the asserted context: :class:`TokenCache` keys it by
(node, client_id, requestor, purpose) and reuses it only until shortly before it expires.
"""

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from medblocks_pipelines.lib.errors import AuthError, ConfigError, ConsentRequired, ProtocolError
from medblocks_pipelines.lib.network.udap.certs import VaultSigner, san_purpose
from medblocks_pipelines.lib.network.udap.registration import Registration

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
#: TEFCA XP code system (SPECS 5.1), as a URI for ``purpose_of_use``.
XP_SYSTEM = "urn:oid:2.16.840.1.113883.3.7204.1.5.2.1"


@dataclass(frozen=True)
class Requestor:
    """Who asks: our organization and (for a human requestor) the person."""

    organization_name: str
    organization_id: str  # a URI (TEFCA: the RCE Directory Organization id)
    subject_name: str | None = None
    subject_id: str | None = None  # NPI URI preferred
    subject_role: str | None = None  # NUCC code URI
    consent_policy: tuple[str, ...] = ()  # policy URIs we assert (hl7-b2b consent_policy)
    consent_reference: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """The cache key part: tokens are bound to the requestor."""
        return f"{self.organization_id}|{self.subject_id or self.subject_name or ''}"


def purpose_uri(code: str, code_system: str = XP_SYSTEM) -> str:
    """``urn:oid:...#CODE`` for ``purpose_of_use``."""
    system = code_system if code_system.startswith("urn:") else f"urn:oid:{code_system}"
    return f"{system}#{code}"


def b2b_extension(
    requestor: Requestor,
    purpose: str,
    *,
    code_system: str = XP_SYSTEM,
    consent_policy: list[str] | None = None,
    consent_reference: list[str] | None = None,
) -> dict[str, Any]:
    """The ``hl7-b2b`` authorization extension object (version 1)."""
    ext: dict[str, Any] = {
        "version": "1",
        "organization_name": requestor.organization_name,
        "organization_id": requestor.organization_id,
        "purpose_of_use": [purpose_uri(purpose, code_system)],
    }
    for key in ("subject_name", "subject_id", "subject_role"):
        value = getattr(requestor, key)
        if value:
            ext[key] = value
    consent_policy = consent_policy or list(requestor.consent_policy)
    consent_reference = consent_reference or list(requestor.consent_reference)
    if consent_policy:
        ext["consent_policy"] = consent_policy
    if consent_reference:
        ext["consent_reference"] = consent_reference
    return ext


def tefca_ias_extension(
    *,
    id_token: str,
    patient: dict[str, Any],
    user: dict[str, Any] | None = None,
    consent_policy: str = "urn:oid:2.16.840.1.113883.3.7204.1.1.1.1.2.1",
) -> dict[str, Any]:
    """The ``tefca_ias`` extension: verified demographics and the CSP's IAL2 ``id_token``."""
    if not id_token:
        raise ConfigError("T-IAS needs the identity provider's id_token")
    return {
        "version": "1",
        "id_token": id_token,
        "patient_information": patient,
        "user_information": user
        or {
            "resourceType": "RelatedPerson",
            "relationship": [{"coding": [{"code": "ONESELF"}]}],
        },
        "consent_policy": [consent_policy],
    }


def client_assertion(
    signer: VaultSigner,
    *,
    client_id: str,
    token_url: str,
    extensions: dict[str, Any] | None,
    now: float | None = None,
    lifetime: int = 300,
) -> str:
    """The signed ``client_assertion`` (``exp - iat`` at most 300 s)."""
    iat = int(now if now is not None else time.time())
    claims: dict[str, Any] = {
        "iss": client_id,
        "sub": client_id,
        "aud": token_url,
        "iat": iat,
        "exp": iat + min(lifetime, 300),
        "jti": uuid.uuid4().hex,
    }
    if extensions:
        claims["extensions"] = extensions
    return signer.sign(claims)


@dataclass
class Token:
    """An access token and when it stops being usable."""

    access_token: str
    expires_at: float
    scope: str
    purpose: str
    obtained_at: float = field(default_factory=time.time)


def request_token(
    http: httpx.Client,
    token_url: str,
    signer: VaultSigner,
    reg: Registration,
    requestor: Requestor,
    purpose: str,
    *,
    scope: str | None = None,
    code_system: str = XP_SYSTEM,
    ias: dict[str, Any] | None = None,
    timeout: float = 15.0,
) -> Token:
    """One B2B token for (requestor, purpose) at the node ``reg`` was made for."""
    if san_purpose(reg.san_uri) not in (None, purpose):
        raise ConfigError("the registration's certificate SAN is for another exchange purpose")
    extensions: dict[str, Any] = {
        "hl7-b2b": b2b_extension(requestor, purpose, code_system=code_system)
    }
    if ias is not None:
        extensions["tefca_ias"] = ias
    form = {
        "grant_type": "client_credentials",
        "scope": scope or reg.scope,
        "udap": "1",
        "client_assertion_type": JWT_BEARER,
        "client_assertion": client_assertion(
            signer, client_id=reg.client_id, token_url=token_url, extensions=extensions
        ),
    }
    resp = http.post(token_url, data=form, headers={"Accept": "application/json"}, timeout=timeout)
    try:
        doc = resp.json()
    except ValueError:
        raise ProtocolError(f"token endpoint answered HTTP {resp.status_code}, not JSON") from None
    if resp.status_code != 200:
        error = doc.get("error") if isinstance(doc, dict) else None
        _raise_consent_required(doc)
        raise AuthError(f"UDAP token refused: HTTP {resp.status_code} {error or ''}".strip())
    token = doc.get("access_token") if isinstance(doc, dict) else None
    if not isinstance(token, str) or str(doc.get("token_type", "")).lower() != "bearer":
        raise ProtocolError("token answer has no bearer access_token")
    now = time.time()
    life = float(doc.get("expires_in") or 300)
    return Token(token, now + min(life, 3600), str(doc.get("scope") or ""), purpose, now)


def _raise_consent_required(doc: Any) -> None:
    """UDAP B2B: ``invalid_grant`` + ``extensions.hl7-b2b.consent_required`` -> ConsentRequired."""
    if not isinstance(doc, dict) or doc.get("error") != "invalid_grant":
        return
    ext = (
        (doc.get("extensions") or {}).get("hl7-b2b")
        if isinstance(doc.get("extensions"), dict)
        else None
    )
    if not isinstance(ext, dict) or not ext.get("consent_required"):
        return
    policies = [str(p) for p in ext["consent_required"] if isinstance(p, str)]
    form = ext.get("consent_form") if isinstance(ext.get("consent_form"), str) else None
    raise ConsentRequired(
        "UDAP token refused: consent_required", policies=policies, consent_form=form
    )


class TokenCache:
    """Tokens per (node, client_id, requestor, purpose), reused until ``margin`` before expiry."""

    def __init__(self, *, margin: float = 60.0, clock: Callable[[], float] = time.time) -> None:
        self.margin = margin
        self._clock = clock
        self._tokens: dict[tuple[str, str, str, str], Token] = {}
        self._lock = threading.Lock()
        self.issued = 0

    def get(
        self,
        reg: Registration,
        requestor: Requestor,
        purpose: str,
        fetch: Callable[[], Token],
        *,
        context: str = "",
        force: bool = False,
    ) -> Token:
        """A live token for the key, fetching a new one when missing, near expiry or forced.

        ``context`` narrows the key further (T-IAS: a digest of the individual's id_token).
        """
        key = (reg.node, reg.client_id, f"{requestor.key}|{context}", purpose)
        with self._lock:
            tok = self._tokens.get(key)
        life = (tok.expires_at - tok.obtained_at) if tok else 0
        margin = min(self.margin, life / 4)
        if tok is None or force or tok.expires_at - margin <= self._clock():
            tok = fetch()
            with self._lock:
                self._tokens[key] = tok
                self.issued += 1
        return tok


class BoundTokens:
    """A :class:`~medblocks_pipelines.lib.smart.tokens.TokenProvider` for one (node, context)."""

    def __init__(
        self,
        cache: TokenCache,
        reg: Registration,
        requestor: Requestor,
        purpose: str,
        fetch: Callable[[], Token],
        *,
        context: str = "",
    ) -> None:
        self._args = (reg, requestor, purpose, fetch)
        self._cache = cache
        self._context = context

    def __repr__(self) -> str:
        return "BoundTokens(***)"

    def access_token(self) -> str:
        """The cached token (new when missing or near expiry)."""
        return self._cache.get(*self._args, context=self._context).access_token

    def refresh(self, *, stale: str | None = None) -> str:
        """A new token after a 401 (client_credentials has no refresh token: ask again)."""
        return self._cache.get(*self._args, context=self._context, force=True).access_token
