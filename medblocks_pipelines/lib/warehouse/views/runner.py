"""Run compiled views in DuckDB, load the shipped views, run the official test suite.

The conformance runner follows the upstream reference runner's comparison rules (README of the
suite copy): row order is ignored, every row must have exactly the expected keys and equal values,
collection columns compare as ordered lists, and an ``expectError`` case passes only when the
view fails to compile or to run.
"""

import json
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from medblocks_pipelines.lib.errors import ViewDefinitionError
from medblocks_pipelines.lib.settings import Settings
from medblocks_pipelines.lib.warehouse.sandboxed import connect_sandboxed, lock_down
from medblocks_pipelines.lib.warehouse.views.compiler import CompiledView, compile_view

__all__ = [
    "PROVENANCE_COLUMNS",
    "data_dictionary",
    "default_suite_dir",
    "load_core_views",
    "load_views",
    "run_test_suite",
    "run_test_case",
    "run_view",
    "view_table_name",
]

DEFINITIONS_DIR = Path(__file__).with_name("definitions")

# Columns of the warehouse ``resources`` table carried onto every view row when present, in the
# order the warehouse build passes them (lib/warehouse/steps.py uses this list).
PROVENANCE_COLUMNS: tuple[str, ...] = (
    "tenant",
    "pattern",
    "source",
    "organization",
    "connection",
    "resource_key",
    "fetched_at",
    "run_id",
    "permitted_purpose",
    "network_query_id",
    "resource_type",
    "resource_id",
    "version_id",
)


def _present_columns(con: duckdb.DuckDBPyConnection, table: str) -> list[str]:
    rel = con.sql(f"SELECT * FROM {table} LIMIT 0")  # noqa: S608 (table name is ours)
    return list(rel.columns)


def run_view(
    con: duckdb.DuckDBPyConnection,
    view: Mapping[str, Any] | CompiledView,
    *,
    table: str = "resources",
    passthrough_columns: Sequence[str] | None = None,
) -> pa.Table:
    """Compile (if needed) and run a view; return an Arrow table.

    ``passthrough_columns`` defaults to the :data:`PROVENANCE_COLUMNS` that ``table`` has.
    """
    if isinstance(view, CompiledView):
        compiled = view
    else:
        if passthrough_columns is None:
            present = set(_present_columns(con, table))
            passthrough_columns = [c for c in PROVENANCE_COLUMNS if c in present]
        compiled = compile_view(view, table=table, passthrough_columns=passthrough_columns)
    return con.sql(compiled.sql).to_arrow_table()


def view_table_name(view: Mapping[str, Any]) -> str:
    """The table name a view materialises to: its ``name``."""
    name = view.get("name")
    if not isinstance(name, str) or not name:
        raise ViewDefinitionError("a shipped or user view needs a 'name'")
    return name


def load_views(directory: Path) -> dict[str, dict[str, Any]]:
    """Load every ``*.json`` ViewDefinition in ``directory``; compile each to validate it."""
    views: dict[str, dict[str, Any]] = {}
    for path in sorted(Path(directory).glob("*.json")):
        try:
            view = json.loads(path.read_text(), parse_float=Decimal)
        except json.JSONDecodeError as exc:
            raise ViewDefinitionError(f"{path.name}: not valid JSON ({exc.msg})") from exc
        if not isinstance(view, dict):
            raise ViewDefinitionError(f"{path.name}: a ViewDefinition must be a JSON object")
        try:
            compile_view(view)
            name = view_table_name(view)
        except ViewDefinitionError as exc:
            raise ViewDefinitionError(f"{path.name}: {exc}") from exc
        if name in views:
            raise ViewDefinitionError(f"{path.name}: duplicate view name {name!r}")
        views[name] = view
    return views


def load_core_views(*, user_dir: Path | str | None = None) -> dict[str, dict[str, Any]]:
    """The shipped views plus user views from ``user_dir`` (default ``MEDBLOCKS_VIEWS_DIR``).

    A user view with the same name as a shipped one replaces it.
    """
    views = load_views(DEFINITIONS_DIR)
    extra = user_dir if user_dir is not None else Settings.from_env().views_dir
    if extra:
        views.update(load_views(Path(extra)))
    return views


def data_dictionary(views: Mapping[str, Mapping[str, Any]] | Iterable[Mapping[str, Any]]) -> str:
    """A markdown data dictionary: one section per view with column, type and description."""
    items = list(views.values()) if isinstance(views, Mapping) else list(views)
    lines = ["# Data dictionary", ""]
    for view in sorted(items, key=lambda v: str(v.get("name"))):
        compiled = compile_view(view, passthrough_columns=())
        lines.append(f"## `{compiled.name}`")
        lines.append("")
        desc = view.get("description") or view.get("title")
        lines.append(f"{desc}" if desc else f"One row per {compiled.resource}.")
        lines.append("")
        lines.append(
            f"Source resource: `{compiled.resource}`. Every row also carries the "
            "provenance columns " + ", ".join(f"`{c}`" for c in PROVENANCE_COLUMNS) + "."
        )
        lines.append("")
        lines.append("| column | type | FHIRPath | description |")
        lines.append("|---|---|---|---|")
        for col in compiled.columns:
            path = (col.path or "").replace("|", "\\|")
            text = (col.description or "").replace("|", "\\|").replace("\n", " ")
            lines.append(f"| `{col.name}` | {col.sql_type} | `{path}` | {text} |")
        lines.append("")
    return "\n".join(lines)


# ---- the official conformance suite -------------------------------------------------------


def default_suite_dir() -> Path | None:
    """The suite copy: ``MEDBLOCKS_SOF_TESTS``, else the verbatim copy (MIT, with its licence) kept in
    the repository's test fixtures (``medblocks_pipelines_tests/fixtures/sql-on-fhir-v2-tests``)."""
    given = Settings.from_env().sof_tests_dir
    if given is not None:
        return given
    repo = Path(__file__).resolve().parents[4]
    candidate = repo / "medblocks_pipelines_tests" / "fixtures" / "sql-on-fhir-v2-tests"
    return candidate if candidate.is_dir() else None


def _norm(value: Any) -> Any:
    """A comparable form: numbers as Decimal, lists as tuples, booleans kept apart from ints."""
    if value is None:
        return ("null",)
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int | float | Decimal):
        return ("num", Decimal(str(value)).normalize())
    if isinstance(value, list | tuple):
        return ("list", tuple(_norm(v) for v in value))
    return ("str", str(value))


def _rows_equal(actual: list[dict[str, Any]], expected: list[dict[str, Any]]) -> bool:
    def key(row: Mapping[str, Any]) -> tuple[Any, ...]:
        return tuple(sorted((k, _norm(v)) for k, v in row.items()))

    return sorted(map(key, actual), key=repr) == sorted(map(key, expected), key=repr)


def _load_fixture(con: duckdb.DuckDBPyConnection, resources: list[dict[str, Any]]) -> None:
    con.execute(
        "CREATE OR REPLACE TABLE resources (resource VARCHAR, resource_type VARCHAR, "
        "resource_id VARCHAR)"
    )
    rows = [(json.dumps(r), r.get("resourceType"), r.get("id")) for r in resources]
    if rows:
        con.executemany("INSERT INTO resources VALUES (?, ?, ?)", rows)


def run_test_case(con: duckdb.DuckDBPyConnection, case: Mapping[str, Any]) -> dict[str, Any]:
    """Run one suite case against the ``resources`` table on ``con``; return its result."""
    expects_error = bool(case.get("expectError"))
    try:
        compiled = compile_view(case["view"])
        rel = con.sql(compiled.sql)
        names = list(rel.columns)
        rows = [dict(zip(names, r, strict=True)) for r in rel.fetchall()]
    except (ViewDefinitionError, duckdb.Error) as exc:
        if expects_error:
            return {"passed": True}
        return {"passed": False, "error": f"{type(exc).__name__}: {exc}"}
    if expects_error:
        return {"passed": False, "error": "expected an error, the view ran"}
    if "expectColumns" in case and names != list(case["expectColumns"]):
        return {"passed": False, "error": f"columns {names} != {case['expectColumns']}"}
    if "expectCount" in case:
        ok = len(rows) == case["expectCount"]
        return {"passed": ok} if ok else {"passed": False, "error": f"{len(rows)} rows"}
    expected = list(case.get("expect", []))
    if _rows_equal(rows, expected):
        return {"passed": True}
    return {
        "passed": False,
        "error": "rows differ",
        "details": {"actual": json.loads(json.dumps(rows, default=str)), "expected": expected},
    }


def run_test_suite(directory: Path | str) -> dict[str, Any]:
    """Run every ``*.json`` suite file in ``directory``; return the standard test report."""
    report: dict[str, Any] = {}
    for path in sorted(Path(directory).glob("*.json")):
        suite = json.loads(path.read_text())
        if not isinstance(suite, dict) or "tests" not in suite:
            continue
        # A suite file is user input: its views run with no file, URL or extension access.
        con = connect_sandboxed()
        try:
            _load_fixture(con, suite.get("resources", []))
            lock_down(con)
            tests = []
            for case in suite["tests"]:
                tests.append({"name": case.get("title"), "result": run_test_case(con, case)})
        finally:
            con.close()
        report[path.name] = {"tests": tests}
    return report
