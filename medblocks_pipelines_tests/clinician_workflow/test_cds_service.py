"""CDS Hooks service over a real socket: discovery, cards with provenance, prefetch rules,
malformed requests, feedback, and the warehouse being missing, replaced or broken."""

import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest

from medblocks_pipelines.lib.cds.knowledge import PACKS_ENV
from medblocks_pipelines.lib.warehouse.build import warehouse_path
from medblocks_pipelines_tests.clinician_workflow.cards_check import assert_valid_response
from medblocks_pipelines_tests.clinician_workflow.conftest import (
    FHIR_TOKEN,
    LOINC,
    RX,
    TENANT,
    TODAY,
    CdsEnv,
    default_facts,
    order_select,
    patient_view,
)

TEST_PACKS = Path(__file__).parent / "packs"


def test_discovery_lists_three_hooks_with_prefetch(cds_env: CdsEnv) -> None:
    url = cds_env.url("/cds-services")
    resp = cds_env.http.get(url, headers={"Authorization": f"Bearer {cds_env.sign(url)}"})
    assert resp.status_code == 200
    services = resp.json()["services"]
    assert {s["hook"] for s in services} == {"patient-view", "order-select", "order-sign"}
    for s in services:
        assert s["id"] and s["description"]
        assert s["prefetch"]["patient"] == "Patient/{{context.patientId}}"
        packs = s["extension"]["com.medblocks.knowledge-packs"]
        assert {p["id"] for p in packs} == {"onc-high-priority-ddi", "vsac-ecqm-2025"}
    order = next(s for s in services if s["hook"] == "order-select")
    # Exactly what the packs hold: the interaction pairs of one pack, no drug-class allergies.
    assert "only the pairs listed in: ONC high-priority" in order["description"]
    assert "drug class" not in order["description"]
    view = next(s for s in services if s["hook"] == "patient-view")
    assert "2.16.840.1.113883.3.464.1003.103.12.1001" in view["description"]


def test_patient_view_shows_records_elsewhere_and_a1c_gap(cds_env: CdsEnv) -> None:
    resp = cds_env.hook("medblocks-patient-view", patient_view(prefetch={"patient": None}))
    assert resp.status_code == 200, resp.text
    cards = assert_valid_response(resp.json())
    by_topic = {c["source"]["topic"]["code"]: c for c in cards}
    beyond = by_topic["records-elsewhere"]
    # 4 facts not stated by ehr-a (the diabetes is also at ehr-a, the check-up only there).
    assert beyond["summary"].startswith("4 items from 2 other sources")
    assert "Riverside Clinic" in beyond["detail"] and "Blue Payer" in beyond["detail"]
    assert "payers (1)" in beyond["detail"]
    assert "pattern: EHR bulk sync" in beyond["detail"] and "date: 2026-05-22" in beyond["detail"]
    assert "Check up" not in beyond["detail"]  # this EHR's own record is not news
    assert beyond["links"][0]["type"] == "smart"
    assert beyond["links"][0]["url"] == cds_env.url("/ehr/launch")
    gap = by_topic["care-gap"]
    assert gap["indicator"] == "warning" and "200 days ago" in gap["summary"]
    action = gap["suggestions"][0]["actions"][0]
    assert action["type"] == "create"
    assert action["resource"]["code"]["coding"][0]["code"] == "4548-4"
    assert action["resource"]["subject"]["reference"] == "Patient/a1"
    # No demographics leak into cards.
    assert "MRN" not in resp.text


def test_recent_a1c_closes_the_gap(cds_env: CdsEnv) -> None:
    facts = [f for f in default_facts() if f["fact_id"] != "f-a1c"]
    recent = dict(next(f for f in default_facts() if f["fact_id"] == "f-a1c"))
    recent["last_date"] = recent["effective_date"] = TODAY - timedelta(days=30)
    cds_env.publish(facts=[*facts, recent])
    time.sleep(1.1)
    cds_env.hook("medblocks-patient-view", patient_view(prefetch={"patient": None}))
    deadline = time.time() + 10
    while time.time() < deadline:
        cards = cds_env.hook(
            "medblocks-patient-view", patient_view(prefetch={"patient": None})
        ).json()["cards"]
        if not any(c["source"]["topic"]["code"] == "care-gap" for c in cards):
            break
        time.sleep(0.2)
    assert not any(c["source"]["topic"]["code"] == "care-gap" for c in cards)


def test_unknown_patient_with_null_prefetch_gets_no_cards(cds_env: CdsEnv) -> None:
    resp = cds_env.hook("medblocks-patient-view", patient_view("zz9", prefetch={"patient": None}))
    assert resp.status_code == 200 and resp.json() == {"cards": []}


def test_unknown_patient_without_prefetch_or_server_is_412(cds_env: CdsEnv) -> None:
    resp = cds_env.hook("medblocks-patient-view", patient_view("zz9"))
    assert resp.status_code == 412
    assert resp.json()["error"] == "prefetch_unavailable"


def test_operation_outcome_prefetch_is_fetched_from_the_fhir_server(cds_env: CdsEnv) -> None:
    # Patient/x7 at ehr-a is not in the warehouse, but its MRN at ehr-b is: link by identifier.
    cds_env.stub.patients["x7"] = {
        "resourceType": "Patient",
        "id": "x7",
        "identifier": [{"system": "urn:mrn:ehr-b", "value": "MRN-B1"}],
    }
    body = patient_view(
        "x7",
        prefetch={
            "patient": {"resourceType": "OperationOutcome", "issue": [{"severity": "error"}]}
        },
    )
    body["fhirServer"] = cds_env.stub.fhir_base
    body["fhirAuthorization"] = {
        "access_token": FHIR_TOKEN,
        "token_type": "Bearer",
        "expires_in": 300,
        "scope": "user/Patient.rs",
        "subject": "medblocks-cds",
    }
    resp = cds_env.hook("medblocks-patient-view", body)
    assert resp.status_code == 200, resp.text
    assert "/fhir/Patient/x7" in cds_env.stub.hits
    assert len(resp.json()["cards"]) == 2


def test_operation_outcome_prefetch_without_server_is_412(cds_env: CdsEnv) -> None:
    body = patient_view("x8", prefetch={"patient": {"resourceType": "OperationOutcome"}})
    assert cds_env.hook("medblocks-patient-view", body).status_code == 412


def test_fhir_server_other_than_the_registered_one_is_refused(cds_env: CdsEnv) -> None:
    body = patient_view("x7")
    body["fhirServer"] = "http://127.0.0.1:9/fhir"
    body["fhirAuthorization"] = {
        "access_token": FHIR_TOKEN,
        "token_type": "Bearer",
        "expires_in": 300,
        "scope": "user/Patient.rs",
        "subject": "x",
    }
    resp = cds_env.hook("medblocks-patient-view", body)
    assert resp.status_code == 400 and resp.json()["error"] == "unknown_fhir_server"


def _service_request(code: str, rid: str = "sr1") -> dict:
    return {
        "resourceType": "ServiceRequest",
        "id": rid,
        "status": "draft",
        "intent": "order",
        "subject": {"reference": "Patient/a1"},
        "code": {"coding": [{"system": LOINC, "code": code}]},
    }


def _med_request(rx: str, rid: str = "mr1") -> dict:
    return {
        "resourceType": "MedicationRequest",
        "id": rid,
        "status": "draft",
        "intent": "order",
        "subject": {"reference": "Patient/a1"},
        "medicationCodeableConcept": {"coding": [{"system": RX, "code": rx}]},
    }


def test_order_select_duplicate_lab(cds_env: CdsEnv) -> None:
    resp = cds_env.hook("medblocks-order-select", order_select([_service_request("2093-3")]))
    cards = assert_valid_response(resp.json())
    assert len(cards) == 1
    card = cards[0]
    assert card["summary"] == "Possible duplicate: Cholesterol done 10 days ago elsewhere"
    assert "Riverside Clinic" in card["detail"] and "190" in card["detail"]
    action = card["suggestions"][0]["actions"][0]
    assert action == {
        "type": "delete",
        "description": "Remove draft order ServiceRequest/sr1",
        "resourceId": "ServiceRequest/sr1",
    }
    # The A1c was 200 days ago: outside the lab window, no duplicate.
    resp = cds_env.hook("medblocks-order-select", order_select([_service_request("4548-4")]))
    assert resp.json() == {"cards": []}


def test_order_select_allergy_class_from_a_plugged_pack_and_interaction(
    cds_env: CdsEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An operator's pack (a test fixture here) adds the penicillin class to the shipped packs.
    monkeypatch.setenv(PACKS_ENV, str(TEST_PACKS))
    # amoxicillin 250 MG Oral Capsule (a clinical drug, SCD 308182), resolved by its name.
    amox = _med_request("308182", "amox")
    amox["medicationCodeableConcept"]["coding"][0]["display"] = "amoxicillin 250 MG Oral Capsule"
    # atazanavir through a contained Medication's ingredient coding.
    ataz = {
        "resourceType": "MedicationRequest",
        "id": "ataz",
        "status": "draft",
        "intent": "order",
        "subject": {"reference": "Patient/a1"},
        "contained": [
            {
                "resourceType": "Medication",
                "id": "m1",
                "code": {"text": "Reyataz 300 mg capsule"},
                "ingredient": [
                    {"itemCodeableConcept": {"coding": [{"system": RX, "code": "343047"}]}}
                ],
            }
        ],
        "medicationReference": {"reference": "#m1"},
    }
    other = _service_request("2093-3", "unselected")
    body = order_select(
        [amox, ataz, other], selections=["MedicationRequest/amox", "MedicationRequest/ataz"]
    )
    cards = assert_valid_response(cds_env.hook("medblocks-order-select", body).json())
    topics = sorted(c["source"]["topic"]["code"] for c in cards)
    assert topics == ["allergy", "interaction"]  # the unselected lab is not checked
    allergy = next(c for c in cards if c["source"]["topic"]["code"] == "allergy")
    assert allergy["indicator"] == "critical" and "same drug class" in allergy["summary"]
    assert "patient-authorized access" in allergy["detail"]
    assert "TEST ONLY penicillin class 0.0-test" in allergy["source"]["label"]
    inter = next(c for c in cards if c["source"]["topic"]["code"] == "interaction")
    assert "omeprazole" in inter["summary"] and "Blue Payer" in inter["detail"]
    assert inter["indicator"] == "critical"
    assert "ONC high-priority drug-drug interactions (subset) 2012.1" in inter["source"]["label"]
    assert "amiajnl-2011-000612" in inter["detail"]


def test_shipped_packs_alone_warn_only_on_what_they_hold(cds_env: CdsEnv) -> None:
    """Without a class pack, amoxicillin against a penicillin allergy is not a class match; an
    order nobody can identify says the checks did not run instead of staying silent."""
    amox = _med_request("723", "amox")
    unknown = {
        "resourceType": "MedicationRequest",
        "id": "local",
        "status": "draft",
        "intent": "order",
        "subject": {"reference": "Patient/a1"},
        "medicationCodeableConcept": {
            "coding": [{"system": "urn:oid:1.2.3.4", "code": "X-17"}],
            "text": "house mix 3",
        },
    }
    body = order_select([amox, unknown])
    cards = assert_valid_response(cds_env.hook("medblocks-order-select", body).json())
    assert [c["source"]["topic"]["code"] for c in cards] == ["unchecked"]
    assert "not" in cards[0]["detail"] and cards[0]["indicator"] == "info"


def test_order_sign_checks_every_draft(cds_env: CdsEnv) -> None:
    body = order_select([_service_request("2093-3"), _med_request("70618")])
    body["hook"] = "order-sign"
    del body["context"]["selections"]
    cards = assert_valid_response(cds_env.hook("medblocks-order-sign", body).json())
    assert sorted(c["source"]["topic"]["code"] for c in cards) == ["allergy", "duplicate-order"]


def test_card_uuids_are_stable_across_calls(cds_env: CdsEnv) -> None:
    a = cds_env.hook("medblocks-patient-view", patient_view(prefetch={"patient": None})).json()
    b = cds_env.hook("medblocks-patient-view", patient_view(prefetch={"patient": None})).json()
    assert [c["uuid"] for c in a["cards"]] == [c["uuid"] for c in b["cards"]]


def test_malformed_requests_are_400_with_a_reason(cds_env: CdsEnv) -> None:
    url = "medblocks-patient-view"
    cases = [
        (
            {
                "hook": "order-select",
                "hookInstance": str(uuid.uuid4()),
                "context": {"userId": "Practitioner/1", "patientId": "a1"},
            },
            "hook must be",
        ),
        ({**patient_view(), "hookInstance": "not-a-uuid"}, "hookInstance"),
        ({"hook": "patient-view", "hookInstance": str(uuid.uuid4())}, "context"),
        ({**patient_view(), "context": {"userId": "Device/1", "patientId": "a1"}}, "userId"),
        ({**patient_view(), "context": {"userId": "Practitioner/1"}}, "patientId"),
        ({**patient_view(), "prefetch": []}, "prefetch"),
        (
            {
                **patient_view(),
                "fhirAuthorization": {
                    "access_token": "t",
                    "token_type": "Bearer",
                    "expires_in": 1,
                    "scope": "s",
                    "subject": "x",
                },
            },
            "fhirServer is required",
        ),
    ]
    for body, expected in cases:
        resp = cds_env.hook(url, body)
        assert resp.status_code == 400, (body, resp.text)
        assert expected in resp.json()["detail"]
    bad_orders = order_select([_service_request("2093-3")], selections=["ServiceRequest/nope"])
    resp = cds_env.hook("medblocks-order-select", bad_orders)
    assert resp.status_code == 400 and "selections" in resp.json()["detail"]
    no_bundle = order_select([_service_request("2093-3")])
    no_bundle["context"]["draftOrders"] = {"resourceType": "Patient"}
    assert cds_env.hook("medblocks-order-select", no_bundle).status_code == 400
    token = cds_env.sign(cds_env.url("/cds-services/medblocks-patient-view"))
    resp = cds_env.http.post(
        cds_env.url("/cds-services/medblocks-patient-view"),
        content=b"{not json",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    assert resp.status_code == 400 and resp.json()["error"] == "invalid_request"
    assert cds_env.hook("no-such-service", patient_view()).status_code == 404


def test_feedback_is_stored_once(cds_env: CdsEnv) -> None:
    cards = cds_env.hook("medblocks-patient-view", patient_view(prefetch={"patient": None})).json()[
        "cards"
    ]
    gap = next(c for c in cards if c["source"]["topic"]["code"] == "care-gap")
    url = cds_env.url("/cds-services/medblocks-patient-view/feedback")
    body = {
        "feedback": [
            {
                "card": gap["uuid"],
                "outcome": "accepted",
                "acceptedSuggestions": [{"id": gap["suggestions"][0]["uuid"]}],
                "outcomeTimestamp": "2026-06-01T10:00:00Z",
            }
        ]
    }
    first = cds_env.http.post(
        url, json=body, headers={"Authorization": f"Bearer {cds_env.sign(url)}"}
    )
    again = cds_env.http.post(
        url, json=body, headers={"Authorization": f"Bearer {cds_env.sign(url)}"}
    )
    assert first.json() == {"stored": 1, "duplicates": 0}
    assert again.json() == {"stored": 0, "duplicates": 1}
    bad = {
        "feedback": [
            {"card": gap["uuid"], "outcome": "accepted", "outcomeTimestamp": "2026-06-01T10:00:00Z"}
        ]
    }
    resp = cds_env.http.post(
        url, json=bad, headers={"Authorization": f"Bearer {cds_env.sign(url)}"}
    )
    assert resp.status_code == 400 and "acceptedSuggestions" in resp.json()["detail"]


def test_missing_warehouse_answers_no_cards(cds_env: CdsEnv) -> None:
    warehouse_path(cds_env.settings, TENANT).unlink()
    resp = cds_env.hook("medblocks-patient-view", patient_view(prefetch={"patient": None}))
    assert resp.status_code == 200 and resp.json() == {"cards": []}


def test_broken_rebuild_keeps_serving_the_last_published(cds_env: CdsEnv) -> None:
    first = cds_env.hook("medblocks-patient-view", patient_view(prefetch={"patient": None}))
    assert len(first.json()["cards"]) == 2
    path = warehouse_path(cds_env.settings, TENANT)
    tmp = path.with_name("broken.tmp")
    tmp.write_bytes(b"this is not a duckdb file" * 100)
    tmp.replace(path)  # what a half-written publish would look like
    time.sleep(1.2)
    for _ in range(5):
        resp = cds_env.hook("medblocks-patient-view", patient_view(prefetch={"patient": None}))
        assert resp.status_code == 200 and len(resp.json()["cards"]) == 2
        time.sleep(0.2)
    # A good publish after that is picked up (in the background, without blocking answers).
    cds_env.publish(facts=[])
    deadline = time.time() + 10
    while time.time() < deadline:
        resp = cds_env.hook("medblocks-patient-view", patient_view(prefetch={"patient": None}))
        if resp.json()["cards"] == []:
            break
        time.sleep(0.2)
    assert resp.json() == {"cards": []}


def test_a_second_source_of_the_same_ehr_counts_as_this_chart(cds_env: CdsEnv) -> None:
    # The same EHR registered twice (bulk sync client + launch client): same FHIR base.
    cds_env.cp.add_source(
        "ehr-a-bulk", "Mercy EHR (bulk)", "sandbox", "ehr", cds_env.stub.fhir_base, ["backend"]
    )
    facts = default_facts()
    for f in facts:
        if f["fact_id"] == "f-lipid":
            f["sources"] = f["organizations"] = ["ehr-a-bulk"]
    # The patient is linked only through the bulk source's key.
    links = [
        {"patient_key": "ehr-a-bulk/Patient/a1", "source": "ehr-a-bulk", "person_id": "P1"},
        {"patient_key": "ehr-b/Patient/b1", "source": "ehr-b", "person_id": "P1"},
    ]
    cds_env.publish(facts=facts, links=links)
    cards = cds_env.hook("medblocks-patient-view", patient_view(prefetch={"patient": None})).json()[
        "cards"
    ]
    beyond = next(c for c in cards if c["source"]["topic"]["code"] == "records-elsewhere")
    assert beyond["summary"].startswith("3 items from 2 other sources")
    assert "Cholesterol" not in beyond["detail"]


def test_fhir_authorization_for_another_patient_is_refused(cds_env: CdsEnv) -> None:
    body = patient_view("x7")
    body["fhirServer"] = cds_env.stub.fhir_base
    body["fhirAuthorization"] = {
        "access_token": FHIR_TOKEN,
        "token_type": "Bearer",
        "expires_in": 300,
        "scope": "patient/Patient.rs",
        "subject": "medblocks-cds",
        "patient": "someone-else",
    }
    resp = cds_env.hook("medblocks-patient-view", body)
    assert resp.status_code == 400 and "fhirAuthorization.patient" in resp.json()["detail"]
    assert "/fhir/Patient/x7" not in cds_env.stub.hits
