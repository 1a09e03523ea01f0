"""Compile SQL on FHIR v2 ViewDefinitions to one DuckDB SELECT over landed JSON.

How it works (spec: https://build.fhir.org/ig/FHIR/sql-on-fhir-v2/):

* Each resource is parsed once with ``from_json(resource, <struct spec>)``. The struct spec holds
  only the elements the view reads, typed from the FHIR schema (lists where an element repeats,
  ``DECIMAL(38,18)`` for decimals (never through a float; exact text beside it with
  ``exact_decimals``, see :mod:`.exact_decimals`), ``BOOLEAN``/``BIGINT``/``VARCHAR`` otherwise).
  The spec is built while the FHIRPath is compiled and substituted at the end.
* A FHIRPath value is a SQL expression that is either a single value (NULL = empty) or a DuckDB
  list (the FHIRPath collection). Navigation over lists uses ``list_transform``/``flatten``,
  ``where`` is ``list_filter``, ``first()`` is ``[1]``.
* A select node that yields exactly one row per focus compiles to plain column expressions. Nodes
  that can yield several rows (``forEach``, ``forEachOrNull``, ``repeat``, ``unionAll``) compile to
  a list of row structs; siblings combine by a list cartesian product, ``unionAll`` is
  ``list_concat``, and the top level ``unnest``\\ s the list. ``%rowIndex`` is the lambda index.
* ``repeat`` walks the tree as JSON (so every depth has the same type) with a recursive CTE per
  resource, to any depth, in document order; below the resource (inside ``forEach``) the walk
  is unrolled to :data:`NESTED_REPEAT_DEPTH` levels and deeper data raises.

Invalid views raise :class:`~medblocks_pipelines.lib.errors.ViewDefinitionError` before any SQL
runs: structure, unknown elements and functions, non-boolean ``where``, union column mismatches.

Modules: :mod:`._model` (data types, ViewDefinition keys), :mod:`._translate` (FHIRPath
expressions), :mod:`._functions` (FHIRPath functions), :mod:`._plan` (repeat, columns, select
planning); this module validates the view and assembles the scan (:func:`compile_view`).
"""

from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

from medblocks_pipelines.lib.errors import ViewDefinitionError
from medblocks_pipelines.lib.warehouse.views import exact_decimals as exact
from medblocks_pipelines.lib.warehouse.views import fhirpath as fp
from medblocks_pipelines.lib.warehouse.views._model import (
    _CONSTANT_TYPES,
    _NAME,
    _VIEW_KEYS,
    NESTED_REPEAT_DEPTH,
    CompiledView,
    OutputColumn,
    _Ctx,
    _ident,
    _q,
    _Spec,
    _Val,
)
from medblocks_pipelines.lib.warehouse.views._plan import _Compiler
from medblocks_pipelines.lib.warehouse.views.schema import (
    DECIMAL_SQL,
    INTEGER_TYPES,
    load_schema,
)

__all__ = ["NESTED_REPEAT_DEPTH", "CompiledView", "OutputColumn", "compile_view"]


def _constants(raw: Any) -> dict[str, _Val]:
    out: dict[str, _Val] = {}
    if raw is None:
        return out
    if not isinstance(raw, list):
        raise ViewDefinitionError("'constant' must be a list")
    for item in raw:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ViewDefinitionError("each constant needs a name")
        name = item["name"]
        if not _NAME.match(name):
            raise ViewDefinitionError(f"invalid constant name {name!r}")
        values = [k for k in item if k.startswith("value")]
        if len(values) != 1 or values[0] not in _CONSTANT_TYPES:
            raise ViewDefinitionError(f"constant {name!r} needs exactly one supported value[x]")
        key = values[0]
        ftype = _CONSTANT_TYPES[key]
        value = item[key]
        if ftype == "boolean":
            if not isinstance(value, bool):
                raise ViewDefinitionError(f"constant {name!r}: valueBoolean must be a boolean")
            out[name] = _Val("true" if value else "false", ftype)
        elif ftype in INTEGER_TYPES:
            if isinstance(value, bool) or not isinstance(value, int | str):
                raise ViewDefinitionError(f"constant {name!r}: {key} must be an integer")
            out[name] = _Val(f"CAST({int(value)} AS BIGINT)", ftype)
        elif ftype == "decimal":
            if isinstance(value, bool) or not isinstance(value, int | float | Decimal | str):
                raise ViewDefinitionError(f"constant {name!r}: valueDecimal must be a number")
            out[name] = _Val(f"CAST({_q(str(Decimal(str(value))))} AS {DECIMAL_SQL})", ftype)
        else:
            if not isinstance(value, str):
                raise ViewDefinitionError(f"constant {name!r}: {key} must be a string")
            out[name] = _Val(_q(value), ftype)
    return out


def compile_view(
    view: Mapping[str, Any],
    *,
    table: str = "resources",
    passthrough_columns: Sequence[str] = (),
    resource_column: str = "resource",
    resource_type_column: str | None = "resource_type",
    strict_cardinality: bool = True,
    exact_decimals: bool = False,
) -> CompiledView:
    """Compile a ViewDefinition to DuckDB SQL over ``table``.

    ``table`` holds one resource per row: ``resource_column`` (JSON text) and, when
    ``resource_type_column`` is given, the resource type (used to filter; otherwise the JSON's
    ``resourceType`` is checked). ``passthrough_columns`` (provenance) are copied onto every
    output row, ahead of the view's columns. With ``strict_cardinality`` a non-collection column
    that meets several values raises at run time, as the specification requires. With
    ``exact_decimals`` every single-valued decimal column gets a ``<name>_text`` companion holding
    its digits beyond ``DECIMAL(38,18)`` (:mod:`.exact_decimals`; the warehouse build uses this).
    Raises ViewDefinitionError for an invalid view.
    """
    if not isinstance(view, Mapping) or not view:
        raise ViewDefinitionError("a ViewDefinition must be a non-empty JSON object")
    unknown = set(view) - _VIEW_KEYS
    if unknown:
        raise ViewDefinitionError(f"unknown ViewDefinition keys {sorted(unknown)}")
    resource = view.get("resource")
    schema = load_schema()
    if not isinstance(resource, str) or not resource:
        raise ViewDefinitionError("a ViewDefinition needs 'resource' (a FHIR resource type)")
    if resource not in schema.resources or not schema.has_type(resource):
        raise ViewDefinitionError(f"unknown resource type {resource!r}")
    selects = view.get("select")
    if not isinstance(selects, list) or not selects:
        raise ViewDefinitionError("a ViewDefinition needs a non-empty 'select' list")
    name = view.get("name") if isinstance(view.get("name"), str) else resource.lower()
    assert isinstance(name, str)

    comp = _Compiler(
        schema,
        resource,
        _constants(view.get("constant")),
        strict_cardinality,
        exact_decimals=exact_decimals,
    )
    root_spec = _Spec()
    # raw: the resource's JSON text in the scan (read again by repeat's recursive CTE)
    root = _Val(
        "__mb_r",
        resource,
        spec=root_spec,
        raw=f"__mb_t.{_ident(resource_column)}",
        is_resource=True,
    )
    ctx = _Ctx(focus=root, root=root, row_index="CAST(0 AS BIGINT)")
    part = comp.body({"select": selects}, ctx)

    conditions: list[str] = []
    wheres = view.get("where") or []
    if not isinstance(wheres, list):
        raise ViewDefinitionError("'where' must be a list")
    for w in wheres:
        if not isinstance(w, dict) or not isinstance(w.get("path"), str):
            raise ViewDefinitionError("each where needs a FHIRPath 'path' string")
        v = comp.expr(fp.parse(w["path"]), ctx)
        if v.ftype != "boolean":
            raise ViewDefinitionError(
                f"where path {w['path']!r} must return a boolean, returns {v.ftype}"
            )
        conditions.append(f"({comp.single(v, 'where')})")

    clash = {c.name for c in part.cols} & set(passthrough_columns)
    if clash:
        raise ViewDefinitionError(f"view columns clash with passthrough columns {sorted(clash)}")

    pass_sql = [f"__mb_src.{_ident(c)}" for c in passthrough_columns]
    src_cols = [
        *(_ident(c) for c in passthrough_columns),
        f"from_json({_ident(resource_column)}, {comp.placeholder(root_spec)}) AS __mb_r",
    ]
    if comp.shadow_used:
        # The same resource with numbers quoted and decimal leaves read as their source text
        # (exact decimal text columns).
        keys = None if comp.decimal_list else comp.decimal_names
        quoted = exact.quoted_numbers_sql(_ident(resource_column), keys)
        src_cols.append(
            f"from_json({quoted}, {comp.placeholder(root_spec, text=True)}) AS {exact.SHADOW_ROOT}"
        )
    src_cols.extend(f"{sql_} AS {alias}" for alias, sql_ in comp.hoisted)
    if resource_type_column is not None:
        filt = f"{_ident(resource_type_column)} = {_q(resource)}"
    else:
        filt = f"json_extract_string({_ident(resource_column)}, '$.resourceType') = {_q(resource)}"
    src = f"SELECT {', '.join(src_cols)} FROM {table} AS __mb_t WHERE {filt}"
    where_sql = f"\nWHERE {' AND '.join(conditions)}" if conditions else ""
    single = part.single or {}
    if part.multi is None:
        out = [*pass_sql, *(f"{single[c.name]} AS {_ident(c.name)}" for c in part.cols)]
        sql = f"SELECT {', '.join(out)}\nFROM ({src}) AS __mb_src{where_sql}"
    else:
        inner = [
            *pass_sql,
            *(f"{sql_} AS {_ident(n)}" for n, sql_ in single.items()),
            f"unnest({part.multi}) AS __mb_row",
        ]
        outer = [
            *(f"__mb_src.{_ident(c)}" for c in passthrough_columns),
            *(
                f"__mb_src.{_ident(c.name)}"
                if c.name in single
                else f"__mb_row.{_ident(c.name)} AS {_ident(c.name)}"
                for c in part.cols
            ),
        ]
        sql = (
            f"SELECT {', '.join(outer)}\nFROM (SELECT {', '.join(inner)}\n"
            f"FROM ({src}) AS __mb_src{where_sql}) AS __mb_src"
        )
    return CompiledView(
        name, resource, comp.finish(sql), tuple(part.cols), tuple(passthrough_columns)
    )
