"""Shared fixtures for the view engine tests: a DuckDB ``resources`` table shaped like the warehouse."""

import json
from collections.abc import Iterable, Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import pytest

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "views"


def load_ndjson(path: Path) -> list[dict[str, Any]]:
    """Resources from an NDJSON file, decimals as Decimal (exact)."""
    return [json.loads(line, parse_float=Decimal) for line in path.read_text().splitlines() if line]


def resources_table(
    con: duckdb.DuckDBPyConnection, lines: Iterable[str], *, table: str = "resources"
) -> None:
    """Create a warehouse-shaped table from raw JSON lines (text kept byte for byte)."""
    con.execute(
        f"CREATE OR REPLACE TABLE {table} (resource VARCHAR, resource_type VARCHAR, "
        "resource_id VARCHAR, tenant VARCHAR, pattern VARCHAR, source VARCHAR, "
        "organization VARCHAR, connection VARCHAR, version_id VARCHAR, "
        "fetched_at TIMESTAMPTZ, run_id VARCHAR, resource_key VARCHAR, "
        "permitted_purpose VARCHAR, network_query_id VARCHAR)"
    )
    rows = []
    for n, line in enumerate(lines):
        head = json.loads(line)
        source = f"src-{n % 2}"
        rows.append(
            (
                line,
                head.get("resourceType"),
                head.get("id"),
                "tenant-a",
                "backend",
                source,
                "org-1",
                None,
                "1",
                "2024-06-01T00:00:00Z",
                "run-1",
                f"{source}/{head.get('resourceType')}/{head.get('id')}",
                None,  # permitted_purpose: network rows only
                None,  # network_query_id
            )
        )
    con.executemany(f"INSERT INTO {table} VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)


@pytest.fixture
def real_shaped_lines() -> list[str]:
    """The raw lines of the hand-written real-shaped fixture."""
    return [ln for ln in (FIXTURES / "real_shaped.ndjson").read_text().splitlines() if ln]


@pytest.fixture
def real_shaped(real_shaped_lines: list[str]) -> list[dict[str, Any]]:
    """The same resources parsed with exact decimals."""
    return [json.loads(ln, parse_float=Decimal) for ln in real_shaped_lines]


@pytest.fixture
def con(real_shaped_lines: list[str]) -> Iterable[duckdb.DuckDBPyConnection]:
    """An in-memory DuckDB with the real-shaped fixture as ``resources``."""
    c = duckdb.connect()
    resources_table(c, real_shaped_lines)
    yield c
    c.close()


def by_id(rows: list[Mapping[str, Any]], key: str = "id") -> dict[Any, Mapping[str, Any]]:
    """Index rows by a column."""
    return {r[key]: r for r in rows}
