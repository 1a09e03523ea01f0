"""The sandbox's certificate authority: a trust anchor, an intermediate, issued leaves and CRLs.

The CA mints what a TEFCA QHIN/RCE PKI would: client certificates whose SAN URI carries the
exchange purpose (``...#T-TREAT``), server certificates whose SAN URI is a FHIR base (for
``signed_metadata``), and a CRL per issuer, published on loopback (``GET {ca}/crl/{issuer}.crl``).
It also signs a CSR (renewal). Expired and untrusted certificates are easy to make for tests.
Everything here is the sandbox's own code: the client's certificate helpers are never used.
"""

import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def new_key(kind: str = "rsa") -> PrivateKey:
    """An RSA-2048 (``rsa``) or P-256 (``ec``) / P-384 (``ec384``) private key."""
    if kind == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "ec384":
        return ec.generate_private_key(ec.SECP384R1())
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def key_pem(key: PrivateKey) -> bytes:
    """PKCS#8 PEM of ``key`` (unencrypted: sandbox and tests only)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def pem(cert: x509.Certificate) -> bytes:
    """PEM of one certificate."""
    return cert.public_bytes(serialization.Encoding.PEM)


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Medblocks Sandbox PKI"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


@dataclass
class Issuer:
    """A CA certificate with its key and the serials it has revoked."""

    slug: str
    cert: x509.Certificate
    key: PrivateKey
    revoked: dict[int, datetime] = field(default_factory=dict)


class SandboxCA:
    """A two-level PKI (root -> intermediate -> leaves) with CRLs at ``{crl_base}/{slug}.crl``."""

    def __init__(self, crl_base: str, *, name: str = "Sandbox TEFCA") -> None:
        self.crl_base = crl_base.rstrip("/")
        self._lock = threading.Lock()
        now = datetime.now(UTC)
        root_key = new_key()
        root = self._ca_cert(f"{name} Root CA", root_key, None, now, path_length=1, crl=None)
        self.root = Issuer("root", root, root_key)
        inter_key = new_key()
        inter = self._ca_cert(
            f"{name} Intermediate CA", inter_key, self.root, now, path_length=0, crl="root"
        )
        self.intermediate = Issuer("intermediate", inter, inter_key)
        self.issuers = {"root": self.root, "intermediate": self.intermediate}

    # -- building --------------------------------------------------------------------------------
    def _ca_cert(
        self,
        cn: str,
        key: PrivateKey,
        parent: Issuer | None,
        now: datetime,
        *,
        path_length: int,
        crl: str | None,
    ) -> x509.Certificate:
        subject = _name(cn)
        issuer_name = parent.cert.subject if parent else subject
        signer = parent.key if parent else key
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1))
            .not_valid_after(now + timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
            .add_extension(_ca_usage(), critical=True)
            .add_extension(ski, critical=False)
        )
        if parent is not None:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(parent.key.public_key()),
                critical=False,
            )
        if crl:
            builder = builder.add_extension(self._crl_dp(crl), critical=False)
        return builder.sign(signer, hashes.SHA256())

    def _crl_dp(self, slug: str) -> x509.CRLDistributionPoints:
        url = f"{self.crl_base}/{slug}.crl"
        return x509.CRLDistributionPoints(
            [x509.DistributionPoint([x509.UniformResourceIdentifier(url)], None, None, None)]
        )

    def issue(
        self,
        san_uris: list[str],
        *,
        public_key: object | None = None,
        key_kind: str = "rsa",
        cn: str = "medblocks client",
        days: float = 365,
        not_before: datetime | None = None,
        server: bool = False,
    ) -> tuple[bytes | None, list[x509.Certificate]]:
        """Issue a leaf for ``san_uris``; returns ``(key_pem or None, [leaf, intermediate])``.

        With ``public_key`` (from a CSR) no key is made; ``days`` may be negative (expired).
        """
        key = None if public_key is not None else new_key(key_kind)
        pub = public_key if public_key is not None else key.public_key()  # type: ignore[union-attr]
        start = not_before or datetime.now(UTC) - timedelta(minutes=5)
        end = start + timedelta(days=days) if days > 0 else datetime.now(UTC) + timedelta(days=days)
        if end <= start:
            start = end - timedelta(days=30)
        ca = self.intermediate
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH] + ([ExtendedKeyUsageOID.SERVER_AUTH] * server)
        leaf = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(ca.cert.subject)
            .public_key(pub)  # type: ignore[arg-type]
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_leaf_usage(), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in san_uris]),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
                critical=False,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(pub),  # type: ignore[arg-type]
                critical=False,
            )
            .add_extension(self._crl_dp(ca.slug), critical=False)
            .sign(ca.key, hashes.SHA256())
        )
        return (key_pem(key) if key is not None else None), [leaf, ca.cert]

    def sign_csr(self, csr_pem: bytes, *, days: float = 365) -> list[x509.Certificate]:
        """Issue a client certificate for a CSR (its SAN URIs kept); renewal without a new key."""
        csr = x509.load_pem_x509_csr(csr_pem)
        if not csr.is_signature_valid:
            raise ValueError("CSR signature is invalid")
        try:
            san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            raise ValueError("CSR has no subjectAltName URI") from None
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        cn = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        _, chain = self.issue(
            uris,
            public_key=csr.public_key(),
            cn=str(cn[0].value) if cn else "medblocks client",
            days=days,
        )
        return chain

    def revoke(self, cert: x509.Certificate) -> None:
        """Put ``cert`` on its issuer's CRL."""
        with self._lock:
            for issuer in self.issuers.values():
                if cert.issuer == issuer.cert.subject:
                    issuer.revoked[cert.serial_number] = datetime.now(UTC)
                    return
        raise ValueError("certificate was not issued by this CA")

    def is_revoked(self, cert: x509.Certificate) -> bool:
        """Whether ``cert`` is on its issuer's CRL."""
        with self._lock:
            return any(
                cert.issuer == i.cert.subject and cert.serial_number in i.revoked
                for i in self.issuers.values()
            )

    def crl(self, slug: str) -> bytes:
        """The current DER CRL of issuer ``slug`` (valid for one hour)."""
        issuer = self.issuers[slug]
        now = datetime.now(UTC)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(issuer.cert.subject)
            .last_update(now - timedelta(minutes=1))
            .next_update(now + timedelta(hours=1))
        )
        with self._lock:
            revoked = dict(issuer.revoked)
        for serial, at in revoked.items():
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(at).build()
            )
        return builder.sign(issuer.key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)

    def anchor_pem(self) -> bytes:
        """The trust anchor a client configures for this community."""
        return pem(self.root.cert)


def _ca_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def _leaf_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def untrusted_issue(
    san_uris: list[str], key_kind: str = "rsa"
) -> tuple[bytes, list[x509.Certificate]]:
    """A leaf from a throw-away CA nobody trusts (for refusal tests)."""
    other = SandboxCA("http://127.0.0.1:9/untrusted", name="Untrusted")
    key, chain = other.issue(san_uris, key_kind=key_kind)
    assert key is not None
    return key, chain
