"""CDS Hooks cards drawn from the unified record (SPECS §4.4).

Every card carries its provenance in ``detail`` (source, organization, pattern, date of each item
it cites) and nothing else about the patient: counts, concept names, dates and values the advice
needs. Cards, suggestions and links are built without nulls or empty elements; ``uuid`` values are
uuid5 of the service, person, rule and item, so feedback on a card repeated by a later hook call
points at the same card.

Rules:

* ``beyond_this_ehr`` (patient-view): facts no record of the calling organization's source states,
  counted by kind, with the most recent items, split by where they came from (other organizations,
  payers, the network, patient-authorized apps);
* ``a1c_overdue`` (patient-view): a diabetes condition and no HbA1c in ``A1C_INTERVAL_DAYS``;
* ``duplicate_order`` (order-select/order-sign): a drafted ServiceRequest whose code was resulted
  recently at another source (labs ``LAB_WINDOW_DAYS``, others ``OTHER_WINDOW_DAYS``);
* ``allergy`` / ``interaction`` (order-select/order-sign): a drafted MedicationRequest against an
  allergy, or an active medication, recorded at another source.
"""

import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any

NAMESPACE = uuid.UUID("6b0f6a0e-3f44-4a52-9a8e-1a3c2e7c1d55")
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
ICD10 = "http://hl7.org/fhir/sid/icd-10-cm"

A1C_CODES = frozenset({f"{LOINC}|4548-4", f"{LOINC}|17856-6", f"{LOINC}|4549-2"})
DIABETES_SNOMED = frozenset({"44054006", "46635009", "73211009", "190372001"})
A1C_INTERVAL_DAYS = 180
LAB_WINDOW_DAYS = 30
OTHER_WINDOW_DAYS = 180
RECENT_ITEMS = 3

# Drug classes (RxNorm ingredient codes) where an allergy to one member warns on the others.
DRUG_CLASSES: dict[str, frozenset[str]] = {
    "penicillins": frozenset({"70618", "723", "733", "7980", "7984", "8339", "10689", "74169"}),
    "sulfonamide antibiotics": frozenset({"10180", "10831", "10207"}),
    "cephalosporins": frozenset({"2176", "2180", "2186", "2191", "2193", "20481"}),
}
# Interacting ingredient pairs (RxNorm IN) and the advice; a deliberately small, cited-free demo table.
INTERACTIONS: dict[frozenset[str], str] = {
    frozenset({"36567", "17767"}): "simvastatin with amlodipine: limit simvastatin to 20 mg daily",
    frozenset({"11289", "1191"}): "warfarin with aspirin: bleeding risk",
    frozenset({"29046", "9997"}): "lisinopril with spironolactone: hyperkalemia risk",
    frozenset({"6809", "4493"}): "metformin with iodinated contrast: hold metformin",
    frozenset({"36437", "10689"}): "sertraline with tramadol: serotonin syndrome risk",
}
PATTERN_LABELS = {
    "backend": "EHR bulk sync",
    "patient_access": "patient-authorized access",
    "clinician_workflow": "EHR launch",
    "network": "exchange network",
}
KIND_LABELS = {
    "condition": "conditions",
    "medication": "medications",
    "allergy": "allergies",
    "immunization": "immunizations",
    "result": "results",
    "report": "reports",
    "encounter": "encounters",
    "procedure": "procedures",
}


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
    srcs = _elsewhere(fact, ctx) or list(fact.get("sources") or [])
    source = ", ".join(ctx.source_names.get(s, s) for s in srcs) or "unknown source"
    orgs = ", ".join(ctx.organization_names.get(o, o) for o in fact.get("organizations") or [])
    patterns = ", ".join(PATTERN_LABELS.get(p, p) for p in fact.get("patterns") or [])
    when = _day(fact.get("last_date"))
    parts = [f"source: {_md(source)}"]
    if orgs:
        parts.append(f"organization: {_md(orgs)}")
    if patterns:
        parts.append(f"pattern: {_md(patterns)}")
    parts.append(f"date: {when.isoformat() if when else 'undated'}")
    return " · ".join(parts)


def _source(ctx: CardContext, topic: str | None = None) -> dict[str, Any]:
    src: dict[str, Any] = {"label": ctx.label}
    if topic:
        src["topic"] = {
            "system": "https://medblocks.com/cds/topics",
            "code": topic,
            "display": topic.replace("-", " "),
        }
    return src


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
    counts = ", ".join(f"{n} {KIND_LABELS.get(k, k)}" for k, n in kinds.most_common())
    summary = (
        f"{len(outside)} items from {len(sources)} other source"
        + ("s" if len(sources) != 1 else "")
        + " not in this chart"
    )
    lines = [
        f"**Not in this chart:** {_md(counts)}.",
        "",
        "**From:** " + _md(", ".join(f"{o} ({n})" for o, n in origins.most_common())) + ".",
        "",
        "**Most recent:**",
        "",
    ]
    dated = sorted(outside, key=lambda f: _day(f.get("last_date")) or date.min, reverse=True)
    for f in dated[:RECENT_ITEMS]:
        value = ""
        if f.get("value_num") is not None:
            value = f" = {f['value_num']:g}" + (
                f" {f['value_unit']}" if f.get("value_unit") else ""
            )
        elif f.get("value_text"):
            value = f" = {f['value_text']}"
        lines.append(f"- {_md(_name(f) + value)} ({_md(str(f['kind']))}); {provenance(f, ctx)}")
    return _clean(
        {
            "uuid": _uuid(ctx, "beyond_this_ehr", str(len(outside))),
            "summary": summary[:139],
            "detail": "\n".join(lines),
            "indicator": "info",
            "source": _source(ctx, "records-elsewhere"),
            "links": _links(ctx),
        }
    )


def _is_diabetes(fact: Mapping[str, Any]) -> bool:
    for c in fact.get("codes") or []:
        system, _, code = str(c).partition("|")
        if system == SNOMED and code in DIABETES_SNOMED:
            return True
        if "icd-10" in system and code.replace(".", "")[:3] in ("E10", "E11"):
            return True
    return False


def a1c_overdue(facts: Sequence[Mapping[str, Any]], ctx: CardContext) -> dict[str, Any] | None:
    """A diabetic with no HbA1c within ``A1C_INTERVAL_DAYS`` (None when not applicable)."""
    diabetes = [
        f
        for f in facts
        if f["kind"] == "condition"
        and _is_diabetes(f)
        and str(f.get("status") or "active") not in ("resolved", "inactive", "entered-in-error")
    ]
    if not diabetes:
        return None
    a1cs = [
        f for f in facts if f["kind"] == "result" and A1C_CODES.intersection(f.get("codes") or [])
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
    return _clean(
        {
            "uuid": _uuid(ctx, "a1c_overdue", last_day.isoformat() if last_day else "never"),
            "summary": summary[:139],
            "detail": "\n".join(lines),
            "indicator": "warning",
            "source": _source(ctx, "care-gap"),
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


def _rx(codes: Iterable[str]) -> set[str]:
    return {c.split("|", 1)[1] for c in codes if c.startswith(RXNORM + "|")}


def _expand(rx: set[str]) -> set[str]:
    out = set(rx)
    for members in DRUG_CLASSES.values():
        if rx & members:
            out |= members
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
    return _clean(
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


def medication_alerts(
    order: Mapping[str, Any], facts: Sequence[Mapping[str, Any]], ctx: CardContext
) -> list[dict[str, Any]]:
    """Allergy and interaction cards for one drafted MedicationRequest."""
    drafted = _rx(codes_of(order.get("medicationCodeableConcept")))
    if not drafted:
        return []
    ref = f"MedicationRequest/{order.get('id')}"
    cards: list[dict[str, Any]] = []
    expanded = _expand(drafted)
    for f in facts:
        if f["kind"] != "allergy" or not _elsewhere(f, ctx):
            continue
        allergic = _rx(f.get("codes") or [])
        if not allergic or not (_expand(allergic) & expanded):
            continue
        same = bool(allergic & drafted)
        summary = (
            f"Allergy to {_name(f)} recorded elsewhere"
            if same
            else f"Allergy to {_name(f)} recorded elsewhere: same drug class"
        )
        cards.append(
            _clean(
                {
                    "uuid": _uuid(ctx, "allergy", ref, str(f["fact_id"])),
                    "summary": summary[:139],
                    "detail": f"The drafted medication may trigger a recorded allergy.\n\n"
                    f"- {provenance(f, ctx)}",
                    "indicator": "critical",
                    "source": _source(ctx, "allergy"),
                    "suggestions": [
                        _delete_suggestion(ctx, "allergy", ref, "Remove this medication")
                    ],
                    "selectionBehavior": "at-most-one",
                    "overrideReasons": [
                        {
                            "system": "https://medblocks.com/cds/override",
                            "code": "tolerated",
                            "display": "Patient has tolerated it before",
                        }
                    ],
                    "links": _links(ctx),
                }
            )
        )
    for f in facts:
        if f["kind"] != "medication" or not _elsewhere(f, ctx):
            continue
        if str(f.get("status") or "active") not in ("active", "on-hold", "draft"):
            continue
        other = _rx(f.get("codes") or [])
        for a in drafted:
            for b in other:
                advice = INTERACTIONS.get(frozenset({a, b}))
                if advice is None:
                    continue
                cards.append(
                    _clean(
                        {
                            "uuid": _uuid(ctx, "interaction", ref, str(f["fact_id"])),
                            "summary": f"Interaction with {_name(f)} prescribed elsewhere"[:139],
                            "detail": f"{_md(advice)}.\n\n- {provenance(f, ctx)}",
                            "indicator": "warning",
                            "source": _source(ctx, "interaction"),
                            "suggestions": [
                                _delete_suggestion(
                                    ctx, "interaction", ref, "Remove this medication"
                                )
                            ],
                            "selectionBehavior": "at-most-one",
                            "links": _links(ctx),
                        }
                    )
                )
    return cards


def order_cards(
    orders: Sequence[Mapping[str, Any]], facts: Sequence[Mapping[str, Any]], ctx: CardContext
) -> list[dict[str, Any]]:
    """Cards for order-select (the selected drafts) and order-sign (every draft)."""
    cards: list[dict[str, Any]] = []
    for order in orders:
        rtype = order.get("resourceType")
        if rtype == "ServiceRequest":
            card = duplicate_order(order, facts, ctx)
            if card:
                cards.append(card)
        elif rtype == "MedicationRequest":
            cards.extend(medication_alerts(order, facts, ctx))
    seen: set[str] = set()
    unique = []
    for c in cards:
        if c["uuid"] not in seen:
            seen.add(c["uuid"])
            unique.append(c)
    return unique
