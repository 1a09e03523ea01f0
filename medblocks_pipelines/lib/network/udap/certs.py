"""Our UDAP client certificate: kept in the vault, checked, used to sign without leaving it.

- The private key and the certificate chain (PEM, leaf first) are vault secrets
  (``udap/{identity}/key``, ``udap/{identity}/chain``). :class:`VaultSigner` loads the key from the
  vault for each signature and drops it: no caller ever holds the key.
- :func:`verify_chain` validates an ``x5c`` chain to a community's trust anchors with
  ``cryptography.x509.verification`` (path building, validity, basic constraints, key usage, EKU),
  then checks revocation through each certificate's CRL distribution point (:class:`CrlChecker`;
  the verifier has no CRL support of its own).
- :func:`make_csr` builds a renewal/issuance request from the key in the vault.

What is automated: CSR generation, storing the issued chain, expiry warnings, CRL checks. What is
not: submitting the CSR to the QHIN/RCE CA (an out-of-band, contractual step; see OPERATIONS.md).
"""

import base64
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from medblocks_pipelines.lib.errors import AuthError, ConfigError, ProtocolError

#: Algorithms we sign and accept (UDAP: SHALL RS256, SHOULD ES256, MAY RS384/ES384).
ALGORITHMS = ("RS256", "RS384", "ES256", "ES384")


def key_secret(identity: str) -> str:
    """Vault name of the private key of ``identity``."""
    return f"udap/{identity}/key"


def chain_secret(identity: str) -> str:
    """Vault name of the certificate chain (PEM, leaf first) of ``identity``."""
    return f"udap/{identity}/chain"


def load_pem_chain(data: bytes) -> list[x509.Certificate]:
    """Certificates of a PEM bundle, in file order."""
    certs = x509.load_pem_x509_certificates(data)
    if not certs:
        raise ConfigError("no certificate in the PEM bundle")
    return certs


def chain_pem(chain: list[x509.Certificate]) -> bytes:
    """A PEM bundle of ``chain``."""
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)


def x5c(chain: list[x509.Certificate]) -> list[str]:
    """The JOSE ``x5c`` header value: base64 (not url-safe) DER, leaf first."""
    return [base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode() for c in chain]


def parse_x5c(value: Any) -> list[x509.Certificate]:
    """Certificates of an ``x5c`` header (leaf first); :class:`AuthError` if malformed."""
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise AuthError("x5c header missing or not a list of certificates")
    try:
        return [x509.load_der_x509_certificate(base64.b64decode(v)) for v in value]
    except ValueError:
        raise AuthError("x5c header holds an unreadable certificate") from None


def san_uris(cert: x509.Certificate) -> list[str]:
    """The subjectAltName URIs of ``cert``."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


def san_purpose(uri: str) -> str | None:
    """The exchange purpose a TEFCA SAN URI carries in its fragment (``...#T-TREAT``)."""
    _, sep, frag = uri.partition("#")
    return frag or None if sep else None


def default_alg(chain: list[x509.Certificate]) -> str:
    """RS256 for an RSA leaf, ES256/ES384 for a P-256/P-384 leaf."""
    pub = chain[0].public_key()
    if isinstance(pub, ec.EllipticCurvePublicKey):
        return "ES384" if pub.curve.name == "secp384r1" else "ES256"
    if isinstance(pub, rsa.RSAPublicKey):
        return "RS256"
    raise ConfigError("unsupported key type for UDAP (RSA or EC P-256/P-384 only)")


# -- revocation ------------------------------------------------------------------------------
class CrlChecker:
    """Revocation by CRL: fetched from the distribution point, signature-checked, cached."""

    def __init__(self, http: httpx.Client, *, clock: Callable[[], float] = time.time) -> None:
        self.http = http
        self._clock = clock
        self._cache: dict[str, tuple[x509.CertificateRevocationList, float]] = {}
        self._lock = threading.Lock()

    def _crl(self, url: str, issuer: x509.Certificate) -> x509.CertificateRevocationList:
        with self._lock:
            hit = self._cache.get(url)
        if hit and hit[1] > self._clock():
            return hit[0]
        try:
            resp = self.http.get(url, timeout=10.0)
        except httpx.HTTPError as exc:
            raise AuthError(f"CRL unreachable ({type(exc).__name__})") from None
        if resp.status_code != 200:
            raise AuthError(f"CRL fetch answered HTTP {resp.status_code}")
        try:
            crl = x509.load_der_x509_crl(resp.content)
        except ValueError:
            try:
                crl = x509.load_pem_x509_crl(resp.content)
            except ValueError:
                raise AuthError("CRL is not DER or PEM") from None
        if crl.issuer != issuer.subject or not crl.is_signature_valid(
            issuer.public_key()  # type: ignore[arg-type]
        ):
            raise AuthError("CRL is not signed by the certificate's issuer")
        nxt = crl.next_update_utc
        until = nxt.timestamp() if nxt else self._clock() + 300
        with self._lock:
            self._cache[url] = (crl, until)
        return crl

    def check(self, chain: list[x509.Certificate]) -> None:
        """Raise :class:`AuthError` if any certificate of a validated chain is revoked."""
        for cert, issuer in zip(chain, chain[1:], strict=False):
            for url in _crl_urls(cert):
                if self._crl(url, issuer).get_revoked_certificate_by_serial_number(
                    cert.serial_number
                ):
                    raise AuthError("certificate revoked")


def _crl_urls(cert: x509.Certificate) -> list[str]:
    try:
        dps = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    except x509.ExtensionNotFound:
        return []
    urls = []
    for dp in dps:
        for name in dp.full_name or []:
            if isinstance(name, x509.UniformResourceIdentifier):
                urls.append(name.value)
    return urls


def verify_chain(
    chain: list[x509.Certificate],
    anchors: list[x509.Certificate],
    *,
    now: datetime | None = None,
    crl: CrlChecker | None = None,
) -> list[x509.Certificate]:
    """Validate ``chain`` (leaf first) to one of ``anchors``; returns the built path.

    Raises :class:`AuthError` for an untrusted, expired, malformed or revoked chain.
    """
    if not anchors:
        raise ConfigError("no trust anchor configured for this community")
    verifier = (
        PolicyBuilder().store(Store(anchors)).time(now or datetime.now(UTC)).build_client_verifier()
    )
    try:
        verified = verifier.verify(chain[0], chain[1:])
    except VerificationError as exc:
        reason = "expired" if "not valid at validation time" in str(exc) else "untrusted"
        raise AuthError(f"certificate chain {reason}") from None
    path = list(verified.chain)
    if crl is not None:
        crl.check(path)
    return path


# -- our identity in the vault -----------------------------------------------------------------
def store_identity(vault: Any, identity: str, key_pem: bytes, chain: bytes) -> None:
    """Put our key and chain (PEM, leaf first) into the vault under ``identity``."""
    certs = load_pem_chain(chain)
    key = serialization.load_pem_private_key(key_pem, password=None)
    if key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != certs[0].public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise ConfigError("the certificate does not belong to the key")
    vault.put(key_secret(identity), key_pem.decode())
    vault.put(chain_secret(identity), chain.decode())


def store_key(vault: Any, identity: str, key_pem: bytes) -> None:
    """Put a new private key into the vault (first issuance: the chain comes after the CSR)."""
    serialization.load_pem_private_key(key_pem, password=None)  # refuse garbage early
    vault.put(key_secret(identity), key_pem.decode())


def csr_for(vault: Any, identity: str, uris: list[str], common_name: str) -> bytes:
    """A CSR for the key of ``identity`` in the vault (the key is read there, never exported)."""
    key = vault.get(key_secret(identity))
    if key is None:
        raise ConfigError(f"UDAP identity {identity!r} has no key in the vault")
    return make_csr(key.reveal().encode(), uris, common_name)


def store_chain(vault: Any, identity: str, chain: bytes) -> None:
    """Replace the chain of ``identity`` (a renewal for the same key)."""
    key = vault.get(key_secret(identity))
    if key is None:
        raise ConfigError(f"UDAP identity {identity!r} has no key in the vault")
    store_identity(vault, identity, key.reveal().encode(), chain)


@dataclass
class VaultSigner:
    """Signs JWTs with the identity's key, loaded from the vault for each signature."""

    vault: Any
    identity: str
    alg: str | None = None

    def chain(self) -> list[x509.Certificate]:
        """Our certificate chain, leaf first."""
        secret = self.vault.get(chain_secret(self.identity))
        if secret is None:
            raise ConfigError(f"UDAP identity {self.identity!r} has no certificate in the vault")
        return load_pem_chain(secret.reveal().encode())

    def algorithm(self) -> str:
        """The JWS algorithm our signatures use (configured, else from the key type)."""
        return self.alg or default_alg(self.chain())

    def sign(self, claims: dict[str, Any], *, header: dict[str, Any] | None = None) -> str:
        """A JWS of ``claims`` with ``alg`` and our ``x5c`` (leaf first) in the header."""
        chain = self.chain()
        alg = self.alg or default_alg(chain)
        if alg not in ALGORITHMS:
            raise ConfigError(f"unsupported UDAP signing algorithm {alg}")
        secret = self.vault.get(key_secret(self.identity))
        if secret is None:
            raise ConfigError(f"UDAP identity {self.identity!r} has no key in the vault")
        key = serialization.load_pem_private_key(secret.reveal().encode(), password=None)
        headers = {"x5c": x5c(chain), **(header or {})}
        return jwt.encode(claims, key, algorithm=alg, headers=headers)  # type: ignore[arg-type]

    def san_uris(self) -> list[str]:
        """Our leaf's SAN URIs (the software statement's ``iss`` is one of them)."""
        return san_uris(self.chain()[0])

    def uri_for_purpose(self, purpose: str) -> str:
        """The SAN URI registered for ``purpose`` (TEFCA: one XP per SAN URI)."""
        for uri in self.san_uris():
            if san_purpose(uri) == purpose:
                return uri
        raise ConfigError(f"our UDAP certificate has no SAN URI for exchange purpose {purpose}")

    def expires_within(self, days: float, *, now: datetime | None = None) -> bool:
        """Whether the leaf expires within ``days`` (an operator renews before that)."""
        end = self.chain()[0].not_valid_after_utc
        return end - (now or datetime.now(UTC)) < timedelta(days=days)

    def csr(self, *, common_name: str | None = None) -> bytes:
        """A PEM CSR for our key carrying the current SAN URIs (renewal keeps the key)."""
        secret = self.vault.get(key_secret(self.identity))
        if secret is None:
            raise ConfigError(f"UDAP identity {self.identity!r} has no key in the vault")
        return make_csr(secret.reveal().encode(), self.san_uris(), common_name or self.identity)


def make_csr(key_pem: bytes, uris: list[str], common_name: str) -> bytes:
    """A PEM certificate signing request for ``key_pem`` with SAN ``uris``."""
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not uris:
        raise ConfigError("a UDAP certificate needs at least one SAN URI")
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=False,
        )
        .sign(key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def generate_key(kind: str = "rsa") -> bytes:
    """A new PKCS#8 PEM key: RSA-2048 (``rsa``), P-256 (``ec``) or P-384 (``ec384``)."""
    key: Any
    if kind == "ec":
        key = ec.generate_private_key(ec.SECP256R1())
    elif kind == "ec384":
        key = ec.generate_private_key(ec.SECP384R1())
    elif kind == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        raise ConfigError(f"unknown key kind {kind!r}")
    return bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def verify_jws(
    token: str, anchors: list[x509.Certificate], **kw: Any
) -> tuple[dict[str, Any], list[x509.Certificate]]:
    """Verify a JWS carrying ``x5c``: chain to ``anchors`` then signature; returns (claims, path).

    ``kw`` goes to :func:`jwt.decode` (``audience``, ``options``...) except ``now`` and ``crl``.
    """
    now, crl = kw.pop("now", None), kw.pop("crl", None)
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise ProtocolError("not a JWS") from None
    if header.get("alg") not in ALGORITHMS:
        raise AuthError(f"JWS algorithm {header.get('alg')!r} not allowed")
    path = verify_chain(parse_x5c(header.get("x5c")), anchors, now=now, crl=crl)
    try:
        claims = jwt.decode(
            token,
            path[0].public_key(),  # type: ignore[arg-type]
            algorithms=[header["alg"]],
            **kw,
        )
    except jwt.PyJWTError as exc:
        raise AuthError(f"JWS rejected: {type(exc).__name__}") from None
    return claims, path
