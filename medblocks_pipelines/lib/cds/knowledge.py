"""Clinical knowledge for the CDS cards as cited, versioned packs (files, not code).

A pack is one JSON file (schema: ``packs/pack.schema.json``, generated from :class:`Pack`) with its
``id``, ``title``, ``version``, ``source`` (the citation), ``licence`` and any of:

* ``interactions``: drug-drug interactions between two groups of RxNorm ingredient codes, with the
  advice and the card indicator;
* ``allergy_groups``: drug classes where an allergy to one member warns on the others;
* ``value_sets``: code lists by OID (VSAC) for a card rule's ``purpose`` (``diabetes``, ``hba1c``).

The packs shipped in ``lib/cds/packs/`` hold only what could be cited and checked (each pack says
where its codes were checked). Operators add a licensed knowledge base as more pack files in a
folder named by ``MEDBLOCKS_CDS_PACKS_DIR``; ``MEDBLOCKS_CDS_DEFAULT_PACKS=0`` turns the shipped
packs off. A pack that does not load refuses the start (a clinician must never get silently less
checking than discovery promises).
"""

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from medblocks_pipelines.lib.errors import ConfigError
from medblocks_pipelines.lib.settings import Settings

PACKS_DIR = Path(__file__).parent / "packs"
PACKS_ENV = "MEDBLOCKS_CDS_PACKS_DIR"
DEFAULTS_ENV = "MEDBLOCKS_CDS_DEFAULT_PACKS"
SCHEMA_FILE = "pack.schema.json"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
ICD10_SYSTEMS = ("http://hl7.org/fhir/sid/icd-10-cm", "http://hl7.org/fhir/sid/icd-10")
PURPOSES = ("diabetes", "hba1c")
_CODE_RE = re.compile(r"^[0-9]{1,10}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Drug(_Strict):
    """One RxNorm ingredient (TTY IN): its code and the name used to read free text."""

    rxnorm: str = Field(description="RxNorm ingredient CUI")
    name: str = Field(min_length=2, description="ingredient name (lower case)")

    @field_validator("rxnorm")
    @classmethod
    def _digits(cls, value: str) -> str:
        if not _CODE_RE.match(value):
            raise ValueError("an RxNorm CUI is digits")
        return value


class DrugGroup(_Strict):
    """A named group of ingredients (one side of an interaction, or an allergy class)."""

    id: str
    name: str
    members: tuple[Drug, ...] = Field(min_length=1)


class Interaction(_Strict):
    """An interaction between any member of ``object`` and any member of ``precipitant``."""

    id: str
    object: DrugGroup
    precipitant: DrugGroup
    advice: str = Field(min_length=5, max_length=400)
    indicator: Literal["info", "warning", "critical"] = "warning"


class ValueSet(_Strict):
    """A value set by OID with its expansion (``system`` -> codes) and the rule it serves."""

    oid: str = Field(pattern=r"^[0-2](\.[0-9]+)+$")
    name: str
    purpose: Literal["diabetes", "hba1c"]
    expansion: str = Field(description="expansion version, e.g. 'eCQM Update 2025-05-08'")
    codes: dict[str, tuple[str, ...]]


class Pack(_Strict):
    """One knowledge pack file."""

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9.-]{1,63}$")
    title: str
    version: str
    source: str = Field(min_length=10, description="citation of the knowledge")
    url: str | None = None
    licence: str = Field(min_length=3)
    codes_checked_against: str = Field(
        min_length=10, description="where every code in the pack was checked"
    )
    omitted: tuple[str, ...] = Field(
        default=(), description="parts of the source left out, and why"
    )
    interactions: tuple[Interaction, ...] = ()
    allergy_groups: tuple[DrugGroup, ...] = ()
    value_sets: tuple[ValueSet, ...] = ()

    @property
    def label(self) -> str:
        """``title version``: what a card names as its knowledge."""
        return f"{self.title} {self.version}"

    def summary(self) -> dict[str, object]:
        """What discovery says of the pack (no codes)."""
        return {
            "id": self.id,
            "title": self.title,
            "version": self.version,
            "source": self.source,
            "licence": self.licence,
            "interactions": len(self.interactions),
            "allergyGroups": len(self.allergy_groups),
            "valueSets": [v.oid for v in self.value_sets],
        }


def pack_json_schema() -> dict[str, object]:
    """The JSON schema of a pack file (``packs/pack.schema.json`` is this, written out)."""
    return Pack.model_json_schema()


def load_pack(path: Path) -> Pack:
    """Read and validate one pack file; :class:`ConfigError` names the file and the fault."""
    try:
        return Pack.model_validate_json(path.read_bytes())
    except (OSError, ValidationError, ValueError) as exc:
        raise ConfigError(f"CDS knowledge pack {path.name} does not load: {exc}") from exc


@dataclass(frozen=True)
class InteractionHit:
    """An interaction found between two ingredients, and the pack that says so."""

    pack: Pack
    interaction: Interaction


@dataclass(frozen=True)
class ClassHit:
    """An allergy-class match, and the pack that defines the class."""

    pack: Pack
    group: DrugGroup


@dataclass
class KnowledgeBase:
    """The active packs, indexed for the card rules."""

    packs: tuple[Pack, ...] = ()
    _pairs: dict[frozenset[str], list[InteractionHit]] = field(default_factory=dict, repr=False)
    _classes: dict[str, list[ClassHit]] = field(default_factory=dict, repr=False)
    _names: dict[str, str] = field(default_factory=dict, repr=False)
    _known: set[str] = field(default_factory=set, repr=False)
    _name_re: re.Pattern[str] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        ids = [p.id for p in self.packs]
        if len(set(ids)) != len(ids):
            raise ConfigError(f"CDS knowledge packs with the same id: {sorted(ids)}")
        for pack in self.packs:
            for inter in pack.interactions:
                hit = InteractionHit(pack, inter)
                for a in inter.object.members:
                    self._name(a)
                    for b in inter.precipitant.members:
                        self._name(b)
                        self._pairs.setdefault(frozenset({a.rxnorm, b.rxnorm}), []).append(hit)
            for group in pack.allergy_groups:
                for m in group.members:
                    self._name(m)
                    self._classes.setdefault(m.rxnorm, []).append(ClassHit(pack, group))
        if self._names:
            alternatives = "|".join(
                re.escape(n) for n in sorted(self._names, key=len, reverse=True)
            )
            self._name_re = re.compile(rf"(?<![a-z0-9])({alternatives})(?![a-z0-9])")

    def _name(self, drug: Drug) -> None:
        self._names.setdefault(drug.name.lower(), drug.rxnorm)
        self._known.add(drug.rxnorm)

    # -- lookups --------------------------------------------------------------------------------
    def interactions(self, a: str, b: str) -> list[InteractionHit]:
        """Every interaction the packs state between ingredients ``a`` and ``b``."""
        return list(self._pairs.get(frozenset({a, b}), ()))

    def classes_of(self, ingredient: str) -> list[ClassHit]:
        """The allergy classes ``ingredient`` belongs to."""
        return list(self._classes.get(ingredient, ()))

    def ingredients_named_in(self, text: str | None) -> set[str]:
        """Ingredient codes whose name appears as a word in ``text`` (e.g. a clinical drug name)."""
        if not text or self._name_re is None:
            return set()
        return {self._names[m] for m in self._name_re.findall(text.lower())}

    def knows(self, ingredient: str) -> bool:
        """Whether any pack mentions this ingredient code."""
        return ingredient in self._known

    def value_set(self, purpose: str) -> tuple[Pack, ValueSet] | None:
        """The first active value set serving ``purpose``."""
        for pack in self.packs:
            for vs in pack.value_sets:
                if vs.purpose == purpose:
                    return pack, vs
        return None

    def in_value_set(self, purpose: str, codes: Iterable[str]) -> bool:
        """Whether any ``system|code`` is in the value set for ``purpose`` (ICD-10 dots ignored)."""
        found = self.value_set(purpose)
        if found is None:
            return False
        vs = found[1]
        for c in codes:
            system, _, code = str(c).partition("|")
            members = vs.codes.get(system.rstrip("/"))
            if members is None and system in ICD10_SYSTEMS:
                members = next((vs.codes[s] for s in ICD10_SYSTEMS if s in vs.codes), None)
                code = code.replace(".", "")
            elif system in ICD10_SYSTEMS:
                code = code.replace(".", "")
            if members is not None and code in members:
                return True
        return False

    @property
    def has_interactions(self) -> bool:
        """Whether any pack states interactions."""
        return bool(self._pairs)

    @property
    def has_allergy_classes(self) -> bool:
        """Whether any pack states allergy classes."""
        return bool(self._classes)

    def describe(self) -> list[dict[str, object]]:
        """Discovery's description of every active pack."""
        return [p.summary() for p in self.packs]

    def labels(self, kind: str) -> str:
        """``title version`` of the packs holding ``kind`` (interactions, allergy_groups)."""
        return "; ".join(p.label for p in self.packs if getattr(p, kind))


def load_knowledge(
    extra_dir: Path | None = None, *, include_defaults: bool = True
) -> KnowledgeBase:
    """The shipped packs (unless turned off) plus every ``*.json`` pack in ``extra_dir``."""
    paths: list[Path] = []
    if include_defaults:
        paths += sorted(p for p in PACKS_DIR.glob("*.json") if p.name != SCHEMA_FILE)
    if extra_dir is not None:
        if not extra_dir.is_dir():
            raise ConfigError(f"{PACKS_ENV} is not a folder")
        paths += sorted(p for p in extra_dir.glob("*.json") if p.name != SCHEMA_FILE)
    return KnowledgeBase(tuple(load_pack(p) for p in paths))


def knowledge_from_env(env: Mapping[str, str] | None = None) -> KnowledgeBase:
    """:func:`load_knowledge` as configured by ``MEDBLOCKS_CDS_PACKS_DIR`` / ``..._DEFAULT_PACKS``."""
    settings = Settings.from_env(env=env)
    return load_knowledge(settings.cds_packs_dir, include_defaults=settings.cds_default_packs)


def write_schema(path: Path = PACKS_DIR / SCHEMA_FILE) -> None:
    """Write the pack JSON schema (run after changing :class:`Pack`)."""
    path.write_text(json.dumps(pack_json_schema(), indent=2, sort_keys=True) + "\n")
