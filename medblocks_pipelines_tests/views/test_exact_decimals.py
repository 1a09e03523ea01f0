"""Decimals past DECIMAL(38,18) through views: the ``<name>_text`` columns of
``compile_view(..., exact_decimals=True)`` (the warehouse build's mode) keep every digit, at the
resource level and through forEach; the spec-suite mode adds no column."""

from decimal import Decimal

import duckdb
import pytest

from medblocks_pipelines.lib.warehouse.views import compile_view

from .conftest import resources_table

# Written as JSON number text, byte for byte as a source would send them.
VALUES = [
    "0.0003311129543085922",  # 19 decimal places: DECIMAL(38,18) rounds the last one
    "12345678901234567890.5",  # 20 integer digits: a finer DECIMAL overflows
    "-0.000000000000000000123",  # tiny negative
    "99999999.123456789012345678901",  # 8 integer digits and 21 places
    "42",
]
VIEW = {
    "resource": "Observation",
    "select": [
        {
            "column": [
                {"name": "id", "path": "id"},
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
    lines = [
        '{"resourceType":"Observation","id":"o%d","status":"final","code":{"text":"x"},'
        '"valueQuantity":{"value":%s},"component":[{"code":{"text":"c"},'
        '"valueQuantity":{"value":%s}}]}' % (n, v, v)
        for n, v in enumerate(VALUES)
    ]
    lines.append('{"resourceType":"Observation","id":"none","status":"final","code":{"text":"x"}}')
    resources_table(c, lines)
    return c


def test_every_digit_survives_in_the_text_columns(con: duckdb.DuckDBPyConnection) -> None:
    compiled = compile_view(VIEW, exact_decimals=True)
    assert [c.name for c in compiled.columns] == ["id", "v", "v_text", "cv", "cv_text"]
    rows = {r[0]: r for r in con.sql(compiled.sql).fetchall()}
    for n, text in enumerate(VALUES):
        _id, v, v_text, cv, cv_text = rows[f"o{n}"]
        assert v_text == text and cv_text == text, (text, v_text, cv_text)
        assert Decimal(v_text) == Decimal(text)
        assert v == cv  # the numeric column is unchanged: DECIMAL(38,18)
    assert rows["o0"][1] == Decimal("0.000331112954308592")  # what the numeric column alone keeps
    assert rows["none"][1:] == (None, None, None, None)


def test_spec_mode_adds_no_column_and_keeps_18_places(con: duckdb.DuckDBPyConnection) -> None:
    compiled = compile_view(VIEW)
    assert [c.name for c in compiled.columns] == ["id", "v", "cv"]
    got = {r[0]: r[1] for r in con.sql(compiled.sql).fetchall()}
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
