"""RxNorm ingredients of a drafted order or a recorded fact, for the knowledge packs.

Orders come coded as clinical drugs (``amoxicillin 250 MG Oral Capsule``, SCD 308182) as often as
ingredients, and the packs are written in ingredient codes, so an order is resolved, in order:

1. RxNorm codes of ``medicationCodeableConcept`` (an ingredient code is used as it is);
2. a ``medicationReference`` to a Medication (contained, or in ``draftOrders``): the codes of its
   ``ingredient[].itemCodeableConcept`` and of its ``code``;
3. the names of pack ingredients read as words in the codings' ``display`` and the ``text``;
4. when a FHIR terminology server is configured: ``ConceptMap/$translate`` of each RxNorm code
   (a ConceptMap from clinical drugs to ingredients, ``MEDBLOCKS_CDS_INGREDIENT_CONCEPTMAP``), and
   ``CodeSystem/$lookup`` for the display of a code that has none, read as in 3.

A terminology server that fails or answers nonsense costs only that step (logged by type, no
codes); what could not be resolved is reported by the card rules, never taken as "no match".
"""

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from medblocks_pipelines.lib.cds.knowledge import RXNORM, KnowledgeBase
from medblocks_pipelines.lib.settings import Settings

log = logging.getLogger(__name__)

TERMINOLOGY_ENV = "MEDBLOCKS_CDS_TERMINOLOGY_URL"
CONCEPTMAP_ENV = "MEDBLOCKS_CDS_INGREDIENT_CONCEPTMAP"
TIMEOUT = 2.0


def _codings(concept: Any) -> list[dict[str, Any]]:
    if not isinstance(concept, dict):
        return []
    return [c for c in concept.get("coding") or [] if isinstance(c, dict)]


def _rx_codes(concept: Any) -> set[str]:
    return {
        c["code"]
        for c in _codings(concept)
        if str(c.get("system", "")).rstrip("/") == RXNORM and isinstance(c.get("code"), str)
    }


def _texts(concept: Any) -> list[str]:
    out = [str(c["display"]) for c in _codings(concept) if isinstance(c.get("display"), str)]
    if isinstance(concept, dict) and isinstance(concept.get("text"), str):
        out.append(concept["text"])
    return out


@dataclass
class TerminologyClient:
    """``$translate`` / ``$lookup`` against one FHIR terminology server (injectable client)."""

    base_url: str
    http: httpx.Client
    conceptmap: str | None = None
    _cache: dict[tuple[str, str], Any] = field(default_factory=dict, repr=False)
    failures: int = 0

    @classmethod
    def from_env(
        cls, http: httpx.Client, env: Mapping[str, str] | None = None
    ) -> "TerminologyClient | None":
        """The configured server (``MEDBLOCKS_CDS_TERMINOLOGY_URL``), or None."""
        settings = Settings.from_env(env=env)
        if not settings.cds_terminology_url:
            return None
        return cls(
            settings.cds_terminology_url, http, conceptmap=settings.cds_ingredient_conceptmap
        )

    def _get(self, op: str, params: dict[str, str]) -> dict[str, Any] | None:
        key = (op, "&".join(f"{k}={v}" for k, v in sorted(params.items())))
        if key in self._cache:
            cached: dict[str, Any] | None = self._cache[key]
            return cached
        try:
            resp = self.http.get(
                f"{self.base_url}/{op}",
                params=params,
                headers={"Accept": "application/fhir+json"},
                timeout=TIMEOUT,
            )
            body = resp.json() if resp.status_code == 200 else None
        except (httpx.HTTPError, ValueError) as exc:
            self.failures += 1
            log.warning("cds terminology %s failed: %s", op, type(exc).__name__)
            return None  # not cached: the next call may find the server back
        if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
            if resp.status_code >= 500 or resp.status_code == 429:
                self.failures += 1
                log.warning("cds terminology %s answered %s", op, resp.status_code)
                return None
            body = None  # a 4xx or a non-Parameters answer: the code is unknown there
        self._cache[key] = body
        return body

    def translate(self, code: str) -> set[str]:
        """RxNorm codes the ConceptMap maps ``code`` to (empty without a ConceptMap)."""
        if not self.conceptmap:
            return set()
        body = self._get(
            "ConceptMap/$translate",
            {"url": self.conceptmap, "system": RXNORM, "code": code, "targetsystem": RXNORM},
        )
        out: set[str] = set()
        for p in (body or {}).get("parameter") or []:
            if not isinstance(p, dict) or p.get("name") != "match":
                continue
            for part in p.get("part") or []:
                coding = part.get("valueCoding") if isinstance(part, dict) else None
                if (
                    part.get("name") == "concept"
                    and isinstance(coding, dict)
                    and str(coding.get("system", "")).rstrip("/") == RXNORM
                    and isinstance(coding.get("code"), str)
                ):
                    out.add(coding["code"])
        return out

    def display(self, code: str) -> str | None:
        """The RxNorm display of ``code`` (``CodeSystem/$lookup``), or None."""
        body = self._get("CodeSystem/$lookup", {"system": RXNORM, "code": code})
        for p in (body or {}).get("parameter") or []:
            if isinstance(p, dict) and p.get("name") == "display":
                value = p.get("valueString")
                return value if isinstance(value, str) else None
        return None


@dataclass(frozen=True)
class Resolved:
    """The ingredients found for one medication, and whether anything was coded or named."""

    ingredients: frozenset[str]
    described: bool


def _medication_of(order: Mapping[str, Any], drafts: Sequence[Mapping[str, Any]]) -> Any:
    ref = order.get("medicationReference")
    target = ref.get("reference") if isinstance(ref, dict) else None
    if not isinstance(target, str):
        return None
    if target.startswith("#"):
        for c in order.get("contained") or []:
            if isinstance(c, dict) and c.get("id") == target[1:]:
                return c
        return None
    for res in drafts:
        if f"{res.get('resourceType')}/{res.get('id')}" == target:
            return res
    return None


def resolve(
    concepts: Iterable[Any],
    kb: KnowledgeBase,
    terminology: TerminologyClient | None = None,
    *,
    codes: Iterable[str] = (),
    texts: Iterable[str | None] = (),
) -> Resolved:
    """Ingredients of CodeableConcepts plus ``system|code`` strings and free texts."""
    rx: set[str] = set()
    names: list[str] = [t for t in texts if t]
    for concept in concepts:
        rx |= _rx_codes(concept)
        names += _texts(concept)
    rx |= {c.split("|", 1)[1] for c in codes if str(c).rstrip("/").startswith(RXNORM + "|")}
    found = set(rx)
    for text in names:
        found |= kb.ingredients_named_in(text)
    if terminology is not None and not any(kb.knows(c) for c in found):
        # Only what the record could not resolve goes to the server (latency, and its load).
        for code in sorted(rx):
            if kb.knows(code):
                continue  # already an ingredient the packs use
            found |= terminology.translate(code)
            if not names:
                found |= kb.ingredients_named_in(terminology.display(code))
    return Resolved(frozenset(found), bool(rx or names))


def order_ingredients(
    order: Mapping[str, Any],
    kb: KnowledgeBase,
    terminology: TerminologyClient | None = None,
    drafts: Sequence[Mapping[str, Any]] = (),
) -> Resolved:
    """Ingredients of a drafted MedicationRequest (see the module docstring for the steps)."""
    concepts: list[Any] = [order.get("medicationCodeableConcept")]
    med = _medication_of(order, drafts)
    if isinstance(med, dict):
        concepts.append(med.get("code"))
        for ing in med.get("ingredient") or []:
            if isinstance(ing, dict):
                concepts.append(ing.get("itemCodeableConcept"))
    return resolve(concepts, kb, terminology)


def fact_ingredients(
    fact: Mapping[str, Any], kb: KnowledgeBase, terminology: TerminologyClient | None = None
) -> Resolved:
    """Ingredients of a medication or allergy fact of the unified record."""
    return resolve(
        (),
        kb,
        terminology,
        codes=[str(c) for c in fact.get("codes") or []],
        texts=[fact.get("display"), fact.get("text")],
    )
