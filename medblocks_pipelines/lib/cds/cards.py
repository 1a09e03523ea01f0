"""CDS Hooks cards drawn from the unified record (SPECS §4.4).

Every card carries its provenance in ``detail`` (source, organization, pattern, date of each item
it cites) and nothing else about the patient: counts, concept names, dates and values the advice
needs. Cards, suggestions and links are built without nulls or empty elements; ``uuid`` values are
uuid5 of the service, person, rule and item, so feedback on a card repeated by a later hook call
points at the same card.

Rules:

* ``beyond_this_ehr`` (patient-view): facts no record of the calling organization's source states,
  counted by kind, with the most relevant items, split by where they came from (other organizations,
  payers, the network, patient-authorized apps);
* ``a1c_overdue`` (patient-view): a condition in the active ``diabetes`` value set and no result
  in the ``hba1c`` value set within ``A1C_INTERVAL_DAYS`` (value sets from :mod:`lib.cds.knowledge`
  packs; the rule is off without them);
* ``duplicate_order`` (order-select/order-sign): a drafted ServiceRequest whose code was resulted
  recently at another source (labs ``LAB_WINDOW_DAYS``, others ``OTHER_WINDOW_DAYS``);
* allergy / interaction checks of drafted medications: :mod:`lib.cds.order_cards`.

The calling organization is never named in a provenance line: the line says where else an item is
recorded.
"""

import functools
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any

from medblocks_pipelines.lib.cds.ingredients import TerminologyClient
from medblocks_pipelines.lib.cds.knowledge import KnowledgeBase, Pack, load_knowledge


@functools.cache
def default_knowledge() -> KnowledgeBase:
    """The shipped knowledge packs, loaded once (a service passes its configured ones)."""
    return load_knowledge()


NAMESPACE = uuid.UUID("6b0f6a0e-3f44-4a52-9a8e-1a3c2e7c1d55")
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
ICD10 = "http://hl7.org/fhir/sid/icd-10-cm"

A1C_INTERVAL_DAYS = 180
LAB_WINDOW_DAYS = 30
OTHER_WINDOW_DAYS = 180
RECENT_ITEMS = 3

PATTERN_LABELS = {
    "backend": "EHR bulk sync",
    "patient_access": "patient-authorized access",
    "clinician_workflow": "EHR launch",
    "network": "exchange network",
}
# kind -> (one, many)
KIND_LABELS = {
    "condition": ("condition", "conditions"),
    "medication": ("medication", "medications"),
    "allergy": ("allergy", "allergies"),
    "immunization": ("immunization", "immunizations"),
    "result": ("result", "results"),
    "report": ("report", "reports"),
    "encounter": ("encounter", "encounters"),
    "procedure": ("procedure", "procedures"),
}
# "Most relevant" lists what changes care first: allergies, problems, medications, then the rest;
# vital signs last (every visit has them, so by date alone they would crowd out everything else).
RELEVANCE = ("allergy", "condition", "medication", "result", "report", "procedure", "immunization")
VITAL_CATEGORIES = frozenset({"vital-signs"})


@dataclass(frozen=True)
class CardContext:
    """Who asks and what we may say: the caller's source, display names, our app link."""

    service_id: str
    person_id: str
    here_source: str
    patient_id: str
    today: date
    #: Every source id that is this EHR (registered twice: bulk sync and launch clients).
    here_sources: frozenset[str] = frozenset()
    source_names: Mapping[str, str] = field(default_factory=dict)
    source_kinds: Mapping[str, str] = field(default_factory=dict)
    organization_names: Mapping[str, str] = field(default_factory=dict)
    app_url: str | None = None
    label: str = "Medblocks unified record"
    #: The calling organization (and its ids): never named as where an item came from.
    here_organizations: frozenset[str] = frozenset()
    knowledge: KnowledgeBase = field(default_factory=default_knowledge)
    terminology: TerminologyClient | None = None


def _uuid(ctx: CardContext, *parts: str) -> str:
    return str(uuid.uuid5(NAMESPACE, "|".join((ctx.service_id, ctx.person_id, *parts))))


def _clean(value: Any) -> Any:
    """Drop None and empty strings/lists/dicts recursively (CDS Hooks: no nulls, no empty elements)."""
    if isinstance(value, dict):
        out = {k: _clean(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v is not None and v != "" and v != [] and v != {}}
    if isinstance(value, list):
        items = [_clean(v) for v in value]
        return [v for v in items if v is not None and v != "" and v != [] and v != {}]
    return value


def _clean_card(doc: dict[str, Any]) -> dict[str, Any]:
    """:func:`_clean` of a card (a JSON object stays a JSON object)."""
    cleaned: dict[str, Any] = _clean(doc)
    return cleaned


def _name(fact: Mapping[str, Any]) -> str:
    return str(fact.get("display") or fact.get("text") or fact.get("code") or "unnamed item")


def _day(value: Any) -> date | None:
    if isinstance(value, date):
        return value
    if isinstance(value, str) and len(value) >= 10:
        try:
            return date.fromisoformat(value[:10])
        except ValueError:
            return None
    return None


def _md(text: str) -> str:
    """Escape Markdown control characters in source-provided text."""
    return "".join("\\" + c if c in "\\`*_[]#|<>" else c for c in text)


def _elsewhere(fact: Mapping[str, Any], ctx: "CardContext") -> list[str]:
    here = ctx.here_sources or {ctx.here_source}
    return [s for s in fact.get("sources") or [] if s not in here]


def provenance(fact: Mapping[str, Any], ctx: CardContext) -> str:
    """``source · organization · pattern · date`` for one fact, the sources other than the caller's."""
    elsewhere = _elsewhere(fact, ctx)
    srcs = elsewhere or list(fact.get("sources") or [])
    source = ", ".join(ctx.source_names.get(s, s) for s in srcs) or "unknown source"
    # Where else it is recorded: the caller's own organization is not news to the caller.
    here = (
        (ctx.here_organizations | (ctx.here_sources or {ctx.here_source})) if elsewhere else set()
    )
    orgs = ", ".join(
        ctx.organization_names.get(o, o) for o in fact.get("organizations") or [] if o not in here
    )
    patterns = ", ".join(PATTERN_LABELS.get(p, p) for p in fact.get("patterns") or [])
    when = _day(fact.get("last_date"))
    parts = [f"source: {_md(source)}"]
    if orgs:
        parts.append(f"organization: {_md(orgs)}")
    if patterns:
        parts.append(f"pattern: {_md(patterns)}")
    parts.append(f"date: {when.isoformat() if when else 'undated'}")
    return " · ".join(parts)


def _source(ctx: CardContext, topic: str | None = None, pack: Pack | None = None) -> dict[str, Any]:
    label = ctx.label if pack is None else f"{ctx.label} · {pack.label}"
    src: dict[str, Any] = {"label": label}
    if topic:
        src["topic"] = {
            "system": "https://medblocks.com/cds/topics",
            "code": topic,
            "display": topic.replace("-", " "),
        }
    return src


def knowledge_line(pack: Pack, *what: str) -> str:
    """The detail line naming the knowledge a card rests on (pack, version, citation)."""
    parts = f" ({_md(', '.join(what))})" if what else ""
    return f"_Knowledge: {_md(pack.label)}{parts}. Source: {_md(pack.source)}_"


def _links(ctx: CardContext) -> list[dict[str, Any]]:
    if not ctx.app_url:
        return []
    return [
        {
            "label": "Open the unified record",
            "url": ctx.app_url,
            "type": "smart",
            "appContext": f"person-view:{ctx.service_id}",
        }
    ]


def _origin_of(fact: Mapping[str, Any], ctx: CardContext) -> str:
    srcs = _elsewhere(fact, ctx)
    if any(ctx.source_kinds.get(s) == "payer" for s in srcs) or fact.get("from_claims"):
        return "payers"
    if "network" in (fact.get("patterns") or []) or any(
        ctx.source_kinds.get(s) == "network" for s in srcs
    ):
        return "the network"
    return "other organizations"


# ---------------------------------------------------------------------------------------------
# patient-view
# ---------------------------------------------------------------------------------------------
def beyond_this_ehr(facts: Sequence[Mapping[str, Any]], ctx: CardContext) -> dict[str, Any] | None:
    """What the record holds that this EHR's source does not state (None when nothing)."""
    outside = [
        f
        for f in facts
        if _elsewhere(f, ctx)
        and not (ctx.here_sources or {ctx.here_source}) & set(f.get("sources") or [])
    ]
    if not outside:
        return None
    kinds = Counter(str(f["kind"]) for f in outside)
    origins = Counter(_origin_of(f, ctx) for f in outside)
    sources = sorted({s for f in outside for s in _elsewhere(f, ctx)})
    counts = ", ".join(f"{n} {kind_label(k, n)}" for k, n in kinds.most_common())
    summary = (
        f"{len(outside)} item{'s' if len(outside) != 1 else ''} from {len(sources)} other source"
        + ("s" if len(sources) != 1 else "")
        + " not in this chart"
    )
    lines = [
        f"**Not in this chart:** {_md(counts)}.",
        "",
        "**From:** " + _md(", ".join(f"{o} ({n})" for o, n in origins.most_common())) + ".",
        "",
        "**Most relevant (newest first within each kind):**",
        "",
    ]
    for f in most_relevant(outside)[:RECENT_ITEMS]:
        value = ""
        if f.get("value_num") is not None:
            value = f" = {f['value_num']:g}" + (
                f" {f['value_unit']}" if f.get("value_unit") else ""
            )
        elif f.get("value_text"):
            value = f" = {f['value_text']}"
        lines.append(f"- {_md(_name(f) + value)} ({_md(str(f['kind']))}); {provenance(f, ctx)}")
    return _clean_card(
        {
            "uuid": _uuid(ctx, "beyond_this_ehr", str(len(outside))),
            "summary": summary[:139],
            "detail": "\n".join(lines),
            "indicator": "info",
            "source": _source(ctx, "records-elsewhere"),
            "links": _links(ctx),
        }
    )


def kind_label(kind: str, n: int) -> str:
    """``condition``/``conditions`` as ``n`` needs."""
    one, many = KIND_LABELS.get(kind, (kind, kind))
    return one if n == 1 else many


def _relevance(fact: Mapping[str, Any]) -> int:
    kind = str(fact.get("kind"))
    if kind == "result" and str(fact.get("category") or "") in VITAL_CATEGORIES:
        return len(RELEVANCE) + 1
    return RELEVANCE.index(kind) if kind in RELEVANCE else len(RELEVANCE)


def most_relevant(facts: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Facts by clinical relevance of their kind (vital signs last), then most recent first."""
    return sorted(
        facts,
        key=lambda f: (_relevance(f), -(_day(f.get("last_date")) or date.min).toordinal()),
    )


def a1c_overdue(facts: Sequence[Mapping[str, Any]], ctx: CardContext) -> dict[str, Any] | None:
    """A diabetic with no HbA1c within ``A1C_INTERVAL_DAYS`` (None when not applicable)."""
    kb = ctx.knowledge
    diabetes_vs, a1c_vs = kb.value_set("diabetes"), kb.value_set("hba1c")
    if diabetes_vs is None or a1c_vs is None:
        return None  # the rule needs both value sets; discovery does not offer it without them
    diabetes = [
        f
        for f in facts
        if f["kind"] == "condition"
        and kb.in_value_set("diabetes", f.get("codes") or [])
        and str(f.get("status") or "active") not in ("resolved", "inactive", "entered-in-error")
    ]
    if not diabetes:
        return None
    a1cs = [
        f for f in facts if f["kind"] == "result" and kb.in_value_set("hba1c", f.get("codes") or [])
    ]
    last = max(a1cs, key=lambda f: _day(f.get("last_date")) or date.min, default=None)
    last_day = _day(last.get("last_date")) if last else None
    if last_day is not None and (ctx.today - last_day).days <= A1C_INTERVAL_DAYS:
        return None
    if last_day is None:
        summary = "HbA1c overdue: diabetes on record and no HbA1c result in any source"
    else:
        summary = (
            f"HbA1c overdue: last result {last_day.isoformat()}, "
            f"{(ctx.today - last_day).days} days ago (across all sources)"
        )
    lines = [
        f"Diabetes is recorded ({_md(_name(diabetes[0]))}); guidelines call for an HbA1c "
        f"at least every {A1C_INTERVAL_DAYS // 30} months.",
        "",
        f"- Condition: {provenance(diabetes[0], ctx)}",
    ]
    if last is not None:
        val = (
            f" = {last['value_num']:g} {last.get('value_unit') or ''}".rstrip()
            if last.get("value_num") is not None
            else ""
        )
        lines.append(f"- Last HbA1c{_md(val)}: {provenance(last, ctx)}")
    lines += ["", knowledge_line(diabetes_vs[0], diabetes_vs[1].oid, a1c_vs[1].oid)]
    order = {
        "resourceType": "ServiceRequest",
        "status": "draft",
        "intent": "proposal",
        "code": {
            "coding": [
                {
                    "system": LOINC,
                    "code": "4548-4",
                    "display": "Hemoglobin A1c/Hemoglobin.total in Blood",
                }
            ]
        },
        "subject": {"reference": f"Patient/{ctx.patient_id}"},
    }
    return _clean_card(
        {
            "uuid": _uuid(ctx, "a1c_overdue", last_day.isoformat() if last_day else "never"),
            "summary": summary[:139],
            "detail": "\n".join(lines),
            "indicator": "warning",
            "source": _source(ctx, "care-gap", diabetes_vs[0]),
            "suggestions": [
                {
                    "label": "Order HbA1c",
                    "uuid": _uuid(ctx, "a1c_overdue", "order"),
                    "isRecommended": True,
                    "actions": [
                        {
                            "type": "create",
                            "description": "Order a hemoglobin A1c test",
                            "resource": order,
                        }
                    ],
                }
            ],
            "selectionBehavior": "at-most-one",
            "overrideReasons": [
                {
                    "system": "https://medblocks.com/cds/override",
                    "code": "done-elsewhere",
                    "display": "Done elsewhere, result not yet received",
                },
                {
                    "system": "https://medblocks.com/cds/override",
                    "code": "not-indicated",
                    "display": "Not clinically indicated",
                },
            ],
            "links": _links(ctx),
        }
    )


def patient_view_cards(
    facts: Sequence[Mapping[str, Any]], ctx: CardContext
) -> list[dict[str, Any]]:
    """Cards for patient-view."""
    return [c for c in (beyond_this_ehr(facts, ctx), a1c_overdue(facts, ctx)) if c]


# ---------------------------------------------------------------------------------------------
# order-select / order-sign
# ---------------------------------------------------------------------------------------------
def codes_of(concept: Any) -> set[str]:
    """``system|code`` of every coding in a CodeableConcept (empty when malformed)."""
    out: set[str] = set()
    if isinstance(concept, dict):
        for c in concept.get("coding") or []:
            if (
                isinstance(c, dict)
                and isinstance(c.get("system"), str)
                and isinstance(c.get("code"), str)
            ):
                out.add(f"{c['system'].rstrip('/')}|{c['code']}")
    return out


def _delete_suggestion(ctx: CardContext, rule: str, ref: str, label: str) -> dict[str, Any]:
    return {
        "label": label,
        "uuid": _uuid(ctx, rule, ref, "delete"),
        "actions": [
            {"type": "delete", "description": f"Remove draft order {ref}", "resourceId": ref}
        ],
    }


def duplicate_order(
    order: Mapping[str, Any], facts: Sequence[Mapping[str, Any]], ctx: CardContext
) -> dict[str, Any] | None:
    """The same lab or imaging done recently at another source."""
    wanted = codes_of(order.get("code"))
    if not wanted:
        return None
    ref = f"ServiceRequest/{order.get('id')}"
    lab = any(c.startswith(LOINC + "|") for c in wanted)
    window = LAB_WINDOW_DAYS if lab else OTHER_WINDOW_DAYS
    hits = []
    for f in facts:
        if f["kind"] not in ("result", "report", "procedure"):
            continue
        when = _day(f.get("last_date"))
        if when is None or (ctx.today - when).days > window or not _elsewhere(f, ctx):
            continue
        if wanted & set(f.get("codes") or []):
            hits.append((when, f))
    if not hits:
        return None
    when, f = max(hits, key=lambda h: h[0])
    days = (ctx.today - when).days
    summary = f"Possible duplicate: {_name(f)} done {days} days ago elsewhere"
    value = ""
    if f.get("value_num") is not None:
        value = f" Result: {f['value_num']:g} {f.get('value_unit') or ''}".rstrip() + "."
    return _clean_card(
        {
            "uuid": _uuid(ctx, "duplicate_order", ref, when.isoformat()),
            "summary": (summary if len(summary) < 140 else summary[:136] + "..."),
            "detail": f"The same test was done within {window} days.{_md(value)}\n\n"
            f"- {provenance(f, ctx)}",
            "indicator": "warning",
            "source": _source(ctx, "duplicate-order"),
            "suggestions": [_delete_suggestion(ctx, "duplicate_order", ref, "Cancel this order")],
            "selectionBehavior": "at-most-one",
            "overrideReasons": [
                {
                    "system": "https://medblocks.com/cds/override",
                    "code": "repeat-indicated",
                    "display": "Repeat is clinically indicated",
                }
            ],
            "links": _links(ctx),
        }
    )
