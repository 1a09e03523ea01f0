"""The analyst's view of a warehouse: every table behind a temp view that applies the read policy.

Analyst SQL runs on a confined connection (:mod:`medblocks_pipelines.lib.warehouse.sandboxed`) with
the tenant's published warehouse attached read-only. Before the connection is locked down,
:func:`apply_analyst_policy` creates, for every table and view of the warehouse, a temp view of
the same name (temp views win over the attached catalog's names) that keeps only what the read
policy lets consumer ``analyst`` see (``lib/warehouse/read_policy.py``; by default no network rows:
analytics is not the purpose any of them was obtained for):

- a table with ``pattern``, ``permitted_purpose`` and ``network_query_id`` (resources, versions,
  view tables, fact mentions and sources): the policy's predicate;
- a table with ``pattern`` only (resource sightings, tombstones, patient links, pull history): its
  non-network rows of the listed patterns, and network rows of resources not withheld;
- a fact table without ``pattern`` (``facts`` and the ``facts_*`` views): facts with at least one
  source the analyst may see;
- a table with ``resource_key`` or ``patient_key`` (version conflicts, identity edges...): rows of
  resources not withheld;
- anything else (persons, build info, view errors) as it is (our ids and counts).

:func:`qualified_references` lets the confined runner refuse SQL that names the attached catalog
itself (``acme.main.resources``) or reads through ``query``/``query_table``, which would step
around the views. ``read_policy_info`` (a temp view) tells the analyst what was withheld.
"""

import re

import duckdb

from medblocks_pipelines.lib.warehouse.read_policy import (
    NETWORK,
    ConsumerRule,
    ReadCounts,
    ReadPolicy,
    consumer_filter,
    read_counts,
)

_PURPOSE = {"pattern", "permitted_purpose", "network_query_id"}
_INDIRECT = re.compile(r"\bquery(_table)?\s*\(", re.IGNORECASE)


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _objects(con: duckdb.DuckDBPyConnection, catalog: str) -> dict[str, set[str]]:
    rows = con.execute(
        "SELECT table_name, column_name FROM information_schema.columns "
        "WHERE table_catalog = ? AND table_schema = 'main' ORDER BY table_name",
        [catalog],
    ).fetchall()
    out: dict[str, set[str]] = {}
    for table, column in rows:
        out.setdefault(str(table), set()).add(str(column))
    return out


def _predicate(
    name: str, cols: set[str], rule: ConsumerRule, withheld: str, facts_ok: str | None
) -> str | None:
    """The WHERE clause of the analyst view of table ``name`` (None: shown as it is)."""
    key = (
        "resource_key"
        if "resource_key" in cols
        else "patient_key"
        if "patient_key" in cols
        else None
    )
    not_withheld = f"{key} NOT IN (SELECT resource_key FROM {withheld})" if key else None
    if cols >= _PURPOSE:
        return consumer_filter(rule)
    if "pattern" in cols:
        others = ", ".join(f"'{p}'" for p in sorted(rule.patterns)) or "NULL"
        local = f"(pattern <> '{NETWORK}' AND pattern IN ({others}))"
        net = f"(pattern = '{NETWORK}' AND {not_withheld})" if not_withheld else None
        return f"({local} OR {net})" if net else local
    if "fact_id" in cols and facts_ok is not None and name != "fact_sources":
        return f"fact_id IN (SELECT fact_id FROM {facts_ok})"
    return not_withheld


def apply_analyst_policy(
    con: duckdb.DuckDBPyConnection, catalog: str, policy: ReadPolicy
) -> ReadCounts:
    """Shadow every object of ``catalog`` with its policy-filtered temp view; return the network
    rows of ``resources`` the analyst sees and does not see, by purpose."""
    rule = policy.rule("analyst")
    objects = _objects(con, catalog)
    cat = _ident(catalog)

    def src(table: str) -> str:
        return f"{cat}.main.{_ident(table)}"

    # Resources withheld from the analyst: any network version the rule does not allow.
    parts = [
        f"SELECT resource_key FROM {src(t)} WHERE pattern = '{NETWORK}' "
        f"AND NOT coalesce({consumer_filter(rule)}, false)"
        for t in ("resources", "resource_versions")
        if _PURPOSE | {"resource_key"} <= objects.get(t, set())
    ]
    con.execute(
        "CREATE TEMP TABLE analyst_withheld_keys AS "
        + (" UNION ".join(parts) if parts else "SELECT NULL::VARCHAR AS resource_key LIMIT 0")
    )
    facts_ok = None
    if _PURPOSE | {"fact_id"} <= objects.get("fact_sources", set()):
        facts_ok = f"(SELECT fact_id FROM {src('fact_sources')} WHERE {consumer_filter(rule)})"
    for name, cols in sorted(objects.items()):
        where = _predicate(name, cols, rule, "analyst_withheld_keys", facts_ok)
        body = f"SELECT * FROM {src(name)}" + (f" WHERE {where}" if where else "")
        con.execute(f"CREATE TEMP VIEW {_ident(name)} AS {body}")
    counts = (
        read_counts(con, src("resources"), rule)
        if "pattern" in objects.get("resources", set())
        else ReadCounts({}, {})
    )
    # Literals only (a view takes no parameters): the version and codes are checked at load.
    allowed = ", ".join(f"'{p}'" for p in sorted(rule.network_purposes))
    version = policy.version.replace("'", "''")
    con.execute(
        f"CREATE TEMP VIEW read_policy_info AS SELECT 'analyst' AS consumer, "
        f"'{version}' AS policy_version, [{allowed}]::VARCHAR[] AS network_purposes_allowed, "
        f"{sum(counts.included.values())} AS network_rows_shown, "
        f"{sum(counts.excluded.values())} AS network_rows_withheld"
    )
    return counts


def analyst_catalog(con: duckdb.DuckDBPyConnection) -> str | None:
    """The warehouse catalog ``con``'s analyst views stand in front of (None: no views)."""
    row = con.execute(
        "SELECT current_database(), EXISTS (SELECT 1 FROM duckdb_views() "
        "WHERE temporary AND view_name = 'read_policy_info')"
    ).fetchone()
    return str(row[0]) if row and row[1] else None


def qualified_references(sql: str, catalog: str) -> str | None:
    """Why ``sql`` would step around the analyst views (None when it does not).

    DuckDB's own tokenizer finds the catalog's name or ``main`` used as a qualifier (followed by
    ``.``), quoted or not, in any statement; ``query()``/``query_table()`` read a table named in a
    string, so they are refused too.
    """
    if _INDIRECT.search(sql):
        return "query()/query_table(): name the tables directly"
    try:
        tokens = duckdb.tokenize(sql)
    except (duckdb.Error, RuntimeError):
        return None  # it does not tokenize: running it says why
    ends = [pos for pos, _kind in tokens[1:]] + [len(sql)]
    texts = [sql[pos:end].strip() for (pos, _kind), end in zip(tokens, ends, strict=True)]
    banned = {catalog.lower(), "main"}
    for i, text in enumerate(texts[:-1]):
        name = text.strip('"').replace('""', '"').lower()
        if name in banned and texts[i + 1] == ".":
            return f"{text}.: name the tables without their catalog or schema"
    return None
