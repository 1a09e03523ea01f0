"""The FHIR R4 Patient compartment as data, and the patient-scope check every landing passes.

A patient-scoped connection (a patient's consent, an EHR launch's targeted sync, network results
for one person) may land only what is in its patient's compartment. Servers get this wrong: a
``next`` link that drops ``patient=`` pages through every patient on the server, a search page
carries another patient's entry. :class:`PatientScope` is the one check, applied by
:class:`~medblocks_pipelines.lib.warehouse.lake.LakeWriter` to every row it lands when it is given
a scope, so no connector can forget it.

The table follows the R4 CompartmentDefinition "patient"
(https://hl7.org/fhir/R4/compartmentdefinition-patient.html): per resource type, the search
parameters that link a resource to the patient, and the element paths those parameters search
(the R4 SearchParameter expressions, ``.where(resolve() is Patient)`` read as "a Patient
reference"). Types the definition lists without parameters (Medication, Practitioner,
Organization, Location, PractitionerRole, Device, Binary, ...) are not in any patient's
compartment: they are shared and pass (we fetch them by reference).

Two readings beyond the letter of the table, both narrow:

* ``Patient`` is in its own compartment (the compartment's identity), and a Patient whose
  ``link.other`` points at the scope's patient is in it too (the ``link`` parameter).
* ``Provenance`` (parameter ``patient`` = ``target`` that is a Patient) is also admitted when a
  ``target`` is a resource this scope has already admitted: US Core Provenance targets the
  patient's clinical resources, not the Patient, and ``Provenance?patient=`` answers those.
* A shared type that names the one patient it belongs to (:data:`PATIENT_BOUND_SHARED`: R4
  ``Device.patient``, "patient to whom Device is affixed", which US Core Implantable Device
  requires) is outside when that patient is someone else. A Device without ``patient`` is shared
  and passes, as the table says; an implant of another patient is that patient's record.
"""

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

#: The reason (and reason class) of a row quarantined by the scope check.
OUTSIDE_PATIENT_COMPARTMENT = "outside_patient_compartment"

#: R4 CompartmentDefinition "patient": resource type -> {search parameter: element paths}.
PATIENT_COMPARTMENT: Mapping[str, Mapping[str, tuple[str, ...]]] = {
    "Account": {"subject": ("subject",)},
    "AdverseEvent": {"subject": ("subject",)},
    "AllergyIntolerance": {
        "patient": ("patient",),
        "recorder": ("recorder",),
        "asserter": ("asserter",),
    },
    "Appointment": {"actor": ("participant.actor",)},
    "AppointmentResponse": {"actor": ("actor",)},
    "AuditEvent": {"patient": ("agent.who", "entity.what")},
    "Basic": {"patient": ("subject",), "author": ("author",)},
    "BodyStructure": {"patient": ("patient",)},
    "CarePlan": {"patient": ("subject",), "performer": ("activity.detail.performer",)},
    "CareTeam": {"patient": ("subject",), "participant": ("participant.member",)},
    "ChargeItem": {"subject": ("subject",)},
    "Claim": {"patient": ("patient",), "payee": ("payee.party",)},
    "ClaimResponse": {"patient": ("patient",)},
    "ClinicalImpression": {"subject": ("subject",)},
    "Communication": {
        "subject": ("subject",),
        "sender": ("sender",),
        "recipient": ("recipient",),
    },
    "CommunicationRequest": {
        "subject": ("subject",),
        "sender": ("sender",),
        "recipient": ("recipient",),
        "requester": ("requester",),
    },
    "Composition": {
        "subject": ("subject",),
        "author": ("author",),
        "attester": ("attester.party",),
    },
    "Condition": {"patient": ("subject",), "asserter": ("asserter",)},
    "Consent": {"patient": ("patient",)},
    "Coverage": {
        "policy-holder": ("policyHolder",),
        "subscriber": ("subscriber",),
        "beneficiary": ("beneficiary",),
        "payor": ("payor",),
    },
    "CoverageEligibilityRequest": {"patient": ("patient",)},
    "CoverageEligibilityResponse": {"patient": ("patient",)},
    "DetectedIssue": {"patient": ("patient",)},
    "DeviceRequest": {"subject": ("subject",), "performer": ("performer",)},
    "DeviceUseStatement": {"subject": ("subject",)},
    "DiagnosticReport": {"subject": ("subject",)},
    "DocumentManifest": {
        "subject": ("subject",),
        "author": ("author",),
        "recipient": ("recipient",),
    },
    "DocumentReference": {"subject": ("subject",), "author": ("author",)},
    "Encounter": {"patient": ("subject",)},
    "EnrollmentRequest": {"subject": ("candidate",)},
    "EpisodeOfCare": {"patient": ("patient",)},
    "ExplanationOfBenefit": {"patient": ("patient",), "payee": ("payee.party",)},
    "FamilyMemberHistory": {"patient": ("patient",)},
    "Flag": {"patient": ("subject",)},
    "Goal": {"patient": ("subject",)},
    "Group": {"member": ("member.entity",)},
    "ImagingStudy": {"patient": ("subject",)},
    "Immunization": {"patient": ("patient",)},
    "ImmunizationEvaluation": {"patient": ("patient",)},
    "ImmunizationRecommendation": {"patient": ("patient",)},
    "Invoice": {"subject": ("subject",), "patient": ("subject",), "recipient": ("recipient",)},
    "List": {"subject": ("subject",), "source": ("source",)},
    "MeasureReport": {"patient": ("subject",)},
    "Media": {"subject": ("subject",)},
    "MedicationAdministration": {
        "patient": ("subject",),
        "performer": ("performer.actor",),
        "subject": ("subject",),
    },
    "MedicationDispense": {
        "subject": ("subject",),
        "patient": ("subject",),
        "receiver": ("receiver",),
    },
    "MedicationRequest": {"subject": ("subject",)},
    "MedicationStatement": {"subject": ("subject",)},
    "MolecularSequence": {"patient": ("patient",)},
    "NutritionOrder": {"patient": ("patient",)},
    "Observation": {"subject": ("subject",), "performer": ("performer",)},
    "Patient": {"link": ("link.other",)},
    "Person": {"patient": ("link.target",)},
    "Procedure": {"patient": ("subject",), "performer": ("performer.actor",)},
    "Provenance": {"patient": ("target",)},
    "QuestionnaireResponse": {"subject": ("subject",), "author": ("author",)},
    "RelatedPerson": {"patient": ("patient",)},
    "RequestGroup": {"subject": ("subject",), "participant": ("action.participant",)},
    "ResearchSubject": {"individual": ("individual",)},
    "RiskAssessment": {"subject": ("subject",)},
    "Schedule": {"actor": ("actor",)},
    "ServiceRequest": {"subject": ("subject",), "performer": ("performer",)},
    "Specimen": {"subject": ("subject",)},
    "SupplyDelivery": {"patient": ("patient",)},
    "SupplyRequest": {"subject": ("deliverTo",)},
    "VisionPrescription": {"patient": ("patient",)},
}


#: Shared types (no compartment parameter in R4) with an element naming the one Patient they
#: belong to: resource type -> element paths. Checked only when the element is present.
PATIENT_BOUND_SHARED: Mapping[str, tuple[str, ...]] = {"Device": ("patient",)}


def in_compartment_definition(resource_type: str) -> bool:
    """Whether resources of this type can belong to a patient's compartment (R4)."""
    return resource_type in PATIENT_COMPARTMENT


def _values(node: Any, parts: list[str]) -> Iterator[Any]:
    if isinstance(node, list):
        for item in node:
            yield from _values(item, parts)
        return
    if not parts:
        yield node
        return
    if isinstance(node, dict):
        yield from _values(node.get(parts[0]), parts[1:])


def reference_key(reference: str) -> tuple[str, str] | None:
    """``(type, id)`` of a literal reference (relative, absolute or versioned), else None."""
    if not reference or reference.startswith(("#", "urn:")):
        return None
    segments = [s for s in reference.split("?")[0].split("/") if s]
    if len(segments) >= 4 and segments[-2] == "_history":
        segments = segments[:-2]
    if len(segments) < 2:
        return None
    rtype, rid = segments[-2], segments[-1]
    if not rtype[:1].isupper() or not rtype.isalpha():
        return None
    return rtype, rid


def _references(resource: Mapping[str, Any], paths: Iterable[str]) -> set[tuple[str, str]]:
    """Every literal ``(type, id)`` reference found at the element ``paths``."""
    found: set[tuple[str, str]] = set()
    for path in paths:
        for value in _values(resource, path.split(".")):
            ref = value.get("reference") if isinstance(value, dict) else None
            key = reference_key(ref) if isinstance(ref, str) else None
            if key:
                found.add(key)
    return found


def compartment_references(resource: Mapping[str, Any]) -> set[tuple[str, str]]:
    """Every ``(type, id)`` the resource's compartment parameters point at."""
    params = PATIENT_COMPARTMENT.get(str(resource.get("resourceType")), {})
    return _references(resource, (path for paths in params.values() for path in paths))


def compartment_patients(resource: Mapping[str, Any]) -> set[str] | None:
    """Ids of the patients whose compartment holds ``resource``; None for a shared type
    (a :data:`PATIENT_BOUND_SHARED` type counts as shared unless it names its patient)."""
    rtype = str(resource.get("resourceType"))
    if rtype in PATIENT_BOUND_SHARED:
        bound = _references(resource, PATIENT_BOUND_SHARED[rtype])
        return {rid for t, rid in bound if t == "Patient"} or None
    if rtype not in PATIENT_COMPARTMENT:
        return None
    patients = {rid for t, rid in compartment_references(resource) if t == "Patient"}
    if rtype == "Patient" and isinstance(resource.get("id"), str):
        patients.add(resource["id"])
    return patients


@dataclass
class PatientScope:
    """The patient(s) one connection covers; :meth:`check` says why a resource is outside.

    Remembers what it admitted, so a Provenance about an admitted resource is admitted too.
    """

    patients: frozenset[str]
    admitted: set[tuple[str, str]] = field(default_factory=set)
    outside: int = 0

    @classmethod
    def of(cls, patients: str | Iterable[str]) -> "PatientScope":
        """A scope of one patient id or several (a person's linked source patients)."""
        ids = frozenset([patients] if isinstance(patients, str) else patients)
        if not ids or not all(ids):
            raise ValueError("a patient scope needs at least one non-empty patient id")
        return cls(ids)

    def check(self, resource: Mapping[str, Any]) -> str | None:
        """None when ``resource`` may land under this scope, else the quarantine reason."""
        rtype = str(resource.get("resourceType"))
        patients = compartment_patients(resource)
        if patients is None or patients & self.patients:
            self._admit(resource)
            return None
        if rtype == "Provenance" and compartment_references(resource) & self.admitted:
            self._admit(resource)
            return None
        self.outside += 1
        return f"{OUTSIDE_PATIENT_COMPARTMENT}: {rtype}"

    def allow(self, patient_ids: Iterable[str]) -> None:
        """Widen the scope to more patients once they are identified as the scope's person
        (a network result's record target that matches the XCPD match)."""
        self.patients = self.patients | frozenset(p for p in patient_ids if p)

    def _admit(self, resource: Mapping[str, Any]) -> None:
        rid = resource.get("id")
        if isinstance(rid, str):
            self.admitted.add((str(resource.get("resourceType")), rid))


def patients_with_identifier(
    resources: Iterable[Mapping[str, Any]], wanted: Iterable[tuple[str, str]]
) -> set[str]:
    """Ids of the Patient resources carrying one of the ``(assigning authority, value)`` ids.

    Used on a network document's converted record target against the XCPD match of the same
    community. The value decides: record targets do not always use the XCPD assigning authority
    as their id root (our sandbox gateway writes ``<oid>.100`` where XCPD says ``<oid>.1``), and
    within one community's answer the id value is the patient it gave us.
    """
    values = {v for _a, v in wanted if v}
    found: set[str] = set()
    for res in resources:
        if res.get("resourceType") != "Patient" or not isinstance(res.get("id"), str):
            continue
        for ident in res.get("identifier") or []:
            if isinstance(ident, dict) and str(ident.get("value")) in values:
                found.add(res["id"])
    return found
