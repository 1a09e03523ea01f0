"""The shipped core views: they load, carry provenance, and equal a per-resource evaluation of
the same ViewDefinition (Python + fhirpathpy) on real-shaped data, with decimals exact."""

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import pytest

from medblocks_pipelines.lib.errors import ViewDefinitionError
from medblocks_pipelines.lib.warehouse.views import (
    PROVENANCE_COLUMNS,
    compile_view,
    data_dictionary,
    load_core_views,
    run_view,
)
from medblocks_pipelines.lib.warehouse.views.runner import _norm
from medblocks_pipelines_tests.support.views_reference import evaluate_view

from .conftest import by_id, resources_table

CORE = {
    "patient",
    "encounter",
    "condition",
    "observation",
    "observation_component",
    "medication_request",
    "allergy_intolerance",
    "immunization",
    "procedure",
    "diagnostic_report",
    "document_reference",
    "coverage",
    "explanation_of_benefit",
    "explanation_of_benefit_line",
}


def _canon(rows: list[dict[str, Any]]) -> list[str]:
    return sorted(repr(sorted((k, _norm(v)) for k, v in r.items())) for r in rows)


def test_core_views_load() -> None:
    views = load_core_views(user_dir="")
    assert set(views) == CORE


@pytest.mark.parametrize("name", sorted(CORE))
def test_core_view_equals_per_resource_evaluation(
    name: str, con: duckdb.DuckDBPyConnection, real_shaped: list[dict[str, Any]]
) -> None:
    v = load_core_views(user_dir="")[name]
    expected = evaluate_view(v, real_shaped)
    got = run_view(con, v, passthrough_columns=[]).to_pylist()
    assert expected, "the fixture must exercise every core view"
    assert _canon(got) == _canon(expected)


def test_core_views_equal_reference_on_generated_population(tmp_path: Path) -> None:
    from medblocks_sandbox.generator.ndjson import stream_bulk_ndjson

    stream_bulk_ndjson(tmp_path, resources=2500, seed=7)
    lines = [ln for f in sorted(tmp_path.glob("*.ndjson")) for ln in f.read_text().splitlines()]
    resources = [json.loads(ln, parse_float=Decimal) for ln in lines]
    c = duckdb.connect()
    resources_table(c, lines)
    for name, v in load_core_views(user_dir="").items():
        got = run_view(c, v, passthrough_columns=[]).to_pylist()
        assert _canon(got) == _canon(evaluate_view(v, resources)), name


def test_every_row_carries_provenance(con: duckdb.DuckDBPyConnection) -> None:
    for name, v in load_core_views(user_dir="").items():
        table = run_view(con, v)
        assert table.column_names[: len(PROVENANCE_COLUMNS)] == list(PROVENANCE_COLUMNS), name
        for row in table.to_pylist():
            for key in (
                "tenant",
                "pattern",
                "source",
                "resource_key",
                "resource_id",
                "fetched_at",
                "run_id",
            ):
                assert row[key] is not None, (name, key)


def test_known_values(con: duckdb.DuckDBPyConnection) -> None:
    views = load_core_views(user_dir="")
    pat = by_id(run_view(con, views["patient"]).to_pylist())
    assert pat["pat-a"]["family_name"] == "O'Brien"  # official name, not the first (maiden)
    assert pat["pat-a"]["given_names"] == "Anne Marie Zoë"
    assert pat["pat-a"]["race_code"] == "2054-5" and pat["pat-a"]["birth_sex"] == "M"
    assert pat["pat-a"]["mrn"] == "MRN-1" and pat["pat-a"]["phone"] == "555-0100"
    assert pat["pat-b"]["deceased"] is False and pat["pat-c"]["family_name"] is None
    comps = run_view(con, views["observation_component"]).to_pylist()
    assert [(c["observation_id"], c["component_index"], c["loinc_code"]) for c in comps] == [
        ("bp-1", 0, "8480-6"),
        ("bp-1", 1, "8462-4"),
        ("bp-1", 2, None),
        ("bp-1", 3, None),
    ]
    assert comps[0]["value_quantity"] == Decimal("120.00000000000000001")
    obs = by_id(run_view(con, views["observation"]).to_pylist())
    assert obs["lab-1"]["value_quantity"] == Decimal("12345678901234.123456789")
    assert obs["obs-int"]["value_integer"] == 42 and obs["obs-bool"]["value_boolean"] is False
    assert obs["bp-1"]["component_count"] == 4 and obs["obs-bool"]["patient_id"] is None
    lines = run_view(con, views["explanation_of_benefit_line"]).to_pylist()
    first = next(r for r in lines if r["eob_id"] == "eob-1" and r["sequence"] == 1)
    assert first["allowed_amount"] == Decimal("99.999999999999999999")
    assert first["net_amount"] == Decimal("150.10") and first["diagnosis_sequences"] == [1, 2]
    eob = by_id(run_view(con, views["explanation_of_benefit"]).to_pylist())
    assert (
        eob["eob-1"]["coverage_id"] == "cov-1"
        and eob["eob-1"]["principal_diagnosis_code"] == "E11.9"
    )
    assert eob["eob-1"]["diagnosis_codes"] == ["I10", "E11.9"] and eob["eob-2"]["item_count"] == 0
    mr = by_id(run_view(con, views["medication_request"]).to_pylist())
    assert mr["mr-1"]["medication_code"] == "860975" and mr["mr-2"]["medication_id"] == "med-1"
    assert mr["mr-1"]["dose_value"] == Decimal("0.333333333333333333")


def test_user_views_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, con: duckdb.DuckDBPyConnection
) -> None:
    custom = {
        "resourceType": "ViewDefinition",
        "name": "patient_names",
        "resource": "Patient",
        "select": [
            {"column": [{"name": "pid", "path": "getResourceKey()"}]},
            {"forEach": "name", "column": [{"name": "family", "path": "family"}]},
        ],
    }
    (tmp_path / "names.json").write_text(json.dumps(custom))
    monkeypatch.setenv("MEDBLOCKS_VIEWS_DIR", str(tmp_path))
    views = load_core_views()
    assert set(views) == CORE | {"patient_names"}
    got = run_view(con, views["patient_names"]).to_pylist()
    assert sorted(str(r["family"]) for r in got) == ["None", "O'Brien", "Oldname"]

    (tmp_path / "broken.json").write_text(
        json.dumps(
            {
                "name": "broken",
                "resource": "Patient",
                "select": [{"column": [{"name": "x", "path": "nosuch"}]}],
            }
        )
    )
    with pytest.raises(ViewDefinitionError, match="broken.json"):
        load_core_views()


def test_data_dictionary_lists_every_view_and_column() -> None:
    views = load_core_views(user_dir="")
    md = data_dictionary(views)
    for name, v in views.items():
        assert f"## `{name}`" in md
        for c in compile_view(v).columns:
            assert f"| `{c.name}` | {c.sql_type} |" in md
    assert "| `value_quantity` | DECIMAL(38,18) |" in md


def test_core_views_equal_reference_on_carebundle_shapes() -> None:
    # Shapes we did not write ourselves (carebundle: US Core R4, BP panels with components).
    carebundle = pytest.importorskip("carebundle")
    ndjson = carebundle.to_ndjson(carebundle.generate_cohort(count=12, seed=5))
    lines = [ln for text in ndjson.values() for ln in text.splitlines() if ln]
    resources = [json.loads(ln, parse_float=Decimal) for ln in lines]
    c = duckdb.connect()
    resources_table(c, lines)
    exercised = 0
    for name, v in load_core_views(user_dir="").items():
        got = run_view(c, v, passthrough_columns=[]).to_pylist()
        assert _canon(got) == _canon(evaluate_view(v, resources)), name
        exercised += bool(got)
    assert exercised >= 7


@pytest.mark.parametrize(
    ("file_text", "message"),
    [
        # not JSON at all
        ("{not json", "not valid JSON"),
        # JSON but not an object
        ("[1, 2]", "must be a JSON object"),
        # a view without a name cannot become a table
        (
            json.dumps(
                {"resource": "Patient", "select": [{"column": [{"name": "id", "path": "id"}]}]}
            ),
            "needs a 'name'",
        ),
        # unknown top-level key (typo of select)
        (json.dumps({"name": "x", "resource": "Patient", "selects": []}), "unknown ViewDefinition"),
    ],
)
def test_bad_user_view_files_name_the_file(tmp_path: Path, file_text: str, message: str) -> None:
    (tmp_path / "mine.json").write_text(file_text)
    with pytest.raises(ViewDefinitionError, match=message) as info:
        load_core_views(user_dir=tmp_path)
    assert "mine.json" in str(info.value)


def test_user_view_replaces_a_core_view_of_the_same_name(tmp_path: Path) -> None:
    mine = {
        "name": "patient",
        "resource": "Patient",
        "select": [{"column": [{"name": "pid", "path": "id"}]}],
    }
    (tmp_path / "patient.json").write_text(json.dumps(mine))
    views = load_core_views(user_dir=tmp_path)
    assert set(views) == CORE and views["patient"]["select"][0]["column"][0]["name"] == "pid"
