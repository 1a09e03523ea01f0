"""The sandbox payer (CMS Patient Access API shape) over real sockets.

CARIN BB profiles in meta.profile, the EOB searches CARIN BB requires, Coverage:payor include, and
its own SMART authorization server (a token from the payer is not valid at the EHR and back).
"""

import pytest

from medblocks_pipelines_tests.sandbox_servers.helpers import (
    AuthRequest,
    Server,
    register_public,
    standalone_token,
)

C4BB = "http://hl7.org/fhir/us/carin-bb/StructureDefinition/"


@pytest.fixture
def member(payer: Server) -> dict[str, str]:
    register_public(payer)
    body = standalone_token(
        payer,
        AuthRequest(scope="launch/patient patient/*.read"),
        username="alice",
        password="alice-payer-pw",
    )
    assert body["patient"] == "m1"
    return {"Authorization": f"Bearer {body['access_token']}"}


def _ids(bundle: dict) -> set[str]:
    return {e["resource"]["id"] for e in bundle.get("entry", []) if e["search"]["mode"] == "match"}


def test_capability_statement_is_carin_bb(payer: Server) -> None:
    cs = payer.http.get(f"{payer.fhir}/metadata").json()
    assert cs["instantiates"] == ["http://hl7.org/fhir/us/carin-bb/CapabilityStatement/c4bb"]
    types = {r["type"] for r in cs["rest"][0]["resource"]}
    assert {"Patient", "Coverage", "ExplanationOfBenefit"} <= types
    assert "Observation" not in types


def test_profiles_in_meta(payer: Server, member: dict) -> None:
    eobs = payer.http.get(f"{payer.fhir}/ExplanationOfBenefit", headers=member).json()
    profiles = {e["resource"]["id"]: e["resource"]["meta"]["profile"] for e in eobs["entry"]}
    assert profiles == {
        "eob1": [C4BB + "C4BB-ExplanationOfBenefit-Professional-NonClinician"],
        "eob2": [C4BB + "C4BB-ExplanationOfBenefit-Pharmacy"],
    }
    cov = payer.http.get(f"{payer.fhir}/Coverage/cov1", headers=member).json()
    assert cov["meta"]["profile"] == [C4BB + "C4BB-Coverage"]
    inst = payer.app.state.store.get("ExplanationOfBenefit", "eob3")
    assert inst["meta"]["profile"] == [C4BB + "C4BB-ExplanationOfBenefit-Inpatient-Institutional"]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("service-date=ge2024-01-01", {"eob1"}),
        ("service-date=lt2024", {"eob2"}),
        ("billable-period-start=2023-05-10", {"eob2"}),
        ("type=http://terminology.hl7.org/CodeSystem/claim-type|pharmacy", {"eob2"}),
        ("patient=m1", {"eob1", "eob2"}),
        ("_id=eob1", {"eob1"}),
        ("coverage=Coverage/cov1", {"eob1", "eob2"}),
    ],
)
def test_eob_searches(payer: Server, member: dict, query: str, expected: set) -> None:
    resp = payer.http.get(f"{payer.fhir}/ExplanationOfBenefit?{query}", headers=member)
    assert resp.status_code == 200, resp.text
    assert _ids(resp.json()) == expected


def test_coverage_include_payor_and_eob_includes(payer: Server, member: dict) -> None:
    cov = payer.http.get(f"{payer.fhir}/Coverage?_include=Coverage:payor", headers=member).json()
    kinds = [(e["resource"]["resourceType"], e["search"]["mode"]) for e in cov["entry"]]
    assert kinds == [("Coverage", "match"), ("Organization", "include")]
    eob = payer.http.get(
        f"{payer.fhir}/ExplanationOfBenefit?_id=eob1&_include=ExplanationOfBenefit:insurer"
        "&_include=ExplanationOfBenefit:coverage",
        headers=member,
    ).json()
    included = {e["resource"]["id"] for e in eob["entry"] if e["search"]["mode"] == "include"}
    assert included == {"payer-org", "cov1"}


def test_member_isolation_and_clinical_types_absent(payer: Server, member: dict) -> None:
    assert (
        payer.http.get(f"{payer.fhir}/ExplanationOfBenefit/eob3", headers=member).status_code == 403
    )
    assert payer.http.get(f"{payer.fhir}/Observation", headers=member).status_code == 404


def test_payer_tokens_are_not_ehr_tokens(payer: Server, ehr: Server, member: dict) -> None:
    assert ehr.http.get(f"{ehr.fhir}/Patient", headers=member).status_code == 401
    assert payer.smart()["issuer"] != ehr.smart()["issuer"]
