"""The select planner: ``repeat``, columns, ``forEach``/``forEachOrNull``/``unionAll`` and
nested selects as lists of row structs combined by a cartesian product.
"""

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from medblocks_pipelines.lib.errors import ViewDefinitionError
from medblocks_pipelines.lib.warehouse.views import exact_decimals as exact
from medblocks_pipelines.lib.warehouse.views import fhirpath as fp
from medblocks_pipelines.lib.warehouse.views._functions import _Functions
from medblocks_pipelines.lib.warehouse.views._model import (
    _COLUMN_KEYS,
    _NAME,
    _SELECT_KEYS,
    NESTED_REPEAT_DEPTH,
    OutputColumn,
    _Ctx,
    _ident,
    _Part,
    _q,
    _Spec,
    _Val,
)
from medblocks_pipelines.lib.warehouse.views.schema import (
    PRIMITIVE_TYPES,
    category,
    sql_type,
)


class _Compiler(_Functions):
    """The whole compiler: the translator, its functions and the select planner."""

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
        source = None
        if v.decimal_text is not None and v.decimal_leaf is not None:
            raw = self.single(replace(v, sql=v.decimal_text), f"column {out.name}")
            source = exact.shadow(raw, ctx.shadow)
            self.shadow_used = self.shadow_used or source is not None
        name = out.name + exact.TEXT_SUFFIX
        text = OutputColumn(
            name, "VARCHAR", "string", False, f"exact decimal text of {out.name}", out.path
        )
        return text, exact.text_sql(sql, source)

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
