"""The bulk server mounted in the sandbox EHR app (ehr.create_ehr_app), with tokens from the EHR's
own SMART Backend Services flow (client_credentials + private_key_jwt, SPECS 2) and the fault
middleware wired to its authorization server."""

import functools
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from starlette.middleware import Middleware

from medblocks_sandbox.auth import require_token
from medblocks_sandbox.bulk import BulkServer
from medblocks_sandbox.bulk_jobs import BulkConfig
from medblocks_sandbox.ehr import create_ehr_app
from medblocks_sandbox.ehr_common import OrgConfig
from medblocks_sandbox.faults import (
    FaultInjector,
    FaultMiddleware,
    connect_auth_server,
    fault_admin_routes,
)
from medblocks_sandbox.fhir_store import FhirStore

from .conftest import KICKOFF_HEADERS, bound_socket, population, serve


@dataclass
class Ehr:
    base: str
    fhir: str
    token_url: str
    app: Any
    faults: FaultInjector
    keys: dict[str, Any]

    def token(
        self, client_id: str = "bulk-app", scope: str = "system/*.rs", alg: str = "RS384"
    ) -> httpx.Response:
        """Run the Backend Services token request with a signed assertion."""
        now = int(time.time())
        assertion = jwt.encode(
            {
                "iss": client_id,
                "sub": client_id,
                "aud": self.token_url,
                "exp": now + 240,
                "iat": now,
                "jti": uuid.uuid4().hex,
            },
            self.keys[alg],
            algorithm=alg,
            headers={"kid": f"k-{alg}", "typ": "JWT"},
        )
        return httpx.post(
            self.token_url,
            data={
                "grant_type": "client_credentials",
                "scope": scope,
                "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                "client_assertion": assertion,
            },
        )

    def bearer(self, **kwargs: Any) -> dict[str, str]:
        response = self.token(**kwargs)
        assert response.status_code == 200, response.text
        return {"Authorization": f"Bearer {response.json()['access_token']}"}


@functools.cache
def _keys() -> tuple[rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey]:
    return (
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
        ec.generate_private_key(ec.SECP384R1()),
    )


@pytest.fixture
def ehr(tmp_path: Any) -> Iterator[Ehr]:
    sock = bound_socket()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    store = FhirStore(population())
    faults = FaultInjector()
    bulk = BulkServer(
        store,
        authenticator=require_token,
        faults=faults,
        config=BulkConfig(export_seconds=0.1),
        work_dir=tmp_path / "bulk",
    )
    holder: dict[str, Any] = {}

    def resolve(token: str) -> str | None:
        return holder["resolve"](token) if "resolve" in holder else None

    app = create_ehr_app(
        OrgConfig(org_id="mercy", name="Mercy"),
        store,
        base_url=base,
        admin_secret="x",
        extra_routes=bulk.routes(),
        middleware=[Middleware(FaultMiddleware, faults=faults, client_resolver=resolve)],
        root_routes=fault_admin_routes(faults),
    )
    holder["resolve"] = connect_auth_server(faults, app.state.auth_server)
    rsa_key, ec_key = _keys()
    jwks = {
        "keys": [
            {
                **RSAAlgorithm.to_jwk(rsa_key.public_key(), as_dict=True),
                "kid": "k-RS384",
                "alg": "RS384",
            },
            {
                **ECAlgorithm.to_jwk(ec_key.public_key(), as_dict=True),
                "kid": "k-ES384",
                "alg": "ES384",
            },
        ]
    }
    for client_id, scopes in (("bulk-app", ["system/*.rs"]), ("narrow-app", ["system/Patient.rs"])):
        app.state.auth_server.register_client(
            {
                "client_id": client_id,
                "token_endpoint_auth_method": "private_key_jwt",
                "jwks": jwks,
                "scopes": scopes,
            }
        )
    with serve(app, sock):
        yield Ehr(
            base,
            base + "/fhir",
            app.state.auth_server.token_endpoint,
            app,
            faults,
            {"RS384": rsa_key, "ES384": ec_key},
        )
    bulk.close()


def _wait(location: str, headers: dict[str, str]) -> httpx.Response:
    deadline = time.monotonic() + 10
    while True:
        response = httpx.get(location, headers=headers)
        if response.status_code != 202 or time.monotonic() > deadline:
            return response
        time.sleep(0.05)


@pytest.mark.parametrize("alg", ["RS384", "ES384"])
def test_group_export_with_backend_services_token(ehr: Ehr, alg: str) -> None:
    auth = ehr.bearer(alg=alg)
    kick = httpx.get(ehr.fhir + "/Group/g1/$export", headers={**KICKOFF_HEADERS, **auth})
    assert kick.status_code == 202, kick.text
    location = kick.headers["content-location"]
    assert location.startswith(ehr.fhir + "/bulk-status/")
    manifest = _wait(location, auth).json()
    assert manifest["request"] == ehr.fhir + "/Group/g1/$export"
    patients = [o for o in manifest["output"] if o["type"] == "Patient"]
    lines = httpx.get(patients[0]["url"], headers=auth).text.splitlines()
    assert len(lines) == patients[0]["count"] == 2
    assert httpx.delete(location, headers=auth).status_code == 202


def test_ehr_routes_still_work_beside_bulk(ehr: Ehr) -> None:
    auth = ehr.bearer()
    read = httpx.get(ehr.fhir + "/Patient/p1", headers={"Accept": "application/fhir+json", **auth})
    assert read.status_code == 200 and read.json()["id"] == "p1"


def test_narrow_scopes_limit_the_export(ehr: Ehr) -> None:
    auth = ehr.bearer(client_id="narrow-app", scope="system/Patient.rs")
    refused = httpx.get(
        ehr.fhir + "/$export", params={"_type": "Observation"}, headers={**KICKOFF_HEADERS, **auth}
    )
    assert refused.status_code == 403
    kick = httpx.get(ehr.fhir + "/$export", headers={**KICKOFF_HEADERS, **auth})
    manifest = _wait(kick.headers["content-location"], auth).json()
    assert [o["type"] for o in manifest["output"]] == ["Patient"]


def test_status_needs_the_exporting_client(ehr: Ehr) -> None:
    auth = ehr.bearer()
    location = httpx.get(ehr.fhir + "/$export", headers={**KICKOFF_HEADERS, **auth}).headers[
        "content-location"
    ]
    other = ehr.bearer(client_id="narrow-app", scope="system/Patient.rs")
    assert httpx.get(location, headers=other).status_code == 403
    assert httpx.get(location).status_code == 401


def test_expired_token_fault_expires_it_in_the_authorization_server(ehr: Ehr) -> None:
    auth = ehr.bearer()
    location = httpx.get(ehr.fhir + "/$export", headers={**KICKOFF_HEADERS, **auth}).headers[
        "content-location"
    ]
    ehr.faults.add("expire_token", client_id="bulk-app", after_requests=1)
    assert httpx.get(location, headers=auth).status_code in (200, 202)
    assert httpx.get(location, headers=auth).status_code == 401
    ehr.faults.clear()
    assert httpx.get(location, headers=auth).status_code == 401  # really expired in the AS
    # Backend Services: no refresh token; the client asks for a new access token.
    assert _wait(location, ehr.bearer()).status_code == 200


def test_rate_limit_by_client_with_opaque_tokens(ehr: Ehr) -> None:
    ehr.faults.add("rate_limit", client_id="narrow-app", limit=1, window=30, path="/fhir/")
    narrow = ehr.bearer(client_id="narrow-app", scope="system/Patient.rs")
    wide = ehr.bearer()
    headers = {"Accept": "application/fhir+json"}
    assert httpx.get(ehr.fhir + "/Patient/p1", headers={**headers, **narrow}).status_code == 200
    assert httpx.get(ehr.fhir + "/Patient/p1", headers={**headers, **narrow}).status_code == 429
    assert httpx.get(ehr.fhir + "/Patient/p1", headers={**headers, **wide}).status_code == 200


def test_epic_profile_makes_the_ehr_require_a_jwks_url() -> None:
    from medblocks_sandbox.profiles import EPIC

    app = create_ehr_app(
        OrgConfig(org_id="epic", name="Epic-like"),
        FhirStore(),
        base_url="http://127.0.0.1:9",
        admin_secret="x",
        profile=EPIC,
    )
    rsa_key, _ = _keys()
    jwk = {**RSAAlgorithm.to_jwk(rsa_key.public_key(), as_dict=True), "kid": "k"}
    with pytest.raises(ValueError, match="JWKS URL"):
        app.state.auth_server.register_client(
            {
                "client_id": "inline",
                "token_endpoint_auth_method": "private_key_jwt",
                "jwks": {"keys": [jwk]},
            }
        )
    app.state.auth_server.register_client(
        {
            "client_id": "hosted",
            "token_endpoint_auth_method": "private_key_jwt",
            "jwks_uri": "http://127.0.0.1:9/jwks.json",
        }
    )
