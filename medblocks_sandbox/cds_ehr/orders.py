"""Draft orders the sandbox EHR puts in its ``order-select``/``order-sign`` hook calls by default."""

from typing import Any

LOINC = "http://loinc.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"


def demo_orders(patient: str) -> list[dict[str, Any]]:
    """Draft orders of the demo: an HbA1c, a lipid panel and amoxicillin (penicillin class)."""
    subject = {"reference": f"Patient/{patient}"}
    return [
        {
            "resourceType": "ServiceRequest",
            "id": "draft-a1c",
            "status": "draft",
            "intent": "order",
            "subject": subject,
            "code": {
                "coding": [
                    {
                        "system": LOINC,
                        "code": "4548-4",
                        "display": "Hemoglobin A1c/Hemoglobin.total in Blood",
                    }
                ]
            },
        },
        {
            "resourceType": "ServiceRequest",
            "id": "draft-lipid",
            "status": "draft",
            "intent": "order",
            "subject": subject,
            "code": {"coding": [{"system": LOINC, "code": "57698-3", "display": "Lipid panel"}]},
        },
        {
            "resourceType": "MedicationRequest",
            "id": "draft-amox",
            "status": "draft",
            "intent": "order",
            "subject": subject,
            "medicationCodeableConcept": {
                "coding": [
                    {
                        "system": RXNORM,
                        "code": "308182",
                        "display": "amoxicillin 250 MG Oral Capsule",
                    },
                    {"system": RXNORM, "code": "723", "display": "amoxicillin"},
                ]
            },
        },
    ]
