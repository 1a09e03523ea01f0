"""The FHIRPath functions (``fn_<name>``) as DuckDB SQL."""

import re
from collections.abc import Callable
from dataclasses import replace

from medblocks_pipelines.lib.errors import ViewDefinitionError
from medblocks_pipelines.lib.warehouse.views import fhirpath as fp
from medblocks_pipelines.lib.warehouse.views._model import (
    _REF_KEY,
    _Ctx,
    _empty,
    _q,
    _Val,
)
from medblocks_pipelines.lib.warehouse.views._translate import _Translator
from medblocks_pipelines.lib.warehouse.views.schema import (
    DECIMAL_SQL,
    category,
)


class _Functions(_Translator):
    """The translator with the FHIRPath functions (dispatched by :meth:`call`)."""

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
            return _Val(f"(TRY_CAST({t} AS {DECIMAL_SQL}) {sign} {half})", "decimal")
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
