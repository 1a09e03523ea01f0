"""Cards for order-select / order-sign (SPECS §4.4): duplicates, allergies, interactions.

* ``duplicate_order`` (:mod:`lib.cds.cards`): a drafted ServiceRequest resulted recently elsewhere;
* ``allergy``: a drafted MedicationRequest sharing an ingredient with an allergy recorded at
  another source, or (from an allergy-class pack) a drug class;
* ``interaction``: a drafted MedicationRequest and an active medication recorded at another source
  that a knowledge pack lists as interacting;
* ``unchecked``: a drafted MedicationRequest whose ingredients could not be identified (no RxNorm
  coding and no known ingredient name): the card says the checks did not run, because a missing
  card reads as "no interaction".

Ingredients come from :mod:`lib.cds.ingredients`; every knowledge-based card names the pack and
version it rests on in ``source.label`` and in its detail.
"""

from collections.abc import Mapping, Sequence
from typing import Any

from medblocks_pipelines.lib.cds.cards import (
    CardContext,
    _clean_card,
    _delete_suggestion,
    _elsewhere,
    _links,
    _md,
    _name,
    _source,
    _uuid,
    duplicate_order,
    knowledge_line,
    provenance,
)
from medblocks_pipelines.lib.cds.ingredients import fact_ingredients, order_ingredients
from medblocks_pipelines.lib.cds.knowledge import ClassHit, InteractionHit

ACTIVE_MED_STATUSES = ("active", "on-hold", "draft")
OVERRIDE = "https://medblocks.com/cds/override"


def _allergy_card(
    f: Mapping[str, Any], ref: str, ctx: CardContext, hit: ClassHit | None
) -> dict[str, Any]:
    if hit is None:
        summary = f"Allergy to {_name(f)} recorded elsewhere"
        why = "The drafted medication contains an ingredient of a recorded allergy."
    else:
        summary = f"Allergy to {_name(f)} recorded elsewhere: same drug class"
        why = (
            f"The drafted medication is in the same class ({_md(hit.group.name)}) as a recorded "
            f"allergy.\n\n{knowledge_line(hit.pack, hit.group.id)}"
        )
    return _clean_card(
        {
            "uuid": _uuid(ctx, "allergy", ref, str(f["fact_id"])),
            "summary": summary[:139],
            "detail": f"{why}\n\n- {provenance(f, ctx)}",
            "indicator": "critical",
            "source": _source(ctx, "allergy", hit.pack if hit else None),
            "suggestions": [_delete_suggestion(ctx, "allergy", ref, "Remove this medication")],
            "selectionBehavior": "at-most-one",
            "overrideReasons": [
                {
                    "system": OVERRIDE,
                    "code": "tolerated",
                    "display": "Patient has tolerated it before",
                }
            ],
            "links": _links(ctx),
        }
    )


def _interaction_card(
    f: Mapping[str, Any], ref: str, ctx: CardContext, hit: InteractionHit
) -> dict[str, Any]:
    inter = hit.interaction
    return _clean_card(
        {
            "uuid": _uuid(ctx, "interaction", ref, str(f["fact_id"]), hit.pack.id, inter.id),
            "summary": f"Interaction with {_name(f)} prescribed elsewhere"[:139],
            "detail": f"{_md(inter.advice)}\n\n- {provenance(f, ctx)}\n\n"
            f"{knowledge_line(hit.pack, inter.id)}",
            "indicator": inter.indicator,
            "source": _source(ctx, "interaction", hit.pack),
            "suggestions": [_delete_suggestion(ctx, "interaction", ref, "Remove this medication")],
            "selectionBehavior": "at-most-one",
            "links": _links(ctx),
        }
    )


def _unchecked_card(ref: str, ctx: CardContext) -> dict[str, Any]:
    return _clean_card(
        {
            "uuid": _uuid(ctx, "unchecked", ref),
            "summary": "Allergy and interaction checks not run: medication not identified",
            "detail": "The drafted medication has no RxNorm coding and no ingredient name these "
            "checks know, so allergies and interactions recorded elsewhere were **not** checked "
            "against it.",
            "indicator": "info",
            "source": _source(ctx, "unchecked"),
            "links": _links(ctx),
        }
    )


def medication_alerts(
    order: Mapping[str, Any],
    facts: Sequence[Mapping[str, Any]],
    ctx: CardContext,
    drafts: Sequence[Mapping[str, Any]] = (),
) -> list[dict[str, Any]]:
    """Allergy and interaction cards for one drafted MedicationRequest."""
    kb = ctx.knowledge
    ref = f"MedicationRequest/{order.get('id')}"
    resolved = order_ingredients(order, kb, ctx.terminology, drafts)
    if not resolved.ingredients:
        return [_unchecked_card(ref, ctx)]
    drafted = set(resolved.ingredients)
    cards: list[dict[str, Any]] = []
    for f in facts:
        if f["kind"] != "allergy" or not _elsewhere(f, ctx):
            continue
        allergic = fact_ingredients(f, kb, ctx.terminology).ingredients
        if not allergic:
            continue
        if allergic & drafted:
            cards.append(_allergy_card(f, ref, ctx, None))
            continue
        hit = next(
            (
                h
                for a in sorted(allergic)
                for h in kb.classes_of(a)
                if drafted & {m.rxnorm for m in h.group.members}
            ),
            None,
        )
        if hit is not None:
            cards.append(_allergy_card(f, ref, ctx, hit))
    for f in facts:
        if f["kind"] != "medication" or not _elsewhere(f, ctx):
            continue
        if str(f.get("status") or "active") not in ACTIVE_MED_STATUSES:
            continue
        other = fact_ingredients(f, kb, ctx.terminology).ingredients
        seen: set[tuple[str, str]] = set()
        for a in sorted(drafted):
            for b in sorted(other):
                for ihit in kb.interactions(a, b):
                    key = (ihit.pack.id, ihit.interaction.id)
                    if key not in seen:
                        seen.add(key)
                        cards.append(_interaction_card(f, ref, ctx, ihit))
    return cards


def order_cards(
    orders: Sequence[Mapping[str, Any]],
    facts: Sequence[Mapping[str, Any]],
    ctx: CardContext,
    drafts: Sequence[Mapping[str, Any]] = (),
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
            cards.extend(medication_alerts(order, facts, ctx, drafts or orders))
    seen: set[str] = set()
    unique = []
    for c in cards:
        if c["uuid"] not in seen:
            seen.add(c["uuid"])
            unique.append(c)
    return unique
