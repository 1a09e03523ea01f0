"""Warehouse quality checks: they pass on a good build and fail on each fault they guard against."""

import shutil
from pathlib import Path

import duckdb
import pytest

from medblocks_pipelines.lib.warehouse import quality
from medblocks_pipelines.lib.warehouse.build import table_counts
from medblocks_pipelines_tests.warehouse.conftest import Built


def test_all_checks_pass_on_a_good_build(built: Built, wh: duckdb.DuckDBPyConnection) -> None:
    outcomes = quality.run_checks(wh, built.result.table_counts, built.result.table_counts)
    assert [o.name for o in outcomes] == list(quality.CHECK_NAMES)
    assert all(o.passed for o in outcomes), [o for o in outcomes if not o.passed]


@pytest.mark.parametrize(
    ("sql", "failing"),
    [
        # a person vanishes: its links and facts point nowhere
        (
            "DELETE FROM persons WHERE person_id = (SELECT min(person_id) FROM persons)",
            {"every_row_has_person"},
        ),
        # a fact source points at a resource that is not in the warehouse
        (
            "UPDATE fact_sources SET resource_key = 'x/Condition/ghost' "
            "WHERE rowid = (SELECT min(rowid) FROM fact_sources)",
            {"referential_integrity"},
        ),
        # provenance lost on a view table
        (
            "UPDATE condition SET source = NULL WHERE rowid = (SELECT min(rowid) FROM condition)",
            {"every_row_has_provenance"},
        ),
        # a fact without any source
        (
            "DELETE FROM fact_sources WHERE fact_id = (SELECT min(fact_id) FROM facts)",
            {"every_row_has_provenance"},
        ),
        # a view failed to build
        (
            "INSERT INTO view_errors VALUES ('broken_view', 'ViewDefinitionError')",
            {"views_compiled"},
        ),
        # a network row that does not say why it was let in (purpose lost)
        (
            "UPDATE resources SET permitted_purpose = NULL WHERE rowid = "
            "(SELECT min(rowid) FROM resources WHERE pattern = 'network')",
            {"network_rows_have_purpose"},
        ),
        # a network fact source without the query that obtained it
        (
            "UPDATE fact_sources SET network_query_id = NULL WHERE rowid = "
            "(SELECT min(rowid) FROM fact_sources WHERE pattern = 'network')",
            {"network_rows_have_purpose"},
        ),
    ],
)
def test_checks_catch_faults(built: Built, sql: str, failing: set[str], tmp_path: Path) -> None:
    copy = tmp_path / "copy.duckdb"
    shutil.copy(built.result.path, copy)
    with duckdb.connect(str(copy)) as con:
        con.execute(sql)
        counts = table_counts(con)
        outcomes = quality.run_checks(con, counts, built.result.table_counts)
    failed = {o.name for o in outcomes if not o.passed}
    assert failing <= failed
    assert not failed - failing - {"row_counts"}


@pytest.mark.parametrize(
    ("table", "failing"),
    [
        # the identity step did not run: no persons, nothing can be checked against them
        ("persons", {"every_row_has_person", "referential_integrity"}),
        # the unified step did not run
        ("fact_sources", {"every_row_has_provenance", "referential_integrity"}),
        # the views step did not run (or its bookkeeping is gone)
        ("view_errors", {"views_compiled"}),
        # a view table listed in view_tables is missing
        ("condition", {"every_row_has_provenance"}),
    ],
)
def test_checks_fail_when_their_table_is_missing(
    built: Built, table: str, failing: set[str], tmp_path: Path
) -> None:
    copy = tmp_path / "copy.duckdb"
    shutil.copy(built.result.path, copy)
    with duckdb.connect(str(copy)) as con:
        con.execute(f'DROP TABLE "{table}" CASCADE')
        outcomes = {o.name: o for o in quality.run_checks(con, table_counts(con), None)}
    failed = {n for n, o in outcomes.items() if not o.passed}
    assert failing <= failed
    for name in failing:
        assert table in outcomes[name].metadata["missing_tables"]
        assert outcomes[name].severity == "ERROR"


def test_row_count_check_flags_a_collapse() -> None:
    prev = {"resources": 1000, "facts": 500, "persons": 50}
    ok = quality.check_row_counts({"resources": 990, "facts": 498, "persons": 50}, prev)
    assert ok.passed
    bad = quality.check_row_counts({"resources": 990, "facts": 100, "persons": 0}, prev)
    assert not bad.passed
    assert bad.metadata["emptied"] == ["persons"] and bad.metadata["shrunk"] == ["facts"]
    assert quality.check_row_counts({"resources": 1}, None).passed  # first build


def test_quarantine_growth_check() -> None:
    prev = {"quarantine": 10, "resource_versions": 1000}
    assert quality.check_quarantine_growth(
        {"quarantine": 12, "resource_versions": 1100}, prev
    ).passed
    grown = quality.check_quarantine_growth({"quarantine": 60, "resource_versions": 1100}, prev)
    assert not grown.passed and grown.metadata["new_quarantined"] == 50


def test_summary_markdown_has_counts_only(built: Built, wh: duckdb.DuckDBPyConnection) -> None:
    s = quality.summary(wh)
    md = quality.summary_markdown(s, built.result.table_counts)
    assert "persons" in md and "| condition |" in md
    # no names, birth dates or identifiers of the synthetic people leak into the summary
    for p in built.pop.persons[:20]:
        assert p.family not in md and p.birth_date not in md and p.ssn not in md
