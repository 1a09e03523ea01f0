"""The compiler's data: the ViewDefinition keys, the output column and compiled view, and the
values the FHIRPath translation passes around (see :mod:`.compiler`).
"""

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from medblocks_pipelines.lib.errors import ViewDefinitionError

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_DATE_TYPES = frozenset({"date", "dateTime", "instant"})
# Levels a repeat below the resource is unrolled to (the top-level repeat has no limit).
NESTED_REPEAT_DEPTH = 8
# A reference's key: the id after "<Type>/" (relative or absolute URL, _history stripped); the
# type must be a whole path segment. FHIR ids are [A-Za-z0-9-.]{1,64}.
_REF_KEY = r"(?:^|/){type}/([A-Za-z0-9\-\.]{{1,64}})(?:/_history/[^/]*)?$"

# The ViewDefinition constant value[x] types, with the FHIR type each stands for.
_CONSTANT_TYPES = {
    "valueBase64Binary": "base64Binary",
    "valueBoolean": "boolean",
    "valueCanonical": "canonical",
    "valueCode": "code",
    "valueDate": "date",
    "valueDateTime": "dateTime",
    "valueDecimal": "decimal",
    "valueId": "id",
    "valueInstant": "instant",
    "valueInteger": "integer",
    "valueInteger64": "integer64",
    "valueOid": "oid",
    "valueString": "string",
    "valuePositiveInt": "positiveInt",
    "valueTime": "time",
    "valueUnsignedInt": "unsignedInt",
    "valueUri": "uri",
    "valueUrl": "url",
    "valueUuid": "uuid",
}
_VIEW_KEYS = {
    "resourceType",
    "url",
    "identifier",
    "name",
    "title",
    "meta",
    "status",
    "experimental",
    "publisher",
    "contact",
    "description",
    "useContext",
    "copyright",
    "resource",
    "resourceVersion",
    "fhirVersion",
    "constant",
    "select",
    "where",
    "id",
    "text",
    "extension",
    "version",
    "date",
    "jurisdiction",
    "purpose",
    "profile",
}
_SELECT_KEYS = {
    "column",
    "select",
    "forEach",
    "forEachOrNull",
    "repeat",
    "unionAll",
    "id",
    "extension",
}
_COLUMN_KEYS = {"name", "path", "description", "collection", "type", "tag", "id", "extension"}


@dataclass(frozen=True)
class OutputColumn:
    """One column of a compiled view."""

    name: str
    sql_type: str
    fhir_type: str | None
    collection: bool = False
    description: str | None = None
    path: str | None = None


@dataclass(frozen=True)
class CompiledView:
    """A view compiled to DuckDB SQL; ``columns`` excludes the passthrough columns."""

    name: str
    resource: str
    sql: str
    columns: tuple[OutputColumn, ...]
    passthrough_columns: tuple[str, ...] = ()

    @property
    def column_names(self) -> list[str]:
        """Every output column name in order, passthrough first."""
        return [*self.passthrough_columns, *(c.name for c in self.columns)]


class _Spec:
    """The part of a type's JSON structure a view reads; becomes a ``from_json`` spec."""

    def __init__(self) -> None:
        self.fields: dict[str, tuple[_Spec | str, bool]] = {}

    def child(self, name: str, is_list: bool) -> "_Spec":
        found = self.fields.get(name)
        if found is not None and isinstance(found[0], _Spec):
            return found[0]
        if found is not None:
            raise ViewDefinitionError(f"element {name!r} is read both as a value and a structure")
        node = _Spec()
        self.fields[name] = (node, is_list)
        return node

    def leaf(self, name: str, sql: str, is_list: bool) -> None:
        found = self.fields.get(name)
        if found is None:
            self.fields[name] = (sql, is_list)
        elif isinstance(found[0], _Spec):
            raise ViewDefinitionError(f"element {name!r} is read both as a value and a structure")
        elif found[0] != sql and "VARCHAR" in (found[0], sql):
            # A decimal needed as written text (boundaries) is read as text everywhere.
            self.fields[name] = ("VARCHAR", is_list)

    def structure(self) -> Any:
        if not self.fields:
            # Only presence is tested (exists/empty): keep the JSON, parse nothing below it.
            return "JSON"
        out: dict[str, Any] = {}
        for name, (sub, is_list) in self.fields.items():
            inner = sub.structure() if isinstance(sub, _Spec) else sub
            out[name] = [inner] if is_list else inner
        return out


@dataclass(frozen=True)
class _Val:
    """A compiled FHIRPath value."""

    sql: str
    ftype: str
    many: bool = False
    spec: _Spec | None = None
    # A choice element used without ofType(): FHIR type -> concrete element name.
    choice: Mapping[str, str] | None = None
    choice_base: "_Val | None" = None
    # A decimal element: where to switch it to text, and the text expression, for boundaries.
    decimal_leaf: tuple[_Spec, str, bool] | None = None
    decimal_text: str | None = None
    # SQL of the element's JSON text, where the scan has it (the resource root only).
    raw: str | None = None
    is_resource: bool = False
    # Fusion hints, each valid only while its first item equals ``sql``:
    # chain = (sql, source list, accessor) for list_filter(list_transform(source, v -> v<acc>)),
    # so that a.b.c over a list is one transform, not three;
    # filtered = (sql, source list, var, condition) for list_filter(source, var -> condition),
    # so that where(...).exists() tests the condition without building the filtered list.
    chain: tuple[str, str, str] | None = None
    filtered: tuple[str, str, str, str] | None = None


@dataclass(frozen=True)
class _Ctx:
    focus: _Val
    root: _Val
    row_index: str
    # forEach element variables -> the same element in the text parse (exact decimals)
    shadow: tuple[tuple[str, str], ...] = ()


@dataclass
class _Part:
    """The rows of a select node.

    ``single`` holds the columns whose value is the same on every row of the node (plain SQL
    expressions); ``multi``, when the node can yield zero or several rows, is a list of row
    structs holding the other columns.
    """

    cols: list[OutputColumn]
    single: dict[str, str] | None = None
    multi: str | None = None


def _q(text: str) -> str:
    """A SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _empty(ftype: str = "empty") -> _Val:
    return _Val("NULL", ftype)
