"""``private_key_jwt`` client assertions (SMART Backend Services, RFC 7523; SPECS.md §2).

The stable API other patterns use (patient access confidential clients, backend services)::

    key = generate_signing_key("ES384")                 # or load_signing_key(pem, kid=..., alg=...)
    jwt_text = make_client_assertion(
        client_id="my-app", token_endpoint="https://ehr/token", key=key, jku=None)
    form = assertion_form(jwt_text)                     # the two client_assertion* form fields
    key.public_jwk()                                    # {"kty","kid","alg","use",...} public only

The assertion carries header ``alg`` (RS384 or ES384), ``kid``, ``typ: JWT`` and optional ``jku``
(it must equal the JWKS URL registered with the server), and claims ``iss`` = ``sub`` = client_id,
``aud`` = the token endpoint exactly as discovered, ``exp`` at most five minutes ahead, ``iat``
and a fresh random ``jti``. Private key material never appears in ``repr`` or messages.
"""

import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from medblocks_pipelines.lib.errors import ConfigError

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ALGORITHMS = ("RS384", "ES384")
#: SPECS §2: the assertion's ``exp`` is at most five minutes ahead.
MAX_LIFETIME_SECONDS = 300
DEFAULT_LIFETIME_SECONDS = 240


@dataclass(frozen=True)
class SigningKey:
    """One of our signing keys: key id, algorithm and the private key as PKCS#8 PEM."""

    kid: str
    alg: str
    private_pem: str = field(repr=False)

    def __post_init__(self) -> None:
        if self.alg not in ALGORITHMS:
            raise ConfigError(f"signing key alg must be one of {ALGORITHMS}, not {self.alg!r}")
        if not self.kid:
            raise ConfigError("a signing key needs a kid")

    def _private(self) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
        try:
            key = serialization.load_pem_private_key(self.private_pem.encode(), password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"signing key {self.kid} is not a valid PEM private key") from exc
        if self.alg == "RS384":
            if not isinstance(key, rsa.RSAPrivateKey):
                raise ConfigError(f"signing key {self.kid} is not an RSA key")
            return key
        if not (isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"):
            raise ConfigError(f"signing key {self.kid} is not a P-384 EC key")
        return key

    def public_jwk(self) -> dict[str, Any]:
        """The public JWK (bare key material plus ``kid``, ``alg``, ``use``, ``key_ops``)."""
        private = self._private()
        if isinstance(private, rsa.RSAPrivateKey):
            jwk = json.loads(RSAAlgorithm.to_jwk(private.public_key()))
        else:
            jwk = json.loads(ECAlgorithm.to_jwk(private.public_key()))
        jwk = {k: v for k, v in jwk.items() if k in ("kty", "n", "e", "crv", "x", "y")}
        jwk.update({"kid": self.kid, "alg": self.alg, "use": "sig", "key_ops": ["verify"]})
        return jwk

    def to_json(self) -> str:
        """Serialise for the vault (contains the private key: store only encrypted)."""
        return json.dumps({"kid": self.kid, "alg": self.alg, "private_pem": self.private_pem})

    @classmethod
    def from_json(cls, text: str) -> "SigningKey":
        """Inverse of :meth:`to_json`."""
        try:
            data = json.loads(text)
            return cls(kid=data["kid"], alg=data["alg"], private_pem=data["private_pem"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError("stored signing key is not readable") from exc


def generate_signing_key(alg: str = "RS384", *, kid: str | None = None) -> SigningKey:
    """Make a new key pair: RSA 3072 for RS384, P-384 for ES384."""
    if alg == "RS384":
        private: Any = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    elif alg == "ES384":
        private = ec.generate_private_key(ec.SECP384R1())
    else:
        raise ConfigError(f"signing key alg must be one of {ALGORITHMS}, not {alg!r}")
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return SigningKey(kid=kid or f"{alg.lower()}-{secrets.token_hex(8)}", alg=alg, private_pem=pem)


def load_signing_key(private_pem: str, *, kid: str, alg: str) -> SigningKey:
    """Wrap an existing PEM private key; checks it matches ``alg``."""
    key = SigningKey(kid=kid, alg=alg, private_pem=private_pem)
    key._private()
    return key


def make_client_assertion(
    *,
    client_id: str,
    token_endpoint: str,
    key: SigningKey,
    jku: str | None = None,
    lifetime: int = DEFAULT_LIFETIME_SECONDS,
    now: float | None = None,
) -> str:
    """Sign a client assertion JWT for ``client_id`` at ``token_endpoint`` (a fresh ``jti``)."""
    if not client_id or not token_endpoint:
        raise ConfigError("a client assertion needs a client_id and a token endpoint")
    if not 0 < lifetime <= MAX_LIFETIME_SECONDS:
        raise ConfigError(f"assertion lifetime must be 1..{MAX_LIFETIME_SECONDS} seconds")
    issued = int(now if now is not None else time.time())
    claims = {
        "iss": client_id,
        "sub": client_id,
        "aud": token_endpoint,
        "iat": issued,
        "exp": issued + lifetime,
        "jti": secrets.token_urlsafe(24),
    }
    headers: dict[str, Any] = {"kid": key.kid, "typ": "JWT"}
    if jku:
        headers["jku"] = jku
    return jwt.encode(claims, key._private(), algorithm=key.alg, headers=headers)


def assertion_form(assertion: str) -> dict[str, str]:
    """The token-request form fields that carry a client assertion."""
    return {"client_assertion_type": JWT_BEARER, "client_assertion": assertion}


def jwks_of(keys: list[SigningKey]) -> dict[str, Any]:
    """A JWK Set of the public halves of ``keys``."""
    return {"keys": [k.public_jwk() for k in keys]}
