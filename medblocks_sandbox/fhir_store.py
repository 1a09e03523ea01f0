"""In-memory, thread-safe, versioned FHIR R4 resource store with search, for the sandbox servers.

One `FhirStore` per sandbox organization. It keeps every version of every resource (deletions are
versions too), stamps `meta.versionId` / `meta.lastUpdated`, indexes the Patient compartment
(FHIR R4 CompartmentDefinition/patient) and evaluates the FHIR search parameters the sandbox
servers advertise (token, reference, date with prefixes, string, `_id`, `_lastUpdated`).

The seams other sandbox modules use (the Bulk Data helper in particular):

- `get(type, id)`, `state(type, id)`, `vread`, `history`: reads with version history;
- `iter_type(type)`, `compartment(patient_id, types)`: current resources (snapshots under the lock);
- `changes_since(since, types=..., until=...)`: changed resources and deletions, for `_since`;
- `search(type, params)`: evaluated search, raising `FhirHttpError(400)` on unknown parameters;
- `now()`: the store clock, monotonic per store, used for `meta.lastUpdated` and `transactionTime`.

Stored resources are shared, not copied: callers must not mutate what they get back.
"""

import json
import re
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Literal

from medblocks_sandbox.errors import FhirHttpError

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


# ---------------------------------------------------------------------------------------------
# Element access and value matching
# ---------------------------------------------------------------------------------------------
def element_values(resource: Any, path: str) -> list[Any]:
    """The values at dotted `path` in `resource`, flattening lists along the way."""
    current: list[Any] = [resource]
    for part in path.split("."):
        nxt: list[Any] = []
        for item in current:
            if isinstance(item, dict) and part in item:
                value = item[part]
                if isinstance(value, list):
                    nxt.extend(value)
                else:
                    nxt.append(value)
        current = nxt
    return current


def reference_key(reference: str) -> tuple[str, str] | None:
    """`(type, id)` of a literal reference, relative (`Patient/1`) or absolute (`http://x/Patient/1`)."""
    parts = reference.split("?")[0].rstrip("/").split("/")
    if len(parts) >= 4 and parts[-2] == "_history":  # Type/id/_history/vid
        parts = parts[:-2]
    if len(parts) < 2 or not parts[-2][:1].isupper():
        return None
    return parts[-2], parts[-1]


def _references(resource: Resource, path: str) -> list[tuple[str, str]]:
    out = []
    for value in element_values(resource, path):
        if isinstance(value, dict) and isinstance(value.get("reference"), str):
            key = reference_key(value["reference"])
            if key:
                out.append(key)
    return out


_DATE_RE = re.compile(
    r"^(?P<y>\d{4})(?:-(?P<m>\d{2})(?:-(?P<d>\d{2})"
    r"(?:T(?P<H>\d{2}):(?P<M>\d{2})(?::(?P<S>\d{2})(?:\.(?P<f>\d+))?)?"
    r"(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?$"
)


def parse_date_range(text: str) -> tuple[datetime, datetime]:
    """The half-open UTC interval `[low, high)` a FHIR date/dateTime/instant value denotes.

    The precision given sets the width (`2024` is the whole year); values without a zone are
    taken as UTC. Raises ValueError on anything that is not a FHIR date.
    """
    match = _DATE_RE.match(text.strip())
    if not match:
        raise ValueError(f"not a FHIR date: {text[:40]!r}")
    g = match.groupdict()
    year = int(g["y"])
    if g["m"] is None:
        low = datetime(year, 1, 1, tzinfo=UTC)
        return low, datetime(year + 1, 1, 1, tzinfo=UTC)
    month = int(g["m"])
    if g["d"] is None:
        low = datetime(year, month, 1, tzinfo=UTC)
        high = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)
        return low, high
    day = int(g["d"])
    if g["H"] is None:
        low = datetime(year, month, day, tzinfo=UTC)
        return low, low + timedelta(days=1)
    tz = UTC
    if g["tz"] and g["tz"] != "Z":
        sign = 1 if g["tz"][0] == "+" else -1
        hours, minutes = int(g["tz"][1:3]), int(g["tz"][4:6])
        tz = timezone(sign * timedelta(hours=hours, minutes=minutes))
    if g["S"] is None:
        low = datetime(year, month, day, int(g["H"]), int(g["M"]), tzinfo=tz)
        return low.astimezone(UTC), (low + timedelta(minutes=1)).astimezone(UTC)
    frac = g["f"] or ""
    micro = int((frac + "000000")[:6]) if frac else 0
    low = datetime(year, month, day, int(g["H"]), int(g["M"]), int(g["S"]), micro, tzinfo=tz)
    width = timedelta(microseconds=10 ** max(0, 6 - len(frac))) if frac else timedelta(seconds=1)
    return low.astimezone(UTC), (low + width).astimezone(UTC)


_FAR_PAST = datetime(1, 1, 1, tzinfo=UTC)
_FAR_FUTURE = datetime(9999, 12, 31, tzinfo=UTC)


def _date_ranges(resource: Resource, path: str) -> list[tuple[datetime, datetime]]:
    out = []
    for value in element_values(resource, path):
        try:
            if isinstance(value, str):
                out.append(parse_date_range(value))
            elif isinstance(value, dict) and ("start" in value or "end" in value):
                low = parse_date_range(value["start"])[0] if value.get("start") else _FAR_PAST
                high = parse_date_range(value["end"])[1] if value.get("end") else _FAR_FUTURE
                out.append((low, high))
        except ValueError:
            continue  # a malformed stored date never matches; it is not the searcher's fault
    return out


_DATE_PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb")


def _date_matches(
    prefix: str, target: tuple[datetime, datetime], value: tuple[datetime, datetime]
) -> bool:
    # FHIR R4 search §3.1.1.4: comparisons between the target's range and the parameter's range.
    t_lo, t_hi = target
    v_lo, v_hi = value
    if prefix == "eq":
        return v_lo <= t_lo and t_hi <= v_hi
    if prefix == "ne":
        return not (v_lo <= t_lo and t_hi <= v_hi)
    if prefix == "gt":
        return t_hi > v_hi
    if prefix == "lt":
        return t_lo < v_lo
    if prefix == "ge":
        return t_hi > v_lo
    if prefix == "le":
        return t_lo < v_hi
    if prefix == "sa":
        return t_lo >= v_hi
    if prefix == "eb":
        return t_hi <= v_lo
    raise AssertionError(prefix)


def _tokens(resource: Resource, path: str) -> list[tuple[str | None, str]]:
    out: list[tuple[str | None, str]] = []
    for value in element_values(resource, path):
        if isinstance(value, str):
            out.append((None, value))
        elif isinstance(value, bool):
            out.append((None, "true" if value else "false"))
        elif isinstance(value, dict):
            if "coding" in value:
                for coding in value.get("coding") or []:
                    if isinstance(coding, dict) and "code" in coding:
                        out.append((coding.get("system"), str(coding["code"])))
            elif "code" in value:  # Coding
                out.append((value.get("system"), str(value["code"])))
            elif "value" in value:  # Identifier
                out.append((value.get("system"), str(value["value"])))
    return out


def _token_matches(query: str, tokens: list[tuple[str | None, str]]) -> bool:
    if "|" in query:
        system, code = query.split("|", 1)
        if system == "":  # |code: the code with no system
            return any(s is None and c == code for s, c in tokens)
        if code == "":  # system|: any code in the system
            return any(s == system for s, _ in tokens)
        return any(s == system and c == code for s, c in tokens)
    return any(c == query for _, c in tokens)


def _strings(resource: Resource, path: str) -> list[str]:
    out: list[str] = []
    for value in element_values(resource, path):
        if isinstance(value, str):
            out.append(value)
        elif isinstance(value, dict):  # HumanName / Address: every string part
            for key in (
                "text",
                "family",
                "given",
                "prefix",
                "suffix",
                "line",
                "city",
                "district",
                "state",
                "postalCode",
                "country",
            ):
                part = value.get(key)
                if isinstance(part, str):
                    out.append(part)
                elif isinstance(part, list):
                    out.extend(x for x in part if isinstance(x, str))
    return out


def _bad(message: str) -> FhirHttpError:
    return FhirHttpError(400, "invalid", message)


def _match_param(resource: Resource, param: SearchParam, modifier: str | None, raw: str) -> bool:
    """Whether `resource` matches one occurrence of a search parameter (comma = OR)."""
    values = _split_or(raw)
    if not values:
        raise _bad(f"search parameter {param.name} has an empty value")
    if param.kind == "token":
        if modifier not in (None, "not"):
            raise _bad(f"modifier :{modifier} is not supported on {param.name}")
        tokens = [t for path in param.paths for t in _tokens(resource, path)]
        hit = any(_token_matches(v, tokens) for v in values)
        return not hit if modifier == "not" else hit
    if param.kind == "reference":
        if (
            modifier is not None
            and modifier not in param.targets
            and not (not param.targets and modifier[:1].isupper())
        ):
            raise _bad(f"modifier :{modifier} is not supported on {param.name}")
        refs = [r for path in param.paths for r in _references(resource, path)]
        for v in values:
            key = reference_key(v) if "/" in v else None
            for rtype, rid in refs:
                if key is not None and (rtype, rid) == key:
                    return True
                if key is None and rid == v:
                    wanted = (modifier,) if modifier else param.targets
                    if not wanted or rtype in wanted:
                        return True
        return False
    if param.kind == "date":
        if modifier is not None:
            raise _bad(f"modifier :{modifier} is not supported on {param.name}")
        ranges = [r for path in param.paths for r in _date_ranges(resource, path)]
        for v in values:
            prefix, text = (v[:2], v[2:]) if v[:2] in _DATE_PREFIXES else ("eq", v)
            try:
                window = parse_date_range(text)
            except ValueError:
                raise _bad(f"search parameter {param.name}: invalid date value") from None
            if any(_date_matches(prefix, r, window) for r in ranges):
                return True
        return False
    # string
    if modifier not in (None, "exact", "contains"):
        raise _bad(f"modifier :{modifier} is not supported on {param.name}")
    strings = [s for path in param.paths for s in _strings(resource, path)]
    for v in values:
        if modifier == "exact" and any(s == v for s in strings):
            return True
        folded = v.casefold()
        if modifier == "contains" and any(folded in s.casefold() for s in strings):
            return True
        if modifier is None and any(s.casefold().startswith(folded) for s in strings):
            return True
    return False


def _split_or(raw: str) -> list[str]:
    # Commas separate OR values; `\,` is an escaped literal comma (FHIR search §3.1.1.3).
    parts, current, i = [], [], 0
    while i < len(raw):
        ch = raw[i]
        if ch == "\\" and i + 1 < len(raw):
            current.append(raw[i + 1])
            i += 2
            continue
        if ch == ",":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    parts.append("".join(current))
    return [p for p in parts if p != ""]


def _validate_date_param_values(name: str, raw: str) -> None:
    for v in _split_or(raw):
        text = v[2:] if v[:2] in _DATE_PREFIXES else v
        if v[:2].isalpha() and v[:2] not in _DATE_PREFIXES:
            raise _bad(f"search parameter {name}: unsupported prefix")
        try:
            parse_date_range(text)
        except ValueError:
            raise _bad(f"search parameter {name}: invalid date value") from None


def compile_filters(
    resource_type: str, params: Sequence[tuple[str, str]]
) -> list[tuple[SearchParam, str | None, str]]:
    """Check the non-control search parameters of a query; raise FhirHttpError(400) if unknown.

    Returns `(param, modifier, value)` triples: repeated parameters are ANDed, commas ORed.
    """
    known = params_for(resource_type)
    out = []
    for name, value in params:
        if name in CONTROL_PARAMS:
            continue
        base, _, modifier = name.partition(":")
        param = known.get(base)
        if param is None:
            raise FhirHttpError(
                400, "not-supported", f"unknown search parameter {base!r} for {resource_type}"
            )
        if param.kind == "date":
            if modifier:
                raise _bad(f"modifier :{modifier} is not supported on {base}")
            _validate_date_param_values(base, value)
        out.append((param, modifier or None, value))
    return out


def matches(resource: Resource, filters: Iterable[tuple[SearchParam, str | None, str]]) -> bool:
    """Whether `resource` satisfies every compiled filter."""
    return all(_match_param(resource, p, m, v) for p, m, v in filters)


# ---------------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Version:
    """One version of a resource; `resource is None` marks a deletion."""

    version_id: int
    last_updated: datetime
    resource: Resource | None


@dataclass
class _Entry:
    versions: list[Version] = field(default_factory=list)

    @property
    def current(self) -> Version:
        return self.versions[-1]


def format_instant(value: datetime) -> str:
    """A FHIR instant in UTC with millisecond precision (`2024-01-02T03:04:05.678Z`)."""
    value = value.astimezone(UTC)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


class FhirStore:
    """A versioned in-memory FHIR store for one sandbox organization (thread-safe)."""

    def __init__(self, resources: Iterable[Resource] = ()) -> None:
        self._lock = threading.RLock()
        self._data: dict[str, dict[str, _Entry]] = {}
        self._by_patient: dict[str, set[tuple[str, str]]] = {}
        self._members: dict[tuple[str, str], frozenset[str]] = {}
        # Binary id -> {DocumentReference key: its patients}, and the reverse.
        self._binary_docs: dict[str, dict[tuple[str, str], frozenset[str]]] = {}
        self._doc_binaries: dict[tuple[str, str], set[str]] = {}
        self._last_now = datetime(1970, 1, 1, tzinfo=UTC)
        self.put_many(resources)

    # -- clock ---------------------------------------------------------------------------------
    def now(self) -> datetime:
        """The store clock: wall-clock UTC, strictly increasing, millisecond precision."""
        with self._lock:
            wall = datetime.now(UTC)
            now = wall.replace(microsecond=wall.microsecond // 1000 * 1000)
            if now <= self._last_now:
                now = self._last_now + timedelta(milliseconds=1)
            self._last_now = now
            return now

    # -- writes --------------------------------------------------------------------------------
    @contextmanager
    def atomic(self) -> Iterator[None]:
        """Hold the store lock for a block: its writes look like one change to other threads.

        Readers and writers of other threads wait until the block ends (the lock is re-entrant,
        so the store's own methods work inside it). Nothing is rolled back if the block raises.
        """
        with self._lock:
            yield

    def put(
        self, resource: Resource, *, keep_last_updated: bool = False, copy: bool = True
    ) -> Resource:
        """Create or update a resource (new version); returns the stored copy with `meta` set.

        `keep_last_updated` keeps a `meta.lastUpdated` the resource already carries if it is in
        the past (used when loading generated data); otherwise the store clock stamps it.
        `copy=False` stores a shallow copy only (new `meta`, shared nested values): for callers
        that never mutate what they pass, such as the copy-on-write generator (fast loads).
        """
        rtype, rid = resource.get("resourceType"), resource.get("id")
        if not isinstance(rtype, str) or not isinstance(rid, str) or not rid:
            raise ValueError("a stored resource needs resourceType and id")
        # A JSON round trip is a deep copy several times faster than copy.deepcopy for JSON data.
        stored = json.loads(json.dumps(resource)) if copy else dict(resource)
        meta = dict(stored.get("meta") or {})
        with self._lock:
            now = self.now()
            stamp = now
            if keep_last_updated and isinstance(meta.get("lastUpdated"), str):
                try:
                    given = parse_date_range(meta["lastUpdated"])[0]
                    if given <= now:
                        stamp = given
                except ValueError:
                    pass
            entry = self._data.setdefault(rtype, {}).setdefault(rid, _Entry())
            version_id = len(entry.versions) + 1
            meta["versionId"] = str(version_id)
            meta["lastUpdated"] = format_instant(stamp)
            stored["meta"] = meta
            entry.versions.append(Version(version_id, stamp, stored))
            self._index(rtype, rid, stored)
        return stored

    def put_many(
        self, resources: Iterable[Resource], *, keep_last_updated: bool = True, copy: bool = True
    ) -> int:
        """Store many resources (generator load); returns how many were stored."""
        n = 0
        with self._lock:
            for resource in resources:
                self.put(resource, keep_last_updated=keep_last_updated, copy=copy)
                n += 1
        return n

    def delete(self, resource_type: str, resource_id: str) -> bool:
        """Delete a resource (a tombstone version); False if it was absent or already deleted."""
        with self._lock:
            entry = self._data.get(resource_type, {}).get(resource_id)
            if entry is None or entry.current.resource is None:
                return False
            now = self.now()
            entry.versions.append(Version(len(entry.versions) + 1, now, None))
            self._index(resource_type, resource_id, None)
            return True

    def _index(self, rtype: str, rid: str, resource: Resource | None) -> None:
        key = (rtype, rid)
        self._set_members(
            key, None if resource is None else self._compartment_patients(rtype, rid, resource)
        )
        if rtype != "DocumentReference":
            return
        # A Binary behind a document belongs to the document's patients (second fetch, same
        # token: SPECS §1.11), whichever of the two was stored first.
        touched = self._doc_binaries.pop(key, set())
        for bid in touched:
            self._binary_docs.get(bid, {}).pop(key, None)
        if resource is not None:
            members = self._members.get(key, frozenset())
            bids = {
                bkey[1]
                for value in element_values(resource, "content.attachment.url")
                if isinstance(value, str)
                and (bkey := reference_key(value)) is not None
                and bkey[0] == "Binary"
            }
            for bid in bids:
                self._binary_docs.setdefault(bid, {})[key] = members
            self._doc_binaries[key] = bids
            touched |= bids
        for bid in touched:
            binary = self.get("Binary", bid)
            if binary is not None:
                self._set_members(
                    ("Binary", bid), self._compartment_patients("Binary", bid, binary)
                )

    def _set_members(self, key: tuple[str, str], members: frozenset[str] | None) -> None:
        for pid in self._members.pop(key, frozenset()):
            self._by_patient.get(pid, set()).discard(key)
        if members is None:
            return
        self._members[key] = members
        for pid in members:
            self._by_patient.setdefault(pid, set()).add(key)

    def _compartment_patients(self, rtype: str, rid: str, resource: Resource) -> frozenset[str]:
        if rtype == "Patient":
            return frozenset({rid})
        if rtype == "Binary":
            found: set[str] = set()
            for members in self._binary_docs.get(rid, {}).values():
                found |= members
            ctx = resource.get("securityContext")
            key = (
                reference_key(ctx["reference"])
                if isinstance(ctx, dict) and isinstance(ctx.get("reference"), str)
                else None
            )
            if key:
                found |= self._members.get(key, frozenset()) if key[0] != "Patient" else {key[1]}
            return frozenset(found)
        paths = PATIENT_COMPARTMENT.get(rtype, ("subject", "patient", "beneficiary"))
        return frozenset(
            ref_id
            for path in paths
            for ref_type, ref_id in _references(resource, path)
            if ref_type == "Patient"
        )

    # -- reads ---------------------------------------------------------------------------------
    def state(
        self, resource_type: str, resource_id: str
    ) -> Literal["present", "deleted", "absent"]:
        """Whether a resource exists now, was deleted, or never existed."""
        with self._lock:
            entry = self._data.get(resource_type, {}).get(resource_id)
            if entry is None:
                return "absent"
            return "deleted" if entry.current.resource is None else "present"

    def get(self, resource_type: str, resource_id: str) -> Resource | None:
        """The current version, or None if absent or deleted."""
        with self._lock:
            entry = self._data.get(resource_type, {}).get(resource_id)
            return None if entry is None else entry.current.resource

    def vread(self, resource_type: str, resource_id: str, version_id: str) -> Version | None:
        """One version (its `resource` is None for a deletion), or None if it does not exist."""
        with self._lock:
            entry = self._data.get(resource_type, {}).get(resource_id)
            if entry is None or not version_id.isdigit():
                return None
            n = int(version_id)
            return entry.versions[n - 1] if 1 <= n <= len(entry.versions) else None

    def history(self, resource_type: str, resource_id: str) -> list[Version]:
        """Every version of a resource, oldest first (empty if it never existed)."""
        with self._lock:
            entry = self._data.get(resource_type, {}).get(resource_id)
            return list(entry.versions) if entry else []

    def resource_types(self) -> list[str]:
        """Types with at least one current resource, sorted."""
        with self._lock:
            return sorted(
                t
                for t, entries in self._data.items()
                if any(e.current.resource is not None for e in entries.values())
            )

    def iter_type(self, resource_type: str) -> Iterator[Resource]:
        """Current resources of one type (a snapshot taken under the lock), in insertion order."""
        with self._lock:
            snapshot = [
                e.current.resource
                for e in self._data.get(resource_type, {}).values()
                if e.current.resource is not None
            ]
        return iter(snapshot)

    def count(self, resource_type: str | None = None) -> int:
        """How many current resources (of one type, or all)."""
        with self._lock:
            types = [resource_type] if resource_type else list(self._data)
            return sum(
                1
                for t in types
                for e in self._data.get(t, {}).values()
                if e.current.resource is not None
            )

    def patient_ids(self) -> list[str]:
        """Ids of current Patient resources."""
        return [r["id"] for r in self.iter_type("Patient")]

    def compartment_of(self, resource_type: str, resource_id: str) -> frozenset[str]:
        """Ids of the patients whose compartment holds this resource (empty if none)."""
        with self._lock:
            return self._members.get((resource_type, resource_id), frozenset())

    def patients_in(self, resource: Resource) -> frozenset[str]:
        """Patients whose compartment a resource's content puts it in (any version, deleted too)."""
        with self._lock:
            return self._compartment_patients(resource["resourceType"], resource["id"], resource)

    def compartment(self, patient_id: str, types: Iterable[str] | None = None) -> list[Resource]:
        """Current resources in one patient's compartment (Patient first), optionally by type."""
        wanted = set(types) if types is not None else None
        with self._lock:
            keys = sorted(
                self._by_patient.get(patient_id, set()),
                key=lambda k: (k[0] != "Patient", k[0], k[1]),
            )
            out = []
            for rtype, rid in keys:
                if wanted is not None and rtype not in wanted:
                    continue
                resource = self.get(rtype, rid)
                if resource is not None:
                    out.append(resource)
            return out

    def changes_since(
        self,
        since: datetime | None,
        *,
        types: Iterable[str] | None = None,
        until: datetime | None = None,
    ) -> tuple[list[Resource], list[tuple[str, str, datetime]]]:
        """Resources whose current version changed in `(since, until]`, and deletions there.

        Returns `(resources, deletions)` where deletions are `(type, id, deleted_at)`; a resource
        created and deleted inside the window appears only as a deletion. `since=None` means
        everything current (and no deletions), as a first full export.
        """
        wanted = set(types) if types is not None else None
        with self._lock:
            resources: list[Resource] = []
            deletions: list[tuple[str, str, datetime]] = []
            for rtype, entries in self._data.items():
                if wanted is not None and rtype not in wanted:
                    continue
                for rid, entry in entries.items():
                    cur = entry.current
                    if until is not None and cur.last_updated > until:
                        # The current version is newer than the window: use the one in it.
                        older = [v for v in entry.versions if v.last_updated <= until]
                        if not older:
                            continue
                        cur = older[-1]
                    if since is not None and cur.last_updated <= since:
                        continue
                    if cur.resource is None:
                        if since is not None:
                            deletions.append((rtype, rid, cur.last_updated))
                    else:
                        resources.append(cur.resource)
            return resources, deletions

    # -- search --------------------------------------------------------------------------------
    def search(
        self,
        resource_type: str,
        params: Sequence[tuple[str, str]],
        *,
        within: Iterable[tuple[str, str]] | None = None,
    ) -> list[Resource]:
        """Current resources of a type matching the search parameters (control params ignored).

        `within` restricts the candidates to given `(type, id)` keys (a patient compartment).
        Raises FhirHttpError(400) for unknown parameters, modifiers or malformed values.
        """
        filters = compile_filters(resource_type, params)
        if within is not None:
            keys = {k for k in within if k[0] == resource_type}
            candidates = [r for r in (self.get(t, i) for t, i in sorted(keys)) if r is not None]
            # Keep the store's insertion order so paging is stable.
            order = {rid: n for n, rid in enumerate(e for e in self._data.get(resource_type, {}))}
            candidates.sort(key=lambda r: order.get(r["id"], 0))
        else:
            candidates = list(self.iter_type(resource_type))
        return [r for r in candidates if matches(r, filters)]

    def compartment_keys(self, patient_id: str) -> set[tuple[str, str]]:
        """`(type, id)` keys in one patient's compartment (a copy)."""
        with self._lock:
            return set(self._by_patient.get(patient_id, set()))
