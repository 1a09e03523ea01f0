"""UDAP trusted dynamic client registration (UDAP Security 2.0 §3, TEFCA Facilitated FHIR SOP).

``POST {registration_endpoint}`` with ``{"software_statement": JWT, "certifications": [JWT],
"udap": "1"}``. The software statement is signed with our certificate (``x5c``, leaf first); its
``iss`` = ``sub`` = the SAN URI of our certificate that carries the exchange purpose (TEFCA: one
XP per SAN URI, so one registration per (node, community, purpose)). ``201`` registers, ``200``
with the same ``client_id`` updates, an empty ``grant_types`` cancels.

Registrations are stored in the vault (``udap/registration/...``): one encrypted JSON document per
(network, node, community, purpose). The client_id is not secret, but the vault is the control
plane's one generic key/value store with concurrency control, so no migration is needed.
"""

import json
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import httpx

from medblocks_pipelines.lib.errors import AuthError, ConfigError, ProtocolError
from medblocks_pipelines.lib.network.udap.certs import VaultSigner
from medblocks_pipelines.lib.network.udap.discovery import UdapMetadata

#: The TEFCA Basic App Certification (Facilitated FHIR SOP; udap-dotnet).
TEFCA_BASIC_APP = "https://rce.sequoiaproject.org/udap/profiles/basic-app-certification"


@dataclass(frozen=True)
class ClientProfile:
    """Who we say we are in a software statement."""

    client_name: str
    contacts: tuple[str, ...]  # mailto: URIs
    scope: str = "system/*.rs"
    grant_type: str = "client_credentials"  # or authorization_code
    redirect_uris: tuple[str, ...] = ()
    logo_uri: str | None = None
    home_community_id: str | None = None


@dataclass(frozen=True)
class Registration:
    """A client registered at one node for one community and purpose."""

    network: str
    node: str
    community: str
    purpose: str
    client_id: str
    registration_endpoint: str
    san_uri: str
    grant_types: tuple[str, ...]
    scope: str
    registered_at: float

    def to_json(self) -> str:
        """The stored form."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Registration":
        """Back from the stored form."""
        doc = json.loads(text)
        doc["grant_types"] = tuple(doc["grant_types"])
        return cls(**doc)


def registration_secret(network: str, node: str, community: str, purpose: str) -> str:
    """Vault name of a registration (ids only; no URLs in names)."""
    return f"udap/registration/{network}/{node}/{community}/{purpose}"


def software_statement(
    signer: VaultSigner,
    *,
    san_uri: str,
    registration_endpoint: str,
    profile: ClientProfile,
    grant_types: list[str] | None = None,
    now: float | None = None,
) -> str:
    """A signed software statement for ``profile`` (``grant_types=[]`` cancels)."""
    iat = int(now if now is not None else time.time())
    grants = [profile.grant_type] if grant_types is None else grant_types
    claims: dict[str, Any] = {
        "iss": san_uri,
        "sub": san_uri,
        "aud": registration_endpoint,
        "iat": iat,
        "exp": iat + 300,
        "jti": uuid.uuid4().hex,
        "client_name": profile.client_name,
        "contacts": list(profile.contacts),
        "grant_types": grants,
        "token_endpoint_auth_method": "private_key_jwt",
        "scope": profile.scope,
    }
    if "authorization_code" in grants:
        if not profile.redirect_uris or not profile.logo_uri:
            raise ConfigError("authorization_code registration needs redirect_uris and logo_uri")
        claims["redirect_uris"] = list(profile.redirect_uris)
        claims["logo_uri"] = profile.logo_uri
        claims["response_types"] = ["code"]
    return signer.sign(claims)


def certification(
    signer: VaultSigner,
    *,
    san_uri: str,
    purpose: str,
    home_community_id: str | None,
    now: float | None = None,
) -> str:
    """The TEFCA Basic App Certification JWT: exactly one exchange purpose."""
    iat = int(now if now is not None else time.time())
    claims: dict[str, Any] = {
        "iss": san_uri,
        "sub": san_uri,
        "iat": iat,
        "exp": iat + 300,
        "jti": uuid.uuid4().hex,
        "certification_name": "TEFCA Basic App Certification",
        "certification_uris": [TEFCA_BASIC_APP],
        "exchange_purposes": [purpose],
    }
    if home_community_id:
        claims["home_community_id"] = home_community_id
    return signer.sign(claims)


def _post(http: httpx.Client, url: str, body: dict[str, Any]) -> httpx.Response:
    return http.post(url, json=body, headers={"Accept": "application/json"}, timeout=15.0)


def register(
    http: httpx.Client,
    meta: UdapMetadata,
    signer: VaultSigner,
    profile: ClientProfile,
    *,
    network: str,
    node: str,
    purpose: str,
    grant_types: list[str] | None = None,
) -> Registration:
    """Register (201) or update (200, same client_id) our client at ``meta``'s server."""
    if "udap_dcr" not in meta.profiles:
        raise ProtocolError("server does not offer UDAP dynamic client registration")
    if profile.grant_type == "client_credentials" and "udap_authz" not in meta.profiles:
        raise ProtocolError("server does not offer UDAP client_credentials (udap_authz)")
    if profile.grant_type not in meta.grant_types:
        raise ProtocolError(f"server does not offer {profile.grant_type}")
    alg = signer.algorithm()
    if meta.token_algs and alg not in meta.token_algs:
        raise ProtocolError(f"server does not accept {alg} signatures")
    san_uri = signer.uri_for_purpose(purpose)
    body: dict[str, Any] = {
        "software_statement": software_statement(
            signer,
            san_uri=san_uri,
            registration_endpoint=meta.registration_endpoint,
            profile=profile,
            grant_types=grant_types,
        ),
        "udap": "1",
    }
    if TEFCA_BASIC_APP in meta.certifications_supported + meta.certifications_required:
        body["certifications"] = [
            certification(
                signer,
                san_uri=san_uri,
                purpose=purpose,
                home_community_id=profile.home_community_id,
            )
        ]
    resp = _post(http, meta.registration_endpoint, body)
    if resp.status_code not in (200, 201):
        err = _error(resp)
        raise AuthError(f"UDAP registration refused: HTTP {resp.status_code} {err}")
    doc = resp.json()
    client_id = doc.get("client_id")
    if not isinstance(client_id, str) or not client_id:
        raise ProtocolError("UDAP registration answer has no client_id")
    return Registration(
        network=network,
        node=node,
        community=meta.community or "",
        purpose=purpose,
        client_id=client_id,
        registration_endpoint=meta.registration_endpoint,
        san_uri=san_uri,
        grant_types=tuple(doc.get("grant_types") or [profile.grant_type]),
        scope=str(doc.get("scope") or profile.scope),
        registered_at=time.time(),
    )


def cancel(http: httpx.Client, meta: UdapMetadata, signer: VaultSigner, reg: Registration) -> None:
    """Cancel ``reg`` (a software statement with an empty ``grant_types``)."""
    profile = ClientProfile(client_name="cancel", contacts=(), scope=reg.scope)
    body = {
        "software_statement": software_statement(
            signer,
            san_uri=reg.san_uri,
            registration_endpoint=meta.registration_endpoint,
            profile=profile,
            grant_types=[],
        ),
        "udap": "1",
    }
    resp = _post(http, meta.registration_endpoint, body)
    if resp.status_code not in (200, 201, 204):
        raise AuthError(f"UDAP registration cancel refused: HTTP {resp.status_code}")


def _error(resp: httpx.Response) -> str:
    try:
        doc = resp.json()
    except ValueError:
        return ""
    return str(doc.get("error", "")) if isinstance(doc, dict) else ""


class RegistrationStore:
    """Registrations in the vault, one per (network, node, community, purpose)."""

    def __init__(self, vault: Any) -> None:
        self.vault = vault

    def get(self, network: str, node: str, community: str, purpose: str) -> Registration | None:
        """The stored registration, or None."""
        secret = self.vault.get(registration_secret(network, node, community, purpose))
        return Registration.from_json(secret.reveal()) if secret is not None else None

    def put(self, reg: Registration) -> None:
        """Store (or replace) ``reg``."""
        name = registration_secret(reg.network, reg.node, reg.community, reg.purpose)
        self.vault.put(name, reg.to_json())

    def delete(self, reg: Registration) -> None:
        """Forget ``reg`` (after a cancel)."""
        self.vault.delete(registration_secret(reg.network, reg.node, reg.community, reg.purpose))

    def list(self, network: str) -> list[Registration]:
        """Every stored registration of ``network``."""
        out = []
        for name in self.vault.names(f"udap/registration/{network}/"):
            secret = self.vault.get(name)
            if secret is not None:
                out.append(Registration.from_json(secret.reveal()))
        return out
