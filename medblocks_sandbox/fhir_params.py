"""What the sandbox FHIR servers search on: the Patient compartment (FHIR R4
CompartmentDefinition/patient), the types a patient token may read outside it, and the search
parameters per resource type that US Core servers advertise.
"""

from dataclasses import dataclass
from typing import Any, Literal

Resource = dict[str, Any]

# ---------------------------------------------------------------------------------------------
# Patient compartment (FHIR R4 CompartmentDefinition/patient): element paths per resource type
# whose Patient references put a resource into that patient's compartment.
# ---------------------------------------------------------------------------------------------
PATIENT_COMPARTMENT: dict[str, tuple[str, ...]] = {
    "AllergyIntolerance": ("patient", "recorder", "asserter"),
    "CarePlan": ("subject",),
    "CareTeam": ("subject", "participant.member"),
    "Claim": ("patient",),
    "ClaimResponse": ("patient",),
    "Communication": ("subject", "sender", "recipient"),
    "Condition": ("subject", "asserter"),
    "Coverage": ("policyHolder", "subscriber", "beneficiary", "payor"),
    "Device": ("patient",),
    "DiagnosticReport": ("subject",),
    "DocumentReference": ("subject", "author"),
    "Encounter": ("subject",),
    "ExplanationOfBenefit": ("patient", "payee.party"),
    "FamilyMemberHistory": ("patient",),
    "Goal": ("subject",),
    "Immunization": ("patient",),
    "List": ("subject", "source"),
    "MedicationAdministration": ("subject",),
    "MedicationDispense": ("subject",),
    "MedicationRequest": ("subject",),
    "MedicationStatement": ("subject",),
    "Observation": ("subject", "performer"),
    "Procedure": ("subject", "performer.actor"),
    "Provenance": ("target",),
    "QuestionnaireResponse": ("subject", "author"),
    "RelatedPerson": ("patient",),
    "ServiceRequest": ("subject", "performer", "requester"),
    "Specimen": ("subject",),
}

# Types a patient-context token may read outside the compartment (what a patient app needs to
# resolve references: US Core "referenced Practitioner, Organization and Location", medications).
SHARED_TYPES: frozenset[str] = frozenset(
    {"Practitioner", "PractitionerRole", "Organization", "Location", "Medication"}
)


# ---------------------------------------------------------------------------------------------
# Search parameter definitions
# ---------------------------------------------------------------------------------------------
SearchKind = Literal["token", "reference", "date", "string"]


@dataclass(frozen=True)
class SearchParam:
    """One FHIR search parameter: its name, type and the element paths it reads."""

    name: str
    kind: SearchKind
    paths: tuple[str, ...]
    targets: tuple[str, ...] = ()  # for references: the resource types it may point to


def _p(name: str, kind: SearchKind, *paths: str, targets: tuple[str, ...] = ()) -> SearchParam:
    return SearchParam(name, kind, tuple(paths), targets)


_PATIENT = ("Patient",)
_COMMON = (
    _p("_id", "token", "id"),
    _p("_lastUpdated", "date", "meta.lastUpdated"),
)
_SUBJECT = (
    _p("patient", "reference", "subject", targets=_PATIENT),
    _p("subject", "reference", "subject"),
)
_PATIENT_EL = (_p("patient", "reference", "patient", targets=_PATIENT),)

SEARCH_PARAMS: dict[str, tuple[SearchParam, ...]] = {
    "Patient": (
        _p("identifier", "token", "identifier"),
        _p("name", "string", "name"),
        _p("family", "string", "name.family"),
        _p("given", "string", "name.given"),
        _p("birthdate", "date", "birthDate"),
        _p("gender", "token", "gender"),
        _p("address-postalcode", "string", "address.postalCode"),
    ),
    "Observation": (
        *_SUBJECT,
        _p("category", "token", "category"),
        _p("code", "token", "code"),
        _p("date", "date", "effectiveDateTime", "effectivePeriod", "effectiveInstant"),
        _p("status", "token", "status"),
        _p("encounter", "reference", "encounter", targets=("Encounter",)),
    ),
    "Condition": (
        *_SUBJECT,
        _p("category", "token", "category"),
        _p("code", "token", "code"),
        _p("clinical-status", "token", "clinicalStatus"),
        _p("verification-status", "token", "verificationStatus"),
        _p("onset-date", "date", "onsetDateTime", "onsetPeriod"),
        _p("abatement-date", "date", "abatementDateTime", "abatementPeriod"),
        _p("recorded-date", "date", "recordedDate"),
        _p("encounter", "reference", "encounter", targets=("Encounter",)),
    ),
    "Encounter": (
        *_SUBJECT,
        _p("date", "date", "period"),
        _p("status", "token", "status"),
        _p("class", "token", "class"),
        _p("type", "token", "type"),
        _p("identifier", "token", "identifier"),
        _p("location", "reference", "location.location", targets=("Location",)),
        _p("service-provider", "reference", "serviceProvider", targets=("Organization",)),
        _p("practitioner", "reference", "participant.individual", targets=("Practitioner",)),
    ),
    "MedicationRequest": (
        *_SUBJECT,
        _p("intent", "token", "intent"),
        _p("status", "token", "status"),
        _p("authoredon", "date", "authoredOn"),
        _p("code", "token", "medicationCodeableConcept"),
        _p("encounter", "reference", "encounter", targets=("Encounter",)),
        _p("medication", "reference", "medicationReference", targets=("Medication",)),
        _p("requester", "reference", "requester"),
    ),
    "Medication": (_p("code", "token", "code"),),
    "AllergyIntolerance": (
        *_PATIENT_EL,
        _p("clinical-status", "token", "clinicalStatus"),
        _p("code", "token", "code"),
    ),
    "Immunization": (
        *_PATIENT_EL,
        _p("date", "date", "occurrenceDateTime"),
        _p("status", "token", "status"),
        _p("vaccine-code", "token", "vaccineCode"),
    ),
    "Procedure": (
        *_SUBJECT,
        _p("date", "date", "performedDateTime", "performedPeriod"),
        _p("code", "token", "code"),
        _p("status", "token", "status"),
    ),
    "DiagnosticReport": (
        *_SUBJECT,
        _p("category", "token", "category"),
        _p("code", "token", "code"),
        _p("date", "date", "effectiveDateTime", "effectivePeriod"),
        _p("status", "token", "status"),
        _p("result", "reference", "result", targets=("Observation",)),
        _p("encounter", "reference", "encounter", targets=("Encounter",)),
    ),
    "DocumentReference": (
        *_SUBJECT,
        _p("category", "token", "category"),
        _p("type", "token", "type"),
        _p("date", "date", "date"),
        _p("period", "date", "context.period"),
        _p("status", "token", "status"),
        _p("encounter", "reference", "context.encounter", targets=("Encounter",)),
    ),
    "CarePlan": (*_SUBJECT, _p("category", "token", "category"), _p("status", "token", "status")),
    "CareTeam": (*_SUBJECT, _p("status", "token", "status")),
    "Goal": (*_SUBJECT, _p("lifecycle-status", "token", "lifecycleStatus")),
    "Device": (*_PATIENT_EL, _p("type", "token", "type")),
    "Provenance": (
        _p("target", "reference", "target"),
        _p("patient", "reference", "target", targets=_PATIENT),
    ),
    "Practitioner": (
        _p("identifier", "token", "identifier"),
        _p("name", "string", "name"),
        _p("family", "string", "name.family"),
        _p("given", "string", "name.given"),
    ),
    "PractitionerRole": (
        _p("practitioner", "reference", "practitioner", targets=("Practitioner",)),
        _p("organization", "reference", "organization", targets=("Organization",)),
    ),
    "Organization": (
        _p("identifier", "token", "identifier"),
        _p("name", "string", "name", "alias"),
        _p("type", "token", "type"),
    ),
    "Location": (
        _p("identifier", "token", "identifier"),
        _p("name", "string", "name", "alias"),
        _p("address", "string", "address"),
    ),
    "Coverage": (
        _p("patient", "reference", "beneficiary", targets=_PATIENT),
        _p("beneficiary", "reference", "beneficiary", targets=_PATIENT),
        _p("payor", "reference", "payor"),
        _p("status", "token", "status"),
        _p("identifier", "token", "identifier"),
        _p("type", "token", "type"),
    ),
    # CARIN Blue Button required EOB searches (SPECS §1.10).
    "ExplanationOfBenefit": (
        *_PATIENT_EL,
        _p("identifier", "token", "identifier"),
        _p("type", "token", "type"),
        _p(
            "service-date",
            "date",
            "billablePeriod",
            "item.servicedDate",
            "item.servicedPeriod",
        ),
        _p(
            "service-start-date",
            "date",
            "billablePeriod.start",
            "item.servicedDate",
            "item.servicedPeriod.start",
        ),
        _p("billable-period-start", "date", "billablePeriod.start"),
        _p("provider", "reference", "provider"),
        _p("care-team", "reference", "careTeam.provider"),
        _p("coverage", "reference", "insurance.coverage", targets=("Coverage",)),
        _p("insurer", "reference", "insurer", targets=("Organization",)),
        _p("status", "token", "status"),
    ),
    "Binary": (),
}

# Result parameters the servers understand besides the per-type search parameters.
CONTROL_PARAMS: frozenset[str] = frozenset(
    {"_count", "_offset", "_include", "_revinclude", "_sort", "_summary", "_format", "_total"}
)


def params_for(resource_type: str) -> dict[str, SearchParam]:
    """The search parameters `resource_type` supports, by name (`_id`, `_lastUpdated` first)."""
    out = {p.name: p for p in _COMMON}
    out.update({p.name: p for p in SEARCH_PARAMS.get(resource_type, ())})
    return out
