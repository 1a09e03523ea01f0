"""FHIRPath to DuckDB SQL: the translator's state, navigation and expressions (operators,
literals, function dispatch); the functions are in :mod:`._functions`.
"""

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from medblocks_pipelines.lib.errors import ViewDefinitionError
from medblocks_pipelines.lib.warehouse.views import exact_decimals as exact
from medblocks_pipelines.lib.warehouse.views import fhirpath as fp
from medblocks_pipelines.lib.warehouse.views._model import (
    _DATE_TYPES,
    _Ctx,
    _empty,
    _ident,
    _q,
    _Spec,
    _Val,
)
from medblocks_pipelines.lib.warehouse.views.schema import (
    DECIMAL_SQL,
    INTEGER_TYPES,
    PRIMITIVE_TYPES,
    FhirSchema,
    category,
    sql_type,
)


@dataclass
class _Translator:
    """A view's compilation state and the FHIRPath expression translation."""

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
    # Element names read as decimals (whose numbers the exact-text parse quotes), and whether
    # one is read as a list (then its numbers are not all right after a key).
    decimal_names: set[str] = field(default_factory=set)
    decimal_list: bool = False

    # ---- helpers -------------------------------------------------------------------------
    def var(self, prefix: str = "v") -> str:
        self.counter += 1
        return f"_{prefix}{self.counter}"

    def placeholder(self, spec: _Spec, *, text: bool = False) -> str:
        self.specs.append(spec)
        return f"\x00SPEC{'F' if text else ''}{len(self.specs) - 1}\x00"

    def finish(self, sql: str) -> str:
        def sub(m: re.Match[str]) -> str:
            structure = json.dumps(self.specs[int(m.group(2))].structure(), separators=(",", ":"))
            return _q(exact.text_structure(structure) if m.group(1) else structure)

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
            self.decimal_names.add(name)
            self.decimal_list = self.decimal_list or is_list
            target = DECIMAL_SQL + ("[]" if many else "")
            # TRY_: a leaf read as text (for boundaries) too large for DECIMAL(38,18) is NULL,
            # as it is when parsed as a DECIMAL, rather than failing the build.
            return _Val(
                f"TRY_CAST({sql} AS {target})",
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
                # A decimal keeps its text beside it, as with first() (boundaries, exact text).
                text = base.decimal_text and f"({base.decimal_text})[({i}) + 1]"
                return replace(base, sql=f"({base.sql})[({i}) + 1]", many=False, decimal_text=text)
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
