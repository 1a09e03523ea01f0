"""UDAP discovery: ``GET {base}/.well-known/udap[?community=...]`` and ``signed_metadata``.

UDAP Security 2.0 §2: the plain JSON says what the server supports; ``signed_metadata`` is a JWT
whose ``x5c`` chain must validate to the community's trust anchor, with ``iss`` = ``sub`` = the
FHIR base URL and that URL among the signing certificate's SAN URIs, and an ``exp``. The signed
endpoint values override the plain ones (a proxy may rewrite JSON; it cannot re-sign). A 404 means
the server offers no UDAP for that community.
"""

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
from cryptography import x509

from medblocks_pipelines.lib.errors import AuthError, ProtocolError
from medblocks_pipelines.lib.network.udap.certs import CrlChecker, san_uris, verify_jws

#: The TEFCA community URI (udap-dotnet), sent as ``?community=``.
TEFCA_COMMUNITY = "urn:oid:2.16.840.1.113883.3.7204.1.5"
#: Values ``signed_metadata`` carries that win over the plain JSON.
SIGNED_KEYS = ("authorization_endpoint", "token_endpoint", "registration_endpoint")


@dataclass(frozen=True)
class UdapMetadata:
    """What a server offers, after the signed metadata was verified and merged."""

    base_url: str
    community: str | None
    token_endpoint: str
    registration_endpoint: str
    authorization_endpoint: str | None = None
    profiles: tuple[str, ...] = ()
    grant_types: tuple[str, ...] = ()
    extensions_supported: tuple[str, ...] = ()
    extensions_required: tuple[str, ...] = ()
    certifications_supported: tuple[str, ...] = ()
    certifications_required: tuple[str, ...] = ()
    scopes: tuple[str, ...] = ()
    token_algs: tuple[str, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


def _strs(doc: dict[str, Any], key: str) -> tuple[str, ...]:
    v = doc.get(key) or []
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ProtocolError(f"UDAP metadata: {key} must be a list of strings")
    return tuple(v)


def verify_signed_metadata(
    token: str,
    base_url: str,
    anchors: list[x509.Certificate],
    *,
    now: datetime | None = None,
    crl: CrlChecker | None = None,
) -> dict[str, Any]:
    """Verify ``signed_metadata`` for ``base_url``; returns its claims or raises AuthError."""
    claims, path = verify_jws(
        token,
        anchors,
        now=now or datetime.now(UTC),
        crl=crl,
        options={"require": ["iss", "sub", "exp", "iat", "jti"], "verify_aud": False},
    )
    base = base_url.rstrip("/")
    if str(claims["iss"]).rstrip("/") != base or claims["sub"] != claims["iss"]:
        raise AuthError("signed_metadata iss/sub is not the server's base URL")
    if base not in {u.rstrip("/") for u in san_uris(path[0])}:
        raise AuthError("signed_metadata signer's certificate does not name the base URL")
    return claims


def discover(
    http: httpx.Client,
    base_url: str,
    anchors: list[x509.Certificate],
    *,
    community: str | None = TEFCA_COMMUNITY,
    crl: CrlChecker | None = None,
    now: datetime | None = None,
    timeout: float = 10.0,
) -> UdapMetadata | None:
    """Fetch and verify UDAP metadata; ``None`` when the server answers 404 (no UDAP)."""
    base = base_url.rstrip("/")
    params = {"community": community} if community else None
    resp = http.get(f"{base}/.well-known/udap", params=params, timeout=timeout)
    if resp.status_code == 404:
        return None
    if resp.status_code != 200:
        raise ProtocolError(f"UDAP discovery answered HTTP {resp.status_code}")
    try:
        doc = resp.json()
    except ValueError:
        raise ProtocolError("UDAP discovery is not JSON") from None
    if not isinstance(doc, dict):
        raise ProtocolError("UDAP discovery is not a JSON object")
    if "1" not in _strs(doc, "udap_versions_supported"):
        raise ProtocolError("server does not support UDAP version 1")
    signed = doc.get("signed_metadata")
    if not isinstance(signed, str):
        raise AuthError("UDAP metadata has no signed_metadata")
    claims = verify_signed_metadata(signed, base, anchors, now=now, crl=crl)
    merged = {**doc, **{k: claims[k] for k in SIGNED_KEYS if k in claims}}
    for key in ("token_endpoint", "registration_endpoint"):
        if not isinstance(merged.get(key), str):
            raise ProtocolError(f"UDAP metadata has no {key}")
    return UdapMetadata(
        base_url=base,
        community=community,
        token_endpoint=merged["token_endpoint"],
        registration_endpoint=merged["registration_endpoint"],
        authorization_endpoint=merged.get("authorization_endpoint"),
        profiles=_strs(merged, "udap_profiles_supported"),
        grant_types=_strs(merged, "grant_types_supported"),
        extensions_supported=_strs(merged, "udap_authorization_extensions_supported"),
        extensions_required=_strs(merged, "udap_authorization_extensions_required"),
        certifications_supported=_strs(merged, "udap_certifications_supported"),
        certifications_required=_strs(merged, "udap_certifications_required"),
        scopes=_strs(merged, "scopes_supported"),
        token_algs=_strs(merged, "token_endpoint_auth_signing_alg_values_supported"),
        raw=merged,
    )
