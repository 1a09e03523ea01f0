"""A tiny hand-made population for the sandbox server tests (two patients, one clinic, one payer).

It mimics the generator's interface (`organizations`, `resources_for`, `logins`) so `start_sandbox`
can run on it too. Values are chosen so each search test has matches and non-matches.
"""

import base64
from dataclasses import dataclass, field
from typing import Any

LOINC = "http://loinc.org"
OBS_CAT = "http://terminology.hl7.org/CodeSystem/observation-category"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"


def _obs(oid: str, pid: str, cat: str, code: str, when: str, value: float) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "category": [{"coding": [{"system": OBS_CAT, "code": cat}]}],
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": when,
        "valueQuantity": {"value": value, "unit": "%"},
        "performer": [{"reference": "Practitioner/dr1"}],
    }


def ehr_resources() -> list[dict[str, Any]]:
    """Resources of the clinic `mercy`: p1 (Alice, diabetic) and p2 (Bob)."""
    out: list[dict[str, Any]] = [
        {"resourceType": "Organization", "id": "org1", "name": "Mercy Clinic"},
        {
            "resourceType": "Practitioner",
            "id": "dr1",
            "name": [{"family": "House", "given": ["Greg"]}],
        },
        {"resourceType": "Location", "id": "loc1", "name": "Mercy Main"},
        {
            "resourceType": "Medication",
            "id": "med1",
            "code": {"coding": [{"system": RXNORM, "code": "860975"}]},
        },
        {
            "resourceType": "Patient",
            "id": "p1",
            "gender": "female",
            "birthDate": "1970-04-02",
            "name": [{"family": "Smith", "given": ["Alice"]}],
            "identifier": [{"system": "urn:mrn", "value": "MRN1"}],
            "managingOrganization": {"reference": "Organization/org1"},
        },
        {
            "resourceType": "Patient",
            "id": "p2",
            "gender": "male",
            "birthDate": "1980-01-01",
            "name": [{"family": "Jones", "given": ["Bob"]}],
            "identifier": [{"system": "urn:mrn", "value": "MRN2"}],
        },
        {
            "resourceType": "Encounter",
            "id": "enc1",
            "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
            "subject": {"reference": "Patient/p1"},
            "period": {"start": "2024-03-01T09:00:00Z", "end": "2024-03-01T10:00:00Z"},
            "serviceProvider": {"reference": "Organization/org1"},
            "location": [{"location": {"reference": "Location/loc1"}}],
        },
        {
            "resourceType": "Condition",
            "id": "cond1",
            "subject": {"reference": "Patient/p1"},
            "category": [{"coding": [{"code": "problem-list-item"}]}],
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006"}]},
            "clinicalStatus": {"coding": [{"code": "active"}]},
        },
        {
            "resourceType": "MedicationRequest",
            "id": "mr1",
            "status": "active",
            "intent": "order",
            "subject": {"reference": "Patient/p1"},
            "medicationReference": {"reference": "Medication/med1"},
            "authoredOn": "2024-03-01",
        },
        {
            "resourceType": "MedicationRequest",
            "id": "mr2",
            "status": "active",
            "intent": "plan",
            "subject": {"reference": "Patient/p2"},
            "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": "197361"}]},
        },
        {
            "resourceType": "Binary",
            "id": "bin1",
            "contentType": "text/plain",
            "data": base64.b64encode(b"Visit note for Alice").decode(),
        },
        {
            "resourceType": "DocumentReference",
            "id": "doc1",
            "status": "current",
            "subject": {"reference": "Patient/p1"},
            "type": {"coding": [{"system": LOINC, "code": "11506-3"}]},
            "content": [{"attachment": {"contentType": "text/plain", "url": "Binary/bin1"}}],
        },
    ]
    # Alice: 7 HbA1c labs (paging), 2 vitals; Bob: 1 lab.
    for n in range(7):
        out.append(
            _obs(
                f"a1c-{n}",
                "p1",
                "laboratory",
                "4548-4",
                f"2024-0{n + 1}-15T08:00:00Z",
                7.0 + n / 10,
            )
        )
    out.append(_obs("bp-1", "p1", "vital-signs", "85354-9", "2023-12-31T23:00:00Z", 120))
    out.append(_obs("bp-2", "p1", "vital-signs", "85354-9", "2024-06-01", 118))
    out.append(_obs("b-a1c", "p2", "laboratory", "4548-4", "2024-02-02T08:00:00Z", 5.4))
    return out


def payer_resources() -> list[dict[str, Any]]:
    """Resources of the payer `acme-health`: Alice's coverage and two claims."""
    return [
        {"resourceType": "Organization", "id": "payer-org", "name": "Acme Health"},
        {"resourceType": "Patient", "id": "m1", "name": [{"family": "Smith", "given": ["Alice"]}]},
        {"resourceType": "Patient", "id": "m2", "name": [{"family": "Jones", "given": ["Bob"]}]},
        {
            "resourceType": "Coverage",
            "id": "cov1",
            "status": "active",
            "beneficiary": {"reference": "Patient/m1"},
            "payor": [{"reference": "Organization/payer-org"}],
        },
        {
            "resourceType": "ExplanationOfBenefit",
            "id": "eob1",
            "status": "active",
            "type": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/claim-type",
                        "code": "professional",
                    }
                ]
            },
            "patient": {"reference": "Patient/m1"},
            "insurer": {"reference": "Organization/payer-org"},
            "billablePeriod": {"start": "2024-03-01", "end": "2024-03-01"},
            "insurance": [{"focal": True, "coverage": {"reference": "Coverage/cov1"}}],
        },
        {
            "resourceType": "ExplanationOfBenefit",
            "id": "eob2",
            "status": "active",
            "type": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/claim-type",
                        "code": "pharmacy",
                    }
                ]
            },
            "patient": {"reference": "Patient/m1"},
            "insurer": {"reference": "Organization/payer-org"},
            "billablePeriod": {"start": "2023-05-10", "end": "2023-05-10"},
            "insurance": [{"focal": True, "coverage": {"reference": "Coverage/cov1"}}],
        },
        {
            "resourceType": "ExplanationOfBenefit",
            "id": "eob3",
            "status": "active",
            "type": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/claim-type",
                        "code": "institutional",
                    }
                ]
            },
            "patient": {"reference": "Patient/m2"},
            "insurer": {"reference": "Organization/payer-org"},
            "billablePeriod": {"start": "2024-01-01", "end": "2024-01-05"},
        },
    ]


@dataclass(frozen=True)
class FakeOrg:
    id: str
    name: str
    kind: str


@dataclass(frozen=True)
class FakeLogin:
    org_id: str
    username: str
    password: str
    patient_id: str


@dataclass
class FakePopulation:
    """Generator-shaped container for the fixture data."""

    organizations: list[FakeOrg] = field(
        default_factory=lambda: [
            FakeOrg("mercy", "Mercy Clinic", "ehr"),
            FakeOrg("acme-health", "Acme Health", "payer"),
        ]
    )
    logins: list[FakeLogin] = field(
        default_factory=lambda: [
            FakeLogin("mercy", "alice", "alice-pw-123", "p1"),
            FakeLogin("mercy", "bob", "bob-pw-456", "p2"),
            FakeLogin("acme-health", "alice", "alice-payer-pw", "m1"),
        ]
    )

    def resources_for(self, org_id: str) -> list[dict[str, Any]]:
        return ehr_resources() if org_id == "mercy" else payer_resources()
