"""Client assertions (SPECS §2): claims, headers, both algorithms, lifetimes, no key leaks."""

import jwt
import pytest

from medblocks_pipelines.lib.errors import ConfigError
from medblocks_pipelines.lib.smart.assertion import (
    JWT_BEARER,
    SigningKey,
    assertion_form,
    generate_signing_key,
    jwks_of,
    load_signing_key,
    make_client_assertion,
)

TOKEN_URL = "https://ehr.example/auth/token"


@pytest.fixture(scope="module", params=["RS384", "ES384"])
def key(request: pytest.FixtureRequest) -> SigningKey:
    return generate_signing_key(request.param)


def test_claims_and_header_verify_against_public_jwk(key: SigningKey) -> None:
    token = make_client_assertion(
        client_id="app-1", token_endpoint=TOKEN_URL, key=key, now=1_700_000_000, lifetime=300
    )
    header = jwt.get_unverified_header(token)
    assert header == {"alg": key.alg, "kid": key.kid, "typ": "JWT"}
    public = jwt.PyJWK(key.public_jwk(), algorithm=key.alg)
    claims = jwt.decode(
        token, public.key, algorithms=[key.alg], audience=TOKEN_URL, options={"verify_exp": False}
    )
    assert claims["iss"] == claims["sub"] == "app-1"
    assert claims["exp"] - claims["iat"] == 300
    assert claims["iat"] == 1_700_000_000


def test_jti_is_unique_and_jku_is_carried(key: SigningKey) -> None:
    a = make_client_assertion(
        client_id="c",
        token_endpoint=TOKEN_URL,
        key=key,
        jku="https://us.example/.well-known/jwks.json",
    )
    b = make_client_assertion(client_id="c", token_endpoint=TOKEN_URL, key=key)
    ja = jwt.decode(a, options={"verify_signature": False})["jti"]
    jb = jwt.decode(b, options={"verify_signature": False})["jti"]
    assert ja != jb
    assert jwt.get_unverified_header(a)["jku"] == "https://us.example/.well-known/jwks.json"
    assert "jku" not in jwt.get_unverified_header(b)


def test_public_jwk_has_no_private_material(key: SigningKey) -> None:
    jwk = key.public_jwk()
    assert "d" not in jwk and "p" not in jwk and "q" not in jwk
    assert jwk["kty"] == ("RSA" if key.alg == "RS384" else "EC")
    if key.alg == "ES384":
        assert jwk["crv"] == "P-384"
    assert jwks_of([key])["keys"][0]["kid"] == key.kid
    assert "PRIVATE" not in repr(key)


@pytest.mark.parametrize("lifetime", [0, 301, -5])  # exp must be <= 5 minutes, > now
def test_lifetime_over_five_minutes_is_refused(key: SigningKey, lifetime: int) -> None:
    with pytest.raises(ConfigError):
        make_client_assertion(client_id="c", token_endpoint=TOKEN_URL, key=key, lifetime=lifetime)


def test_round_trip_and_mismatched_alg(key: SigningKey) -> None:
    again = SigningKey.from_json(key.to_json())
    assert again == key
    other = "ES384" if key.alg == "RS384" else "RS384"
    with pytest.raises(ConfigError):
        load_signing_key(key.private_pem, kid="x", alg=other)
    with pytest.raises(ConfigError):
        generate_signing_key("HS256")


def test_assertion_form() -> None:
    assert assertion_form("abc") == {"client_assertion_type": JWT_BEARER, "client_assertion": "abc"}
