"""Quality checks of a built warehouse and its summary (pure functions, no Dagster).

Each check returns a :class:`CheckOutcome` with counts only (never patient data), so Dagster can turn it
into an asset check result and the CLI can print it. The checks:

- ``row_counts``: no table that had rows in the previous build is empty now, and none shrank by more
  than ``max_shrink`` (tombstones legitimately remove rows; a collapse is a pipeline fault);
- ``every_row_has_person``: ``patient_links``, ``facts`` and matched ``fact_mentions`` rows carry a
  ``person_id`` that exists in ``persons``;
- ``every_row_has_provenance``: view tables and ``fact_sources`` carry source, pattern, resource key and
  fetched_at; every fact has at least one ``fact_sources`` row;
- ``referential_integrity``: ``fact_sources.resource_key`` and ``patient_links.patient_key`` exist in
  ``resources``; ``persons`` has no member-less person;
- ``quarantine_growth``: quarantined rows did not grow by more than ``max_quarantine_growth`` of the
  resources landed since the previous build;
- ``views_compiled``: no ViewDefinition failed (``view_errors`` is empty);
- ``network_rows_have_purpose``: every ``network`` row of ``resources``, ``resource_versions``,
  ``fact_sources`` and the view tables carries ``permitted_purpose`` and ``network_query_id`` (the
  consumers' read policy, ``lib/warehouse/read_policy.py``, cannot judge a row without them).

A check whose tables are missing fails (ERROR) and names them in ``missing_tables``: a build that
skipped a step is not a clean build.
"""

from dataclasses import dataclass, field
from typing import Any

import duckdb


@dataclass
class CheckOutcome:
    """One check's verdict and its (PHI-free) numbers."""

    name: str
    passed: bool
    description: str
    metadata: dict[str, Any] = field(default_factory=dict)
    severity: str = "ERROR"  # or "WARN"


def _tables(con: duckdb.DuckDBPyConnection) -> set[str]:
    return {
        r[0]
        for r in con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main' "
            "AND table_catalog = current_database()"
        ).fetchall()
    }


#: The tables each check reads; any of them missing fails the check.
REQUIRED_TABLES: dict[str, tuple[str, ...]] = {
    "every_row_has_person": ("persons", "patient_links", "facts", "fact_mentions"),
    "every_row_has_provenance": ("facts", "fact_sources", "view_tables"),
    "referential_integrity": ("resources", "persons", "patient_links", "fact_sources"),
    "views_compiled": ("view_errors", "view_tables"),
}


def _missing_tables(name: str, tables: set[str], also: list[str] | None = None) -> list[str]:
    return sorted({t for t in (*REQUIRED_TABLES.get(name, ()), *(also or [])) if t not in tables})


def _failed_missing(name: str, description: str, missing: list[str]) -> CheckOutcome:
    return CheckOutcome(
        name,
        False,
        f"{description} (tables missing: {', '.join(missing)})",
        {"missing_tables": missing},
    )


def _scalar(con: duckdb.DuckDBPyConnection, sql: str) -> int:
    row = con.execute(sql).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def check_row_counts(
    counts: dict[str, int], previous: dict[str, int] | None, *, max_shrink: float = 0.5
) -> CheckOutcome:
    """Compare this build's table counts with the previous build's."""
    if not previous:
        return CheckOutcome(
            "row_counts", True, "first build: nothing to compare", {"tables": len(counts)}, "WARN"
        )
    emptied = sorted(t for t, n in previous.items() if n > 0 and counts.get(t, 0) == 0)
    shrunk = sorted(
        t for t, n in previous.items() if n > 0 and 0 < counts.get(t, 0) < n * (1 - max_shrink)
    )
    changes = {
        t: counts.get(t, 0) - previous.get(t, 0) for t in sorted(set(counts) | set(previous))
    }
    return CheckOutcome(
        "row_counts",
        not emptied and not shrunk,
        f"no table emptied or shrank by more than {int(max_shrink * 100)}% since the last build",
        {"emptied": emptied, "shrunk": shrunk, "changes": {k: v for k, v in changes.items() if v}},
        "WARN",
    )


def check_person(con: duckdb.DuckDBPyConnection) -> CheckOutcome:
    """Every linked row has a person that exists."""
    tables = _tables(con)
    if missing_tables := _missing_tables("every_row_has_person", tables):
        return _failed_missing("every_row_has_person", "rows belong to a person", missing_tables)
    missing: dict[str, int] = {}
    if "patient_links" in tables:
        missing["patient_links"] = _scalar(
            con,
            "SELECT count(*) FROM patient_links l LEFT JOIN persons p USING (person_id) "
            "WHERE p.person_id IS NULL",
        )
    if "facts" in tables:
        missing["facts"] = _scalar(
            con,
            "SELECT count(*) FROM facts f LEFT JOIN persons p USING (person_id) "
            "WHERE p.person_id IS NULL",
        )
    if "fact_mentions" in tables:
        missing["fact_mentions"] = _scalar(
            con,
            "SELECT count(*) FROM fact_mentions WHERE fact_id IS NOT NULL AND person_id IS NULL",
        )
    unlinked = (
        _scalar(con, "SELECT count(*) FROM fact_mentions WHERE person_id IS NULL")
        if "fact_mentions" in tables
        else 0
    )
    return CheckOutcome(
        "every_row_has_person",
        all(v == 0 for v in missing.values()),
        "patient links, facts and matched mentions all belong to a person in `persons`",
        {"rows_without_person": missing, "mentions_of_unknown_patients": unlinked},
    )


def check_provenance(
    con: duckdb.DuckDBPyConnection, view_tables: list[str] | None = None
) -> CheckOutcome:
    """View tables and fact sources carry their provenance; every fact has a source."""
    tables = _tables(con)
    if missing_tables := _missing_tables("every_row_has_provenance", tables, view_tables):
        return _failed_missing("every_row_has_provenance", "rows carry provenance", missing_tables)
    bad: dict[str, int] = {}
    for t in view_tables or []:
        if t not in tables:
            continue
        cols = {r[0] for r in con.execute(f'DESCRIBE "{t}"').fetchall()}
        need = [c for c in ("source", "pattern", "resource_key", "fetched_at") if c in cols]
        if len(need) < 4:
            bad[t] = -1  # a provenance column is missing altogether
            continue
        cond = " OR ".join(f"{c} IS NULL" for c in need)
        bad[t] = _scalar(con, f'SELECT count(*) FROM "{t}" WHERE {cond}')
    if "fact_sources" in tables:
        bad["fact_sources"] = _scalar(
            con,
            "SELECT count(*) FROM fact_sources WHERE source IS NULL OR pattern IS NULL "
            "OR resource_key IS NULL OR fetched_at IS NULL",
        )
        bad["facts_without_source"] = _scalar(
            con,
            "SELECT count(*) FROM facts f WHERE NOT EXISTS "
            "(SELECT 1 FROM fact_sources s WHERE s.fact_id = f.fact_id)",
        )
    return CheckOutcome(
        "every_row_has_provenance",
        all(v == 0 for v in bad.values()),
        "view rows and fact sources carry source, pattern, resource key and fetched_at; "
        "every fact has a source (-1: a provenance column is missing)",
        {"rows_without_provenance": {k: v for k, v in bad.items() if v}, "tables": len(bad)},
    )


def check_referential_integrity(con: duckdb.DuckDBPyConnection) -> CheckOutcome:
    """fact_sources and patient_links point at current resources; persons have members."""
    tables = _tables(con)
    if missing_tables := _missing_tables("referential_integrity", tables):
        return _failed_missing("referential_integrity", "references resolve", missing_tables)
    out: dict[str, int] = {}
    if "fact_sources" in tables:
        out["fact_sources_to_resources"] = _scalar(
            con,
            "SELECT count(*) FROM fact_sources s WHERE NOT EXISTS "
            "(SELECT 1 FROM resources r WHERE r.resource_key = s.resource_key)",
        )
    if "patient_links" in tables:
        out["patient_links_to_resources"] = _scalar(
            con,
            "SELECT count(*) FROM patient_links l WHERE NOT EXISTS "
            "(SELECT 1 FROM resources r WHERE r.resource_key = l.patient_key)",
        )
        out["persons_without_members"] = _scalar(
            con,
            "SELECT count(*) FROM persons p WHERE NOT EXISTS "
            "(SELECT 1 FROM patient_links l WHERE l.person_id = p.person_id)",
        )
    return CheckOutcome(
        "referential_integrity",
        all(v == 0 for v in out.values()),
        "fact_sources -> resources, patient_links -> resources, persons -> patient_links",
        {"dangling": out},
    )


def check_quarantine_growth(
    counts: dict[str, int], previous: dict[str, int] | None, *, max_growth: float = 0.05
) -> CheckOutcome:
    """Quarantine grew by at most ``max_growth`` of the resources added since the last build."""
    q_now = counts.get("quarantine", 0)
    q_before = (previous or {}).get("quarantine", 0)
    r_now = counts.get("resource_versions", counts.get("resources", 0))
    r_before = (previous or {}).get("resource_versions", (previous or {}).get("resources", 0))
    grew = max(0, q_now - q_before)
    added = max(0, r_now - r_before)
    allowed = max_growth * max(added, 1)
    return CheckOutcome(
        "quarantine_growth",
        grew <= allowed,
        f"new quarantined rows at most {max_growth:.0%} of the newly landed resources",
        {"quarantine": q_now, "new_quarantined": grew, "new_resources": added},
        "WARN",
    )


def check_views(con: duckdb.DuckDBPyConnection) -> CheckOutcome:
    """No ViewDefinition failed to build."""
    if missing_tables := _missing_tables("views_compiled", _tables(con)):
        return _failed_missing("views_compiled", "the views step did not run", missing_tables)
    rows = con.execute("SELECT view, error FROM view_errors ORDER BY view").fetchall()
    return CheckOutcome(
        "views_compiled",
        not rows,
        "every ViewDefinition compiled and ran",
        {"failed_views": {v: e for v, e in rows}},
    )


def check_network_purpose(
    con: duckdb.DuckDBPyConnection, view_tables: list[str] | None = None
) -> CheckOutcome:
    """Every network row says under which exchange purpose and by which query it came in."""
    tables = _tables(con)
    bad: dict[str, int] = {}
    for t in ["resources", "resource_versions", "fact_sources", *(view_tables or [])]:
        if t not in tables:
            continue
        cols = {r[0] for r in con.execute(f'DESCRIBE "{t}"').fetchall()}
        if "pattern" not in cols:
            continue
        if not {"permitted_purpose", "network_query_id"} <= cols:
            bad[t] = _scalar(con, f"SELECT count(*) FROM \"{t}\" WHERE pattern = 'network'")
            continue
        bad[t] = _scalar(
            con,
            f"SELECT count(*) FROM \"{t}\" WHERE pattern = 'network' "
            "AND (permitted_purpose IS NULL OR network_query_id IS NULL)",
        )
    return CheckOutcome(
        "network_rows_have_purpose",
        all(v == 0 for v in bad.values()),
        "every network row carries the exchange purpose and the query that obtained it",
        {"network_rows_without_purpose": {k: v for k, v in bad.items() if v}, "tables": len(bad)},
    )


CHECK_NAMES = (
    "row_counts",
    "every_row_has_person",
    "every_row_has_provenance",
    "referential_integrity",
    "quarantine_growth",
    "views_compiled",
    "network_rows_have_purpose",
)


def run_checks(
    con: duckdb.DuckDBPyConnection, counts: dict[str, int], previous: dict[str, int] | None
) -> list[CheckOutcome]:
    """All warehouse checks in :data:`CHECK_NAMES` order."""
    tables = _tables(con)
    views = (
        [r[0] for r in con.execute("SELECT view FROM view_tables").fetchall()]
        if "view_tables" in tables
        else []
    )
    return [
        check_row_counts(counts, previous),
        check_person(con),
        check_provenance(con, views),
        check_referential_integrity(con),
        check_quarantine_growth(counts, previous),
        check_views(con),
        check_network_purpose(con, views),
    ]


def summary(con: duckdb.DuckDBPyConnection) -> dict[str, Any]:
    """Headline numbers of a built warehouse (counts only)."""
    tables = _tables(con)
    out: dict[str, Any] = {}
    if "persons" in tables:
        out["persons"] = _scalar(con, "SELECT count(*) FROM persons")
        out["source_patients"] = _scalar(con, "SELECT count(*) FROM patient_links")
        out["persons_in_multiple_sources"] = _scalar(
            con, "SELECT count(*) FROM persons WHERE n_sources > 1"
        )
        out["persons_by_pattern_count"] = {
            int(n): int(c)
            for n, c in con.execute(
                "SELECT n_patterns, count(*) FROM persons GROUP BY 1 ORDER BY 1"
            ).fetchall()
        }
        out["links_by_rule"] = {
            str(r): int(c)
            for r, c in con.execute(
                "SELECT rule, count(*) FROM patient_links GROUP BY 1 ORDER BY 1"
            ).fetchall()
        }
    if "facts" in tables:
        out["facts_by_kind"] = {
            str(k): {"facts": int(n), "multi_source": int(m), "mentions": int(x)}
            for k, n, m, x in con.execute(
                "SELECT kind, count(*), count(*) FILTER (WHERE n_sources > 1), sum(n_mentions) "
                "FROM facts GROUP BY 1 ORDER BY 1"
            ).fetchall()
        }
    return out


def summary_markdown(
    s: dict[str, Any], counts: dict[str, int], checks: list[CheckOutcome] | None = None
) -> str:
    """A markdown summary for Dagster metadata and the CLI."""
    lines = ["### Warehouse summary", ""]
    if "persons" in s:
        lines.append(
            f"**{s['persons']:,} persons** from {s['source_patients']:,} source patients; "
            f"{s['persons_in_multiple_sources']:,} seen in more than one source."
        )
        lines.append("")
        lines.append("| patterns per person | persons |")
        lines.append("|---|---|")
        for n, c in s["persons_by_pattern_count"].items():
            lines.append(f"| {n} | {c:,} |")
        lines.append("")
        lines.append("| link rule | source patients |")
        lines.append("|---|---|")
        for r, c in s["links_by_rule"].items():
            lines.append(f"| {r} | {c:,} |")
        lines.append("")
    if "facts_by_kind" in s:
        lines.append("| fact kind | facts | from >1 source | mentions |")
        lines.append("|---|---|---|---|")
        for k, v in s["facts_by_kind"].items():
            lines.append(f"| {k} | {v['facts']:,} | {v['multi_source']:,} | {v['mentions']:,} |")
        lines.append("")
    if checks:
        lines.append("| check | result |")
        lines.append("|---|---|")
        for c in checks:
            lines.append(
                f"| {c.name} | {'passed' if c.passed else 'FAILED (' + c.severity + ')'} |"
            )
        lines.append("")
    lines.append("| table | rows |")
    lines.append("|---|---|")
    for t, n in sorted(counts.items()):
        lines.append(f"| {t} | {n:,} |")
    return "\n".join(lines)
