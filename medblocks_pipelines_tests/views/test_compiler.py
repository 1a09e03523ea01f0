"""Compiler behaviour beyond the suite: validation errors raised before running, FHIRPath
semantics on real-shaped data, exact decimals, passthrough provenance, repeat to any depth and
runtime cardinality errors."""

import json
from decimal import Decimal
from typing import Any

import duckdb
import pytest

from medblocks_pipelines.lib.errors import ViewDefinitionError
from medblocks_pipelines.lib.warehouse.views import compile_view, run_view
from medblocks_pipelines.lib.warehouse.views import fhirpath as fp

from .conftest import by_id, resources_table


def view(resource: str, *columns: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"resource": resource, "select": [{"column": list(columns)}], **extra}


def col(name: str, path: str, **kw: Any) -> dict[str, Any]:
    return {"name": name, "path": path, **kw}


def rows(con: duckdb.DuckDBPyConnection, v: dict[str, Any]) -> list[dict[str, Any]]:
    return run_view(con, v, passthrough_columns=[]).to_pylist()


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        # unknown function
        (view("Patient", col("x", "name.frobnicate()")), "unknown or unsupported FHIRPath"),
        # unknown element: a typo must not silently yield NULLs
        (view("Patient", col("x", "nmae.family")), "unknown element 'nmae' on Patient"),
        # unknown resource type
        (view("Patinet", col("x", "id")), "unknown resource type"),
        # where that is not boolean
        (view("Patient", col("x", "id"), where=[{"path": "name.given"}]), "must return a boolean"),
        # complex value in a column
        (view("Patient", col("x", "name")), "not a primitive"),
        # choice element without ofType
        (view("Observation", col("x", "value")), "ofType"),
        # syntax error
        (view("Patient", col("x", "name.(")), "syntax error"),
        # bad column name
        (view("Patient", col("1x", "id")), "invalid column name"),
        # duplicate column
        (view("Patient", col("a", "id"), col("a", "gender")), "duplicate column"),
        # constant with two values
        (
            view(
                "Patient",
                col("a", "%c"),
                constant=[{"name": "c", "valueString": "x", "valueInteger": 1}],
            ),
            "exactly one",
        ),
        # unknown key in a select (typo of forEach)
        (
            {"resource": "Patient", "select": [{"foreach": "name", "column": [col("a", "id")]}]},
            "unknown select keys",
        ),
        # two iterators on one select
        (
            {
                "resource": "Patient",
                "select": [
                    {"forEach": "name", "forEachOrNull": "name", "column": [col("a", "family")]}
                ],
            },
            "only one",
        ),
        # boolean operator on strings
        (view("Patient", col("a", "gender and active")), "boolean operands"),
        # arithmetic on strings
        (view("Patient", col("a", "gender * 2")), "needs numbers"),
        # unionAll branches with different types
        (
            {
                "resource": "Patient",
                "select": [
                    {"unionAll": [{"column": [col("a", "id")]}, {"column": [col("a", "active")]}]}
                ],
            },
            "types",
        ),
        # quantity literal (not in the subset)
        (view("Observation", col("a", "value.ofType(Quantity).value > 5 'mg'")), "quantity"),
        # empty view
        ({}, "non-empty"),
        # collection: false on elements that repeat (wrong collection use)
        (view("Patient", col("g", "name.given", collection=False)), "collection: false"),
    ],
)
def test_invalid_views_fail_before_running(bad: dict[str, Any], message: str) -> None:
    with pytest.raises(ViewDefinitionError, match=message):
        compile_view(bad)


def test_passthrough_clash_is_an_error() -> None:
    with pytest.raises(ViewDefinitionError, match="clash"):
        compile_view(view("Patient", col("source", "id")), passthrough_columns=["source"])


def test_passthrough_columns_on_every_row_including_foreach(con: duckdb.DuckDBPyConnection) -> None:
    v = {
        "resource": "Patient",
        "select": [
            {"column": [col("id", "id")]},
            {"forEach": "name", "column": [col("family", "family")]},
        ],
    }
    compiled = compile_view(v, passthrough_columns=["tenant", "source", "fetched_at"])
    out = con.sql(compiled.sql).fetchall()
    assert compiled.column_names == ["tenant", "source", "fetched_at", "id", "family"]
    assert len(out) == 3  # pat-a has two names, pat-b one, pat-c none
    assert all(r[0] == "tenant-a" and r[1] in ("src-0", "src-1") and r[2] is not None for r in out)


def test_decimals_are_exact_through_the_view(con: duckdb.DuckDBPyConnection) -> None:
    v = {
        "resource": "Observation",
        "select": [
            {
                "column": [
                    col("id", "id"),
                    col("v", "value.ofType(Quantity).value"),
                    col("low", "referenceRange.first().low.value"),
                    col("high", "referenceRange.first().high.value"),
                ]
            },
        ],
    }
    got = by_id(rows(con, v))
    assert got["lab-1"]["v"] == Decimal("12345678901234.123456789")
    assert got["lab-1"]["low"] == Decimal("0.000000000000000001")
    assert got["lab-1"]["high"] == Decimal("99.5")
    assert got["obs-neg"]["v"] == Decimal("-0.5")
    comp = {
        "resource": "Observation",
        "select": [{"forEach": "component", "column": [col("v", "value.ofType(Quantity).value")]}],
    }
    values = [r["v"] for r in rows(con, comp) if r["v"] is not None]
    assert values == [Decimal("120.00000000000000001")]


def test_choice_types_inside_foreach(con: duckdb.DuckDBPyConnection) -> None:
    v = {
        "resource": "Observation",
        "where": [{"path": "id = 'bp-1'"}],
        "select": [
            {
                "forEach": "component",
                "column": [
                    col("i", "%rowIndex"),
                    col("loinc", "code.coding.where(system = 'http://loinc.org').code.first()"),
                    col("q", "value.ofType(Quantity).value"),
                    col("cc", "value.ofType(CodeableConcept).coding.code.first()"),
                    col("s", "valueString"),
                    col("has_value", "value.exists()"),
                    col("absent", "dataAbsentReason.exists()"),
                ],
            }
        ],
    }
    got = rows(con, v)
    assert [r["i"] for r in got] == [0, 1, 2, 3]
    assert [r["loinc"] for r in got] == ["8480-6", "8462-4", None, None]
    assert [r["cc"] for r in got] == [None, None, "33586001", None]
    assert [r["s"] for r in got] == [None, None, None, "left arm"]
    assert [r["has_value"] for r in got] == [True, False, True, True]
    assert [r["absent"] for r in got] == [False, True, False, False]


def test_fhirpath_functions_on_real_shapes(con: duckdb.DuckDBPyConnection) -> None:
    race = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race"
    v = view(
        "Patient",
        col("id", "id"),
        col("official", "name.where(use = 'official').family"),
        col("all_given", "name.given", collection=True),
        col("n_given", "name.given.count()"),
        col("last_given", "name.given.last()"),
        col(
            "race",
            f"extension('{race}').extension('ombCategory').value.ofType(Coding).code",
            collection=True,
        ),
        col("phones", "telecom.where(system = 'phone').value.join('|')"),
        col("upper", "name.where(use = 'official').family.upper()"),
        col("starts", r"name.where(use = 'official').family.startsWith('O\'')"),
        col("org", "managingOrganization.getReferenceKey(Organization)"),
        col("org_wrong", "managingOrganization.getReferenceKey(Patient)"),
        col("low", "birthDate.lowBoundary()"),
        col("high", "birthDate.highBoundary()"),
        col(
            "dead", "deceased.ofType(boolean) | deceased.ofType(dateTime).exists()", collection=True
        ),
        col("xor", "active xor deceased.ofType(boolean)"),
        col("implies", "active implies gender = 'male'"),
        col("iif", "iif(active, 'on', 'off')"),
        col("arith", "name.given.count() * 2 + 1"),
        col("div", "7 div 2"),
        col("mod", "7 mod 2"),
        col("in_", "'Zoë' in name.given"),
    )
    got = by_id(rows(con, v))
    a, b, c = got["pat-a"], got["pat-b"], got["pat-c"]
    assert a["official"] == "O'Brien" and b["official"] is None
    assert a["all_given"] == ["Zed", "Anne", "Marie", "Zoë"] and c["all_given"] == []
    assert (a["n_given"], b["n_given"], c["n_given"]) == (4, 0, 0)
    assert a["last_given"] == "Zoë"
    assert a["race"] == ["2054-5", "2106-3"]
    assert a["phones"] == "555-0100|555-0101" and c["phones"] == ""
    assert a["upper"] == "O'BRIEN" and a["starts"] is True
    assert a["org"] == "org-1" and a["org_wrong"] is None
    assert (a["low"], a["high"]) == ("1970-06-01", "1970-06-30")
    assert a["dead"] == [True] and b["dead"] == [False]
    assert a["xor"] is None and b["xor"] is None
    assert a["implies"] is True and c["implies"] is None
    assert a["iif"] == "on" and c["iif"] == "off"
    assert a["arith"] == 9 and (a["div"], a["mod"]) == (3, 1)
    assert a["in_"] is True and c["in_"] is False


def test_singleton_column_with_many_values_raises_at_run_time(
    con: duckdb.DuckDBPyConnection,
) -> None:
    v = view("Patient", col("given", "name.given"))
    with pytest.raises(duckdb.Error, match="more than one value"):
        rows(con, v)
    lenient = compile_view(v, strict_cardinality=False)
    assert len(con.sql(lenient.sql).fetchall()) == 3


def test_nested_foreach_unionall_and_foreachornull(con: duckdb.DuckDBPyConnection) -> None:
    v = {
        "resource": "ExplanationOfBenefit",
        "select": [
            {"column": [col("eob", "id")]},
            {
                "forEachOrNull": "item",
                "column": [col("seq", "sequence")],
                "select": [
                    {
                        "forEachOrNull": "adjudication",
                        "column": [
                            col("cat", "category.coding.code.first()"),
                            col("amt", "amount.value"),
                        ],
                    }
                ],
            },
            {
                "unionAll": [
                    {"column": [col("kind", "'header'")]},
                    {"forEach": "diagnosis", "column": [col("kind", "'dx'")]},
                ]
            },
        ],
    }
    got = rows(con, v)
    eob1 = [r for r in got if r["eob"] == "eob-1"]
    # (3 adjudications + 1) x (1 header + 3 diagnoses)
    assert len(eob1) == 4 * 4
    eob2 = [r for r in got if r["eob"] == "eob-2"]
    assert eob2 == [{"eob": "eob-2", "seq": None, "cat": None, "amt": None, "kind": "header"}]
    amounts = {r["amt"] for r in eob1 if r["cat"] == "eligible"}
    assert amounts == {Decimal("99.999999999999999999")}


def test_repeat_walks_nested_items_in_document_order() -> None:
    qr = (
        '{"resourceType":"QuestionnaireResponse","id":"q","item":[{"linkId":"1","item":'
        '[{"linkId":"1.1","answer":[{"valueString":"x","item":[{"linkId":"1.1.1"}]}]}]},'
        '{"linkId":"2"}]}'
    )
    c = duckdb.connect()
    resources_table(c, [qr])
    v = {
        "resource": "QuestionnaireResponse",
        "select": [
            {
                "repeat": ["item", "answer.item"],
                "column": [col("i", "%rowIndex"), col("l", "linkId")],
                "select": [
                    {"forEachOrNull": "answer", "column": [col("a", "value.ofType(string)")]}
                ],
            }
        ],
    }
    got = run_view(c, v, passthrough_columns=[]).to_pylist()
    assert [(r["i"], r["l"], r["a"]) for r in got] == [
        (0, "1", None),
        (1, "1.1", "x"),
        (2, "1.1.1", None),
        (3, "2", None),
    ]


def test_repeat_has_no_depth_limit() -> None:
    item: dict[str, Any] = {"linkId": "leaf"}
    for n in range(40):
        item = {"linkId": str(n), "item": [item, {"linkId": f"{n}b"}]}
    c = duckdb.connect()
    resources_table(
        c,
        [
            json.dumps({"resourceType": "QuestionnaireResponse", "id": "deep", "item": [item]}),
            json.dumps({"resourceType": "QuestionnaireResponse", "id": "none"}),
        ],
    )
    v = {
        "resource": "QuestionnaireResponse",
        "select": [
            {"column": [col("id", "id")]},
            {"repeat": ["item"], "column": [col("l", "linkId"), col("i", "%rowIndex")]},
        ],
    }
    got = run_view(c, v, passthrough_columns=[]).to_pylist()
    assert len(got) == 81 and {r["id"] for r in got} == {"deep"}
    # document order: 39, 38, ..., 0, leaf, 0b, 1b, ..., 39b
    assert [r["l"] for r in got[:41]] == [str(n) for n in range(39, -1, -1)] + ["leaf"]
    assert [r["l"] for r in got[41:]] == [f"{n}b" for n in range(40)]
    assert [r["i"] for r in got] == list(range(81))


def test_repeat_below_the_resource() -> None:
    qr = {
        "resourceType": "QuestionnaireResponse",
        "id": "q",
        "item": [
            {
                "linkId": "g1",
                "item": [
                    {
                        "linkId": "g1.1",
                        "answer": [{"valueString": "x", "item": [{"linkId": "g1.1.1"}]}],
                    }
                ],
            },
            {"linkId": "g2"},
        ],
    }
    c = duckdb.connect()
    resources_table(c, [json.dumps(qr)])
    v = {
        "resource": "QuestionnaireResponse",
        "select": [
            {
                "forEach": "item",
                "column": [col("group", "linkId")],
                "select": [
                    {
                        "repeat": ["item", "answer.item"],
                        "column": [col("l", "linkId"), col("i", "%rowIndex")],
                    }
                ],
            }
        ],
    }
    got = run_view(c, v, passthrough_columns=[]).to_pylist()
    assert [(r["group"], r["l"], r["i"]) for r in got] == [("g1", "g1.1", 0), ("g1", "g1.1.1", 1)]


def test_repeat_below_the_resource_has_a_depth_limit_that_raises() -> None:
    from medblocks_pipelines.lib.warehouse.views.compiler import NESTED_REPEAT_DEPTH

    item: dict[str, Any] = {"linkId": "leaf"}
    for n in range(NESTED_REPEAT_DEPTH + 1):
        item = {"linkId": str(n), "item": [item]}
    c = duckdb.connect()
    resources_table(
        c,
        [
            json.dumps(
                {
                    "resourceType": "QuestionnaireResponse",
                    "id": "q",
                    "item": [{"linkId": "top", "item": [item]}],
                }
            )
        ],
    )
    v = {
        "resource": "QuestionnaireResponse",
        "select": [
            {"forEach": "item", "select": [{"repeat": ["item"], "column": [col("l", "linkId")]}]}
        ],
    }
    with pytest.raises(duckdb.Error, match="deeper than"):
        run_view(c, v, passthrough_columns=[])


def test_repeat_path_also_read_as_a_structure_is_refused() -> None:
    v = {
        "resource": "QuestionnaireResponse",
        "select": [
            {
                "forEach": "item",
                "column": [col("n", "item.linkId.count()")],
                "select": [{"repeat": ["item"], "column": [col("l", "linkId")]}],
            }
        ],
    }
    with pytest.raises(ViewDefinitionError, match="both as a value and a structure"):
        compile_view(v)


def test_resource_type_filter_and_missing_type_column() -> None:
    c = duckdb.connect()
    c.execute("CREATE TABLE raw (resource VARCHAR)")
    c.execute(
        "INSERT INTO raw VALUES "
        '(\'{"resourceType":"Patient","id":"p"}\'),'
        '(\'{"resourceType":"Observation","id":"o"}\')'
    )
    compiled = compile_view(
        view("Patient", col("id", "id")), table="raw", resource_type_column=None
    )
    assert c.sql(compiled.sql).fetchall() == [("p",)]


def test_wrong_json_types_in_data_give_null_not_a_failed_build() -> None:
    # A source that sends "active": "maybe" or a string for a decimal must not kill the view.
    c = duckdb.connect()
    resources_table(
        c,
        [
            '{"resourceType":"Patient","id":"p","active":"maybe","gender":7}',
            '{"resourceType":"Observation","id":"o","valueQuantity":{"value":"1x"}}',
        ],
    )
    assert rows(c, view("Patient", col("a", "active"), col("g", "gender"))) == [
        {"a": None, "g": "7"}
    ]
    assert rows(c, view("Observation", col("v", "value.ofType(Quantity).value"))) == [{"v": None}]


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        # precedence: and binds tighter than or
        (
            "a or b and c",
            fp.Binary(
                "or",
                fp.Member(None, "a"),
                fp.Binary("and", fp.Member(None, "b"), fp.Member(None, "c")),
            ),
        ),
        # indexer then member
        (
            "name[1].family",
            fp.Member(fp.Index(fp.Member(None, "name"), fp.Literal(1, "integer")), "family"),
        ),
        # escaped quote and delimited identifier
        (
            r"`given`.where($this = 'O\'B')",
            fp.Call(
                fp.Member(None, "given"),
                "where",
                (fp.Binary("=", fp.This(), fp.Literal("O'B", "string")),),
            ),
        ),
        # constant and date literal
        ("%bd = @2020-01", fp.Binary("=", fp.Var("bd"), fp.Literal("2020-01", "date"))),
        # unary minus and decimal
        ("-1.50", fp.Unary("-", fp.Literal("1.50", "decimal"))),
    ],
)
def test_fhirpath_parser(expr: str, expected: fp.Node) -> None:
    assert fp.parse(expr) == expected


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        # same instant in two time zones
        ("@2024-05-01T10:00:00-07:00 = @2024-05-01T17:00:00Z", True),
        ("@2024-05-01T10:00:00-07:00 > @2024-05-01T16:00:00Z", True),
        # same precision: text order
        ("@2024-05-01 < @2024-05-02", True),
        # different precision, equal on the common part: unknown
        ("@2024-05 = @2024-05-01", None),
        ("@2024-05-01 < @2024-05-01T10:00:00Z", None),
        # different precision, different common part: decided
        ("@2024-04 < @2024-05-01", True),
        ("@2023 = @2024-05-01", False),
    ],
)
def test_date_comparisons_follow_fhirpath(expr: str, expected: bool | None) -> None:
    c = duckdb.connect()
    resources_table(c, ['{"resourceType":"Patient","id":"p"}'])
    assert rows(c, view("Patient", col("x", expr)))[0]["x"] is expected


def test_resource_variables_inside_foreach_and_choice_exists(
    con: duckdb.DuckDBPyConnection,
) -> None:
    v = {
        "resource": "Observation",
        "where": [{"path": "value.exists()"}],
        "select": [
            {
                "forEachOrNull": "component",
                "column": [
                    col("obs", "%resource.getResourceKey()"),
                    col("subject", "%resource.subject.getReferenceKey(Patient)"),
                    col("n", "%rowIndex"),
                    col("label", "iif(value.ofType(Quantity).exists(), 'quantity')"),
                ],
            }
        ],
    }
    got = rows(con, v)
    # bp-1 has no value of its own, so only lab-1, obs-int, obs-bool and obs-neg pass the where
    assert sorted({r["obs"] for r in got}) == ["lab-1", "obs-bool", "obs-int", "obs-neg"]
    assert all(r["n"] == 0 and r["label"] is None for r in got)
    assert {r["obs"]: r["subject"] for r in got}["lab-1"] == "pat-a"


@pytest.mark.parametrize(
    ("constant", "path", "expected_ids"),
    [
        ({"name": "c", "valueCode": "male"}, "gender = %c", ["pat-a"]),
        ({"name": "c", "valueBoolean": False}, "deceased.ofType(boolean) = %c", ["pat-b"]),
        ({"name": "c", "valueInteger": 2}, "name.count() = %c", ["pat-a"]),
        ({"name": "c", "valueDate": "1970-06"}, "birthDate = %c", ["pat-a"]),
        ({"name": "c", "valueDecimal": 2.5}, "name.count() < %c", ["pat-a", "pat-b", "pat-c"]),
        ({"name": "c", "valueUri": "urn:mrn"}, "identifier.system contains %c", ["pat-a"]),
    ],
)
def test_constants_in_where(
    con: duckdb.DuckDBPyConnection, constant: dict[str, Any], path: str, expected_ids: list[str]
) -> None:
    v = view("Patient", col("id", "id"), constant=[constant], where=[{"path": path}])
    assert sorted(r["id"] for r in rows(con, v)) == expected_ids


@pytest.mark.parametrize(
    ("reference", "typed", "untyped"),
    [
        ("Patient/p1", "p1", "p1"),
        # absolute URL with a version: the key is the id
        ("https://ehr.example/fhir/Patient/p1/_history/7", "p1", "p1"),
        # the type must be a whole segment
        ("MyPatient/p1", None, "p1"),
        # another type
        ("Group/g1", None, "g1"),
        # contained and logical references have no key
        ("#contained-1", None, None),
        ("urn:uuid:53fefa32-fcbb-4ff8-8a92-55ee120877b7", None, None),
    ],
)
def test_reference_keys(reference: str, typed: str | None, untyped: str | None) -> None:
    c = duckdb.connect()
    resources_table(
        c,
        [
            json.dumps(
                {"resourceType": "Observation", "id": "o", "subject": {"reference": reference}}
            )
        ],
    )
    got = rows(
        c,
        view(
            "Observation",
            col("t", "subject.getReferenceKey(Patient)"),
            col("u", "subject.getReferenceKey()"),
        ),
    )
    assert got == [{"t": typed, "u": untyped}]


def test_first_takes_the_first_present_value() -> None:
    # first() on a list where the first coding has no code must skip it (not return NULL).
    c = duckdb.connect()
    resources_table(
        c,
        [
            '{"resourceType":"Observation","id":"o","code":{"coding":['
            '{"display":"no code"},{"code":"b"},{"code":"c"}]}}'
        ],
    )
    got = rows(
        c,
        view(
            "Observation", col("f", "code.coding.code.first()"), col("l", "code.coding.code.last()")
        ),
    )
    assert got == [{"f": "b", "l": "c"}]


def test_getreferencekey_type_must_be_a_resource_type() -> None:
    with pytest.raises(ViewDefinitionError, match="not a resource type"):
        compile_view(view("Observation", col("x", "subject.getReferenceKey('a|b')")))


def test_ansi_type_tag_casts_and_rejects_injection(con: duckdb.DuckDBPyConnection) -> None:
    tag = [{"name": "ansi/type", "value": "TIMESTAMP WITH TIME ZONE"}]
    v = view(
        "Observation",
        col("id", "id"),
        col("issued", "issued", tag=tag),
        col(
            "d",
            "value.ofType(Quantity).value",
            tag=[{"name": "ansi/type", "value": "DECIMAL(20,9)"}],
        ),
    )
    compiled = compile_view(v)
    assert [c.sql_type for c in compiled.columns] == [
        "VARCHAR",
        "TIMESTAMP WITH TIME ZONE",
        "DECIMAL(20,9)",
    ]
    got = by_id(rows(con, v))
    assert str(got["lab-1"]["issued"].isoformat()).startswith("2024-05-03T00:00:00")
    assert got["lab-1"]["d"] is None  # 12345678901234.123456789 does not fit DECIMAL(20,9)
    assert got["obs-neg"]["d"] == Decimal("-0.5")
    bad = view(
        "Patient",
        col("x", "id", tag=[{"name": "ansi/type", "value": "VARCHAR); DROP TABLE resources; --"}]),
    )
    with pytest.raises(ViewDefinitionError, match="invalid ansi/type"):
        compile_view(bad)


def test_empty_literal_inside_an_expression(con: duckdb.DuckDBPyConnection) -> None:
    v = view(
        "Patient", col("id", "id"), col("x", "iif(active, gender, {})"), col("e", "{}.exists()")
    )
    got = by_id(rows(con, v))
    assert got["pat-a"]["x"] == "male" and got["pat-c"]["x"] is None
    assert got["pat-a"]["e"] is False


def test_quotes_in_constants_and_literals_cannot_break_out(
    con: duckdb.DuckDBPyConnection,
) -> None:
    evil = "x'); DROP TABLE resources; --"
    v = view(
        "Patient",
        col("id", "id"),
        col("c", "%evil"),
        col("l", r"'it\'s'"),
        col("u", "extension('" + evil.replace("'", "\\'") + "').exists()"),
        constant=[{"name": "evil", "valueString": evil}],
        where=[{"path": "name.family != %evil"}],
    )
    got = rows(con, v)
    assert {r["c"] for r in got} == {evil} and {r["l"] for r in got} == {"it's"}
    assert all(r["u"] is False for r in got)
    assert con.execute("SELECT count(*) FROM resources").fetchall() == [(21,)]


def test_empty_table_and_other_types_are_ignored() -> None:
    c = duckdb.connect()
    resources_table(c, ['{"resourceType":"Observation","id":"o"}'])
    compiled = compile_view(
        view("Patient", col("id", "id"), col("n", "name.family", collection=True))
    )
    table = c.sql(compiled.sql).to_arrow_table()
    assert table.num_rows == 0 and table.column_names == ["id", "n"]
    assert str(table.schema.field("n").type.value_type) == "string"
    assert (
        compile_view(view("Patient", col("id", "id"))).sql
        == compile_view(view("Patient", col("id", "id"))).sql
    )  # deterministic SQL
