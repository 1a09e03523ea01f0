"""Kick-off of $export (Bulk Data 2.0 §kick-off, SPECS 3.1): levels, GET and POST, the required
headers, parameter validation and lenient handling, over a live server."""

import json
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from .conftest import KICKOFF_HEADERS, BulkEnv


@pytest.mark.parametrize(
    ("path", "expected_patients"),
    [
        ("/$export", {"p1", "p2", "p3"}),  # system level: everything
        ("/Patient/$export", {"p1", "p2", "p3"}),  # all patients
        ("/Group/g1/$export", {"p1", "p2"}),  # cohort: members only
    ],
)
def test_get_kickoff_each_level(env: BulkEnv, path: str, expected_patients: set[str]) -> None:
    response = env.kickoff(path)
    assert response.status_code == 202
    location = response.headers["content-location"]
    assert location.startswith(env.base + "/")
    final = env.wait(location)
    manifest = final.json()
    assert final.headers["content-type"].startswith("application/json")
    assert manifest["request"] == env.base + path
    data = env.all_of(manifest)
    assert {p["id"] for p in data["Patient"]} == expected_patients
    subjects = {o["subject"]["reference"] for o in data["Observation"]}
    assert subjects == {f"Patient/{p}" for p in expected_patients}
    if path == "/$export":
        assert "Group" in data  # non-compartment types only in a system export
    else:
        assert "Group" not in data
        assert "Practitioner" in data  # referenced shared types come along


def test_post_kickoff_with_parameters_and_patient(env: BulkEnv) -> None:
    body = {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "_type", "valueString": "Patient,Observation"},
            {"name": "patient", "valueReference": {"reference": "Patient/p2"}},
            {"name": "patient", "valueReference": {"reference": "Patient/p3"}},
        ],
    }
    headers = {**KICKOFF_HEADERS, **env.auth(), "Content-Type": "application/fhir+json"}
    response = httpx.post(env.base + "/Patient/$export", content=json.dumps(body), headers=headers)
    assert response.status_code == 202, response.text
    manifest = env.wait(response.headers["content-location"]).json()
    # STU2: POST parameters are not echoed in `request`.
    assert manifest["request"] == env.base + "/Patient/$export"
    data = env.all_of(manifest)
    assert set(data) == {"Patient", "Observation"}
    assert {p["id"] for p in data["Patient"]} == {"p2", "p3"}
    assert len(data["Observation"]) == 4


def test_post_patient_outside_group_is_excluded(env: BulkEnv) -> None:
    body = {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "patient", "valueReference": {"reference": "Patient/p1"}},
            {"name": "_type", "valueString": "Patient"},
        ],
    }
    headers = {**KICKOFF_HEADERS, **env.auth(), "Content-Type": "application/fhir+json"}
    response = httpx.post(env.base + "/Group/g1/$export", json=body, headers=headers)
    manifest = env.wait(response.headers["content-location"]).json()
    assert [p["id"] for p in env.all_of(manifest)["Patient"]] == ["p1"]


@pytest.mark.parametrize(
    ("headers", "fragment"),
    [
        ({"Prefer": "respond-async"}, "Accept"),  # no Accept
        ({"Accept": "application/json", "Prefer": "respond-async"}, "Accept"),  # wrong Accept
        ({"Accept": "application/fhir+json"}, "Prefer"),  # no Prefer
        ({"Accept": "application/fhir+json", "Prefer": "return=minimal"}, "Prefer"),
    ],
)
def test_kickoff_requires_accept_and_prefer(
    env: BulkEnv, headers: dict[str, str], fragment: str
) -> None:
    response = httpx.get(env.base + "/$export", headers={**headers, **env.auth()})
    assert response.status_code == 400
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert fragment in outcome["issue"][0]["diagnostics"]


@pytest.mark.parametrize("fmt", ["application/fhir+ndjson", "application/ndjson", "ndjson"])
def test_output_formats_accepted(env: BulkEnv, fmt: str) -> None:
    assert env.kickoff(params={"_outputFormat": fmt, "_type": "Patient"}).status_code == 202


@pytest.mark.parametrize(
    ("params", "status"),
    [
        ({"_outputFormat": "text/csv"}, 400),  # only NDJSON
        ({"_since": "2024-01-01"}, 400),  # a date, not an instant
        ({"_since": "2024-01-01T00:00:00 00:00"}, 400),  # '+' left unencoded
        ({"_type": "Observation,NotAType"}, 400),  # unknown resource type
        ({"_type": "Observation,"}, 400),  # empty entry
        ({"_elements": "Observation.code.coding"}, 400),  # only root elements
        ({"_typeFilter": "Observation?bogus=1"}, 400),  # unknown search parameter
        ({"_typeFilter": "Observation?_include=Observation:subject"}, 400),  # no _include
        ({"_typeFilter": "Condition?code=x", "_type": "Observation"}, 400),  # type not in _type
        ({"_until": "2024-01-01T00:00:00Z"}, 400),  # STU3 parameter: not supported
        ({"includeAssociatedData": "_custom"}, 400),  # custom associated data: not supported
        ({"patient": "Patient/p1"}, 400),  # patient only in POST
    ],
)
def test_bad_parameters_rejected(env: BulkEnv, params: dict[str, str], status: int) -> None:
    response = env.kickoff(params=params)
    assert response.status_code == status, response.text
    assert response.json()["resourceType"] == "OperationOutcome"
    assert not env.server.jobs()


def test_patient_param_not_allowed_at_system_level(env: BulkEnv) -> None:
    body = {
        "resourceType": "Parameters",
        "parameter": [{"name": "patient", "valueReference": {"reference": "Patient/p1"}}],
    }
    headers = {**KICKOFF_HEADERS, **env.auth()}
    response = httpx.post(env.base + "/$export", json=body, headers=headers)
    assert response.status_code == 400


@pytest.mark.parametrize(
    "body",
    [
        {"resourceType": "Bundle"},  # not Parameters
        {"resourceType": "Parameters", "parameter": [{"name": "_type"}]},  # no value
        {
            "resourceType": "Parameters",
            "parameter": [{"name": "patient", "valueString": "p1"}],
        },  # patient not a reference
    ],
)
def test_post_body_validated(env: BulkEnv, body: dict) -> None:
    headers = {**KICKOFF_HEADERS, **env.auth()}
    response = httpx.post(env.base + "/Patient/$export", json=body, headers=headers)
    assert response.status_code == 400


def test_post_needs_json_body(env: BulkEnv) -> None:
    headers = {**KICKOFF_HEADERS, **env.auth(), "Content-Type": "text/plain"}
    response = httpx.post(env.base + "/$export", content="_type=Patient", headers=headers)
    assert response.status_code == 415


def test_unknown_group_is_404(env: BulkEnv) -> None:
    assert env.kickoff("/Group/nope/$export").status_code == 404


def test_lenient_handling_reports_ignored_parameters(env: BulkEnv) -> None:
    headers = {"Prefer": "respond-async, handling=lenient"}
    manifest = env.export(
        params={
            "_type": "Patient",
            "_until": "2030-01-01T00:00:00Z",
            "organizeOutputBy": "Patient",
        },
        headers=headers,
    )
    issues = [i for oo in env.all_of(manifest, "error")["OperationOutcome"] for i in oo["issue"]]
    assert len(issues) == 2
    assert all(i["severity"] == "warning" for i in issues)
    # _until is unknown here; organizeOutputBy is known but a system export has no patients
    diagnostics = sorted(i["diagnostics"] for i in issues)
    assert "_until" in diagnostics[1] and diagnostics[0].startswith("organizeOutputBy")
    assert [o["type"] for o in manifest["output"]] == ["Patient"]


def test_repeated_type_means_comma_joined(env: BulkEnv) -> None:
    response = httpx.get(
        env.base + "/$export?_type=Patient&_type=Condition",
        headers={**KICKOFF_HEADERS, **env.auth()},
    )
    assert response.status_code == 202
    manifest = env.wait(response.headers["content-location"]).json()
    assert {o["type"] for o in manifest["output"]} == {"Patient", "Condition"}


def test_since_filters_on_last_updated(env: BulkEnv) -> None:
    cut = env.store.now()
    changed = dict(env.store.get("Observation", "p1-bp") or {})
    changed["status"] = "amended"
    env.store.put(changed)
    env.store.put(
        {"resourceType": "Condition", "id": "new", "subject": {"reference": "Patient/p3"}}
    )
    since = (cut - timedelta(milliseconds=0)).astimezone(UTC).isoformat()
    manifest = env.export(params={"_since": since})
    data = env.all_of(manifest)
    assert {k: [r["id"] for r in v] for k, v in data.items()} == {
        "Observation": ["p1-bp"],
        "Condition": ["new"],
    }
    tt = datetime.fromisoformat(manifest["transactionTime"].replace("Z", "+00:00"))
    assert tt >= cut


def test_patient_level_type_outside_compartment_gives_nothing(env: BulkEnv) -> None:
    manifest = env.export("/Patient/$export", params={"_type": "Group,Patient"})
    assert [o["type"] for o in manifest["output"]] == ["Patient"]
    outcome = env.all_of(manifest, "error")["OperationOutcome"][0]["issue"][0]
    assert outcome["severity"] == "information" and "Group" in outcome["diagnostics"]


def test_group_patient_param_non_member_excluded_unknown_refused(env: BulkEnv) -> None:
    headers = {**KICKOFF_HEADERS, **env.auth()}

    def body(*ids: str) -> dict:
        return {
            "resourceType": "Parameters",
            "parameter": [
                {"name": "_type", "valueString": "Patient"},
                *(
                    {"name": "patient", "valueReference": {"reference": f"Patient/{i}"}}
                    for i in ids
                ),
            ],
        }

    # p3 exists but is not in g1: it is not exported.
    ok = httpx.post(env.base + "/Group/g1/$export", json=body("p2", "p3"), headers=headers)
    manifest = env.wait(ok.headers["content-location"]).json()
    assert [p["id"] for p in env.all_of(manifest)["Patient"]] == ["p2"]
    unknown = httpx.post(env.base + "/Group/g1/$export", json=body("ghost"), headers=headers)
    assert unknown.status_code == 400
