"""What a reader of the lake relies on, checked at the door: FHIR R4 structure rules as data.

Every landed resource must have a known FHIR R4 resource type, a valid id, the type its file
states, the required (1..1 / 1..*) elements of the core types our views read, and well-formed
primitives in the elements the views and facts read. A resource that breaks a rule is quarantined
with the first broken rule as its reason, e.g.
``invalid_primitive: Patient.birthDate: "yesterday" is not a FHIR date``. The text before the first
colon is the reason CLASS (value-free, used in metadata counts); the rest may quote the raw value,
which is fine only because quarantine rows hold the raw resource anyway (PHI-bearing storage).

The rules are checked two ways from the same data: :func:`invalid_reason` in Python (one resource
at a time, for ``LakeWriter.add``) and :func:`valid_sql` as one DuckDB predicate (the NDJSON
fast path, vectorised: per-row Python only for the rows it rejects, which get their reason from
``invalid_reason``). The tests hold the two to the same verdict on every case.

Regexes are the FHIR R4 (4.0.1) ones, verbatim from the datatypes page
(https://hl7.org/fhir/R4/datatypes.html#primitive) and the id type; they are anchored (a full
match) in both engines. Only scalar paths are checked (DuckDB's multi-path ``json_extract`` takes no
wildcards), which covers every element the views read as a scalar.
"""

import json
import re
from dataclasses import dataclass
from typing import Any

# FHIR R4 4.0.1 resource types (https://hl7.org/fhir/R4/resourcelist.html), abstract types excluded.
R4_RESOURCE_TYPES: frozenset[str] = frozenset(
    """
    Account ActivityDefinition AdverseEvent AllergyIntolerance Appointment AppointmentResponse
    AuditEvent Basic Binary BiologicallyDerivedProduct BodyStructure Bundle CapabilityStatement
    CarePlan CareTeam CatalogEntry ChargeItem ChargeItemDefinition Claim ClaimResponse
    ClinicalImpression CodeSystem Communication CommunicationRequest CompartmentDefinition
    Composition ConceptMap Condition Consent Contract Coverage CoverageEligibilityRequest
    CoverageEligibilityResponse DetectedIssue Device DeviceDefinition DeviceMetric DeviceRequest
    DeviceUseStatement DiagnosticReport DocumentManifest DocumentReference EffectEvidenceSynthesis
    Encounter Endpoint EnrollmentRequest EnrollmentResponse EpisodeOfCare EventDefinition Evidence
    EvidenceVariable ExampleScenario ExplanationOfBenefit FamilyMemberHistory Flag Goal
    GraphDefinition Group GuidanceResponse HealthcareService ImagingStudy Immunization
    ImmunizationEvaluation ImmunizationRecommendation ImplementationGuide InsurancePlan Invoice
    Library Linkage List Location Measure MeasureReport Media Medication MedicationAdministration
    MedicationDispense MedicationKnowledge MedicationRequest MedicationStatement MedicinalProduct
    MedicinalProductAuthorization MedicinalProductContraindication MedicinalProductIndication
    MedicinalProductIngredient MedicinalProductInteraction MedicinalProductManufactured
    MedicinalProductPackaged MedicinalProductPharmaceutical MedicinalProductUndesirableEffect
    MessageDefinition MessageHeader MolecularSequence NamingSystem NutritionOrder Observation
    ObservationDefinition OperationDefinition OperationOutcome Organization OrganizationAffiliation
    Parameters Patient PaymentNotice PaymentReconciliation Person PlanDefinition Practitioner
    PractitionerRole Procedure Provenance Questionnaire QuestionnaireResponse RelatedPerson
    RequestGroup ResearchDefinition ResearchElementDefinition ResearchStudy ResearchSubject
    RiskAssessment RiskEvidenceSynthesis Schedule SearchParameter ServiceRequest Slot Specimen
    SpecimenDefinition StructureDefinition StructureMap Subscription Substance
    SubstanceNucleicAcid SubstancePolymer SubstanceProtein SubstanceReferenceInformation
    SubstanceSourceMaterial SubstanceSpecification SupplyDelivery SupplyRequest Task
    TerminologyCapabilities TestReport TestScript ValueSet VerificationResult VisionPrescription
    """.split()  # noqa: SIM905 (a readable table of names)
)

_YEAR = r"([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)"
_TIME = r"([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?"
_TZ = r"(Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00))"
_MONTH_DAY = r"-(0[1-9]|1[0-2])(-(0[1-9]|[1-2][0-9]|3[0-1])"

# The R4 regexes (datatypes page); "string" kinds are checked for JSON type, numbers likewise.
ID_REGEX = r"[A-Za-z0-9\-\.]{1,64}"
PRIMITIVE_REGEX: dict[str, str] = {
    "date": _YEAR + r"(" + _MONTH_DAY + r")?)?",
    "dateTime": _YEAR + r"(" + _MONTH_DAY + r"(T" + _TIME + _TZ + r")?)?)?",
    "instant": _YEAR + r"-(0[1-9]|1[0-2])-(0[1-9]|[1-2][0-9]|3[0-1])T" + _TIME + _TZ,
    "code": r"[^\s]+(\s[^\s]+)*",
    "uri": r"\S*",
    # Reference.reference (https://hl7.org/fhir/R4/references.html#literal): a relative or
    # absolute ``Type/id(/_history/vid)``, a contained ``#id``, or a ``urn:uuid:`` / ``urn:oid:``.
    "reference": r"((https?://\S+/)?[A-Z][A-Za-z]+/"
    + ID_REGEX
    + r"(/_history/"
    + ID_REGEX
    + r")?)|(#\S*)|(urn:(uuid|oid):\S+)",
}
# JSON representation: boolean is a JSON boolean; integer/decimal are JSON numbers (whose grammar
# is the R4 decimal regex ``-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?``).
JSON_KINDS = ("boolean", "integer", "decimal")

# Required-binding value sets of the codes the views read (R4 value sets, by name).
VALUE_SETS: dict[str, tuple[str, ...]] = {
    "administrative-gender": ("male", "female", "other", "unknown"),
    "observation-status": (
        "registered", "preliminary", "final", "amended", "corrected", "cancelled",
        "entered-in-error", "unknown",
    ),
    "encounter-status": (
        "planned", "arrived", "triaged", "in-progress", "onleave", "finished", "cancelled",
        "entered-in-error", "unknown",
    ),
    "event-status": (
        "preparation", "in-progress", "not-done", "on-hold", "stopped", "completed",
        "entered-in-error", "unknown",
    ),
    "diagnostic-report-status": (
        "registered", "partial", "preliminary", "final", "amended", "corrected", "appended",
        "cancelled", "entered-in-error", "unknown",
    ),
    "medicationrequest-status": (
        "active", "on-hold", "cancelled", "completed", "entered-in-error", "stopped", "draft",
        "unknown",
    ),
    "medicationrequest-intent": (
        "proposal", "plan", "order", "original-order", "reflex-order", "filler-order",
        "instance-order", "option",
    ),
    "immunization-status": ("completed", "entered-in-error", "not-done"),
    "fm-status": ("active", "cancelled", "draft", "entered-in-error"),
    "document-reference-status": ("current", "superseded", "entered-in-error"),
    "composition-status": ("preliminary", "final", "amended", "entered-in-error"),
    "allergy-intolerance-type": ("allergy", "intolerance"),
    "allergy-intolerance-criticality": ("low", "high", "unable-to-assess"),
    "claim-use": ("claim", "preauthorization", "predetermination"),
    "remittance-outcome": ("queued", "complete", "error", "partial"),
}  # fmt: skip

# Required elements (min cardinality >= 1 in R4) of the core types we use. A tuple entry is a
# choice element ``x[x]``: one of its type variants must be present.
REQUIRED: dict[str, tuple[str | tuple[str, ...], ...]] = {
    "Observation": ("status", "code"),
    "Condition": ("subject",),
    "Encounter": ("status", "class"),
    "Procedure": ("status", "subject"),
    "DiagnosticReport": ("status", "code"),
    "MedicationRequest": (
        "status", "intent", ("medicationCodeableConcept", "medicationReference"), "subject",
    ),
    "Immunization": (
        "status", "vaccineCode", "patient", ("occurrenceDateTime", "occurrenceString"),
    ),
    "AllergyIntolerance": ("patient",),
    "Coverage": ("status", "beneficiary", "payor"),
    "DocumentReference": ("status", "content"),
    "ExplanationOfBenefit": (
        "status", "type", "use", "patient", "created", "insurer", "provider", "outcome",
        "insurance",
    ),
}  # fmt: skip

_SUBJECT_ENCOUNTER = (("subject.reference", "reference"), ("encounter.reference", "reference"))
_PERIOD = ("start", "end")

# Elements our views and facts read, by resource type: (dotted path, kind). A kind is a primitive
# (PRIMITIVE_REGEX / JSON_KINDS), "reference", or "code:<value set>" (a required binding).
ELEMENTS: dict[str, tuple[tuple[str, str], ...]] = {
    "Patient": (
        ("active", "boolean"),
        ("gender", "code:administrative-gender"),
        ("birthDate", "date"),
        ("deceasedBoolean", "boolean"),
        ("deceasedDateTime", "dateTime"),
        ("managingOrganization.reference", "reference"),
    ),
    "Observation": (
        ("status", "code:observation-status"),
        *_SUBJECT_ENCOUNTER,
        ("effectiveDateTime", "dateTime"),
        ("effectiveInstant", "instant"),
        *((f"effectivePeriod.{p}", "dateTime") for p in _PERIOD),
        ("issued", "instant"),
        ("valueQuantity.value", "decimal"),
        ("valueQuantity.code", "code"),
        ("valueBoolean", "boolean"),
        ("valueInteger", "integer"),
        ("valueDateTime", "dateTime"),
    ),
    "Condition": (
        *_SUBJECT_ENCOUNTER,
        ("onsetDateTime", "dateTime"),
        ("abatementDateTime", "dateTime"),
        ("recordedDate", "dateTime"),
    ),
    "Encounter": (
        ("status", "code:encounter-status"),
        ("class.code", "code"),
        ("subject.reference", "reference"),
        *((f"period.{p}", "dateTime") for p in _PERIOD),
        ("serviceProvider.reference", "reference"),
    ),
    "Procedure": (
        ("status", "code:event-status"),
        *_SUBJECT_ENCOUNTER,
        ("performedDateTime", "dateTime"),
        *((f"performedPeriod.{p}", "dateTime") for p in _PERIOD),
    ),
    "DiagnosticReport": (
        ("status", "code:diagnostic-report-status"),
        *_SUBJECT_ENCOUNTER,
        ("effectiveDateTime", "dateTime"),
        *((f"effectivePeriod.{p}", "dateTime") for p in _PERIOD),
        ("issued", "instant"),
    ),
    "MedicationRequest": (
        ("status", "code:medicationrequest-status"),
        ("intent", "code:medicationrequest-intent"),
        *_SUBJECT_ENCOUNTER,
        ("medicationReference.reference", "reference"),
        ("authoredOn", "dateTime"),
        ("requester.reference", "reference"),
    ),
    "Immunization": (
        ("status", "code:immunization-status"),
        ("patient.reference", "reference"),
        ("encounter.reference", "reference"),
        ("occurrenceDateTime", "dateTime"),
        ("primarySource", "boolean"),
        ("recorded", "dateTime"),
    ),
    "AllergyIntolerance": (
        ("patient.reference", "reference"),
        ("type", "code:allergy-intolerance-type"),
        ("criticality", "code:allergy-intolerance-criticality"),
        ("onsetDateTime", "dateTime"),
        ("recordedDate", "dateTime"),
    ),
    "Coverage": (
        ("status", "code:fm-status"),
        ("beneficiary.reference", "reference"),
        *((f"period.{p}", "dateTime") for p in _PERIOD),
    ),
    "DocumentReference": (
        ("status", "code:document-reference-status"),
        ("docStatus", "code:composition-status"),
        ("subject.reference", "reference"),
        ("date", "instant"),
        ("context.period.start", "dateTime"),
    ),
    "ExplanationOfBenefit": (
        ("status", "code:fm-status"),
        ("use", "code:claim-use"),
        ("outcome", "code:remittance-outcome"),
        ("patient.reference", "reference"),
        ("created", "dateTime"),
        *((f"billablePeriod.{p}", "dateTime") for p in _PERIOD),
        ("insurer.reference", "reference"),
        ("provider.reference", "reference"),
        ("payment.amount.value", "decimal"),
    ),
}
# Every resource: the lake reads meta.lastUpdated and meta.versionId.
COMMON: tuple[tuple[str, str], ...] = (("meta.lastUpdated", "instant"), ("meta.versionId", "id"))

_KIND_NAMES = {"reference": "Reference.reference", "id": "FHIR id"}


@dataclass(frozen=True)
class Rule:
    """One element check: ``path`` of ``rtype`` must be of ``kind``."""

    rtype: str
    path: str
    kind: str

    @property
    def label(self) -> str:
        return f"{self.rtype}.{self.path}"


def rules_for(rtype: str) -> tuple[Rule, ...]:
    """The element checks of one resource type, in the order they are reported."""
    return tuple(Rule(rtype, p, k) for p, k in (*COMMON, *ELEMENTS.get(rtype, ())))


# re.ASCII: \s and \S mean ASCII whitespace, as in DuckDB's RE2.
_COMPILED = {k: re.compile(v, re.ASCII) for k, v in {**PRIMITIVE_REGEX, "id": ID_REGEX}.items()}


def _quote(value: Any) -> str:
    # The same text DuckDB gives for a JSON value (compact, UTF-8), capped.
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))[:100]


def _present(value: Any) -> bool:
    return value is not None and value != [] and value != ""


def _get(obj: dict[str, Any], path: str) -> Any:
    cur: Any = obj
    for part in path.split("."):
        if not isinstance(cur, dict):
            return None
        cur = cur.get(part)
    return cur


def _kind_error(rule: Rule, value: Any) -> str | None:
    kind = rule.kind
    if kind.startswith("code:"):
        vs = kind[5:]
        if isinstance(value, str) and value in VALUE_SETS[vs]:
            return None
        return f"invalid_code: {rule.label}: {_quote(value)} is not in value set {vs}"
    ok: bool
    if kind == "boolean":
        ok = isinstance(value, bool)
    elif kind == "integer":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "decimal":
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    else:
        ok = isinstance(value, str) and _COMPILED[kind].fullmatch(value) is not None
    if ok:
        return None
    name = _KIND_NAMES.get(kind, "FHIR " + kind)
    return f"invalid_primitive: {rule.label}: {_quote(value)} is not a {name}"


def invalid_reason(
    obj: Any, expected_type: str | None = None, *, structure_only: bool = False
) -> str | None:
    """The first rule ``obj`` (a parsed JSON value) breaks, or None when it may land.

    ``structure_only`` checks only what the lake itself needs (a JSON object with a string
    resourceType and id): the ingest benchmark's no-validation baseline.
    """
    if not isinstance(obj, dict):
        return "not a JSON object"
    rtype = obj.get("resourceType")
    if not isinstance(rtype, str) or not rtype:
        return "missing resourceType"
    # FHIR ids are non-empty strings; a number or an object is as unusable as no id at all.
    rid = obj.get("id")
    if not isinstance(rid, str) or not rid:
        return "missing id"
    if structure_only:
        return None
    if rtype not in R4_RESOURCE_TYPES:
        return f"unknown_resource_type: {_quote(rtype)} is not a FHIR R4 resource type"
    if not _COMPILED["id"].fullmatch(rid):
        return f"invalid_id: {_quote(rid)} is not a FHIR id"
    if expected_type and rtype != expected_type:
        return f"type_mismatch: a {rtype} in a file of {expected_type}"
    for req in REQUIRED.get(rtype, ()):
        choices = (req,) if isinstance(req, str) else req
        if not any(_present(obj.get(c)) for c in choices):
            name = choices[0] if len(choices) == 1 else "/".join(choices)
            return f"missing_required: {rtype}.{name}"
    for rule in rules_for(rtype):
        value = _get(obj, rule.path)
        if value is not None:
            err = _kind_error(rule, value)
            if err:
                return err
    return None


# -- the same rules as one DuckDB predicate ----------------------------------------------------
# The fast path extracts every checked path in one multi-path json_extract (each line is parsed
# once) cast to VARCHAR[]: the JSON text of each value, which DuckDB writes normalised (escapes
# decoded but for '"', '\\' and control characters), so a JSON string's text is its value in
# quotes. The predicate below is string comparisons and RE2 matches on that text, never a second
# JSON parse (json_type / ->> per value would cost more than the landing). It says only whether a
# row is valid; the few rows it rejects get their reason from ``invalid_reason`` (the one place
# that words reasons), and a row it rejects that ``invalid_reason`` accepts lands. Values of one
# kind share one regex (a lambda over a list): every regex in a query is compiled per file.


def _checked_types(expected_type: str | None) -> list[str]:
    # A file of one known type needs only that type's checks: any other type is rejected.
    if expected_type:
        return [expected_type]
    return sorted(set(ELEMENTS) | set(REQUIRED))


def checked_paths(expected_type: str | None = None) -> list[str]:
    """Every JSON path the SQL checks read (dotted element paths), for a file of one type or any."""
    paths: list[str] = []
    for rtype in _checked_types(expected_type):
        for req in REQUIRED.get(rtype, ()):
            paths.extend((req,) if isinstance(req, str) else req)
        paths.extend(r.path for r in rules_for(rtype))
    paths.extend(r.path for r in rules_for("Basic"))
    return list(dict.fromkeys(paths))


def _lit(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


# R4 decimal / integer regexes, matched against a JSON number's text.
_NUMBER_REGEX = {
    "decimal": r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?",
    "integer": r"-?([0]|([1-9][0-9]*))",
}


def _text_regex(kind: str) -> str:
    """The regex a valid value's JSON text matches in full."""
    if kind in _NUMBER_REGEX:
        return _NUMBER_REGEX[kind]
    return '"(?:' + (ID_REGEX if kind == "id" else PRIMITIVE_REGEX[kind]) + ')"'


def _sql_type_ok(rtype: str, slot: dict[str, str]) -> str:
    parts: list[str] = []
    for req in REQUIRED.get(rtype, ()):
        choices = (req,) if isinstance(req, str) else req
        parts.append(
            "(" + " OR ".join(f"coalesce({slot[c]}, 'null') NOT IN ('null', '[]', '\"\"')"
                              for c in choices) + ")"
        )  # fmt: skip
    by_kind: dict[str, list[str]] = {}
    for rule in rules_for(rtype):
        by_kind.setdefault(rule.kind, []).append(slot[rule.path])
    for kind, values in by_kind.items():
        if kind.startswith("code:") or kind == "boolean":
            allowed = ["true", "false"] if kind == "boolean" else VALUE_SETS[kind[5:]]
            ok = ", ".join(_lit(a if kind == "boolean" else json.dumps(a)) for a in allowed)
            parts.extend(f"coalesce({v}, 'null') IN ('null', {ok})" for v in values)
            continue
        regex = _lit(_text_regex(kind))
        if len(values) == 1:
            v = values[0]
            parts.append(f"(coalesce({v}, 'null') = 'null' OR regexp_full_match({v}, {regex}))")
        else:
            parts.append(
                f"list_bool_and(list_transform([{', '.join(values)}], "
                f"lambda x: coalesce(x, 'null') = 'null' OR regexp_full_match(x, {regex})))"
            )
    return "(" + " AND ".join(parts or ["true"]) + ")"


def valid_sql(s: str, first_slot: int, rtype: str, expected_type: str | None) -> str:
    """A DuckDB predicate: TRUE when a row passes every check :func:`invalid_reason` makes.

    ``s`` is the VARCHAR[] of JSON texts ``json_extract(json, [...])::VARCHAR[]`` whose slots 1
    and 2 are ``$.resourceType`` and ``$.id`` (present as strings: the caller checks that) and
    whose slots from ``first_slot`` (1-based) are ``checked_paths(expected_type)``; ``rtype`` is
    the unquoted type.
    """
    slot = {p: f"{s}[{first_slot + i}]" for i, p in enumerate(checked_paths(expected_type))}
    if expected_type:
        type_ok = f"{s}[1] = {_lit(json.dumps(expected_type))}"
    else:
        known = ", ".join(_lit(json.dumps(t)) for t in sorted(R4_RESOURCE_TYPES))
        type_ok = f"{s}[1] IN ({known})"
    per_type = _sql_type_ok("Basic", slot)
    branches = [
        f"WHEN {_lit(t)} THEN {_sql_type_ok(t, slot)}"
        for t in _checked_types(expected_type)
        if t in ELEMENTS or t in REQUIRED
    ]
    if branches:
        per_type = f"CASE {rtype} {' '.join(branches)} ELSE {per_type} END"
    id_ok = f"regexp_full_match({s}[2], {_lit(_text_regex('id'))})"
    return f"({type_ok} AND {id_ok} AND {per_type})"
