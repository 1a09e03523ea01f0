"""Hand-written FHIR R4 resources for one patient, one of each domain the C-CDA renderer covers."""

from typing import Any

SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
ORG = {
    "id": "riverside-health",
    "name": "Riverside Health System",
    "oid": "2.16.840.1.113883.3.9999.4",
}


def patient_bundle(pid: str = "p1") -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A patient and their resources (ids prefixed by ``pid`` so two patients never collide)."""
    patient = {
        "resourceType": "Patient",
        "id": pid,
        "name": [{"family": "Rivera", "given": ["Ana", "Maria"]}],
        "gender": "female",
        "birthDate": "1980-04-12",
        "address": [
            {"line": ["12 Oak St"], "city": "Eugene", "state": "OR", "postalCode": "97401"}
        ],
        "telecom": [{"system": "phone", "value": "541-555-0100"}],
    }
    subj = {"reference": f"Patient/{pid}"}
    res: list[dict[str, Any]] = [
        {
            "resourceType": "Condition",
            "id": f"{pid}-c1",
            "subject": subj,
            "category": [{"coding": [{"code": "problem-list-item"}]}],
            "clinicalStatus": {"coding": [{"code": "active"}]},
            "code": {
                "coding": [
                    {"system": SNOMED, "code": "44054006", "display": "Diabetes mellitus type 2"},
                    {"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "E11.9"},
                ],
                "text": "Type 2 diabetes",
            },
            "onsetDateTime": "2019-03",
            "recordedDate": "2019-03-15",
        },
        {
            "resourceType": "Condition",
            "id": f"{pid}-c2",
            "subject": subj,
            "category": [{"coding": [{"code": "problem-list-item"}]}],
            "clinicalStatus": {"coding": [{"code": "resolved"}]},
            "code": {
                "coding": [
                    {"system": SNOMED, "code": "195662009", "display": "Acute viral pharyngitis"}
                ]
            },
            "onsetDateTime": "2024-01-05",
            "abatementDateTime": "2024-01-20",
        },
        {
            "resourceType": "Condition",
            "id": f"{pid}-c3",
            "subject": subj,
            "category": [{"coding": [{"code": "encounter-diagnosis"}]}],
            "encounter": {"reference": f"Encounter/{pid}-e1"},
            "code": {"coding": [{"system": SNOMED, "code": "38341003", "display": "Hypertension"}]},
            "onsetDateTime": "2025-06-01",
        },
        {
            "resourceType": "AllergyIntolerance",
            "id": f"{pid}-a1",
            "patient": subj,
            "clinicalStatus": {"coding": [{"code": "active"}]},
            "category": ["medication"],
            "criticality": "high",
            "code": {
                "coding": [
                    {
                        "system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                        "code": "7980",
                        "display": "Penicillin G",
                    }
                ]
            },
            "reaction": [
                {
                    "manifestation": [
                        {"coding": [{"system": SNOMED, "code": "247472004", "display": "Hives"}]}
                    ],
                    "severity": "moderate",
                }
            ],
            "onsetDateTime": "2010",
        },
        {
            "resourceType": "MedicationRequest",
            "id": f"{pid}-m1",
            "subject": subj,
            "status": "active",
            "intent": "order",
            "authoredOn": "2025-06-01T10:30:00+00:00",
            "medicationCodeableConcept": {
                "coding": [
                    {
                        "system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                        "code": "860975",
                        "display": "metformin 500 MG",
                    }
                ]
            },
            "dosageInstruction": [
                {
                    "timing": {
                        "repeat": {
                            "period": 12,
                            "periodUnit": "h",
                            "boundsPeriod": {"start": "2025-06-01"},
                        }
                    },
                    "doseAndRate": [{"doseQuantity": {"value": 1, "unit": "{tbl}"}}],
                }
            ],
        },
        {
            "resourceType": "Observation",
            "id": f"{pid}-l1",
            "status": "final",
            "subject": subj,
            "category": [{"coding": [{"code": "laboratory"}]}],
            "code": {"coding": [{"system": LOINC, "code": "4548-4", "display": "Hemoglobin A1c"}]},
            "effectiveDateTime": "2025-06-01T09:00:00-07:00",
            "valueQuantity": {"value": 7.2, "unit": "%", "code": "%"},
            "referenceRange": [
                {"low": {"value": 4.0, "code": "%"}, "high": {"value": 5.6, "code": "%"}}
            ],
        },
        {
            "resourceType": "Observation",
            "id": f"{pid}-v1",
            "status": "final",
            "subject": subj,
            "category": [{"coding": [{"code": "vital-signs"}]}],
            "code": {
                "coding": [{"system": LOINC, "code": "85354-9", "display": "Blood pressure panel"}]
            },
            "effectiveDateTime": "2025-06-01T09:00:00-07:00",
            "component": [
                {
                    "code": {"coding": [{"system": LOINC, "code": "8480-6"}]},
                    "valueQuantity": {"value": 142, "code": "mm[Hg]"},
                },
                {
                    "code": {"coding": [{"system": LOINC, "code": "8462-4"}]},
                    "valueQuantity": {"value": 91, "code": "mm[Hg]"},
                },
            ],
        },
        {
            "resourceType": "Observation",
            "id": f"{pid}-v2",
            "status": "final",
            "subject": subj,
            "category": [{"coding": [{"code": "vital-signs"}]}],
            "code": {"coding": [{"system": LOINC, "code": "29463-7", "display": "Body weight"}]},
            "effectiveDateTime": "2025-06-01T09:00:00-07:00",
            "valueQuantity": {"value": 81.5, "unit": "kg", "code": "kg"},
        },
        {
            "resourceType": "Immunization",
            "id": f"{pid}-i1",
            "status": "completed",
            "patient": subj,
            "vaccineCode": {
                "coding": [
                    {
                        "system": "http://hl7.org/fhir/sid/cvx",
                        "code": "140",
                        "display": "Influenza, seasonal",
                    }
                ]
            },
            "occurrenceDateTime": "2024-10-02",
            "lotNumber": "LOT123",
        },
        {
            "resourceType": "Procedure",
            "id": f"{pid}-pr1",
            "status": "completed",
            "subject": subj,
            "code": {"coding": [{"system": SNOMED, "code": "73761001", "display": "Colonoscopy"}]},
            "performedDateTime": "2023-02-14",
        },
        {
            "resourceType": "Encounter",
            "id": f"{pid}-e1",
            "status": "finished",
            "class": {"code": "AMB", "display": "ambulatory"},
            "type": [
                {
                    "coding": [
                        {
                            "system": "http://www.ama-assn.org/go/cpt",
                            "code": "99213",
                            "display": "Office visit",
                        }
                    ]
                }
            ],
            "subject": subj,
            "period": {"start": "2025-06-01T09:00:00-07:00", "end": "2025-06-01T09:40:00-07:00"},
            "location": [{"location": {"display": "Riverside Clinic"}}],
        },
    ]
    return patient, res
