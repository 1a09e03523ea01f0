"""FHIR element facts the view compiler needs: names, types, cardinality, choice groups.

Loaded once from ``fhir_schema.json`` (generated from the ``fhir.resources`` models by
``_schema_gen.py``). R4B decides an element's shape (the data we land is R4); R5 only adds the
elements and types R4B lacks, so views using R5-only elements still compile.
"""

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

__all__ = [
    "DECIMAL_SQL",
    "INTEGER_TYPES",
    "PRIMITIVE_TYPES",
    "Element",
    "FhirSchema",
    "category",
    "load_schema",
    "sql_type",
]

_SCHEMA_FILE = Path(__file__).with_name("fhir_schema.json")

# Decimals are parsed by DuckDB straight from the JSON text into DECIMAL (never through a binary
# float): 18 places and 20 integer digits. Digits past that are kept by the exact_decimals text
# columns (exact_decimals.py).
DECIMAL_SQL = "DECIMAL(38,18)"

INTEGER_TYPES = frozenset({"integer", "positiveInt", "unsignedInt", "integer64"})
PRIMITIVE_TYPES = frozenset(
    {
        "boolean",
        "integer",
        "positiveInt",
        "unsignedInt",
        "integer64",
        "decimal",
        "string",
        "code",
        "id",
        "uri",
        "url",
        "canonical",
        "oid",
        "uuid",
        "markdown",
        "base64Binary",
        "date",
        "dateTime",
        "instant",
        "time",
        "xhtml",
    }
)


def sql_type(fhir_type: str) -> str:
    """The DuckDB type a FHIR primitive is read and emitted as."""
    if fhir_type == "boolean":
        return "BOOLEAN"
    if fhir_type in INTEGER_TYPES:
        return "BIGINT"
    if fhir_type == "decimal":
        return DECIMAL_SQL
    return "VARCHAR"


def category(fhir_type: str) -> str:
    """Comparison family of a type: bool, num, text, empty or complex."""
    if fhir_type == "boolean":
        return "bool"
    if fhir_type in INTEGER_TYPES or fhir_type == "decimal":
        return "num"
    if fhir_type == "empty":
        return "empty"
    if fhir_type in PRIMITIVE_TYPES:
        return "text"
    return "complex"


@dataclass(frozen=True)
class Element:
    """One element of a FHIR type."""

    name: str
    type: str
    is_list: bool
    choice_of: str | None = None


class FhirSchema:
    """Lookup over the generated element table."""

    def __init__(self, data: dict[str, object]) -> None:
        types = data["types"]
        assert isinstance(types, dict)
        self._types: dict[str, dict[str, list[object]]] = types
        resources = data["resources"]
        assert isinstance(resources, list)
        self.resources: frozenset[str] = frozenset(str(r) for r in resources)

    def has_type(self, name: str) -> bool:
        """True for a known complex type (resource, datatype or backbone element)."""
        return name in self._types

    def element(self, type_name: str, name: str) -> Element | None:
        """The element ``name`` of ``type_name``, or None when it does not exist."""
        entry = self._types.get(type_name, {}).get(name)
        if entry is None:
            return None
        choice = str(entry[2]) if len(entry) > 2 else None
        return Element(name, str(entry[0]), bool(entry[1]), choice)

    def choices(self, type_name: str, base: str) -> dict[str, str]:
        """For a choice element ``base`` (``value[x]``): FHIR type -> concrete element name."""
        out: dict[str, str] = {}
        for ename, entry in self._types.get(type_name, {}).items():
            if len(entry) > 2 and entry[2] == base:
                out[str(entry[0])] = ename
        return out


@cache
def load_schema() -> FhirSchema:
    """The shipped schema (cached)."""
    return FhirSchema(json.loads(_SCHEMA_FILE.read_text()))
