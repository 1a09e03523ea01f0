"""The sandbox EHR's FHIR R4 REST surface over real sockets.

Search parameters (token, reference, date prefixes, string, _id, _lastUpdated), paging whose
next links keep the parameters, _include/_revinclude, Patient/$everything, read/vread/history,
OperationOutcome errors, content negotiation and patient-compartment isolation.
"""

from typing import Any

import pytest

from medblocks_pipelines_tests.sandbox_servers.helpers import (
    AuthRequest,
    Server,
    register_public,
    standalone_token,
)


def _ids(bundle: dict[str, Any], mode: str = "match") -> list[str]:
    return [e["resource"]["id"] for e in bundle.get("entry", []) if e["search"]["mode"] == mode]


@pytest.fixture
def alice(ehr: Server) -> dict[str, str]:
    """Bearer header of Alice's patient-context token (patient/*.rs)."""
    register_public(ehr)
    return {"Authorization": f"Bearer {standalone_token(ehr)['access_token']}"}


def test_metadata_lists_types_params_and_security(ehr: Server) -> None:
    resp = ehr.http.get(f"{ehr.fhir}/metadata")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("application/fhir+json")
    cs = resp.json()
    assert cs["resourceType"] == "CapabilityStatement" and cs["fhirVersion"] == "4.0.1"
    rest = cs["rest"][0]
    assert rest["security"]["service"][0]["coding"][0]["code"] == "SMART-on-FHIR"
    obs = next(r for r in rest["resource"] if r["type"] == "Observation")
    assert {"patient", "category", "code", "date", "_lastUpdated"} <= {
        p["name"] for p in obs["searchParam"]
    }
    mr = next(r for r in rest["resource"] if r["type"] == "MedicationRequest")
    assert "MedicationRequest:medication" in mr["searchInclude"]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        # token: code with and without system, category
        ("code=http://loinc.org|85354-9", {"bp-1", "bp-2"}),
        ("code=85354-9", {"bp-1", "bp-2"}),
        ("code=http://snomed.info/sct|85354-9", set()),
        ("category=vital-signs", {"bp-1", "bp-2"}),
        # date prefixes
        ("category=laboratory&date=ge2024-06-01", {"a1c-5", "a1c-6"}),
        ("category=laboratory&date=lt2024-02", {"a1c-0"}),
        ("category=laboratory&date=gt2024-06-15", {"a1c-6"}),
        ("category=laboratory&date=le2024-01-15", {"a1c-0"}),
        ("category=laboratory&date=2024-03", {"a1c-2"}),
        ("date=ge2024-03-01&date=lt2024-05-01", {"a1c-2", "a1c-3"}),  # AND
        ("code=85354-9&date=2023", {"bp-1"}),
        # OR with commas, _id
        ("_id=bp-1,a1c-0", {"bp-1", "a1c-0"}),
        ("patient=Patient/p1&code=85354-9", {"bp-1", "bp-2"}),
    ],
)
def test_observation_search_filters(ehr: Server, alice: dict, query: str, expected: set) -> None:
    resp = ehr.http.get(f"{ehr.fhir}/Observation?{query}&_count=100", headers=alice)
    assert resp.status_code == 200, resp.text
    bundle = resp.json()
    assert bundle["type"] == "searchset"
    assert set(_ids(bundle)) == expected and bundle["total"] == len(expected)


def test_paging_next_links_keep_parameters(ehr: Server, alice: dict) -> None:
    url = f"{ehr.fhir}/Observation?patient=p1&category=laboratory&_count=3"
    seen: list[str] = []
    pages = 0
    while url:
        bundle = ehr.http.get(url, headers=alice).json()
        assert bundle["total"] == 7
        seen += _ids(bundle)
        pages += 1
        nxt = [lk["url"] for lk in bundle["link"] if lk["relation"] == "next"]
        if nxt:
            assert "category=laboratory" in nxt[0] and "patient=p1" in nxt[0]
            assert nxt[0].startswith(ehr.fhir)
        url = nxt[0] if nxt else ""
    assert pages == 3 and len(seen) == 7 and len(set(seen)) == 7
    assert all(s.startswith("a1c-") for s in seen)


def test_last_updated_and_sort(ehr: Server, alice: dict) -> None:
    everything = ehr.http.get(f"{ehr.fhir}/Observation?_count=100", headers=alice).json()
    assert everything["total"] == 9  # Alice's only: compartment enforced without a patient param
    stamps = sorted(e["resource"]["meta"]["lastUpdated"] for e in everything["entry"])
    after = ehr.http.get(
        f"{ehr.fhir}/Observation?_lastUpdated=gt{stamps[-1]}", headers=alice
    ).json()
    assert after["total"] == 0
    ehr.admin(
        "apply-changes",
        {
            "upserts": [
                {
                    "resourceType": "Observation",
                    "id": "bp-3",
                    "status": "final",
                    "code": {"coding": [{"system": "http://loinc.org", "code": "85354-9"}]},
                    "subject": {"reference": "Patient/p1"},
                    "effectiveDateTime": "2024-07-01",
                }
            ]
        },
    )
    after = ehr.http.get(
        f"{ehr.fhir}/Observation?_lastUpdated=gt{stamps[-1]}", headers=alice
    ).json()
    assert _ids(after) == ["bp-3"]
    sorted_desc = ehr.http.get(
        f"{ehr.fhir}/Observation?code=85354-9&_sort=-date", headers=alice
    ).json()
    assert _ids(sorted_desc) == ["bp-3", "bp-2", "bp-1"]


def test_include_medication_and_revinclude(ehr: Server, alice: dict) -> None:
    resp = ehr.http.get(
        f"{ehr.fhir}/MedicationRequest?patient=p1&intent=order"
        "&_include=MedicationRequest:medication",
        headers=alice,
    )
    bundle = resp.json()
    assert _ids(bundle) == ["mr1"] and _ids(bundle, "include") == ["med1"]
    assert bundle["total"] == 1  # includes are not counted


def test_patient_everything(ehr: Server, alice: dict) -> None:
    bundle = ehr.http.get(f"{ehr.fhir}/Patient/p1/$everything?_count=500", headers=alice).json()
    ids = {(e["resource"]["resourceType"], e["resource"]["id"]) for e in bundle["entry"]}
    assert ("Patient", "p1") in ids and ("Observation", "a1c-0") in ids
    assert ("Binary", "bin1") in ids and ("Medication", "med1") in ids
    assert ("Practitioner", "dr1") in ids and ("Location", "loc1") in ids
    assert not any(t == "Patient" and i == "p2" for t, i in ids)
    assert ("Observation", "b-a1c") not in ids and ("MedicationRequest", "mr2") not in ids
    typed = ehr.http.get(f"{ehr.fhir}/Patient/p1/$everything?_type=Condition", headers=alice).json()
    assert _ids(typed) == ["cond1"]
    other = ehr.http.get(f"{ehr.fhir}/Patient/p2/$everything", headers=alice)
    assert other.status_code == 403


def test_compartment_isolation(ehr: Server, alice: dict) -> None:
    assert ehr.http.get(f"{ehr.fhir}/Patient/p2", headers=alice).status_code == 403
    assert ehr.http.get(f"{ehr.fhir}/Observation/b-a1c", headers=alice).status_code == 403
    assert ehr.http.get(f"{ehr.fhir}/Observation?patient=p2", headers=alice).status_code == 403
    pats = ehr.http.get(f"{ehr.fhir}/Patient", headers=alice).json()
    assert _ids(pats) == ["p1"]
    meds = ehr.http.get(f"{ehr.fhir}/MedicationRequest", headers=alice).json()
    assert _ids(meds) == ["mr1"]
    # Shared, non-compartment resources are readable: a patient app resolves references.
    assert ehr.http.get(f"{ehr.fhir}/Practitioner/dr1", headers=alice).status_code == 200
    # Binary behind Alice's document: same token, raw content with a non-FHIR Accept.
    raw = ehr.http.get(f"{ehr.fhir}/Binary/bin1", headers={**alice, "Accept": "text/plain"})
    assert raw.status_code == 200 and raw.text == "Visit note for Alice"
    as_fhir = ehr.http.get(f"{ehr.fhir}/Binary/bin1", headers=alice).json()
    assert as_fhir["resourceType"] == "Binary"


def test_bob_sees_only_bob(ehr: Server) -> None:
    register_public(ehr)
    body = standalone_token(ehr, AuthRequest(), username="bob", password="bob-pw-456")
    assert body["patient"] == "p2"
    auth = {"Authorization": f"Bearer {body['access_token']}"}
    obs = ehr.http.get(f"{ehr.fhir}/Observation", headers=auth).json()
    assert _ids(obs) == ["b-a1c"]
    assert ehr.http.get(f"{ehr.fhir}/Patient/p1", headers=auth).status_code == 403


def test_granular_v2_scope_with_query_filters_results(ehr: Server) -> None:
    register_public(
        ehr,
        scopes=["launch/patient", "patient/*.rs", "patient/Observation.rs?category=vital-signs"],
    )
    req = AuthRequest(scope="launch/patient patient/Observation.rs?category=vital-signs")
    body = standalone_token(ehr, req)
    auth = {"Authorization": f"Bearer {body['access_token']}"}
    obs = ehr.http.get(f"{ehr.fhir}/Observation", headers=auth).json()
    assert set(_ids(obs)) == {"bp-1", "bp-2"}
    assert ehr.http.get(f"{ehr.fhir}/Observation/a1c-0", headers=auth).status_code == 403


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("Observation?colour=blue", 400, "not-supported"),  # unknown search parameter
        ("Observation?date=xx2024", 400, "invalid"),  # unknown date prefix
        ("Observation?date=2024-13-45", 400, "invalid"),  # not a date
        ("Observation?code:below=1", 400, "invalid"),  # unsupported modifier
        ("Observation?_count=-1", 400, "invalid"),
        ("Observation?_include=Observation:nothing", 400, "not-supported"),
        ("Observation/nope", 404, "not-found"),
        ("Spaceship/1", 404, "not-supported"),
        ("Observation?_format=xml", 406, "not-supported"),
    ],
)
def test_errors_are_operation_outcomes(
    ehr: Server, alice: dict, path: str, status: int, code: str
) -> None:
    resp = ehr.http.get(f"{ehr.fhir}/{path}", headers=alice)
    assert resp.status_code == status
    assert resp.headers["content-type"].startswith("application/fhir+json")
    outcome = resp.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["code"] == code


def test_no_token_is_401_with_bearer_challenge(ehr: Server) -> None:
    resp = ehr.http.get(f"{ehr.fhir}/Patient/p1")
    assert resp.status_code == 401
    assert resp.headers["www-authenticate"].startswith("Bearer realm=")
    bad = ehr.http.get(f"{ehr.fhir}/Patient/p1", headers={"Authorization": "Bearer nope"})
    assert bad.status_code == 401 and 'error="invalid_token"' in bad.headers["www-authenticate"]


def test_deleted_resource_is_410_and_history_keeps_versions(ehr: Server, alice: dict) -> None:
    ehr.admin(
        "apply-changes",
        {
            "upserts": [
                {
                    "resourceType": "Condition",
                    "id": "cond1",
                    "subject": {"reference": "Patient/p1"},
                    "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006"}]},
                    "clinicalStatus": {"coding": [{"code": "resolved"}]},
                }
            ]
        },
    )
    current = ehr.http.get(f"{ehr.fhir}/Condition/cond1", headers=alice)
    assert current.json()["meta"]["versionId"] == "2" and current.headers["etag"] == 'W/"2"'
    v1 = ehr.http.get(f"{ehr.fhir}/Condition/cond1/_history/1", headers=alice).json()
    assert v1["clinicalStatus"]["coding"][0]["code"] == "active"
    assert ehr.admin(
        "apply-changes", {"deletes": [{"resourceType": "Condition", "id": "cond1"}]}
    ).json() == {"upserted": 0, "deleted": 1}
    gone = ehr.http.get(f"{ehr.fhir}/Condition/cond1", headers=alice)
    assert gone.status_code == 410 and gone.json()["issue"][0]["code"] == "deleted"
    hist = ehr.http.get(f"{ehr.fhir}/Condition/cond1/_history", headers=alice).json()
    assert hist["type"] == "history" and hist["total"] == 3
    assert hist["entry"][0]["request"]["method"] == "DELETE"
    store = ehr.app.state.store
    assert [v.version_id for v in store.history("Condition", "cond1")] == [1, 2, 3]
    _, deletions = store.changes_since(store.now().replace(year=2000))
    assert ("Condition", "cond1") in {(t, i) for t, i, _ in deletions}


def test_post_search_and_summary_count(ehr: Server, alice: dict) -> None:
    resp = ehr.http.post(
        f"{ehr.fhir}/Observation/_search", data={"category": "laboratory"}, headers=alice
    )
    assert resp.status_code == 200 and resp.json()["total"] == 7
    count = ehr.http.get(f"{ehr.fhir}/Observation?_summary=count", headers=alice).json()
    assert count["total"] == 9 and "entry" not in count


def test_writes_need_write_scopes_and_patch_is_not_supported(ehr: Server, alice: dict) -> None:
    # A read-only patient token may not write (the write API itself: test_fhir_writes.py).
    resp = ehr.http.put(f"{ehr.fhir}/Patient/p1", json={}, headers=alice)
    assert resp.status_code == 403
    assert "insufficient_scope" in resp.headers["www-authenticate"]
    resp = ehr.http.patch(f"{ehr.fhir}/Patient/p1", json=[], headers=alice)
    assert resp.status_code == 405
