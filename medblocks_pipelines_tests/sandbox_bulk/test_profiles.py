"""Vendor profiles (SPECS 3.6): strict, Epic-like and Oracle-like behaviour over live servers,
including Oracle's 307 to a presigned URL that must not receive an Authorization header."""

from collections.abc import Callable
from urllib.parse import urlsplit

import httpx
import pytest

from medblocks_sandbox.profiles import (
    EPIC,
    ORACLE,
    STRICT,
    check_client_registration,
    get_profile,
)

from .conftest import KICKOFF_HEADERS, BulkEnv


def test_get_profile() -> None:
    assert get_profile(None) is STRICT
    assert get_profile("Oracle") is ORACLE
    assert get_profile(EPIC) is EPIC
    with pytest.raises(ValueError):
        get_profile("cerner-2009")


def test_client_registration_rules() -> None:
    check_client_registration(STRICT, jwks_url=None, jwks={"keys": []})
    check_client_registration(EPIC, jwks_url="https://app/jwks.json", jwks=None)
    with pytest.raises(ValueError, match="JWKS URL"):
        check_client_registration(EPIC, jwks_url=None, jwks={"keys": []})
    with pytest.raises(ValueError):
        check_client_registration(STRICT, jwks_url=None, jwks=None)


def test_strict_serves_files_directly_with_boolean_flag(env: BulkEnv) -> None:
    manifest = env.export()
    assert manifest["requiresAccessToken"] is True
    response = httpx.get(manifest["output"][0]["url"], headers=env.auth())
    assert response.status_code == 200


# -- Epic-like -----------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/$export", "/Patient/$export"])
def test_epic_group_only(make_env: Callable[..., BulkEnv], path: str) -> None:
    env = make_env("epic")
    response = env.kickoff(path)
    assert response.status_code == 404
    assert response.json()["issue"][0]["code"] == "not-supported"


def test_epic_opaque_progress_then_everything_at_once(make_env: Callable[..., BulkEnv]) -> None:
    env = make_env("epic", export_seconds=1.0)
    location = env.kickoff("/Group/g1/$export").headers["content-location"]
    first = httpx.get(location, headers=env.auth())
    assert first.status_code == 202
    assert first.headers["x-progress"] == "in-progress"
    assert first.headers["retry-after"] == "2"
    manifest = env.wait(location).json()
    assert {p["id"] for p in env.all_of(manifest)["Patient"]} == {"p1", "p2"}


# -- Oracle-like ---------------------------------------------------------------------------------
@pytest.fixture
def oracle(make_env: Callable[..., BulkEnv]) -> BulkEnv:
    return make_env("oracle")


def test_oracle_group_only(oracle: BulkEnv) -> None:
    assert oracle.kickoff("/$export").status_code == 404
    assert oracle.kickoff("/Patient/$export").status_code == 404
    assert oracle.kickoff("/Group/g1/$export").status_code == 202


def test_oracle_one_export_per_client(make_env: Callable[..., BulkEnv]) -> None:
    env = make_env("oracle", export_seconds=30)
    assert env.kickoff("/Group/g1/$export").status_code == 202
    second = env.kickoff("/Group/g1/$export")
    assert second.status_code == 429
    assert second.json()["issue"][0]["code"] == "throttled"
    assert second.headers["retry-after"].isdigit()
    # Another client is not throttled; deleting the first export frees the slot.
    assert env.kickoff("/Group/g1/$export", client_id="client-b").status_code == 202
    job = next(j for j in env.server.jobs() if j.client_id == "client-a")
    httpx.delete(f"{env.base}/bulk-status/{job.id}", headers=env.auth())
    assert env.kickoff("/Group/g1/$export").status_code == 202


@pytest.mark.parametrize(
    ("query", "status"),
    [
        ("_type=Patient&_type=Observation", 400),  # repeated _type refused
        ("_type=Patient,Observation", 202),  # comma-joined accepted
        ("_type=Binary", 400),  # not in the USCDI v1 list
        ("_type=Practitioner,Location", 400),  # reference types need a clinical type
        ("_type=Practitioner,Observation", 202),
        ("_typeFilter=Observation%3Fstatus%3Dfinal", 400),  # _typeFilter needs _type
        ("_type=Observation&_typeFilter=Observation%3Fstatus%3Dfinal", 202),
        (
            "_type=Observation&_typeFilter=Observation%3Fstatus%3Dfinal,"
            "Observation%3Fcategory%3Dlaboratory",
            400,
        ),  # one query per type
        ("_type=Patient&_typeFilter=Patient%3Fgender%3Dfemale", 400),  # Patient unfilterable
        ("_type=Observation&_typeFilter=Observation%3Fpatient%3DPatient%2Fp1", 400),  # blocked
        ("_type=Patient&_elements=id", 400),  # _elements unsupported
    ],
)
def test_oracle_parameter_rules(oracle: BulkEnv, query: str, status: int) -> None:
    headers = {**KICKOFF_HEADERS, **oracle.auth()}
    response = httpx.get(f"{oracle.base}/Group/g1/$export?{query}", headers=headers)
    assert response.status_code == status, response.text


def test_oracle_elements_refused_even_when_lenient(oracle: BulkEnv) -> None:
    headers = {"Prefer": "respond-async, handling=lenient"}
    response = oracle.kickoff("/Group/g1/$export", params={"_elements": "id"}, headers=headers)
    assert response.status_code == 400


def test_oracle_presigned_redirect(oracle: BulkEnv) -> None:
    manifest = oracle.export("/Group/g1/$export", params={"_type": "Patient,Observation"})
    assert manifest["requiresAccessToken"] == "true"  # a string, as Oracle sends it
    item = next(o for o in manifest["output"] if o["type"] == "Observation")
    auth = oracle.auth()
    # Without a token the file URL itself is refused...
    assert httpx.get(item["url"]).status_code == 401
    # ...with one it answers 307 to a presigned URL on another origin.
    first = httpx.get(item["url"], headers={"Accept": "application/fhir+ndjson", **auth})
    assert first.status_code == 307
    location = first.headers["location"]
    assert urlsplit(location).netloc != urlsplit(oracle.base).netloc
    assert oracle.storage is not None and location.startswith(oracle.storage)
    # Sending the bearer token on to the presigned URL is refused, as S3 does.
    leaked = httpx.get(location, headers=auth)
    assert leaked.status_code == 400
    assert "InvalidArgument" in leaked.text
    ok = httpx.get(location, headers={"Accept": "application/fhir+ndjson"})
    assert ok.status_code == 200
    assert len(ok.text.splitlines()) == item["count"] == 4
    # Range works on the storage origin too.
    part = httpx.get(location, headers={"Range": "bytes=5-", "Accept-Encoding": "identity"})
    assert part.status_code == 206 and part.content == ok.content[5:]


def test_oracle_presigned_url_is_tamper_proof(oracle: BulkEnv) -> None:
    manifest = oracle.export("/Group/g1/$export", params={"_type": "Patient"})
    location = httpx.get(manifest["output"][0]["url"], headers=oracle.auth()).headers["location"]
    tampered = location.replace("X-Signature=", "X-Signature=0")
    assert httpx.get(tampered).status_code == 403
    other_file = location.replace("Patient.001", "Observation.001")
    assert httpx.get(other_file).status_code == 403
    expired = location.split("X-Expires=")[0] + "X-Expires=1&X-Signature=x"
    assert httpx.get(expired).status_code == 403


def test_httpx_redirect_following_strips_authorization(oracle: BulkEnv) -> None:
    """httpx drops Authorization on a cross-origin redirect, so a client that follows
    redirects with it gets the file; one that re-adds the header by hand does not."""
    manifest = oracle.export("/Group/g1/$export", params={"_type": "Patient"})
    with httpx.Client(headers=oracle.auth(), follow_redirects=True) as client:
        response = client.get(manifest["output"][0]["url"])
    assert response.status_code == 200
    assert response.history[0].status_code == 307


def test_oracle_status_restricted_to_owner(oracle: BulkEnv) -> None:
    location = oracle.kickoff("/Group/g1/$export").headers["content-location"]
    assert httpx.get(location, headers=oracle.auth("client-b")).status_code == 403
