"""The searches of a patient-access pull, planned from what the server declares.

The types are the US Core types we know (US Core 3.1 through 7; SPECS §1.11) or the CMS Patient
Access types of a payer (§1.10), kept where the server's CapabilityStatement lists them, the grant
allows them and the source's ``resource_types`` config keeps them. Each search uses only the
parameters the server declares for that type: a server that does not declare ``category`` on
Observation (many do not, and answer 0 or 400 when it is used anyway) is searched by patient alone,
and the categories a category-filtered scope grants are kept locally. A server without a usable
CapabilityStatement gets the whole known list with the US Core parameters, and the pull records
the anomaly ``no_capability_statement``.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from medblocks_pipelines.lib.smart.scopes import ScopeSet

#: Observation categories searched one by one (many servers require ``category``; SPECS §1.11).
OBSERVATION_CATEGORIES: tuple[str, ...] = (
    "laboratory",
    "vital-signs",
    "social-history",
    "survey",
    "sdoh",
)


@dataclass(frozen=True)
class Query:
    """One search of a pull: the type, its parameters, and a PHI-free label for metadata.

    ``keep_categories``: when set, only resources with one of these category codes are landed
    (the server could not filter by category and the grant is limited to these).
    """

    resource_type: str
    params: tuple[tuple[str, str], ...]
    label: str
    keep_categories: tuple[str, ...] | None = None


@dataclass(frozen=True)
class TypeSearch:
    """How US Core searches one type: patient parameter, extra parameters, category codes."""

    resource_type: str
    extra: tuple[tuple[str, str], ...] = ()
    categories: tuple[str, ...] = ()
    #: ``True``: one search per category (Observation); else all categories in one.
    per_category: bool = False


#: US Core 3.1 - 7 patient-compartment searches (the referenced types are followed instead).
US_CORE_SEARCHES: tuple[TypeSearch, ...] = (
    TypeSearch("AllergyIntolerance"),
    TypeSearch("Condition"),
    TypeSearch("Immunization"),
    TypeSearch("Procedure"),
    TypeSearch("Encounter"),
    TypeSearch("Observation", categories=OBSERVATION_CATEGORIES, per_category=True),
    TypeSearch(
        "MedicationRequest",
        extra=(("intent", "order"), ("_include", "MedicationRequest:medication")),
    ),
    TypeSearch("MedicationDispense", extra=(("_include", "MedicationDispense:medication"),)),
    TypeSearch("DiagnosticReport"),
    TypeSearch("DocumentReference"),
    TypeSearch("CarePlan", categories=("assess-plan",)),
    TypeSearch("CareTeam", extra=(("status", "active"),)),
    TypeSearch("Goal"),
    TypeSearch("Device"),
    TypeSearch("ServiceRequest"),
    TypeSearch("Specimen"),
    TypeSearch("QuestionnaireResponse"),
    TypeSearch("RelatedPerson"),
    TypeSearch("Coverage"),
    TypeSearch("Provenance"),
)

#: CMS Patient Access API searches of a payer.
PAYER_SEARCHES: tuple[TypeSearch, ...] = (
    TypeSearch("Coverage", extra=(("_include", "Coverage:payor"),)),
    TypeSearch("ExplanationOfBenefit"),
)


@dataclass(frozen=True)
class Capabilities:
    """What a CapabilityStatement declares: types, and search parameters and includes per type.

    ``params[t]`` / ``includes[t]`` are None when the type lists none (then nothing is assumed
    missing: many servers declare types without their parameters).
    """

    types: frozenset[str]
    params: Mapping[str, frozenset[str] | None]
    includes: Mapping[str, frozenset[str] | None]

    @property
    def known(self) -> bool:
        return bool(self.types)

    def declares(self, rtype: str, param: str) -> bool:
        declared = self.params.get(rtype)
        return declared is None or param in declared

    def declares_include(self, rtype: str, include: str) -> bool:
        declared = self.includes.get(rtype)
        return declared is None or include in declared


def read_capabilities(statement: Mapping[str, Any] | None) -> Capabilities:
    """Types (with ``search-type`` or ``read``), search parameters and includes of a server."""
    types: set[str] = set()
    params: dict[str, frozenset[str] | None] = {}
    includes: dict[str, frozenset[str] | None] = {}
    for rest in (statement or {}).get("rest") or []:
        if not isinstance(rest, dict) or rest.get("mode", "server") != "server":
            continue
        for res in rest.get("resource") or []:
            rtype = res.get("type") if isinstance(res, dict) else None
            if not isinstance(rtype, str):
                continue
            codes = {i.get("code") for i in res.get("interaction") or [] if isinstance(i, dict)}
            if codes and not codes & {"search-type", "read"}:
                continue
            types.add(rtype)
            names = {
                str(p["name"])
                for p in res.get("searchParam") or []
                if isinstance(p, dict) and p.get("name")
            }
            params[rtype] = frozenset(names) if names else None
            incl = {str(i) for i in res.get("searchInclude") or [] if isinstance(i, str)}
            includes[rtype] = frozenset(incl) if incl else None
    return Capabilities(frozenset(types), params, includes)


def _granted_categories(granted: ScopeSet, rtype: str) -> tuple[str, ...] | None:
    """Category codes a category-filtered grant limits ``rtype`` to; None when unfiltered."""
    keep: list[str] = []
    for query in granted.filters_for(rtype):
        cats = [v for k, v in query if k.split(":")[0] == "category"]
        if not cats:
            return None
        keep += [c.split("|")[-1] for v in cats for c in v.split(",")]
    return tuple(dict.fromkeys(keep)) or None


def _searches_of(
    spec: TypeSearch, pid: str, patient_param: str, caps: Capabilities, cfg: Mapping[str, Any]
) -> list[Query]:
    rtype = spec.resource_type
    extra = [
        (k, v)
        for k, v in spec.extra
        if (caps.declares_include(rtype, v) if k == "_include" else caps.declares(rtype, k))
    ]
    base = [(patient_param, pid), *extra]
    cats = spec.categories
    if rtype == "Observation":
        cats = tuple(cfg.get("observation_categories") or cats)
    if not cats:
        return [Query(rtype, tuple(base), rtype)]
    if not caps.declares(rtype, "category"):
        # Category is not searchable here: search by patient alone, land what the grant allows.
        return [Query(rtype, tuple(base), rtype)]
    if spec.per_category and not cfg.get("observation_categories_combined"):
        return [Query(rtype, (*base, ("category", c)), f"{rtype}:{c}") for c in cats]
    return [Query(rtype, (*base, ("category", ",".join(cats))), rtype)]


def plan_queries(
    *,
    kind: str,
    patient_id: str,
    supported: set[str],
    granted: ScopeSet,
    since: str | None = None,
    since_by_label: Mapping[str, str | None] | None = None,
    config: Mapping[str, Any] | None = None,
    capability: Mapping[str, Any] | None = None,
) -> tuple[list[Query], dict[str, str]]:
    """The searches of one pull and, per skipped type, why (``not_supported`` / ``not_granted`` /
    ``no_patient_search``).

    ``capability`` is the server's CapabilityStatement; without one, ``supported`` (types) is
    used, and empty ``supported`` means every known type is tried with the US Core parameters.
    ``since_by_label`` gives one search (by its label) its own ``_lastUpdated`` bound, else ``since``.
    """
    cfg = dict(config or {})
    caps = read_capabilities(capability)
    if not caps.known and supported:
        caps = Capabilities(frozenset(supported), {}, {})
    specs: Sequence[TypeSearch] = PAYER_SEARCHES if kind == "payer" else US_CORE_SEARCHES
    only = set(cfg.get("resource_types") or [])
    queries: list[Query] = []
    skipped: dict[str, str] = {}
    for spec in specs:
        rtype = spec.resource_type
        if only and rtype not in only:
            continue
        if caps.known and rtype not in caps.types:
            skipped[rtype] = "not_supported"
            continue
        if not granted.can_search(rtype):
            skipped[rtype] = "not_granted"
            continue
        declared = caps.params.get(rtype)
        patient_param = (
            "patient"
            if declared is None
            else next((p for p in ("patient", "subject", "beneficiary") if p in declared), None)
        )
        if patient_param is None:
            skipped[rtype] = "no_patient_search"
            continue
        keep = _granted_categories(granted, rtype)
        for query in _searches_of(spec, patient_id, patient_param, caps, cfg):
            params = list(query.params)
            query_since = (since_by_label or {}).get(query.label) or since
            if query_since:
                params.append(("_lastUpdated", f"gt{query_since}"))
            if cfg.get("page_size"):
                params.append(("_count", str(cfg["page_size"])))
            has_category = any(k == "category" for k, _v in params)
            queries.append(
                Query(
                    query.resource_type,
                    tuple(params),
                    query.label,
                    keep_categories=None if has_category else keep,
                )
            )
    return queries, skipped
