"""Exact decimal text beside a view's DECIMAL columns (``compile_view(..., exact_decimals=True)``).

DuckDB reads a JSON number exactly only into a ``DECIMAL`` (its JSON ``VARCHAR``/``JSON`` reads go
through a double: ``12345678901234567890.5`` comes back as ``12345678901234567000.0``), and one
``DECIMAL`` holds 38 digits at a fixed scale: ``DECIMAL(38,18)`` rounds ``0.0003311129543085922``
(19 places). FHIR decimals are exact and their precision is significant (``7.10`` is not ``7.1``).

So the scan parses the resource a second time from its raw text with the numbers of the view's
decimal elements (every number when a decimal list is read) turned into JSON strings holding
their source text (:func:`quoted_numbers_sql`), with decimal leaves read as
``VARCHAR`` (:func:`text_structure`). A decimal column gets a companion
``<name>_text`` column read from that parse: the number exactly as the source wrote it (every
digit, trailing zeros, exponent, sign of ``-0.000``), for columns read from the resource or
through ``forEach``/``forEachOrNull``. Where the second parse cannot follow the path (``repeat``,
a path through a ``where`` over an outer variable) the text is the ``DECIMAL(38,18)`` value printed
without trailing zeros. The ``DECIMAL`` column itself is unchanged (typed, for arithmetic).
"""

import re
from collections.abc import Collection, Sequence

from medblocks_pipelines.lib.warehouse.views.schema import DECIMAL_SQL

ROOT = "__mb_r"
SHADOW_ROOT = "__mb_r2"
TEXT_SUFFIX = "_text"

_NUMBER_RE = r"(-?[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)"
# Every number, one JSON token at a time, left to right: a whole string (escapes included) or a
# number. A scan that starts outside a string only ever meets a string at its opening quote, and
# the string alternative consumes it to its closing quote, so digits inside strings are never
# matched and, outside strings, digits only occur in numbers. Strings come back unchanged (group 2
# empty) and numbers wrapped in \x01...\x02, which raw JSON text cannot hold (control characters
# must be escaped inside strings and are not whitespace outside them), so both map to quotes.
_TOKEN_RE = rf'("(?:[^"\\]|\\.)*")|{_NUMBER_RE}'
# The value of one of the given keys when it is a number: ``"<key>"`` cannot lie inside a string
# (its closing quote is unescaped, so it is a string's end, and a bare word cannot precede it),
# so what follows the colon is a value outside any string (a key such as ``x\"value`` also
# matches: its number gets quoted, harmless, as no view reads it). About 4x cheaper than
# quoting every token, as most of a resource is strings.
_KEYED_RE = r'("(?:{keys})"\s*:\s*)' + _NUMBER_RE
_KEY_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")

_ROOT_RE = re.compile(rf"\b{ROOT}\b")
_VAR_RE = re.compile(r"\b_[a-z]+\d+\b")
_INDEX_RE = re.compile(r"^_i\d+$")
_BOUND_RE = re.compile(r"lambda\s+(_[a-z]+\d+)(?:\s*,\s*(_[a-z]+\d+))?")
_CAST_RE = re.compile(r"\bCAST\(")


def quoted_numbers_sql(json_sql: str, keys: Collection[str] | None = None) -> str:
    """SQL of the JSON text ``json_sql`` with numbers written as strings of their source text.

    With ``keys`` (element names), only numbers that are the value of one of those keys; else
    every number.
    """
    if keys is not None and all(_KEY_NAME.match(k) for k in keys):
        if not keys:
            return json_sql
        pattern = _KEYED_RE.format(keys="|".join(sorted(keys)))
        return f"regexp_replace({json_sql}, '{pattern}', '\\1\"\\2\"', 'g')"
    marked = f"regexp_replace({json_sql}, '{_TOKEN_RE}', '\\1' || chr(1) || '\\2' || chr(2), 'g')"
    return f"replace(replace(replace({marked}, chr(1) || chr(2), ''), chr(1), '\"'), chr(2), '\"')"


def text_structure(structure_json: str) -> str:
    """The scan structure with every decimal leaf read as its text."""
    return structure_json.replace(f'"{DECIMAL_SQL}"', '"VARCHAR"')


def shadow(sql: str, elements: Sequence[tuple[str, str]] = ()) -> str | None:
    """``sql`` read from the text parse, or None when it cannot be.

    ``elements`` maps the element variables of enclosing ``forEach`` lambdas to the same element
    of the text parse (``(<shadowed list>)[<index>]``); indexes of enclosing lambdas stay in scope.
    Any other variable bound outside ``sql`` (a ``where`` lambda, a ``repeat`` walk) means no.
    Casts become ``TRY_CAST``: a decimal that the main parse reads as NULL (too large for
    ``DECIMAL(38,18)``) is NULL in a condition of the text parse too, not an error.
    """
    for var, expr in reversed(elements):
        sql = re.sub(rf"\b{var}\b", expr, sql)
    sql = _ROOT_RE.sub(SHADOW_ROOT, sql)
    bound = {v for m in _BOUND_RE.finditer(sql) for v in m.groups() if v}
    free = set(_VAR_RE.findall(sql)) - bound
    if SHADOW_ROOT not in sql or any(not _INDEX_RE.match(v) for v in free):
        return None
    return _CAST_RE.sub("TRY_CAST(", sql)


def _printed(value_sql: str) -> str:
    text = f"CAST({value_sql} AS VARCHAR)"
    return (
        f"regexp_replace(regexp_replace({text}, '(\\.[0-9]*[1-9])0+$|\\.0+$', '\\1'), '^-0$', '0')"
    )


def text_sql(coarse_sql: str, source_text_sql: str | None) -> str:
    """The text of a decimal: its source text when the text parse reaches it, else the
    ``DECIMAL(38,18)`` value printed."""
    if source_text_sql is None:
        return _printed(coarse_sql)
    return f"coalesce({source_text_sql}, {_printed(coarse_sql)})"
