"""Signing keys of the sandbox's own actors (the CDS/launch EHR signs its JWTs with one).

Independent of the product's key store: the sandbox is a separate party with its own keys. Any
object with ``kid``, ``alg``, ``private_pem`` and ``public_jwk()`` can be handed in instead (tests
pass keys they made themselves).
"""

import json
from dataclasses import dataclass, field
from typing import Any, Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from medblocks_sandbox.errors import SandboxConfigError


class JwtSigningKey(Protocol):
    """What a sandbox actor needs of a key to sign JWTs and publish its JWKS."""

    @property
    def kid(self) -> str: ...

    @property
    def alg(self) -> str: ...

    @property
    def private_pem(self) -> str: ...

    def public_jwk(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class ActorKey:
    """A key pair of one sandbox actor: key id, algorithm (RS384 or ES384), PKCS#8 PEM."""

    kid: str
    alg: str
    private_pem: str = field(repr=False)

    def public_jwk(self) -> dict[str, Any]:
        """The public JWK (key material plus ``kid``, ``alg``, ``use``)."""
        private = serialization.load_pem_private_key(self.private_pem.encode(), password=None)
        if isinstance(private, rsa.RSAPrivateKey):
            jwk = json.loads(RSAAlgorithm.to_jwk(private.public_key()))
        elif isinstance(private, ec.EllipticCurvePrivateKey):
            jwk = json.loads(ECAlgorithm.to_jwk(private.public_key()))
        else:
            raise SandboxConfigError(f"key {self.kid} is neither RSA nor EC")
        jwk = {k: v for k, v in jwk.items() if k in ("kty", "n", "e", "crv", "x", "y")}
        jwk.update({"kid": self.kid, "alg": self.alg, "use": "sig", "key_ops": ["verify"]})
        return jwk


def generate_actor_key(alg: str, *, kid: str) -> ActorKey:
    """A new key pair: P-384 for ES384, RSA 3072 for RS384."""
    private: Any
    if alg == "ES384":
        private = ec.generate_private_key(ec.SECP384R1())
    elif alg == "RS384":
        private = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    else:
        raise SandboxConfigError(f"actor key alg must be ES384 or RS384, not {alg!r}")
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return ActorKey(kid=kid, alg=alg, private_pem=pem)
