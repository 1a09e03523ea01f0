"""Materialization metadata people read at a glance in the Dagster UI.

Every landing asset reports the same three things the same way: a table of resources by type, a
table of failures (or quarantined rows) by reason, and a markdown summary with the headline counts
and the freshness of what landed (source watermark or pull time). Counts, types, reasons and our
own ids only: never patient data.
"""

from collections.abc import Mapping
from typing import Any

import dagster as dg

_COUNT_SCHEMA = dg.TableSchema(
    columns=[
        dg.TableColumn("resource_type", "string", description="FHIR resource type"),
        dg.TableColumn("count", "int", description="resources landed"),
    ]
)
_REASON_SCHEMA = dg.TableSchema(
    columns=[
        dg.TableColumn("reason", "string", description="failure or quarantine reason (class)"),
        dg.TableColumn("count", "int"),
    ]
)


def _rows(counts: Mapping[str, Any]) -> list[tuple[str, int]]:
    return sorted(((str(k), int(v)) for k, v in counts.items() if v), key=lambda r: (-r[1], r[0]))


def counts_table(counts: Mapping[str, Any]) -> dg.TableMetadataValue:
    """Resources by type as a Dagster table (largest first)."""
    return dg.MetadataValue.table(
        records=[dg.TableRecord({"resource_type": t, "count": n}) for t, n in _rows(counts)],
        schema=_COUNT_SCHEMA,
    )


def reasons_table(reasons: Mapping[str, Any]) -> dg.TableMetadataValue:
    """Failures (or quarantined rows) by reason as a Dagster table."""
    return dg.MetadataValue.table(
        records=[dg.TableRecord({"reason": r, "count": n}) for r, n in _rows(reasons)],
        schema=_REASON_SCHEMA,
    )


def summary_markdown(
    title: str,
    headline: Mapping[str, Any],
    by_type: Mapping[str, Any],
    reasons: Mapping[str, Any] | None = None,
    *,
    freshness: str | None = None,
) -> str:
    """A short markdown report: headline counts, resources by type, failures by reason."""
    lines = [f"**{title}**", ""]
    lines += [
        f"- {k}: **{v:,}**" if isinstance(v, int) else f"- {k}: {v}" for k, v in headline.items()
    ]
    if freshness:
        lines.append(f"- freshness: {freshness}")
    rows = _rows(by_type)
    if rows:
        lines += ["", "| resource type | count |", "|---|---:|"]
        lines += [f"| {t} | {n:,} |" for t, n in rows]
    failures = _rows(reasons or {})
    lines += ["", "No failures." if not failures else "| failure reason | count |"]
    if failures:
        lines += ["|---|---:|", *(f"| {r} | {n:,} |" for r, n in failures)]
    return "\n".join(lines)


def landing_metadata(
    title: str,
    headline: Mapping[str, Any],
    by_type: Mapping[str, Any],
    reasons: Mapping[str, Any] | None = None,
    *,
    freshness: str | None = None,
) -> dict[str, dg.MetadataValue]:
    """The three UI entries every landing asset adds to its own metadata."""
    return {
        "resources_by_type_table": counts_table(by_type),
        "failures_by_reason_table": reasons_table(reasons or {}),
        "summary": dg.MetadataValue.md(
            summary_markdown(title, headline, by_type, reasons, freshness=freshness)
        ),
    }
