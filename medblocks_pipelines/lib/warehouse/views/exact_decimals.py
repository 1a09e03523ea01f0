"""Exact decimal text beside a view's DECIMAL columns (``compile_view(..., exact_decimals=True)``).

DuckDB reads a JSON number exactly only into a ``DECIMAL`` (its JSON ``VARCHAR``/``JSON`` reads go
through a double: ``12345678901234567890.5`` comes back as ``12345678901234567000.0``), and one
``DECIMAL`` holds 38 digits at a fixed scale: ``DECIMAL(38,18)`` rounds ``0.0003311129543085922``
(19 places) and a finer scale overflows on ``12345678901234567890.5`` (20 integer digits).

So the scan parses the resource a second time with every decimal leaf read at the fine scale
(:data:`FINE_DECIMAL_SQL`, NULL when a value does not fit) and a decimal column gets a companion
``<name>_text`` column: the fine value when it fits, else the ``DECIMAL(38,18)`` value, printed
without trailing zeros. Every digit is kept for values below 10^8 with up to 30 decimal places
and for values below 10^20 with up to 18, in columns read from the resource or through
``forEach``/``forEachOrNull`` (not through ``repeat``). Trailing zeros of the source text (``7.10``) are not
kept: the lake keeps the resource exactly as sent.
"""

import re
from collections.abc import Sequence

from medblocks_pipelines.lib.warehouse.views.schema import DECIMAL_SQL

FINE_DECIMAL_SQL = "DECIMAL(38,30)"
ROOT = "__mb_r"
SHADOW_ROOT = "__mb_r2"
TEXT_SUFFIX = "_text"

_ROOT_RE = re.compile(rf"\b{ROOT}\b")
_VAR_RE = re.compile(r"\b_[a-z]+\d+\b")
_INDEX_RE = re.compile(r"^_i\d+$")
_BOUND_RE = re.compile(r"lambda\s+(_[a-z]+\d+)(?:\s*,\s*(_[a-z]+\d+))?")


def fine_structure(structure_json: str) -> str:
    """The scan structure with every decimal leaf read at the fine scale."""
    return structure_json.replace(DECIMAL_SQL, FINE_DECIMAL_SQL)


def shadow(sql: str, elements: Sequence[tuple[str, str]] = ()) -> str | None:
    """``sql`` read from the fine-scale parse, or None when it cannot be.

    ``elements`` maps the element variables of enclosing ``forEach`` lambdas to the same element
    of the fine parse (``(<shadowed list>)[<index>]``); indexes of enclosing lambdas stay in scope.
    Any other variable bound outside ``sql`` (a ``where`` lambda, a ``repeat`` walk) means no.
    """
    for var, expr in reversed(elements):
        sql = re.sub(rf"\b{var}\b", expr, sql)
    sql = _ROOT_RE.sub(SHADOW_ROOT, sql)
    bound = {v for m in _BOUND_RE.finditer(sql) for v in m.groups() if v}
    free = set(_VAR_RE.findall(sql)) - bound
    if SHADOW_ROOT not in sql or any(not _INDEX_RE.match(v) for v in free):
        return None
    return sql


def _printed(value_sql: str) -> str:
    text = f"CAST({value_sql} AS VARCHAR)"
    return (
        f"regexp_replace(regexp_replace({text}, '(\\.[0-9]*[1-9])0+$|\\.0+$', '\\1'), '^-0$', '0')"
    )


def text_sql(coarse_sql: str, fine_sql: str | None) -> str:
    """The exact text of a decimal: the fine parse when it holds the value, else the coarse one."""
    if fine_sql is None:
        return _printed(coarse_sql)
    return f"coalesce({_printed(fine_sql)}, {_printed(coarse_sql)})"
