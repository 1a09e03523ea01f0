"""Authorization of bulk endpoints: system-scoped tokens only (SPECS 2, 3), v1 and v2 scope
syntax, per-type scopes, and the seam to the EHR's authorization server."""

from types import SimpleNamespace

import httpx
import pytest

from medblocks_sandbox.bulk_auth import auth_server_authenticator, can_read, has_system_read

from .conftest import KICKOFF_HEADERS, BulkEnv


@pytest.mark.parametrize(
    ("scopes", "rtype", "allowed"),
    [
        (["system/*.read"], "Observation", True),  # v1 wildcard
        (["system/*.rs"], "Observation", True),  # v2 wildcard
        (["system/*.r"], "Observation", True),  # v2 read only
        (["system/*.cruds"], "Observation", True),
        (["system/Observation.rs"], "Observation", True),
        (["system/Observation.rs"], "Condition", False),  # other type
        (["system/*.write"], "Observation", False),  # v1 write only
        (["system/*.cud"], "Observation", False),  # v2 without r
        (["system/*.sr"], "Observation", False),  # v2 letters out of order: invalid
        (["patient/*.read"], "Observation", False),  # patient scopes are not bulk scopes
        (["user/*.rs"], "Observation", False),
        (["system/Observation.rs?category=laboratory"], "Observation", False),  # granular
    ],
)
def test_can_read(scopes: list[str], rtype: str, allowed: bool) -> None:
    assert can_read(scopes, rtype) is allowed


def test_has_system_read() -> None:
    assert has_system_read(["launch", "system/Patient.r"])
    assert not has_system_read(["patient/*.rs", "system/*.write"])


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),  # no token
        ({"Authorization": "Basic abc"}, 401),  # not a bearer token
        ({"Authorization": "Bearer unknown"}, 401),  # unknown token
    ],
)
def test_kickoff_needs_a_valid_token(env: BulkEnv, headers: dict[str, str], status: int) -> None:
    response = httpx.get(env.base + "/$export", headers={**KICKOFF_HEADERS, **headers})
    assert response.status_code == status
    assert "www-authenticate" in response.headers
    assert response.json()["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize("scopes", ["patient/*.read", "user/*.rs", "system/*.write", "openid"])
def test_kickoff_needs_system_read_scope(env: BulkEnv, scopes: str) -> None:
    headers = {**KICKOFF_HEADERS, **env.auth(scopes=scopes)}
    assert httpx.get(env.base + "/$export", headers=headers).status_code == 403


def test_expired_token_refused(env: BulkEnv) -> None:
    token = env.tokens.issue("client-a", ["system/*.read"], ttl=-1)
    response = httpx.get(
        env.base + "/$export", headers={**KICKOFF_HEADERS, "Authorization": f"Bearer {token}"}
    )
    assert response.status_code == 401
    assert response.json()["issue"][0]["code"] == "expired"


def test_type_without_scope_is_forbidden(env: BulkEnv) -> None:
    headers = {**KICKOFF_HEADERS, **env.auth(scopes="system/Patient.rs system/Condition.rs")}
    response = httpx.get(
        env.base + "/$export", params={"_type": "Patient,Observation"}, headers=headers
    )
    assert response.status_code == 403
    assert "Observation" in response.json()["issue"][0]["diagnostics"]


def test_without_type_only_authorised_types_are_exported(env: BulkEnv) -> None:
    scopes = "system/Patient.rs system/Condition.read"
    token = env.token(scopes=scopes)
    headers = {**KICKOFF_HEADERS, "Authorization": f"Bearer {token}"}
    response = httpx.get(env.base + "/$export", headers=headers)
    assert response.status_code == 202
    final = httpx.get(response.headers["content-location"], headers=headers)
    while final.status_code == 202:
        final = httpx.get(response.headers["content-location"], headers=headers)
    manifest = final.json()
    assert {o["type"] for o in manifest["output"]} == {"Patient", "Condition"}
    outcomes = env.all_of(manifest, "error")["OperationOutcome"]
    omitted = {oo["issue"][0]["diagnostics"].split()[0] for oo in outcomes}
    assert omitted == {"Group", "MedicationRequest", "Observation", "Practitioner"}
    assert {oo["issue"][0]["severity"] for oo in outcomes} == {"information"}


class _FakeAuthServer:
    """Stands in for sandbox.auth.AuthServer's public validate_access_token."""

    def validate_access_token(self, token: str) -> SimpleNamespace | None:
        if token == "good":
            return SimpleNamespace(client_id="c1", scopes=("system/*.rs",), grant_id=None)
        return None


def test_auth_server_adapter() -> None:
    authenticate = auth_server_authenticator(_FakeAuthServer())
    request = SimpleNamespace(headers={"authorization": "Bearer good"})
    info = authenticate(request)  # type: ignore[arg-type]
    assert info.client_id == "c1" and info.scopes == frozenset({"system/*.rs"})
    from medblocks_sandbox.errors import FhirHttpError

    with pytest.raises(FhirHttpError) as caught:
        authenticate(SimpleNamespace(headers={"authorization": "Bearer bad"}))  # type: ignore
    assert caught.value.status == 401
