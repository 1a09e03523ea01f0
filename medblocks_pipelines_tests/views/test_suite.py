"""The official SQL on FHIR v2 conformance suite, run as it is: one pytest case per suite test.

The suite is a verbatim copy of the upstream test files with their MIT licence, kept in
``medblocks_pipelines_tests/fixtures/sql-on-fhir-v2-tests`` (``MEDBLOCKS_SOF_TESTS`` points elsewhere).
Experimental cases (boundaries, join) are included.
"""

import json
from pathlib import Path
from typing import Any

import duckdb
import pytest

from medblocks_pipelines.lib.warehouse.views import run_test_case, run_test_suite
from medblocks_pipelines.lib.warehouse.views.runner import _load_fixture, default_suite_dir

SUITE = default_suite_dir()


def _cases() -> list[Any]:
    if SUITE is None or not SUITE.is_dir():
        return [pytest.param(None, None, None, id="suite-missing")]
    out = []
    for path in sorted(SUITE.glob("*.json")):
        suite = json.loads(path.read_text())
        for case in suite["tests"]:
            out.append(
                pytest.param(
                    path.name, suite.get("resources", []), case, id=f"{path.stem}::{case['title']}"
                )
            )
    return out


@pytest.mark.parametrize(("file_name", "resources", "case"), _cases())
def test_conformance_case(
    file_name: str | None, resources: list[dict[str, Any]] | None, case: dict[str, Any] | None
) -> None:
    assert SUITE is not None and case is not None and resources is not None, (
        "SQL on FHIR suite not found: medblocks_pipelines_tests/fixtures/sql-on-fhir-v2-tests"
    )
    con = duckdb.connect()
    try:
        _load_fixture(con, resources)
        result = run_test_case(con, case)
    finally:
        con.close()
    assert result["passed"], result


def test_report_covers_every_case_in_the_standard_shape() -> None:
    assert SUITE is not None
    report = run_test_suite(SUITE)
    files = sorted(p.name for p in Path(SUITE).glob("*.json"))
    assert sorted(report) == files
    total = sum(len(v["tests"]) for v in report.values())
    assert total == sum(len(json.loads((SUITE / f).read_text())["tests"]) for f in files)
    for suite in report.values():
        for t in suite["tests"]:
            assert isinstance(t["name"], str) and isinstance(t["result"]["passed"], bool)
    assert all(t["result"]["passed"] for v in report.values() for t in v["tests"])


def test_a_wrong_expectation_is_reported_as_a_failure(tmp_path: Path) -> None:
    # The runner must be able to fail: a suite whose expectation is wrong.
    suite = {
        "title": "self-check",
        "resources": [{"resourceType": "Patient", "id": "p1", "active": True}],
        "tests": [
            {
                "title": "wrong value",
                "view": {
                    "resource": "Patient",
                    "select": [{"column": [{"name": "id", "path": "id"}]}],
                },
                "expect": [{"id": "p2"}],
            },
            {
                "title": "missing error",
                "view": {
                    "resource": "Patient",
                    "select": [{"column": [{"name": "id", "path": "id"}]}],
                },
                "expectError": True,
            },
            {
                "title": "extra row",
                "view": {
                    "resource": "Patient",
                    "select": [{"column": [{"name": "id", "path": "id"}]}],
                },
                "expect": [],
            },
            {
                "title": "bool is not 1",
                "view": {
                    "resource": "Patient",
                    "select": [{"column": [{"name": "a", "path": "active"}]}],
                },
                "expect": [{"a": 1}],
            },
        ],
    }
    (tmp_path / "self.json").write_text(json.dumps(suite))
    report = run_test_suite(tmp_path)
    assert [t["result"]["passed"] for t in report["self.json"]["tests"]] == [False] * 4
