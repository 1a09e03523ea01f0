"""Analyst SQL, confined to one tenant's published warehouse.

Every surface that runs SQL written by a user (``medblocks warehouse query``, the ViewDefinition test
runner, any future web surface) goes through :func:`open_confined` / :func:`run_confined`.

The confinement is DuckDB's own, not a filter of ours:

- an in-memory database is opened and the tenant's published file is ``ATTACH``-ed read-only (an
  in-memory host, rather than ``duckdb.connect(file)``, so the confined connection never collides
  with another read-only connection of the same process to the same file: DuckDB refuses two
  configurations for one file);
- then ``enable_external_access=false`` (no file, URL or other database: ``read_parquet``,
  ``read_csv``, ``read_text``, ``glob``, ``ATTACH``, ``COPY ... TO``, ``EXPORT``, ``INSTALL`` all
  fail with a permission error; Python replacement scans of the caller's variables too), no
  extension auto-install or auto-load, no community extensions, and ``lock_configuration=true``
  so ``SET`` / ``PRAGMA`` / ``RESET`` cannot undo any of it.

The analyst sees the warehouse through the read policy (``lib/warehouse/read_policy.py``): every
table is shadowed by a temp view that withholds network rows whose exchange purpose the policy does
not list for consumer ``analyst`` (``lib/warehouse/analyst_views.py``); SQL that names the attached
catalog or schema (``acme.main.resources``) or reads through ``query()`` is refused, and a session
that met restricted rows leaves an audit row.

On top of that, :func:`check_sql` refuses statement types an analyst never needs (``ATTACH``,
``COPY``, ``INSTALL``/``LOAD``, ``SET``, ``PRAGMA``, writes...) before anything runs, so a script of
several statements is refused whole rather than half run. What stays usable: ``SELECT`` (with the
warehouse's views and macros, ``DESCRIBE``, ``SHOW``, ``SUMMARIZE``, ``PIVOT``), ``EXPLAIN``,
``CALL`` of table functions, and ``CREATE TEMP`` tables, views and macros for the session. Data
leaves the warehouse through ``medblocks exports``, never through SQL.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from medblocks_pipelines.lib.errors import QueryFailed, QueryRefused, WarehouseError
from medblocks_pipelines.lib.settings import Settings

#: Options fixed at connect time (``python_enable_replacements``: a query never sees the caller's
#: Python variables as tables).
_CONNECT_CONFIG: dict[str, Any] = {
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    "allow_community_extensions": False,
    "allow_unsigned_extensions": False,
    "python_enable_replacements": False,
}

_RESERVED_CATALOGS = frozenset({"memory", "system", "temp", "main"})

_ST = duckdb.StatementType
#: Statement types analyst SQL may run (MULTI: PIVOT and friends expand into several statements).
ALLOWED_TYPES = frozenset({_ST.SELECT, _ST.EXPLAIN, _ST.CREATE, _ST.CALL, _ST.MULTI})
_REFUSALS: dict[Any, str] = {
    _ST.ATTACH: "ATTACH: analyst SQL sees its own tenant's warehouse only",
    _ST.DETACH: "DETACH: analyst SQL sees its own tenant's warehouse only",
    _ST.COPY: "COPY: SQL cannot write files; use `medblocks exports` to get data out",
    _ST.COPY_DATABASE: "COPY DATABASE: SQL cannot write files; use `medblocks exports`",
    _ST.EXPORT: "EXPORT: SQL cannot write files; use `medblocks exports` to get data out",
    _ST.LOAD: "INSTALL/LOAD: extensions cannot be installed or loaded from analyst SQL",
    _ST.SET: "SET/RESET/USE: the session's settings are fixed",
    _ST.VARIABLE_SET: "SET VARIABLE: the session's settings are fixed",
    _ST.PRAGMA: "PRAGMA: the session's settings are fixed (DESCRIBE, SHOW and duckdb_*() read the "
    "catalog)",
    _ST.INSERT: "INSERT: the warehouse is read-only (CREATE TEMP TABLE ... AS SELECT for scratch)",
    _ST.UPDATE: "UPDATE: the warehouse is read-only",
    _ST.DELETE: "DELETE: the warehouse is read-only",
    _ST.MERGE_INTO: "MERGE: the warehouse is read-only",
    _ST.ALTER: "ALTER: the warehouse is read-only",
    _ST.DROP: "DROP: the warehouse is read-only",
}


@dataclass(frozen=True)
class ConfinedResult:
    """The last statement's result: column names and up to ``max_rows`` rows."""

    columns: list[str]
    rows: list[tuple[Any, ...]]
    truncated: bool


def lock_down(con: duckdb.DuckDBPyConnection) -> None:
    """Cut ``con`` off from files, URLs, other databases and extensions, for good.

    Whatever ``con`` attached or loaded before stays readable; ``lock_configuration`` makes the
    settings final for the connection's database instance.
    """
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


def connect_sandboxed() -> duckdb.DuckDBPyConnection:
    """A new in-memory DuckDB with extension loading off (call :func:`lock_down` once loaded)."""
    return duckdb.connect(":memory:", config=dict(_CONNECT_CONFIG))


def _catalog_of(path: Path) -> str:
    # The catalog is named after the file, as a plain client would name it, unless that
    # name is one of DuckDB's own catalogs.
    return path.stem if path.stem.lower() not in _RESERVED_CATALOGS else "warehouse"


def _attach_confined(
    path: Path, prepare: Callable[[duckdb.DuckDBPyConnection, str], Any] | None = None
) -> duckdb.DuckDBPyConnection:
    con = connect_sandboxed()
    try:
        name = _catalog_of(path)
        alias = name.replace('"', '""')
        literal = str(path).replace("'", "''")
        con.execute(f"ATTACH '{literal}' AS \"{alias}\" (READ_ONLY)")
        con.execute(f'USE "{alias}"')
        if prepare is not None:
            prepare(con, name)
        lock_down(con)
    except BaseException:
        con.close()
        raise
    return con


def open_confined(
    tenant: str,
    *,
    settings: Settings,
    control_plane: Any | None = None,
    actor: str = "analyst",
) -> duckdb.DuckDBPyConnection:
    """``tenant``'s published warehouse, read-only, confined (see the module docstring), seen
    through the read policy's analyst views (``lib/warehouse/analyst_views.py``). A session that
    met purpose-restricted network rows is written to ``control_plane``'s audit log."""
    from medblocks_pipelines.lib.warehouse.analyst_views import apply_analyst_policy
    from medblocks_pipelines.lib.warehouse.build import current_warehouse_path
    from medblocks_pipelines.lib.warehouse.read_policy import audit_read, load_read_policy

    path = current_warehouse_path(settings, tenant)
    if not path.exists():
        raise WarehouseError(
            f"no warehouse for tenant {tenant} yet",
            hint=f"build it with `medblocks warehouse build --tenant {tenant}`",
        )
    policy = load_read_policy()
    counts: list[Any] = []
    con = _attach_confined(
        path, lambda c, catalog: counts.append(apply_analyst_policy(c, catalog, policy))
    )
    audit_read(
        control_plane,
        tenant=tenant,
        rule=policy.rule("analyst"),
        policy=policy,
        counts=counts[0],
        actor=actor,
        table="resources",
        ref="analyst session",
    )
    return con


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_sql(sql: str) -> list[duckdb.Statement]:
    """The statements of ``sql`` if every one may run; :class:`QueryRefused` names the first that
    may not (nothing has run then). :class:`QueryFailed` when it does not parse or is empty."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryFailed(_first_line(exc)) from exc
    except ValueError as exc:
        # The Python binding cannot name some statement types (e.g. UPDATE EXTENSIONS).
        raise QueryRefused("refused: a statement type analyst SQL may not run") from exc
    if not statements:
        raise QueryFailed("no SQL statement (only comments or whitespace)")
    for n, stmt in enumerate(statements, start=1):
        if stmt.type in ALLOWED_TYPES:
            continue
        reason = _REFUSALS.get(stmt.type, f"{stmt.type.name}: not allowed in analyst SQL")
        where = f" (statement {n} of {len(statements)})" if len(statements) > 1 else ""
        raise QueryRefused(f"refused{where}: {reason}")
    return statements


def execute_confined(con: duckdb.DuckDBPyConnection, sql: str) -> duckdb.DuckDBPyConnection:
    """Check and run ``sql`` on a confined connection; return the cursor of its last statement.

    DuckDB's refusals (a file or URL, a read-only database, locked settings) become
    :class:`QueryRefused`; any other DuckDB error :class:`QueryFailed`; both carry one line.
    """
    statements = check_sql(sql)
    from medblocks_pipelines.lib.warehouse.analyst_views import (
        analyst_catalog,
        qualified_references,
    )

    catalog = analyst_catalog(con)
    if catalog is not None:
        why = qualified_references(sql, catalog)
        if why:
            raise QueryRefused(f"refused: {why} (analyst SQL reads the policy's views)")
    try:
        for stmt in statements:
            con.execute(stmt)
    except duckdb.PermissionException as exc:
        raise QueryRefused(f"refused: {_first_line(exc)}") from exc
    except duckdb.Error as exc:
        line = _first_line(exc)
        if "read-only mode" in line or "configuration has been locked" in line:
            raise QueryRefused(f"refused: {line}") from exc
        raise QueryFailed(line) from exc
    return con


def run_confined(
    tenant: str,
    sql: str,
    *,
    settings: Settings,
    max_rows: int = 200,
    control_plane: Any | None = None,
) -> ConfinedResult:
    """Run analyst ``sql`` against ``tenant``'s warehouse; the last statement's first rows."""
    check_sql(sql)  # refuse before touching (or downloading) the warehouse
    con = open_confined(tenant, settings=settings, control_plane=control_plane)
    try:
        cur = execute_confined(con, sql)
        if cur.description is None:
            return ConfinedResult([], [], False)
        columns = [d[0] for d in cur.description]
        try:
            rows = cur.fetchmany(max_rows + 1)
        except duckdb.Error as exc:  # errors found while streaming (a bad cast in row n)
            raise QueryFailed(_first_line(exc)) from exc
        return ConfinedResult(columns, rows[:max_rows], len(rows) > max_rows)
    finally:
        con.close()
