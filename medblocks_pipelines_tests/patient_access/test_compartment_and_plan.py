"""Unit tests of the patient-scope chokepoint and the capability-driven search plan.

The R4 Patient compartment table and :class:`PatientScope`, the scope enforced by
:class:`LakeWriter` (``add`` and the NDJSON path), the ``next``-link checks of the FHIR client
(``lost_parameters``, ``url_shape``, re-issue at the server's offset over MockTransport), and
``plan_queries`` from a CapabilityStatement (declared types and parameters, no ``category``).
"""

import json
from pathlib import Path
from typing import Any

import duckdb
import httpx
import pytest

from medblocks_pipelines.lib.errors import IncompleteSearch
from medblocks_pipelines.lib.fhir.client import FhirClient, lost_parameters, url_shape
from medblocks_pipelines.lib.fhir.compartment import (
    PATIENT_COMPARTMENT,
    PatientScope,
    compartment_patients,
    reference_key,
)
from medblocks_pipelines.lib.fhir.search_plan import plan_queries
from medblocks_pipelines.lib.smart.scopes import ScopeSet
from medblocks_pipelines.lib.warehouse.lake import LakeWriter, Provenance, quarantine_glob

BASE = "https://ehr.example/fhir"


@pytest.mark.parametrize(
    ("resource", "expected"),
    [
        # subject reference, relative
        (
            {"resourceType": "Observation", "id": "o", "subject": {"reference": "Patient/p1"}},
            {"p1"},
        ),
        # performer may be the patient too (R4: Observation subject|performer)
        (
            {
                "resourceType": "Observation",
                "id": "o",
                "subject": {"reference": "Group/g"},
                "performer": [{"reference": "Patient/p2"}],
            },
            {"p2"},
        ),
        # absolute and versioned references
        (
            {
                "resourceType": "Encounter",
                "id": "e",
                "subject": {"reference": f"{BASE}/Patient/p3/_history/2"},
            },
            {"p3"},
        ),
        # Coverage: policy-holder|subscriber|beneficiary|payor
        (
            {"resourceType": "Coverage", "id": "c", "beneficiary": {"reference": "Patient/p4"}},
            {"p4"},
        ),
        # Patient: itself and link.other
        (
            {
                "resourceType": "Patient",
                "id": "p5",
                "link": [{"other": {"reference": "Patient/p6"}}],
            },
            {"p5", "p6"},
        ),
        # a compartment type with no patient reference is in nobody's compartment
        ({"resourceType": "Condition", "id": "c", "subject": {"reference": "Group/x"}}, set()),
        # shared types are in no compartment at all
        ({"resourceType": "Practitioner", "id": "dr"}, None),
        ({"resourceType": "Medication", "id": "m"}, None),
    ],
)
def test_compartment_patients(resource: dict[str, Any], expected: set[str] | None) -> None:
    assert compartment_patients(resource) == expected


def test_compartment_table_follows_r4() -> None:
    # A few rows checked against hl7.org/fhir/R4/compartmentdefinition-patient.html.
    assert set(PATIENT_COMPARTMENT["AllergyIntolerance"]) == {"patient", "recorder", "asserter"}
    assert set(PATIENT_COMPARTMENT["Coverage"]) == {
        "policy-holder",
        "subscriber",
        "beneficiary",
        "payor",
    }
    assert set(PATIENT_COMPARTMENT["ExplanationOfBenefit"]) == {"patient", "payee"}
    assert PATIENT_COMPARTMENT["Encounter"] == {"patient": ("subject",)}
    for shared in ("Medication", "Practitioner", "Organization", "Location", "PractitionerRole"):
        assert shared not in PATIENT_COMPARTMENT


@pytest.mark.parametrize(
    ("ref", "key"),
    [
        ("Patient/1", ("Patient", "1")),
        (f"{BASE}/Patient/1", ("Patient", "1")),
        ("Patient/1/_history/3", ("Patient", "1")),
        ("#contained", None),
        ("urn:uuid:abc", None),
        ("nonsense", None),
    ],
)
def test_reference_key(ref: str, key: tuple[str, str] | None) -> None:
    assert reference_key(ref) == key


def test_device_of_another_patient_is_outside() -> None:
    # Device is shared in the R4 table, but Device.patient names the one patient it is affixed to.
    scope = PatientScope.of("p1")
    ours = {"resourceType": "Device", "id": "d1", "patient": {"reference": "Patient/p1"}}
    theirs = {"resourceType": "Device", "id": "d2", "patient": {"reference": f"{BASE}/Patient/p2"}}
    unbound = {"resourceType": "Device", "id": "d3"}
    assert scope.check(ours) is None
    assert scope.check(unbound) is None
    assert scope.check(theirs) == "outside_patient_compartment: Device"
    assert compartment_patients(unbound) is None
    assert scope.outside == 1


def test_scope_admits_provenance_of_admitted_resources() -> None:
    scope = PatientScope.of("p1")
    obs = {"resourceType": "Observation", "id": "o1", "subject": {"reference": "Patient/p1"}}
    assert scope.check(obs) is None
    ours = {"resourceType": "Provenance", "id": "v1", "target": [{"reference": "Observation/o1"}]}
    theirs = {"resourceType": "Provenance", "id": "v2", "target": [{"reference": "Observation/o9"}]}
    assert scope.check(ours) is None
    assert scope.check(theirs) == "outside_patient_compartment: Provenance"
    assert scope.outside == 1


def _writer(tmp_path: Path) -> LakeWriter:
    prov = Provenance("t", "patient_access", "s", None, "c1", "r1")
    return LakeWriter(tmp_path, prov, patient_scope=PatientScope.of("p1"))


def _quarantined(tmp_path: Path) -> list[tuple[str, str]]:
    with duckdb.connect() as con:
        return con.execute(
            f"SELECT resource_type, reason FROM read_parquet('{quarantine_glob(tmp_path, 't')}')"
        ).fetchall()


def test_lake_writer_quarantines_outside_the_scope(tmp_path: Path) -> None:
    with _writer(tmp_path) as w:
        assert w.add(
            {"resourceType": "Condition", "id": "a", "subject": {"reference": "Patient/p1"}}
        )
        assert not w.add(
            {"resourceType": "Condition", "id": "b", "subject": {"reference": "Patient/p2"}}
        )
        assert w.add({"resourceType": "Organization", "id": "org"})
    assert w.stats.landed == 2
    assert w.stats.quarantine_reasons == {"outside_patient_compartment": 1}
    assert _quarantined(tmp_path) == [("Condition", "outside_patient_compartment: Condition")]


def test_lake_writer_ndjson_files_obey_the_scope(tmp_path: Path) -> None:
    path = tmp_path / "Observation.ndjson"
    lines = [
        {
            "resourceType": "Observation",
            "id": str(i),
            "status": "final",  # Observation.status and .code are 1..1: valid apart from scope
            "code": {"text": "weight"},
            "subject": {"reference": f"Patient/p{i}"},
        }
        for i in (1, 2, 3)
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    with _writer(tmp_path / "lake") as w:
        w.add_ndjson_file(path)
    assert w.stats.counts_by_type == {"Observation": 1}
    assert w.stats.quarantine_reasons == {"outside_patient_compartment": 2}


@pytest.mark.parametrize(
    ("link", "lost"),
    [
        # the live case: only paging parameters left on the search's own path
        (f"{BASE}/MedicationRequest?_offset=100&_count=100", {"patient", "intent"}),
        # everything kept, in another order
        (f"{BASE}/MedicationRequest?_count=100&intent=order&patient=p1&_offset=100", set()),
        # another patient's value is lost too
        (f"{BASE}/MedicationRequest?patient=p2&intent=order&_offset=100", {"patient"}),
        # the patient as a reference and a re-encoded token value are the same search
        (
            f"{BASE}/MedicationRequest?patient=Patient/p1&intent=http://x%7Corder&_offset=9",
            set(),
        ),
        # an opaque page token on the base (HAPI) is the server's own state
        (f"{BASE}?_getpages=abc&_getpagesoffset=100", set()),
    ],
)
def test_lost_parameters(link: str, lost: set[str]) -> None:
    asked = [("patient", "p1"), ("intent", "order"), ("_include", "MedicationRequest:medication")]
    assert lost_parameters(asked, link, search_path="/fhir/MedicationRequest") == lost


def test_url_shape_has_no_values() -> None:
    shape = url_shape(f"{BASE}/MedicationRequest?_offset=100&_count=100&patient=p1", BASE)
    assert shape == "/MedicationRequest?_count&_offset&patient"
    assert "p1" not in url_shape(f"{BASE}/Patient/p1?x=1", BASE)


def _bundle(ids: list[str], nxt: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [{"resource": {"resourceType": "Condition", "id": i}} for i in ids],
    }
    if nxt:
        body["link"] = [{"relation": "next", "url": nxt}]
    return body


def test_next_link_without_params_is_reissued_or_refused() -> None:
    seen: list[httpx.URL] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url)
        offset = request.url.params.get("_offset")
        if offset is None:
            return httpx.Response(200, json=_bundle(["a"], f"{BASE}/Condition?_offset=1"))
        return httpx.Response(200, json=_bundle(["b"], f"{BASE}/Condition?cursor=z"))

    notes: list[tuple[str, str]] = []
    with httpx.Client(transport=httpx.MockTransport(handler)) as http:
        client = FhirClient(BASE, http=http)
        pages = client.search(
            "Condition", [("patient", "p1")], on_anomaly=lambda k, n: notes.append((k, n))
        )
        got = []
        with pytest.raises(IncompleteSearch):
            for page in pages:
                got += [e["resource"]["id"] for e in page.bundle["entry"]]
    assert got == ["a", "b"]
    # The second request is our own search at the server's offset, patient kept.
    assert seen[1].params.get("patient") == "p1" and seen[1].params.get("_offset") == "1"
    assert [k for k, _n in notes] == ["next_link_lost_parameters"] * 2
    assert all("p1" not in n for _k, n in notes)


def test_plain_text_401_is_described() -> None:
    from medblocks_pipelines.lib.errors import AuthError

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, text="Unauthorized", headers={"content-type": "text/plain"})

    with (
        httpx.Client(transport=httpx.MockTransport(handler)) as http,
        pytest.raises(AuthError, match="HTTP 401 .*text/plain body, not an OperationOutcome"),
    ):
        FhirClient(BASE, http=http).read("Patient", "p1")


def _cap(resources: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "resourceType": "CapabilityStatement",
        "rest": [{"mode": "server", "resource": resources}],
    }


def _res(rtype: str, *params: str) -> dict[str, Any]:
    return {
        "type": rtype,
        "interaction": [{"code": "read"}, {"code": "search-type"}],
        "searchParam": [{"name": p, "type": "token"} for p in params],
    }


GRANT = ScopeSet.parse("patient/*.rs")


def test_plan_follows_the_capability_statement() -> None:
    cap = _cap(
        [
            _res("Observation", "patient", "code"),  # no category
            _res("ServiceRequest", "patient"),
            _res("Specimen", "subject"),  # only subject
            _res("MedicationRequest", "patient"),  # no intent
            _res("Goal", "lifecycle-status"),  # no patient search at all
        ]
    )
    queries, skipped = plan_queries(
        kind="ehr", patient_id="p1", supported=set(), granted=GRANT, capability=cap
    )
    by_type = {q.resource_type: q.params for q in queries}
    assert by_type["Observation"] == (("patient", "p1"),)
    assert by_type["ServiceRequest"] == (("patient", "p1"),)
    assert by_type["Specimen"] == (("subject", "p1"),)
    assert ("intent", "order") not in by_type["MedicationRequest"]
    assert skipped["Goal"] == "no_patient_search"
    assert skipped["Condition"] == "not_supported"


def test_plan_keeps_categories_of_a_category_limited_grant() -> None:
    cap = _cap([_res("Observation", "patient")])
    grant = ScopeSet.parse("patient/Observation.rs?category=laboratory")
    (query,), _skipped = plan_queries(
        kind="ehr", patient_id="p1", supported=set(), granted=grant, capability=cap
    )
    assert query.keep_categories == ("laboratory",)


def test_plan_without_capability_uses_the_known_list() -> None:
    queries, skipped = plan_queries(
        kind="ehr", patient_id="p1", supported=set(), granted=GRANT, capability=None
    )
    labels = {q.label for q in queries}
    assert "Observation:laboratory" in labels and "ServiceRequest" in labels
    assert skipped == {}
