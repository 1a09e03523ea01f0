"""Decimals past DECIMAL(38,18) through views: the ``<name>_text`` columns of
``compile_view(..., exact_decimals=True)`` (the warehouse build's mode) carry the number's source
text (every digit, trailing zeros, exponent), at the resource level and through forEach; numbers
inside strings are left alone; the spec-suite mode adds no column."""

import json
from decimal import Decimal
from typing import Any

import duckdb
import pytest

from medblocks_pipelines.lib.warehouse.views import compile_view

from .conftest import resources_table

TRAP = 'a: 12, b [3, -4.50] \\" : 7.10}, "x": 5 \\'
# Written as JSON number text, byte for byte as a source would send them.
VALUES = [
    "0.0003311129543085922",  # 19 decimal places: DECIMAL(38,18) rounds the last one
    "12345678901234567890.5",  # 20 integer digits: a finer DECIMAL overflows
    "-0.000000000000000000123",  # tiny negative
    "99999999.123456789012345678901",  # 8 integer digits and 21 places
    "42",
    "123456789012345678901234567890.123456789",  # 30 integer digits: no DECIMAL(38,x) holds it
    "7.10",  # precision is significant in FHIR: the trailing zero stays
    "1e-7",  # exponent notation, as written
    "-0.000",
    "100",
]
VIEW = {
    "resource": "Observation",
    "select": [
        {
            "column": [
                {"name": "id", "path": "id"},
                {"name": "t", "path": "code.text"},
                {"name": "v", "path": "value.ofType(Quantity).value"},
            ]
        },
        {
            "forEachOrNull": "component",
            "column": [{"name": "cv", "path": "value.ofType(Quantity).value"}],
        },
    ],
}


@pytest.fixture
def con() -> duckdb.DuckDBPyConnection:
    c = duckdb.connect()
    # Spacing varies; the code text is a trap: numbers, separators and an escaped quote inside
    # a string must stay as they are.
    lines = [
        '{"resourceType":"Observation", "id":"o%d","status":"final","code":{"text":%s},'
        '"valueQuantity":{ "value" : %s },"component":[{"code":{"text":"c"},'
        '"valueQuantity":{"value":\n%s}}]}' % (n, json.dumps(TRAP), v, v)
        for n, v in enumerate(VALUES)
    ]
    lines.append('{"resourceType":"Observation","id":"none","status":"final","code":{"text":"x"}}')
    # Components beside one too large for DECIMAL(38,18): conditions on them must not fail.
    lines.append(
        '{"resourceType":"Observation","id":"mix","status":"final","code":{"text":"x"},'
        '"component":[{"code":{"text":"a"},"valueQuantity":{"value":%s}},'
        '{"code":{"text":"b"},"valueQuantity":{"value":7.10}},'
        '{"code":{"text":"c"},"valueQuantity":{"value":3}}]}' % VALUES[5]
    )
    resources_table(c, lines)
    return c


def test_the_text_columns_carry_the_source_text(con: duckdb.DuckDBPyConnection) -> None:
    compiled = compile_view(VIEW, exact_decimals=True)
    assert [c.name for c in compiled.columns] == ["id", "t", "v", "v_text", "cv", "cv_text"]
    rows = {r[0]: r for r in con.sql(compiled.sql).fetchall()}
    for n, text in enumerate(VALUES):
        _id, t, v, v_text, cv, cv_text = rows[f"o{n}"]
        assert v_text == text and cv_text == text, (text, v_text, cv_text)
        assert t == TRAP  # numbers inside the string untouched
        assert v == cv  # the numeric column is unchanged: DECIMAL(38,18)
    assert rows["o0"][2] == Decimal("0.000331112954308592")  # what the numeric column alone keeps
    assert rows["o6"][2] == Decimal("7.1")
    assert rows["o5"][2] is None  # too large for DECIMAL(38,18); its text is still there
    assert rows["none"][2:] == (None, None, None, None)


def test_a_decimal_condition_in_a_foreach_keeps_its_meaning(
    con: duckdb.DuckDBPyConnection,
) -> None:
    view = {
        "resource": "Observation",
        "select": [
            {"column": [{"name": "id", "path": "id"}]},
            {
                "forEach": "component.where(value.ofType(Quantity).value > 5)",
                "column": [{"name": "cv", "path": "value.ofType(Quantity).value"}],
            },
        ],
    }
    got = {r[0]: r[2] for r in con.sql(compile_view(view, exact_decimals=True).sql).fetchall()}
    # The 30-digit value is NULL in DECIMAL(38,18), so the condition is empty for it.
    want = {f"o{n}": v for n, v in enumerate(VALUES) if n != 5 and Decimal(v) > 5}
    assert got == {**want, "mix": "7.10"}


def test_the_text_survives_a_boundary_on_the_same_element(
    con: duckdb.DuckDBPyConnection,
) -> None:
    """lowBoundary() makes the scan read the element as VARCHAR (through a double); the text
    column still reads it from the quoted parse."""
    view = {
        "resource": "Observation",
        "select": [
            {
                "column": [
                    {"name": "id", "path": "id"},
                    {"name": "v", "path": "value.ofType(Quantity).value"},
                    {"name": "low", "path": "value.ofType(Quantity).value.lowBoundary()"},
                ]
            }
        ],
    }
    compiled = compile_view(view, exact_decimals=True)
    got = {r[0]: r[2] for r in con.sql(compiled.sql).fetchall()}
    assert got == {**{f"o{n}": v for n, v in enumerate(VALUES)}, "none": None, "mix": None}


def test_a_decimal_list_quotes_every_number_and_keeps_strings() -> None:
    """A list of decimals (MolecularSequence ROC precision): numbers are not all right after a
    key, so the scan quotes every number token, never the digits inside strings."""
    c = duckdb.connect()
    resources_table(
        c,
        [
            '{"resourceType":"MolecularSequence","id":"m1","type":"dna","quality":[{"type":"snp",'
            '"roc":{"score":[3, 4],"precision":[0.10, 1.000000000000000000001, -0.0]}}],'
            f'"text":{{"status":"generated","div":{json.dumps(TRAP)}}}}}'
        ],
    )
    view = {
        "resource": "MolecularSequence",
        "select": [
            {
                "column": [
                    {"name": "first", "path": "quality.roc.precision.first()"},
                    {"name": "second", "path": "quality.roc.precision[1]"},
                    {"name": "last", "path": "quality.roc.precision.last()"},
                    {"name": "score", "path": "quality.roc.score.first()"},
                    {"name": "div", "path": "text.div"},
                ]
            }
        ],
    }
    compiled = compile_view(view, exact_decimals=True)
    names = [col.name for col in compiled.columns]
    row = dict(zip(names, c.sql(compiled.sql).fetchall()[0], strict=True))
    assert (row["first_text"], row["second_text"], row["last_text"]) == (
        "0.10",
        "1.000000000000000000001",
        "-0.0",
    )
    assert row["second"] == Decimal("1")  # DECIMAL(38,18) rounds the 21st place
    assert row["score"] == 3 and row["div"] == TRAP


@pytest.mark.parametrize(
    "doc",
    [
        '{"a": 1, "b": [1.50, -2E+3, 0, -0.0], "c": {"d": 12345678901234567890123.4567}}',
        '{"s": "1, 2]", "e": "\\\\", "f": 3, "g": "\\"x\\": 4", "h": [[5], {}]}',
        '{"k1": "\\u0031", "n": null, "t": true, "u": "\u00e9 9", "v":[ 1 , 2 ]}',
        '[1e5, "2", 3]',
    ],
)
def test_numbers_are_quoted_and_strings_kept(doc: str) -> None:
    from medblocks_pipelines.lib.warehouse.views.exact_decimals import quoted_numbers_sql

    c = duckdb.connect()
    quoted = c.execute(f"SELECT {quoted_numbers_sql('s')} FROM (SELECT ?::VARCHAR AS s)", [doc])
    text = quoted.fetchall()[0][0]
    assert json.loads(text) == json.loads(doc, parse_float=str, parse_int=str)


class Source(str):
    """A JSON number kept as its source text (``json.loads`` hook)."""


def _keys_quoted(node: Any, keys: set[str], key: str | None = None) -> Any:
    """``node`` with the numbers right under one of ``keys`` as their text, others as numbers."""
    if isinstance(node, Source):
        return str(node) if key in keys else json.loads(node)
    if isinstance(node, dict):
        return {k: _keys_quoted(v, keys, k) for k, v in node.items()}
    if isinstance(node, list):
        return [_keys_quoted(v, keys) for v in node]
    return node


@pytest.mark.parametrize(
    "doc",
    [
        '{"value": 1.50, "b": {"value" :\n-2E+3, "d": 3, "v": [{"value": 0}]}, "value2": 4}',
        '{"t": "\\"value\\": 5, \\"d\\": 6", "value": [1, 2], "d": "7", "x": {"d": 8}}',
    ],
)
def test_the_numbers_of_decimal_keys_are_quoted(doc: str) -> None:
    """The view-specific mode: only numbers right after one of the view's decimal keys."""
    from medblocks_pipelines.lib.warehouse.views.exact_decimals import quoted_numbers_sql

    c = duckdb.connect()
    sql = quoted_numbers_sql("s", {"value", "d"})
    text = c.execute(f"SELECT {sql} FROM (SELECT ?::VARCHAR AS s)", [doc]).fetchall()[0][0]
    want = _keys_quoted(json.loads(doc, parse_float=Source, parse_int=Source), {"value", "d"})
    assert json.loads(text) == want


def test_spec_mode_adds_no_column_and_keeps_18_places(con: duckdb.DuckDBPyConnection) -> None:
    compiled = compile_view(VIEW)
    assert [c.name for c in compiled.columns] == ["id", "t", "v", "cv"]
    got = {r[0]: r[2] for r in con.sql(compiled.sql).fetchall()}
    assert got["o1"] == Decimal("12345678901234567890.5")


def test_a_text_column_name_taken_by_the_view_is_an_error() -> None:
    clash = {
        "resource": "Observation",
        "select": [
            {
                "column": [
                    {"name": "v", "path": "value.ofType(Quantity).value"},
                    {"name": "v_text", "path": "id"},
                ]
            }
        ],
    }
    compile_view(clash)  # fine without the text columns
    with pytest.raises(Exception, match="duplicate column name 'v_text'"):
        compile_view(clash, exact_decimals=True)
