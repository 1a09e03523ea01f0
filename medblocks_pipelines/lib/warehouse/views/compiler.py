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
"""

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any

from medblocks_pipelines.lib.errors import ViewDefinitionError
from medblocks_pipelines.lib.warehouse.views import exact_decimals as exact
from medblocks_pipelines.lib.warehouse.views import fhirpath as fp
from medblocks_pipelines.lib.warehouse.views.schema import (
    DECIMAL_SQL,
    INTEGER_TYPES,
    PRIMITIVE_TYPES,
    FhirSchema,
    category,
    load_schema,
    sql_type,
)

__all__ = ["CompiledView", "OutputColumn", "compile_view"]

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
    # forEach element variables -> the same element in the fine-scale parse (exact decimals)
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


@dataclass
class _Compiler:
    schema: FhirSchema
    resource: str
    constants: dict[str, _Val] = field(default_factory=dict)
    strict_cardinality: bool = True
    exact_decimals: bool = False
    shadow_used: bool = False
    counter: int = 0
    specs: list[_Spec] = field(default_factory=list)
    # Subqueries computed once per resource in the scan (repeat), as (alias, sql).
    hoisted: list[tuple[str, str]] = field(default_factory=list)

    # ---- helpers -------------------------------------------------------------------------
    def var(self, prefix: str = "v") -> str:
        self.counter += 1
        return f"_{prefix}{self.counter}"

    def placeholder(self, spec: _Spec, *, fine: bool = False) -> str:
        self.specs.append(spec)
        return f"\x00SPEC{'F' if fine else ''}{len(self.specs) - 1}\x00"

    def finish(self, sql: str) -> str:
        def sub(m: re.Match[str]) -> str:
            structure = json.dumps(self.specs[int(m.group(2))].structure(), separators=(",", ":"))
            return _q(exact.fine_structure(structure) if m.group(1) else structure)

        return re.sub("\x00SPEC(F?)(\\d+)\x00", sub, sql)

    def single(self, v: _Val, what: str) -> str:
        """SQL of a value that must be a single item (FHIRPath singleton evaluation)."""
        if v.choice is not None:
            raise ViewDefinitionError(f"{what}: choice element needs ofType(<type>)")
        if not v.many:
            return v.sql
        if not self.strict_cardinality:
            return f"({v.sql})[1]"
        return (
            f"(CASE WHEN len({v.sql}) > 1 THEN error({_q(what + ': more than one value')}) "
            f"ELSE ({v.sql})[1] END)"
        )

    def as_list(self, v: _Val) -> str:
        if v.many:
            return v.sql
        if v.sql == "NULL":
            return "[]"
        var = self.var()
        return f"list_filter([{v.sql}], lambda {var}: {var} IS NOT NULL)"

    # ---- navigation ----------------------------------------------------------------------
    def member(self, base: _Val, name: str) -> _Val:
        if base.choice is not None:
            raise ViewDefinitionError(
                f"element {name!r} read from a choice element without ofType(<type>)"
            )
        if base.ftype == "empty":
            return _empty()
        if base.ftype in PRIMITIVE_TYPES:
            raise ViewDefinitionError(f"primitive type {base.ftype} has no element {name!r}")
        if base.ftype == "Resource":
            raise ViewDefinitionError("contained/polymorphic resources are not supported in views")
        element = self.schema.element(base.ftype, name)
        if element is not None:
            return self.navigate(base, element.name, element.type, element.is_list)
        choices = self.schema.choices(base.ftype, name)
        if choices:
            return _Val("", "choice", base.many, choice=choices, choice_base=base)
        raise ViewDefinitionError(f"unknown element {name!r} on {base.ftype}")

    def navigate(self, base: _Val, name: str, ftype: str, is_list: bool) -> _Val:
        assert base.spec is not None
        child: _Spec | None = None
        if ftype in PRIMITIVE_TYPES:
            base.spec.leaf(name, sql_type(ftype), is_list)
        else:
            child = base.spec.child(name, is_list)
        key = _ident(name)
        chain: tuple[str, str, str] | None = None
        if not base.many:
            sql = f"({base.sql}).{key}"
            many = is_list
        else:
            v = self.var()
            if base.chain is not None and base.chain[0] == base.sql:
                source, accessor = base.chain[1], base.chain[2] + "." + key
            else:
                source, accessor = base.sql, "." + key
            if is_list:
                sql = f"flatten(list_transform({source}, lambda {v}: {v}{accessor}))"
            else:
                w = self.var()
                sql = (
                    f"list_filter(list_transform({source}, lambda {v}: {v}{accessor}), "
                    f"lambda {w}: {w} IS NOT NULL)"
                )
                chain = (sql, source, accessor)
            many = True
        if ftype == "decimal":
            target = DECIMAL_SQL + ("[]" if many else "")
            return _Val(
                f"CAST({sql} AS {target})",
                ftype,
                many,
                decimal_leaf=(base.spec, name, is_list),
                decimal_text=sql,
            )
        return _Val(sql, ftype, many, spec=child, chain=chain)

    def type_matches(self, want: str, have: str) -> bool:
        want = want.removeprefix("FHIR.").removeprefix("System.")
        return want == have or want[:1].lower() + want[1:] == have

    def of_type(self, base: _Val, type_name: str) -> _Val:
        if base.choice is not None:
            assert base.choice_base is not None
            for ftype, ename in base.choice.items():
                if self.type_matches(type_name, ftype):
                    return self.member(base.choice_base, ename)
            return _empty()
        if base.ftype == "Resource":
            raise ViewDefinitionError("ofType() on contained resources is not supported")
        if self.type_matches(type_name, base.ftype) or (
            base.is_resource and type_name == base.ftype
        ):
            return base
        return _empty()

    # ---- expressions ---------------------------------------------------------------------
    def expr(self, node: fp.Node, ctx: _Ctx) -> _Val:
        if isinstance(node, fp.Literal):
            return self.literal(node)
        if isinstance(node, fp.This):
            return ctx.focus
        if isinstance(node, fp.Var):
            if node.name == "rowIndex":
                return _Val(ctx.row_index, "integer")
            if node.name in ("resource", "rootResource"):
                return ctx.root
            if node.name == "context":
                return ctx.focus
            if node.name not in self.constants:
                raise ViewDefinitionError(f"undefined constant %{node.name}")
            return self.constants[node.name]
        if isinstance(node, fp.Member):
            if node.base is None:
                focus = ctx.focus
                if focus.is_resource and node.name == focus.ftype:
                    return focus
                return self.member(focus, node.name)
            return self.member(self.expr(node.base, ctx), node.name)
        if isinstance(node, fp.Call):
            base = ctx.focus if node.base is None else self.expr(node.base, ctx)
            return self.call(base, node, ctx)
        if isinstance(node, fp.Index):
            base = self.expr(node.base, ctx)
            idx = self.expr(node.index, ctx)
            if category(idx.ftype) != "num":
                raise ViewDefinitionError("an indexer needs an integer")
            i = self.single(idx, "indexer")
            if base.many:
                return replace(
                    base,
                    sql=f"({base.sql})[({i}) + 1]",
                    many=False,
                    decimal_leaf=None,
                    decimal_text=None,
                )
            return replace(base, sql=f"(CASE WHEN ({i}) = 0 THEN {base.sql} END)")
        if isinstance(node, fp.Unary):
            v = self.expr(node.operand, ctx)
            if category(v.ftype) != "num":
                raise ViewDefinitionError(f"unary {node.op} needs a number")
            s = self.single(v, "unary operator")
            return _Val(f"(-({s}))" if node.op == "-" else s, v.ftype)
        if isinstance(node, fp.TypeOp):
            v = self.expr(node.operand, ctx)
            res = self.of_type(v, node.type_name)
            if node.op == "as":
                return res
            return _Val(f"({self.single(res, 'is')} IS NOT NULL)", "boolean")
        if isinstance(node, fp.Binary):
            return self.binary(node, ctx)
        raise ViewDefinitionError(f"unsupported FHIRPath construct {type(node).__name__}")

    def literal(self, node: fp.Literal) -> _Val:
        if node.kind == "empty":
            return _empty()
        if node.kind == "boolean":
            return _Val("true" if node.value else "false", "boolean")
        if node.kind == "integer":
            return _Val(f"CAST({int(node.value)} AS BIGINT)", "integer")  # type: ignore[call-overload]
        if node.kind == "decimal":
            return _Val(f"CAST({_q(str(node.value))} AS {DECIMAL_SQL})", "decimal")
        return _Val(_q(str(node.value)), "string" if node.kind == "string" else node.kind)

    def bool_operand(self, v: _Val, op: str) -> str:
        if v.ftype == "empty":
            return "CAST(NULL AS BOOLEAN)"
        if v.ftype != "boolean":
            raise ViewDefinitionError(f"operator {op!r} needs boolean operands, got {v.ftype}")
        return self.single(v, f"operator {op}")

    def binary(self, node: fp.Binary, ctx: _Ctx) -> _Val:
        op = node.op
        left = self.expr(node.left, ctx)
        right = self.expr(node.right, ctx)
        if op in ("and", "or", "xor", "implies"):
            a, b = self.bool_operand(left, op), self.bool_operand(right, op)
            if op == "and":
                return _Val(f"(({a}) AND ({b}))", "boolean")
            if op == "or":
                return _Val(f"(({a}) OR ({b}))", "boolean")
            if op == "xor":
                return _Val(f"(({a}) <> ({b}))", "boolean")
            # FHIRPath implies: false implies x = true; empty implies true = true.
            return _Val(f"((NOT ({a})) OR ({b}))", "boolean")
        if op in ("=", "!=", "~", "!~"):
            return self.equality(op, left, right)
        if op in ("<", ">", "<=", ">="):
            ca, cb = category(left.ftype), category(right.ftype)
            if "empty" in (ca, cb):
                return _Val("CAST(NULL AS BOOLEAN)", "boolean")
            if ca != cb or ca not in ("num", "text"):
                raise ViewDefinitionError(
                    f"cannot compare {left.ftype} with {right.ftype} using {op!r}"
                )
            a = self.single(left, f"operator {op}")
            b = self.single(right, f"operator {op}")
            if left.ftype in _DATE_TYPES and right.ftype in _DATE_TYPES:
                return _Val(self.date_compare(a, b, op), "boolean")
            return _Val(f"(({a}) {op} ({b}))", "boolean")
        if op in ("+", "-", "*", "/", "div", "mod", "&"):
            return self.arithmetic(op, left, right)
        if op == "|":
            return self.union(left, right)
        if op in ("in", "contains"):
            item, coll = (left, right) if op == "in" else (right, left)
            x = self.single(item, f"operator {op}")
            return _Val(
                f"(CASE WHEN ({x}) IS NULL THEN NULL "
                f"ELSE coalesce(list_contains({self.as_list(coll)}, {x}), false) END)",
                "boolean",
            )
        raise ViewDefinitionError(f"unsupported operator {op!r}")

    def equality(self, op: str, left: _Val, right: _Val) -> _Val:
        ca, cb = category(left.ftype), category(right.ftype)
        if "complex" in (ca, cb) or left.choice is not None or right.choice is not None:
            raise ViewDefinitionError(
                f"equality on complex values ({left.ftype}, {right.ftype}) is not supported"
            )
        negate = op in ("!=", "!~")
        if "empty" in (ca, cb):
            return _Val("CAST(NULL AS BOOLEAN)", "boolean")
        if op in ("~", "!~"):
            a = self.single(left, "operator ~")
            b = self.single(right, "operator ~")
            if ca == "text" and cb == "text":
                a, b = f"lower(trim({a}))", f"lower(trim({b}))"
            sql = f"coalesce(({a}) = ({b}), ({a}) IS NULL AND ({b}) IS NULL)"
            return _Val(f"(NOT {sql})" if negate else f"({sql})", "boolean")
        if ca != cb:
            a = self.as_list(left) if left.many else left.sql
            b = self.as_list(right) if right.many else right.sql
            # Different kinds of value are never equal (FHIRPath 6.1.1); empty stays empty.
            sql = f"(CASE WHEN ({a}) IS NULL OR ({b}) IS NULL THEN NULL ELSE false END)"
        elif left.many or right.many:
            la, lb = self.as_list(left), self.as_list(right)
            sql = (
                f"(CASE WHEN coalesce(len({la}), 0) = 0 OR coalesce(len({lb}), 0) = 0 "
                f"THEN NULL ELSE ({la}) = ({lb}) END)"
            )
        elif left.ftype in _DATE_TYPES and right.ftype in _DATE_TYPES:
            sql = self.date_compare(left.sql, right.sql, "=")
        else:
            sql = f"(({left.sql}) = ({right.sql}))"
        return _Val(f"(NOT {sql})" if negate else sql, "boolean")

    @staticmethod
    def date_compare(a: str, b: str, op: str) -> str:
        """FHIRPath date/time comparison on ISO text (FHIRPath 6.1.1, 6.2).

        Two values with a time of day compare as instants (time zones honoured); values of the
        same precision compare as text; different precisions compare on the common date part,
        and are unknown (empty) when that part is equal.
        """
        n = f"least(length({a}), length({b}), 10)"
        return (
            f"(CASE WHEN ({a}) IS NULL OR ({b}) IS NULL THEN NULL "
            f"WHEN length({a}) >= 19 AND length({b}) >= 19 "
            f"THEN TRY_CAST({a} AS TIMESTAMPTZ) {op} TRY_CAST({b} AS TIMESTAMPTZ) "
            f"WHEN length({a}) = length({b}) THEN ({a}) {op} ({b}) "
            f"WHEN substr({a}, 1, {n}) = substr({b}, 1, {n}) THEN NULL "
            f"ELSE substr({a}, 1, {n}) {op} substr({b}, 1, {n}) END)"
        )

    def arithmetic(self, op: str, left: _Val, right: _Val) -> _Val:
        ca, cb = category(left.ftype), category(right.ftype)
        a = self.single(left, f"operator {op}")
        b = self.single(right, f"operator {op}")
        if op == "&":
            if "num" in (ca, cb) or "bool" in (ca, cb):
                raise ViewDefinitionError("operator & needs strings")
            return _Val(f"(coalesce({a}, '') || coalesce({b}, ''))", "string")
        if "empty" in (ca, cb):
            return _empty()
        if ca == "text" and cb == "text" and op == "+":
            return _Val(f"(({a}) || ({b}))", "string")
        if ca != "num" or cb != "num":
            raise ViewDefinitionError(
                f"operator {op!r} needs numbers, got {left.ftype} and {right.ftype}"
            )
        ints = left.ftype in INTEGER_TYPES and right.ftype in INTEGER_TYPES
        if op in ("div", "mod"):
            fn = "//" if op == "div" else "%"
            if ints:
                return _Val(f"(CASE WHEN ({b}) = 0 THEN NULL ELSE ({a}) {fn} ({b}) END)", "integer")
            expr = (
                f"trunc(CAST({a} AS DOUBLE) / CAST({b} AS DOUBLE))"
                if op == "div"
                else f"(CAST({a} AS {DECIMAL_SQL}) % CAST({b} AS {DECIMAL_SQL}))"
            )
            return _Val(
                f"(CASE WHEN ({b}) = 0 THEN NULL ELSE CAST({expr} AS "
                f"{'BIGINT' if op == 'div' else DECIMAL_SQL}) END)",
                "integer" if op == "div" else "decimal",
            )
        if ints and op != "/":
            return _Val(f"(({a}) {op} ({b}))", "integer")
        if op == "*":
            # DECIMAL(38,18) * DECIMAL(38,18) has scale 36 and overflows at 100; scale 9 each
            # keeps an exact product with 18 places.
            return _Val(
                f"CAST(CAST({a} AS DECIMAL(38,9)) * CAST({b} AS DECIMAL(38,9)) AS {DECIMAL_SQL})",
                "decimal",
            )
        if op == "/":
            return _Val(
                f"(CASE WHEN ({b}) = 0 THEN NULL ELSE CAST(CAST({a} AS {DECIMAL_SQL}) / "
                f"CAST({b} AS {DECIMAL_SQL}) AS {DECIMAL_SQL}) END)",
                "decimal",
            )
        return _Val(
            f"CAST(CAST({a} AS {DECIMAL_SQL}) {op} CAST({b} AS {DECIMAL_SQL}) AS {DECIMAL_SQL})",
            "decimal",
        )

    def union(self, left: _Val, right: _Val) -> _Val:
        if left.ftype == "empty":
            return right if right.many else replace(right, sql=self.as_list(right), many=True)
        if right.ftype == "empty":
            return left if left.many else replace(left, sql=self.as_list(left), many=True)
        ca, cb = category(left.ftype), category(right.ftype)
        if "complex" in (ca, cb) and left.spec is not right.spec:
            raise ViewDefinitionError("union (|) of complex values is not supported")
        if ca != cb:
            raise ViewDefinitionError(f"union (|) of {left.ftype} and {right.ftype}")
        ftype = (
            left.ftype if left.ftype == right.ftype else ("decimal" if ca == "num" else "string")
        )
        both = f"list_concat({self.as_list(left)}, {self.as_list(right)})"
        u, x, i = self.var("u"), self.var(), self.var("i")
        # Union removes duplicates but keeps the first occurrence's order (list_distinct does not).
        sql = (
            f"list_transform([{both}], lambda {u}: list_filter({u}, lambda {x}, {i}: "
            f"list_position({u}, {x}) = {i}))[1]"
        )
        return _Val(sql, ftype, True, spec=left.spec)

    # ---- functions -----------------------------------------------------------------------
    def call(self, base: _Val, node: fp.Call, ctx: _Ctx) -> _Val:
        name = node.name
        handler: Callable[[_Val, tuple[fp.Node, ...], _Ctx], _Val] | None = getattr(
            self, f"fn_{name}", None
        )
        if handler is None:
            raise ViewDefinitionError(f"unknown or unsupported FHIRPath function {name}()")
        return handler(base, node.args, ctx)

    def nargs(self, name: str, args: tuple[fp.Node, ...], lo: int, hi: int) -> None:
        if not lo <= len(args) <= hi:
            raise ViewDefinitionError(f"{name}() takes {lo}..{hi} arguments, got {len(args)}")

    def type_arg(self, name: str, arg: fp.Node) -> str:
        parts: list[str] = []
        node: fp.Node | None = arg
        while isinstance(node, fp.Member):
            parts.append(node.name)
            node = node.base
        if node is not None or not parts:
            if isinstance(arg, fp.Literal) and arg.kind == "string":
                return str(arg.value)
            raise ViewDefinitionError(f"{name}() needs a type name")
        return ".".join(reversed(parts))

    def elem_ctx(self, base: _Val, ctx: _Ctx, var: str) -> _Ctx:
        return replace(
            ctx,
            focus=replace(
                base,
                sql=var,
                many=False,
                decimal_leaf=None,
                decimal_text=None if base.decimal_text is None else var,
            ),
        )

    def criteria(self, base: _Val, arg: fp.Node, ctx: _Ctx, what: str) -> tuple[str, str]:
        """(lambda var, SQL boolean) of a criteria evaluated per element of ``base``."""
        v = self.var()
        crit = self.expr(arg, self.elem_ctx(base, ctx, v))
        if crit.ftype not in ("boolean", "empty"):
            raise ViewDefinitionError(f"{what}() criteria must be boolean, got {crit.ftype}")
        return v, self.bool_operand(crit, what)

    def fn_where(self, base: _Val, args: tuple[fp.Node, ...], ctx: _Ctx) -> _Val:
        self.nargs("where", args, 1, 1)
        if base.choice is not None:
            raise ViewDefinitionError("where() on a choice element needs ofType(<type>) first")
        v, cond = self.criteria(base, args[0], ctx, "where")
        if base.many:
            sql = f"list_filter({base.sql}, lambda {v}: {cond})"
            return replace(base, sql=sql, decimal_leaf=None, filtered=(sql, base.sql, v, cond))
        # A single value: bind it through a one-element list so the criteria can name it.
        return replace(
            base, sql=f"list_filter([{base.sql}], lambda {v}: {cond})[1]", decimal_leaf=None
        )

    def fn_exists(self, base: _Val, args: tuple[fp.Node, ...], ctx: _Ctx) -> _Val:
        self.nargs("exists", args, 0, 1)
        if args:
            base = self.fn_where(base, args, ctx)
        return _Val(self.exists_sql(base), "boolean")

    def exists_sql(self, base: _Val) -> str:
        if base.choice is not None:
            assert base.choice_base is not None
            parts = [
                self.exists_sql(self.member(base.choice_base, e)) for e in base.choice.values()
            ]
            return "(" + " OR ".join(parts) + ")"
        if base.ftype == "empty":
            return "false"
        if base.filtered is not None and base.filtered[0] == base.sql:
            _sql, source, v, cond = base.filtered
            return f"coalesce(list_bool_or(list_transform({source}, lambda {v}: {cond})), false)"
        if base.many:
            return f"(coalesce(len({base.sql}), 0) > 0)"
        return f"(({base.sql}) IS NOT NULL)"

    def fn_empty(self, base: _Val, args: tuple[fp.Node, ...], ctx: _Ctx) -> _Val:
        self.nargs("empty", args, 0, 0)
        return _Val(f"(NOT {self.exists_sql(base)})", "boolean")

    def fn_hasValue(self, base: _Val, args: tuple[fp.Node, ...], ctx: _Ctx) -> _Val:  # noqa: N802
        self.nargs("hasValue", args, 0, 0)
        return _Val(self.exists_sql(base), "boolean")

    def fn_count(self, base: _Val, args: tuple[fp.Node, ...], ctx: _Ctx) -> _Val:
        self.nargs("count", args, 0, 0)
        if base.many:
            return _Val(f"CAST(coalesce(len({base.sql}), 0) AS BIGINT)", "integer")
        return _Val(f"CAST(({base.sql}) IS NOT NULL AS BIGINT)", "integer")

    def fn_all(self, base: _Val, args: tuple[fp.Node, ...], ctx: _Ctx) -> _Val:
        self.nargs("all", args, 1, 1)
        v, cond = self.criteria(base, args[0], ctx, "all")
        lst = self.as_list(base)
        return _Val(
            f"(coalesce(len(list_filter({lst}, lambda {v}: NOT coalesce({cond}, false))), 0) = 0)",
            "boolean",
        )

    def fn_first(self, base: _Val, args: tuple[fp.Node, ...], ctx: _Ctx) -> _Val:
        self.nargs("first", args, 0, 0)
        if not base.many:
            return base
        if base.chain is not None and base.chain[0] == base.sql:
            # Most lists have the value on their first element: try that before building the
            # filtered list (coalesce evaluates its second argument only where the first is NULL).
            _sql, source, accessor = base.chain
            return self.pick(base, f"coalesce(({source})[1]{accessor}, ({base.sql})[1])")
        return self.pick(base, f"({base.sql})[1]")

    def fn_last(self, base: _Val, args: tuple[fp.Node, ...], ctx: _Ctx) -> _Val:
        self.nargs("last", args, 0, 0)
        if not base.many:
            return base
        return self.pick(base, f"({base.sql})[-1]")

    def fn_single(self, base: _Val, args: tuple[fp.Node, ...], ctx: _Ctx) -> _Val:
        self.nargs("single", args, 0, 0)
        return self.pick(base, self.single(base, "single()"))

    def pick(self, base: _Val, sql: str) -> _Val:
        text = None
        if base.decimal_text is not None:
            text = sql.replace(base.sql, base.decimal_text)
        return replace(base, sql=sql, many=False, decimal_text=text)

    def fn_tail(self, base: _Val, args: tuple[fp.Node, ...], ctx: _Ctx) -> _Val:
        self.nargs("tail", args, 0, 0)
        return replace(base, sql=f"({self.as_list(base)})[2:]", many=True, decimal_leaf=None)

    def fn_skip(self, base: _Val, args: tuple[fp.Node, ...], ctx: _Ctx) -> _Val:
        self.nargs("skip", args, 1, 1)
        n = self.single(self.expr(args[0], ctx), "skip()")
        return replace(
            base, sql=f"({self.as_list(base)})[({n}) + 1:]", many=True, decimal_leaf=None
        )

    def fn_take(self, base: _Val, args: tuple[fp.Node, ...], ctx: _Ctx) -> _Val:
        self.nargs("take", args, 1, 1)
        n = self.single(self.expr(args[0], ctx), "take()")
        return replace(base, sql=f"({self.as_list(base)})[:{n}]", many=True, decimal_leaf=None)

    def fn_distinct(self, base: _Val, args: tuple[fp.Node, ...], ctx: _Ctx) -> _Val:
        self.nargs("distinct", args, 0, 0)
        u, x, i = self.var("u"), self.var(), self.var("i")
        sql = (
            f"list_transform([{self.as_list(base)}], lambda {u}: list_filter({u}, "
            f"lambda {x}, {i}: list_position({u}, {x}) = {i}))[1]"
        )
        return replace(base, sql=sql, many=True)

    def fn_select(self, base: _Val, args: tuple[fp.Node, ...], ctx: _Ctx) -> _Val:
        self.nargs("select", args, 1, 1)
        v = self.var()
        proj = self.expr(args[0], self.elem_ctx(base, ctx, v))
        if proj.choice is not None:
            raise ViewDefinitionError("select() projecting a choice element needs ofType()")
        if not base.many:
            return replace(
                proj,
                sql=f"list_transform([{base.sql}], lambda {v}: {proj.sql})[1]"
                if not proj.many
                else f"flatten(list_transform([{base.sql}], lambda {v}: {proj.sql}))",
                decimal_leaf=None,
                decimal_text=None,
            )
        if proj.many:
            sql = f"flatten(list_transform({base.sql}, lambda {v}: {proj.sql}))"
        else:
            w = self.var()
            sql = (
                f"list_filter(list_transform({base.sql}, lambda {v}: {proj.sql}), "
                f"lambda {w}: {w} IS NOT NULL)"
            )
        return replace(proj, sql=sql, many=True, decimal_leaf=None, decimal_text=None)

    def fn_ofType(self, base: _Val, args: tuple[fp.Node, ...], ctx: _Ctx) -> _Val:  # noqa: N802
        self.nargs("ofType", args, 1, 1)
        return self.of_type(base, self.type_arg("ofType", args[0]))

    def fn_as(self, base: _Val, args: tuple[fp.Node, ...], ctx: _Ctx) -> _Val:
        self.nargs("as", args, 1, 1)
        return self.of_type(base, self.type_arg("as", args[0]))

    def fn_is(self, base: _Val, args: tuple[fp.Node, ...], ctx: _Ctx) -> _Val:
        self.nargs("is", args, 1, 1)
        res = self.of_type(base, self.type_arg("is", args[0]))
        return _Val(self.exists_sql(res), "boolean")

    def fn_extension(self, base: _Val, args: tuple[fp.Node, ...], ctx: _Ctx) -> _Val:
        self.nargs("extension", args, 1, 1)
        url = self.expr(args[0], ctx)
        if category(url.ftype) != "text":
            raise ViewDefinitionError("extension() needs a URL string")
        ext = self.member(base, "extension")
        assert ext.spec is not None
        ext.spec.leaf("url", "VARCHAR", False)
        v = self.var()
        u = self.single(url, "extension()")
        return replace(ext, sql=f'list_filter({ext.sql}, lambda {v}: {v}."url" = {u})')

    def fn_not(self, base: _Val, args: tuple[fp.Node, ...], ctx: _Ctx) -> _Val:
        self.nargs("not", args, 0, 0)
        return _Val(f"(NOT ({self.bool_operand(base, 'not()')}))", "boolean")

    def fn_iif(self, base: _Val, args: tuple[fp.Node, ...], ctx: _Ctx) -> _Val:
        self.nargs("iif", args, 2, 3)
        cond = self.bool_operand(self.expr(args[0], ctx), "iif()")
        a = self.expr(args[1], ctx)
        b = self.expr(args[2], ctx) if len(args) == 3 else _empty(a.ftype)
        if category(a.ftype) != category(b.ftype) and "empty" not in (
            category(a.ftype),
            category(b.ftype),
        ):
            raise ViewDefinitionError("iif() branches must have the same type")
        sa, sb = self.single(a, "iif()"), self.single(b, "iif()")
        ftype = a.ftype if a.ftype != "empty" else b.ftype
        return _Val(f"(CASE WHEN {cond} THEN {sa} ELSE {sb} END)", ftype)

    def fn_join(self, base: _Val, args: tuple[fp.Node, ...], ctx: _Ctx) -> _Val:
        self.nargs("join", args, 0, 1)
        sep = "''"
        if args:
            sep_val = self.expr(args[0], ctx)
            if category(sep_val.ftype) != "text":
                raise ViewDefinitionError("join() separator must be a string")
            sep = self.single(sep_val, "join()")
        lst = self.as_list(base)
        if category(base.ftype) not in ("text", "empty"):
            j = self.var()
            lst = f"list_transform({lst}, lambda {j}: CAST({j} AS VARCHAR))"
        return _Val(f"coalesce(array_to_string({lst}, {sep}), '')", "string")

    def string_fn(
        self,
        base: _Val,
        args: tuple[fp.Node, ...],
        ctx: _Ctx,
        name: str,
        n: int,
        build: Callable[..., str],
        ftype: str,
    ) -> _Val:
        self.nargs(name, args, n, n)
        if category(base.ftype) not in ("text", "empty"):
            raise ViewDefinitionError(f"{name}() needs a string, got {base.ftype}")
        s = self.single(base, f"{name}()")
        params = [self.single(self.expr(a, ctx), f"{name}()") for a in args]
        return _Val(build(s, *params), ftype)

    def fn_startsWith(self, base: _Val, args: tuple[fp.Node, ...], ctx: _Ctx) -> _Val:  # noqa: N802
        return self.string_fn(
            base, args, ctx, "startsWith", 1, lambda s, p: f"starts_with({s}, {p})", "boolean"
        )

    def fn_endsWith(self, base: _Val, args: tuple[fp.Node, ...], ctx: _Ctx) -> _Val:  # noqa: N802
        return self.string_fn(
            base, args, ctx, "endsWith", 1, lambda s, p: f"suffix({s}, {p})", "boolean"
        )

    def fn_contains(self, base: _Val, args: tuple[fp.Node, ...], ctx: _Ctx) -> _Val:
        return self.string_fn(
            base, args, ctx, "contains", 1, lambda s, p: f"contains({s}, {p})", "boolean"
        )

    def fn_lower(self, base: _Val, args: tuple[fp.Node, ...], ctx: _Ctx) -> _Val:
        return self.string_fn(base, args, ctx, "lower", 0, lambda s: f"lower({s})", "string")

    def fn_upper(self, base: _Val, args: tuple[fp.Node, ...], ctx: _Ctx) -> _Val:
        return self.string_fn(base, args, ctx, "upper", 0, lambda s: f"upper({s})", "string")

    def fn_trim(self, base: _Val, args: tuple[fp.Node, ...], ctx: _Ctx) -> _Val:
        return self.string_fn(base, args, ctx, "trim", 0, lambda s: f"trim({s})", "string")

    def fn_length(self, base: _Val, args: tuple[fp.Node, ...], ctx: _Ctx) -> _Val:
        return self.string_fn(
            base, args, ctx, "length", 0, lambda s: f"CAST(length({s}) AS BIGINT)", "integer"
        )

    def fn_indexOf(self, base: _Val, args: tuple[fp.Node, ...], ctx: _Ctx) -> _Val:  # noqa: N802
        return self.string_fn(
            base,
            args,
            ctx,
            "indexOf",
            1,
            lambda s, p: f"CAST(strpos({s}, {p}) - 1 AS BIGINT)",
            "integer",
        )

    def fn_matches(self, base: _Val, args: tuple[fp.Node, ...], ctx: _Ctx) -> _Val:
        return self.string_fn(
            base, args, ctx, "matches", 1, lambda s, p: f"regexp_full_match({s}, {p})", "boolean"
        )

    def fn_replace(self, base: _Val, args: tuple[fp.Node, ...], ctx: _Ctx) -> _Val:
        return self.string_fn(
            base, args, ctx, "replace", 2, lambda s, a, b: f"replace({s}, {a}, {b})", "string"
        )

    def fn_substring(self, base: _Val, args: tuple[fp.Node, ...], ctx: _Ctx) -> _Val:
        if len(args) == 1:
            return self.string_fn(
                base, args, ctx, "substring", 1, lambda s, a: f"substring({s}, ({a}) + 1)", "string"
            )
        return self.string_fn(
            base,
            args,
            ctx,
            "substring",
            2,
            lambda s, a, b: f"substring({s}, ({a}) + 1, {b})",
            "string",
        )

    def fn_toString(self, base: _Val, args: tuple[fp.Node, ...], ctx: _Ctx) -> _Val:  # noqa: N802
        self.nargs("toString", args, 0, 0)
        if category(base.ftype) == "complex":
            raise ViewDefinitionError("toString() needs a primitive value")
        s = self.single(base, "toString()")
        if base.ftype == "boolean":
            return _Val(f"(CASE WHEN {s} THEN 'true' WHEN NOT {s} THEN 'false' END)", "string")
        if base.ftype == "decimal":
            # Drop the DECIMAL padding: 1.500000 -> 1.5.
            return _Val(f"rtrim(rtrim(CAST({s} AS VARCHAR), '0'), '.')", "string")
        return _Val(f"CAST({s} AS VARCHAR)", "string")

    def fn_toInteger(self, base: _Val, args: tuple[fp.Node, ...], ctx: _Ctx) -> _Val:  # noqa: N802
        self.nargs("toInteger", args, 0, 0)
        return _Val(f"TRY_CAST({self.single(base, 'toInteger()')} AS BIGINT)", "integer")

    def fn_toDecimal(self, base: _Val, args: tuple[fp.Node, ...], ctx: _Ctx) -> _Val:  # noqa: N802
        self.nargs("toDecimal", args, 0, 0)
        return _Val(f"TRY_CAST({self.single(base, 'toDecimal()')} AS {DECIMAL_SQL})", "decimal")

    def fn_getResourceKey(self, base: _Val, args: tuple[fp.Node, ...], ctx: _Ctx) -> _Val:  # noqa: N802
        self.nargs("getResourceKey", args, 0, 0)
        if not base.is_resource:
            raise ViewDefinitionError("getResourceKey() must be called on a resource")
        return self.member(base, "id")

    def fn_getReferenceKey(self, base: _Val, args: tuple[fp.Node, ...], ctx: _Ctx) -> _Val:  # noqa: N802
        self.nargs("getReferenceKey", args, 0, 1)
        if base.ftype == "empty":
            return _empty("string")
        if base.ftype != "Reference":
            raise ViewDefinitionError(f"getReferenceKey() needs a Reference, got {base.ftype}")
        want = self.type_arg("getReferenceKey", args[0]) if args else None
        ref = self.member(base, "reference")

        if want is not None and not re.fullmatch(r"[A-Z][A-Za-z]+", want):
            raise ViewDefinitionError(f"getReferenceKey(): {want!r} is not a resource type")
        pattern = _q(_REF_KEY.format(type=want or "[A-Z][A-Za-z]+"))

        def key(s: str) -> str:
            # One regular expression per reference; the type is part of the pattern.
            return f"nullif(regexp_extract({s}, {pattern}, 1), '')"

        if not ref.many:
            return _Val(key(ref.sql), "string")
        v, w = self.var(), self.var()
        return _Val(
            f"list_filter(list_transform({ref.sql}, lambda {v}: {key(v)}), "
            f"lambda {w}: {w} IS NOT NULL)",
            "string",
            True,
        )

    def fn_lowBoundary(self, base: _Val, args: tuple[fp.Node, ...], ctx: _Ctx) -> _Val:  # noqa: N802
        return self.boundary(base, args, low=True)

    def fn_highBoundary(self, base: _Val, args: tuple[fp.Node, ...], ctx: _Ctx) -> _Val:  # noqa: N802
        return self.boundary(base, args, low=False)

    def boundary(self, base: _Val, args: tuple[fp.Node, ...], *, low: bool) -> _Val:
        name = "lowBoundary" if low else "highBoundary"
        self.nargs(name, args, 0, 1)
        if args:
            raise ViewDefinitionError(f"{name}(precision) is not supported; use {name}()")
        if base.ftype == "empty":
            return base
        if base.ftype == "decimal":
            if base.decimal_leaf is not None:
                spec, ename, is_list = base.decimal_leaf
                spec.leaf(ename, "VARCHAR", is_list)
            text = base.decimal_text or f"CAST({base.sql} AS VARCHAR)"
            t = self.single(replace(base, sql=text), name)
            digits = (
                f"(CASE WHEN strpos({t}, '.') > 0 THEN length({t}) - strpos({t}, '.') ELSE 0 END)"
            )
            half = f"CAST('0.' || repeat('0', {digits}) || '5' AS {DECIMAL_SQL})"
            sign = "-" if low else "+"
            return _Val(f"(CAST({t} AS {DECIMAL_SQL}) {sign} {half})", "decimal")
        s = self.single(base, name)
        if base.ftype == "date":
            return _Val(self.date_boundary(s, low), "date")
        if base.ftype in ("dateTime", "instant"):
            return _Val(self.datetime_boundary(s, low), base.ftype)
        if base.ftype == "time":
            return _Val(self.time_boundary(s, low), "time")
        raise ViewDefinitionError(f"{name}() is not defined for {base.ftype}")

    @staticmethod
    def date_boundary(s: str, low: bool) -> str:
        if low:
            return (
                f"(CASE length({s}) WHEN 4 THEN {s} || '-01-01' WHEN 7 THEN {s} || '-01' "
                f"ELSE substr({s}, 1, 10) END)"
            )
        return (
            f"(CASE length({s}) WHEN 4 THEN {s} || '-12-31' WHEN 7 THEN "
            f"strftime(last_day(CAST({s} || '-01' AS DATE)), '%Y-%m-%d') "
            f"ELSE substr({s}, 1, 10) END)"
        )

    def datetime_boundary(self, s: str, low: bool) -> str:
        date_part = self.date_boundary(f"split_part({s}, 'T', 1)", low)
        pattern = _q(r"^[^T]*T(\d{2})(?::(\d{2}))?(?::(\d{2}))?(?:\.(\d+))?(Z|[+-]\d{2}:\d{2})?$")
        fill = ("00", "00", "000", "+14:00") if low else ("59", "59", "999", "-12:00")

        def grp(n: int) -> str:
            return f"nullif(regexp_extract({s}, {pattern}, {n}), '')"

        time_part = (
            f"'T' || {grp(1)} || ':' || coalesce({grp(2)}, '{fill[0]}') || ':' || "
            f"coalesce({grp(3)}, '{fill[1]}') || '.' || "
            f"coalesce(rpad(substr({grp(4)}, 1, 3), 3, '{fill[2][0]}'), '{fill[2]}') || "
            f"coalesce({grp(5)}, '{fill[3]}')"
        )
        return (
            f"(CASE WHEN strpos({s}, 'T') = 0 THEN {date_part} || 'T00:00:00.000+14:00' "
            if low
            else f"(CASE WHEN strpos({s}, 'T') = 0 THEN {date_part} || 'T23:59:59.999-12:00' "
        ) + (f"ELSE {date_part} || {time_part} END)")

    @staticmethod
    def time_boundary(s: str, low: bool) -> str:
        pattern = _q(r"^(\d{2})(?::(\d{2}))?(?::(\d{2}))?(?:\.(\d+))?$")
        fill = ("00", "00", "000") if low else ("59", "59", "999")

        def grp(n: int) -> str:
            return f"nullif(regexp_extract({s}, {pattern}, {n}), '')"

        return (
            f"({grp(1)} || ':' || coalesce({grp(2)}, '{fill[0]}') || ':' || "
            f"coalesce({grp(3)}, '{fill[1]}') || '.' || "
            f"coalesce(rpad(substr({grp(4)}, 1, 3), 3, '{fill[2][0]}'), '{fill[2]}'))"
        )

    # ---- repeat --------------------------------------------------------------------------
    def repeat(self, focus: _Val, paths: list[str]) -> _Val:
        if focus.spec is None:
            raise ViewDefinitionError("repeat needs a complex element as its focus")
        chains: list[list[str]] = []
        for path in paths:
            node = fp.parse(path)
            names: list[str] = []
            cur: fp.Node | None = node
            while isinstance(cur, fp.Member):
                names.append(cur.name)
                cur = cur.base
            if cur is not None or not names:
                raise ViewDefinitionError(f"repeat path {path!r} must be a plain element path")
            chains.append(list(reversed(names)))

        def resolve(tname: str, chain: list[str]) -> list[tuple[str, bool, str]] | None:
            steps = []
            for name in chain:
                el = self.schema.element(tname, name)
                if el is None:
                    return None
                steps.append((name, el.is_list, el.type))
                tname = el.type
            return steps

        first = [s for c in chains if (s := resolve(focus.ftype, c)) is not None]
        if not first:
            # The suite's "empty expression" case: a path the type lacks yields no rows.
            return _Val("[]", "empty", True)
        elem_type = first[0][-1][2]
        if elem_type in PRIMITIVE_TYPES:
            raise ViewDefinitionError("repeat must walk complex elements")
        deeper = [s for c in chains if (s := resolve(elem_type, c)) is not None]
        for steps in (*first, *deeper):
            if steps[-1][2] != elem_type:
                raise ViewDefinitionError(f"repeat paths {paths} lead to different types")

        def children(json_sql: str, chain_steps: list[list[tuple[str, bool, str]]]) -> str:
            structure: dict[str, Any] = {}
            for steps in chain_steps:
                cur = structure
                for i, (name, is_list, _t) in enumerate(steps):
                    last = i == len(steps) - 1
                    if last:
                        cur[name] = ["JSON"] if is_list else "JSON"
                    else:
                        nxt = cur.get(name)
                        if nxt is None:
                            nxt = {}
                            cur[name] = [nxt] if is_list else nxt
                        elif isinstance(nxt, list):
                            nxt = nxt[0]
                        cur = nxt
            s = self.var("s")
            spec = _q(json.dumps(structure, separators=(",", ":")))
            return (
                f"coalesce(list_transform([from_json({json_sql}, {spec})], "
                f"lambda {s}: {lists_from(s, chain_steps)})[1], [])"
            )

        def lists_from(struct_sql: str, chain_steps: list[list[tuple[str, bool, str]]]) -> str:
            """The JSON children reached by the chains from a parsed struct, concatenated."""
            lists = []
            for steps in chain_steps:
                val = _Val(struct_sql, "x")
                many = False
                for name, is_list, _t in steps:
                    key = _ident(name)
                    if not many:
                        val = _Val(f"({val.sql}).{key}", "x")
                        many = is_list
                    else:
                        v = self.var()
                        if is_list:
                            val = _Val(
                                f"flatten(list_transform({val.sql}, lambda {v}: {v}.{key}))", "x"
                            )
                        else:
                            w = self.var()
                            val = _Val(
                                f"list_filter(list_transform({val.sql}, lambda {v}: "
                                f"{v}.{key}), lambda {w}: {w} IS NOT NULL)",
                                "x",
                            )
                        many = True
                lists.append(val.sql if many else self.as_list(val))
            body = lists[0]
            for other in lists[1:]:
                body = f"list_concat({body}, {other})"
            return body

        elem_spec = _Spec()
        j = self.var("j")
        if not (focus.is_resource and focus.raw is not None):
            return self.nested_repeat(focus, first, deeper, elem_type, children, lists_from)

        # A recursive CTE walks the tree to any depth; the path of child positions sorts the
        # nodes into document (pre-)order. It is hoisted into the scan so that it never ends up
        # inside a lambda, where DuckDB allows no subqueries.
        n = len(self.hoisted)
        cte = f"__mb_rep{n}"
        assert focus.raw is not None
        first_level = children(focus.raw, first)

        def level(children_sql: str) -> str:
            return (
                f"(SELECT unnest({children_sql}) AS x, generate_subscripts({children_sql}, 1) AS i)"
            )

        recursive = ""
        if deeper:
            recursive = (
                f" UNION ALL SELECT list_append(t.k, c.i), c.x FROM {cte} AS t, "
                f"LATERAL {level(children('t.j', deeper))} AS c"
            )
        sql = (
            f"(WITH RECURSIVE {cte}(k, j) AS (SELECT [o.i], o.x FROM "
            f"{level(first_level)} AS o{recursive}) SELECT list(j ORDER BY k) FROM {cte})"
        )
        self.hoisted.append((cte, sql))
        elements = (
            f"list_transform(__mb_src.{cte}, lambda {j}: "
            f"from_json({j}, {self.placeholder(elem_spec)}))"
        )
        return _Val(elements, elem_type, True, spec=elem_spec)

    def nested_repeat(
        self,
        focus: _Val,
        first: list[list[tuple[str, bool, str]]],
        deeper: list[list[tuple[str, bool, str]]],
        elem_type: str,
        children: Callable[[str, list[list[tuple[str, bool, str]]]], str],
        lists_from: Callable[[str, list[list[tuple[str, bool, str]]]], str],
    ) -> _Val:
        """``repeat`` below the resource (inside forEach or another repeat).

        No subquery may run inside a lambda, so the walk is unrolled to
        :data:`NESTED_REPEAT_DEPTH` levels (DuckDB's binder cost grows fast with lambda nesting);
        deeper data raises at run time rather than being dropped.
        """
        assert focus.spec is not None
        for steps in first:
            # The first level is read as JSON from the focus' own parse.
            spec = focus.spec
            for idx, (name, is_list, _t) in enumerate(steps):
                if idx == len(steps) - 1:
                    spec.leaf(name, "JSON", is_list)
                else:
                    spec = spec.child(name, is_list)

        def descend(level_list: str, depth: int) -> str:
            if depth == NESTED_REPEAT_DEPTH:
                return (
                    f"(CASE WHEN coalesce(len({level_list}), 0) > 0 THEN CAST(error("
                    f"'repeat below the resource nests deeper than {NESTED_REPEAT_DEPTH} "
                    f"levels') AS JSON[]) ELSE CAST([] AS JSON[]) END)"
                )
            v = self.var("x")
            inner = descend(children(v, deeper), depth + 1) if deeper else "CAST([] AS JSON[])"
            return f"flatten(list_transform({level_list}, lambda {v}: list_concat([{v}], {inner})))"

        all_json = descend(f"CAST({lists_from(focus.sql, first)} AS JSON[])", 0)
        elem_spec = _Spec()
        j = self.var("j")
        sql = (
            f"list_transform({all_json}, lambda {j}: from_json({j}, {self.placeholder(elem_spec)}))"
        )
        return _Val(sql, elem_type, True, spec=elem_spec)

    # ---- select structure ----------------------------------------------------------------
    def column(self, col: Any, ctx: _Ctx) -> tuple[OutputColumn, str]:
        if not isinstance(col, dict):
            raise ViewDefinitionError("a column must be an object")
        unknown = set(col) - _COLUMN_KEYS
        if unknown:
            raise ViewDefinitionError(f"unknown column keys {sorted(unknown)}")
        name, path = col.get("name"), col.get("path")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ViewDefinitionError(f"invalid column name {name!r}")
        if not isinstance(path, str):
            raise ViewDefinitionError(f"column {name!r} needs a FHIRPath 'path' string")
        collection = col.get("collection", None)
        if collection is not None and not isinstance(collection, bool):
            raise ViewDefinitionError(f"column {name!r}: 'collection' must be a boolean")
        declared = col.get("type")
        if declared is not None and not isinstance(declared, str):
            raise ViewDefinitionError(f"column {name!r}: 'type' must be a string")
        try:
            v = self.expr(fp.parse(path), ctx)
        except ViewDefinitionError as exc:
            raise ViewDefinitionError(f"column {name!r}: {exc}") from exc
        if v.choice is not None:
            raise ViewDefinitionError(f"column {name!r}: choice element needs ofType(<type>)")
        if category(v.ftype) == "complex":
            raise ViewDefinitionError(
                f"column {name!r}: path resolves to {v.ftype}, not a primitive value"
            )
        fhir_type = declared or (None if v.ftype == "empty" else v.ftype)
        if fhir_type is not None and fhir_type not in PRIMITIVE_TYPES:
            raise ViewDefinitionError(f"column {name!r}: unknown type {fhir_type!r}")
        base_sql = sql_type(fhir_type or "string")
        if collection:
            lst = self.as_list(v)
            sql = f"coalesce(CAST({lst} AS {base_sql}[]), CAST([] AS {base_sql}[]))"
            out_type = base_sql + "[]"
        else:
            if v.many and collection is False:
                # Declared single but the elements may repeat: refuse before running (the spec
                # requires collection: true whenever several values may come back).
                raise ViewDefinitionError(
                    f"column {name!r} has collection: false but {path!r} may return several "
                    "values; set collection: true or select one (first(), an index, where())"
                )
            sql = f"CAST({self.single(v, 'column ' + name)} AS {base_sql})"
            out_type = base_sql
        ansi = _ansi_type(col.get("tag"), name)
        if ansi is not None:
            # The spec's "ansi/type" hint: the database type the author wants (for example
            # TIMESTAMP WITH TIME ZONE for instants); a value that does not convert becomes NULL.
            target = f"{ansi}[]" if collection else ansi
            sql = f"TRY_CAST({sql} AS {target})"
            out_type = target
        description = col.get("description")
        return OutputColumn(
            name,
            out_type,
            fhir_type,
            bool(collection),
            description if isinstance(description, str) else None,
            path,
        ), sql

    def decimal_text_column(
        self, col: Mapping[str, Any], out: OutputColumn, sql: str, ctx: _Ctx
    ) -> tuple[OutputColumn, str]:
        """``<name>_text``: the decimal's exact text (see :mod:`.exact_decimals`)."""
        v = self.expr(fp.parse(str(col["path"])), ctx)
        fine = None
        if v.decimal_text is not None and v.decimal_leaf is not None:
            raw = self.single(replace(v, sql=v.decimal_text), f"column {out.name}")
            fine = exact.shadow(raw, ctx.shadow)
            self.shadow_used = self.shadow_used or fine is not None
        name = out.name + exact.TEXT_SUFFIX
        text = OutputColumn(
            name, "VARCHAR", "string", False, f"exact decimal text of {out.name}", out.path
        )
        return text, exact.text_sql(sql, fine)

    def select(self, sel: Any, ctx: _Ctx) -> _Part:
        if not isinstance(sel, dict):
            raise ViewDefinitionError("a select must be an object")
        unknown = set(sel) - _SELECT_KEYS
        if unknown:
            raise ViewDefinitionError(f"unknown select keys {sorted(unknown)}")
        iterators = [k for k in ("forEach", "forEachOrNull", "repeat") if k in sel]
        if len(iterators) > 1:
            raise ViewDefinitionError(f"a select may have only one of {iterators}")
        if not iterators:
            return self.body(sel, ctx)
        kind = iterators[0]
        if kind == "repeat":
            paths = sel["repeat"]
            if (
                not isinstance(paths, list)
                or not paths
                or not all(isinstance(p, str) for p in paths)
            ):
                raise ViewDefinitionError("repeat must be a non-empty list of FHIRPath strings")
            coll = self.repeat(ctx.focus, paths)
        else:
            path = sel[kind]
            if not isinstance(path, str):
                raise ViewDefinitionError(f"{kind} must be a FHIRPath string")
            coll = self.expr(fp.parse(path), ctx)
            if coll.choice is not None:
                raise ViewDefinitionError(f"{kind}: choice element needs ofType(<type>)")
            if coll.ftype == "empty":
                coll = _Val("[]", "empty", True)
        e, i = self.var("e"), self.var("i")
        elem = replace(
            coll,
            sql=e,
            many=False,
            decimal_leaf=None,
            decimal_text=None,
            raw=None,
            is_resource=False,
        )
        shadow = ctx.shadow
        if self.exact_decimals:
            sh_list = exact.shadow(self.as_list(coll), ctx.shadow)
            if sh_list is not None:
                shadow = (*ctx.shadow, (e, f"({sh_list})[{i}]"))
        inner = self.body(sel, replace(ctx, focus=elem, row_index=f"({i} - 1)", shadow=shadow))
        lst = self.as_list(coll)
        if kind == "forEachOrNull":
            # No element: one row evaluated against an empty focus (%rowIndex 0).
            lst = f"(CASE WHEN coalesce(len({lst}), 0) = 0 THEN [NULL] ELSE {lst} END)"
        return _Part(
            inner.cols, None, f"flatten(list_transform({lst}, lambda {e}, {i}: {self.rows(inner)}))"
        )

    def rows(self, part: _Part) -> str:
        """The part as a list of row structs."""
        if part.multi is None:
            assert part.single is not None
            return "[" + self.struct(part.cols, part.single) + "]"
        if not part.single:
            return part.multi
        r = self.var("r")
        values = {c.name: part.single.get(c.name, f"{r}.{_ident(c.name)}") for c in part.cols}
        return f"list_transform({part.multi}, lambda {r}: {self.struct(part.cols, values)})"

    @staticmethod
    def struct(cols: list[OutputColumn], values: Mapping[str, str]) -> str:
        return "{" + ", ".join(f"{_q(c.name)}: {values[c.name]}" for c in cols) + "}"

    def body(self, sel: Mapping[str, Any], ctx: _Ctx) -> _Part:
        parts: list[_Part] = []
        columns = sel.get("column")
        if columns is not None:
            if not isinstance(columns, list):
                raise ViewDefinitionError("'column' must be a list")
            cols: list[OutputColumn] = []
            values: dict[str, str] = {}
            for col in columns:
                out, sql = self.column(col, ctx)
                pairs = [(out, sql)]
                if self.exact_decimals and out.fhir_type == "decimal" and not out.collection:
                    pairs.append(self.decimal_text_column(col, out, sql, ctx))
                for out, sql in pairs:
                    if out.name in values:
                        raise ViewDefinitionError(f"duplicate column name {out.name!r}")
                    cols.append(out)
                    values[out.name] = sql
            parts.append(_Part(cols, values))
        subs = sel.get("select")
        if subs is not None:
            if not isinstance(subs, list):
                raise ViewDefinitionError("'select' must be a list")
            parts.extend(self.select(s, ctx) for s in subs)
        union = sel.get("unionAll")
        if union is not None:
            parts.append(self.union_all(union, ctx))
        return self.product(parts)

    def union_all(self, branches: Any, ctx: _Ctx) -> _Part:
        if not isinstance(branches, list) or not branches:
            raise ViewDefinitionError("'unionAll' must be a non-empty list")
        parts = [self.select(b, ctx) for b in branches]
        first = parts[0].cols
        for p in parts[1:]:
            names = [c.name for c in p.cols]
            if names != [c.name for c in first]:
                raise ViewDefinitionError(
                    f"unionAll branches have different columns: {[c.name for c in first]} "
                    f"vs {names}"
                )
            for a, b in zip(first, p.cols, strict=True):
                if a.sql_type != b.sql_type:
                    raise ViewDefinitionError(
                        f"unionAll column {a.name!r} has types {a.sql_type} and {b.sql_type}"
                    )
        lists = [self.rows(p) for p in parts]
        sql = lists[0]
        for other in lists[1:]:
            sql = f"list_concat({sql}, {other})"
        return _Part(list(first), None, sql)

    def product(self, parts: list[_Part]) -> _Part:
        cols: list[OutputColumn] = []
        seen: set[str] = set()
        for p in parts:
            for c in p.cols:
                if c.name in seen:
                    raise ViewDefinitionError(f"duplicate column name {c.name!r}")
                seen.add(c.name)
                cols.append(c)
        singles: dict[str, str] = {}
        for p in parts:
            if p.single:
                singles.update(p.single)
        multis = [p for p in parts if p.multi is not None]
        if not multis:
            return _Part(cols, singles)
        # Values that are the same on every row stay outside the row list (computed once).
        if len(multis) == 1:
            return _Part(cols, singles, multis[0].multi)
        multi_cols = [c for c in cols if c.name not in singles]
        names: dict[int, str] = {id(p): self.var("r") for p in multis}
        values: dict[str, str] = {}
        for p in multis:
            for c in p.cols:
                if c.name not in singles:
                    values[c.name] = f"{names[id(p)]}.{_ident(c.name)}"
        sql = "[" + self.struct(multi_cols, values) + "]"
        for p in reversed(multis):
            sql = f"flatten(list_transform({p.multi}, lambda {names[id(p)]}: {sql}))"
        return _Part(cols, singles, sql)


_ANSI = re.compile(r"^[A-Za-z][A-Za-z ]{0,40}(\(\d{1,2}(, ?\d{1,2})?\))?$")


def _ansi_type(tags: Any, column: str) -> str | None:
    """The column's ``ansi/type`` tag value, checked to be a plain SQL type name."""
    if tags is None:
        return None
    if not isinstance(tags, list) or not all(isinstance(t, dict) for t in tags):
        raise ViewDefinitionError(f"column {column!r}: 'tag' must be a list of objects")
    for tag in tags:
        if tag.get("name") == "ansi/type":
            value = tag.get("value")
            if not isinstance(value, str) or not _ANSI.match(value.strip()):
                raise ViewDefinitionError(f"column {column!r}: invalid ansi/type {value!r}")
            return value.strip().upper()
    return None


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
        # The same resource with decimal leaves at the fine scale (exact decimal text columns).
        src_cols.append(
            f"from_json({_ident(resource_column)}, {comp.placeholder(root_spec, fine=True)})"
            f" AS {exact.SHADOW_ROOT}"
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
