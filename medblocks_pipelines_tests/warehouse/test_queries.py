"""Every example analyst query runs against a built warehouse and answers its question."""

import duckdb
import pytest

from medblocks_pipelines.lib.warehouse.queries import query_files

QUERIES = query_files()


def test_the_examples_are_shipped() -> None:
    assert {"persons_across_patterns", "fact_provenance", "diabetes_latest_a1c"} <= set(QUERIES)


@pytest.mark.parametrize("name", sorted(QUERIES))
def test_query_runs_and_returns_rows(wh: duckdb.DuckDBPyConnection, name: str) -> None:
    rows = wh.execute(QUERIES[name].read_text()).fetchall()
    if name != "claims_only_conditions":  # may legitimately be empty
        assert rows, f"{name} returned no rows"


def test_persons_linked_across_four_patterns(wh: duckdb.DuckDBPyConnection) -> None:
    rows = wh.execute(QUERIES["persons_across_patterns"].read_text()).fetchall()
    four = [r for r in rows if r[1] == 4]
    assert four, "some persons arrive through all four patterns"
    person_id, n_patterns, patterns, *_ = four[0]
    assert sorted(patterns) == ["backend", "clinician_workflow", "network", "patient_access"]
    # the persons row agrees with the links it was built from
    linked = wh.execute(
        "SELECT DISTINCT pattern FROM patient_links WHERE person_id = ? ORDER BY 1", [person_id]
    ).fetchall()
    assert [r[0] for r in linked] == sorted(patterns)


def test_fact_provenance_lists_several_patterns(wh: duckdb.DuckDBPyConnection) -> None:
    rows = wh.execute(QUERIES["fact_provenance"].read_text()).fetchall()
    assert len({r[6] for r in rows}) >= 3  # pattern column
