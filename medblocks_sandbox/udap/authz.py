"""A strict UDAP authorization server for one responding node (discovery, registration, token).

Its own reading of what a client sends (the client's parsers and validators are never imported):
``x5c`` is decoded here, the chain is walked here (issuer signatures, validity, CA flags, the
sandbox CA's revocation list), claims are checked here. It refuses, with the UDAP/OAuth error a
real server would give:

- registration: a bad or untrusted or expired or revoked certificate; ``iss`` != ``sub`` or not a
  SAN URI; a wrong ``aud``; ``exp - iat`` > 300 s; a replayed ``jti``; both or neither of
  ``authorization_code``/``client_credentials``; ``authorization_code`` without ``redirect_uris``,
  ``logo_uri``, ``response_types``; a missing TEFCA certification or one with not exactly one
  exchange purpose, or one that differs from the SAN URI's ``#XP``.
- token: the same certificate and assertion checks, an unknown or cancelled client, no ``udap=1``,
  a missing ``hl7-b2b``, a ``purpose_of_use`` missing, not exactly one, not allowed at this node or
  not the certificate's XP, T-IAS without ``tefca_ias.id_token``.
"""

import base64
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from medblocks_sandbox.udap.ca import SandboxCA, pem

BASIC_APP = "https://rce.sequoiaproject.org/udap/profiles/basic-app-certification"
XP_OID = "urn:oid:2.16.840.1.113883.3.7204.1.5.2.1"
ALGS = ["RS256", "RS384", "ES256", "ES384"]
_SHA = hashes.SHA256()


class Refused(Exception):
    """A refusal: the OAuth/UDAP ``error`` code and the HTTP status."""

    def __init__(
        self,
        error: str,
        description: str,
        status: int = 400,
        extensions: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(description)
        self.error, self.description, self.status = error, description, status
        self.extensions = extensions


@dataclass
class IssuedToken:
    """What the node remembers of an access token."""

    client_id: str
    purpose: str
    organization_id: str
    expires_at: float
    scope: str
    patient: str | None = None  # authorization_code: the individual who logged in


@dataclass
class AuthzState:
    """Clients, seen ``jti``s and tokens of one node's authorization server."""

    clients: dict[str, dict[str, Any]] = field(default_factory=dict)  # client_id -> registration
    by_san: dict[str, str] = field(default_factory=dict)  # SAN URI -> client_id
    jtis: dict[str, float] = field(default_factory=dict)
    tokens: dict[str, IssuedToken] = field(default_factory=dict)
    codes: dict[str, Any] = field(default_factory=dict)  # authorization codes (authcode.Code)
    counts: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def bump(self, key: str) -> None:
        """Count an event (``registered``, ``token``, ``refused:<error>``)."""
        with self.lock:
            self.counts[key] = self.counts.get(key, 0) + 1


class UdapAuthServer:
    """The UDAP endpoints of a node whose FHIR base is ``fhir_base``."""

    def __init__(
        self,
        ca: SandboxCA,
        fhir_base: str,
        *,
        community: str,
        purposes: tuple[str, ...],
        token_lifetime: int = 300,
        require_certification: bool = True,
        grant_types: tuple[str, ...] = ("client_credentials",),
        consent_policy: str | None = None,
    ) -> None:
        self.ca = ca
        self.fhir_base = fhir_base.rstrip("/")
        self.community = community
        self.purposes = purposes
        self.token_lifetime = token_lifetime
        self.require_certification = require_certification
        # authorization_code clients can register (redirect_uris, logo_uri, response_types are
        # checked), but this sandbox serves no authorize endpoint: B2B tokens only.
        self.grant_types = grant_types
        self.consent_policy = consent_policy
        self.register_url = f"{self.fhir_base}/udap/register"
        self.token_url = f"{self.fhir_base}/udap/token"
        self.server_key, self.server_chain = ca.issue([self.fhir_base], server=True)
        self.state = AuthzState()

    # -- discovery ---------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        """The plain discovery document with ``signed_metadata``."""
        now = int(time.time())
        endpoints = {
            "token_endpoint": self.token_url,
            "registration_endpoint": self.register_url,
        }
        if "authorization_code" in self.grant_types:
            endpoints["authorization_endpoint"] = f"{self.fhir_base}/udap/authorize"
        signed = jwt.encode(
            {
                "iss": self.fhir_base,
                "sub": self.fhir_base,
                "iat": now,
                "exp": now + 3600,
                "jti": uuid.uuid4().hex,
                **endpoints,
            },
            self.server_key,  # type: ignore[arg-type]
            algorithm="RS256",
            headers={"x5c": [_b64der(c) for c in self.server_chain]},
        )
        return {
            "udap_versions_supported": ["1"],
            "udap_profiles_supported": ["udap_dcr", "udap_authn", "udap_authz"],
            "udap_authorization_extensions_supported": ["hl7-b2b", "tefca_ias"],
            "udap_authorization_extensions_required": ["hl7-b2b"],
            "udap_certifications_supported": [BASIC_APP],
            "udap_certifications_required": [BASIC_APP] if self.require_certification else [],
            "grant_types_supported": list(self.grant_types),
            "scopes_supported": ["system/*.rs", "system/Patient.rs"],
            "token_endpoint_auth_methods_supported": ["private_key_jwt"],
            "token_endpoint_auth_signing_alg_values_supported": ALGS,
            "registration_endpoint_jwt_signing_alg_values_supported": ALGS,
            "signed_metadata": signed,
            **endpoints,
        }

    async def discovery(self, request: Request) -> Response:
        """``GET /.well-known/udap[?community=]``: 404 for another community."""
        community = request.query_params.get("community")
        if community is not None and community != self.community:
            return JSONResponse({"error": "unknown community"}, status_code=404)
        return JSONResponse(self.metadata())

    # -- the JWT checks ----------------------------------------------------------------------
    def _chain(self, header: dict[str, Any]) -> list[x509.Certificate]:
        raw = header.get("x5c")
        if not isinstance(raw, list) or not raw:
            raise Refused("invalid_client", "x5c missing")
        try:
            chain = [x509.load_der_x509_certificate(base64.b64decode(v)) for v in raw]
        except (ValueError, TypeError):
            raise Refused("invalid_client", "x5c unreadable") from None
        now = datetime.now(UTC)
        anchor = self.ca.root.cert
        path = list(chain)
        if path[-1].subject != anchor.subject:
            path.append(anchor)
        for cert, issuer in zip(path, path[1:], strict=False):
            try:
                cert.verify_directly_issued_by(issuer)
            except Exception:  # InvalidSignature, ValueError, TypeError
                raise Refused("invalid_client", "certificate not trusted") from None
            if issuer.fingerprint(_SHA) != anchor.fingerprint(_SHA):
                bc = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value
                if not bc.ca:
                    raise Refused("invalid_client", "issuer is not a CA")
        if path[-1].fingerprint(_SHA) != anchor.fingerprint(_SHA):
            raise Refused("invalid_client", "certificate not trusted")
        for cert in path:
            if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
                raise Refused("invalid_client", "certificate expired")
            if self.ca.is_revoked(cert):
                raise Refused("invalid_client", "certificate revoked")
        return chain

    def _verify(self, token: str, audience: str | None) -> tuple[dict[str, Any], list[str]]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Refused("invalid_request", "not a JWT") from None
        if header.get("alg") not in ALGS:
            raise Refused("invalid_client", "alg not allowed")
        chain = self._chain(header)
        try:
            claims = jwt.decode(
                token,
                chain[0].public_key(),  # type: ignore[arg-type]
                algorithms=[header["alg"]],
                options={"verify_aud": False, "require": ["iss", "sub", "exp", "iat", "jti"]},
            )
        except jwt.ExpiredSignatureError:
            raise Refused("invalid_client", "JWT expired") from None
        except jwt.PyJWTError:
            raise Refused("invalid_client", "JWT signature or claims invalid") from None
        aud = claims.get("aud")
        if (
            audience is not None
            and aud != audience
            and not (isinstance(aud, list) and aud == [audience])
        ):
            raise Refused("invalid_client", "wrong aud")
        if int(claims["exp"]) - int(claims["iat"]) > 300:
            raise Refused("invalid_client", "exp - iat exceeds 300 s")
        with self.state.lock:
            if claims["jti"] in self.state.jtis:
                raise Refused("invalid_client", "jti replayed")
            self.state.jtis[str(claims["jti"])] = float(claims["exp"])
        sans = chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = list(sans.get_values_for_type(x509.UniformResourceIdentifier))
        return claims, uris

    def routes(self, prefix: str = "") -> list[Route]:
        """The routes, relative to the node mount (``{fhir}/.well-known/udap`` etc.)."""
        from medblocks_sandbox.udap.authz_endpoints import endpoints

        return endpoints(self, prefix)

    def token_info(self, token: str) -> IssuedToken | None:
        """A live token's binding, or None."""
        with self.state.lock:
            info = self.state.tokens.get(token)
        if info is None or info.expires_at <= time.time():
            return None
        return info

    def new_token(self, info: IssuedToken) -> str:
        """Mint and remember an access token."""
        token = secrets.token_urlsafe(24)
        with self.state.lock:
            self.state.tokens[token] = info
        return token

    def anchor_pem(self) -> bytes:
        """The community trust anchor (what a client must be configured with)."""
        return pem(self.ca.root.cert)


def _b64der(cert: x509.Certificate) -> str:
    return base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
