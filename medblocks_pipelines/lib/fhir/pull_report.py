"""What a run's pulls did, per connection, from pull history: for the CLI and Dagster metadata.

One row per pull of a run (patient access or an EHR-launch sync): status, resources landed,
quarantined, failed requests and anomalies, with our connection ids and counts only (no PHI).
"""

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from medblocks_pipelines.lib.fhir.pull import PullResult
from medblocks_pipelines.lib.registry import ControlPlane
from medblocks_pipelines.lib.registry.rows import Pull

ANOMALY_PREFIX = "_anomaly:"


@dataclass(frozen=True)
class PullRow:
    """One connection's pull in a run."""

    connection_id: str
    status: str
    landed: int
    quarantined: int
    failed: int
    anomalies: Mapping[str, int] = field(default_factory=dict)
    error: str | None = None


def row_from_history(pull: Pull) -> PullRow:
    """A :class:`PullRow` from a ``pull_history`` row."""
    counts: Mapping[str, Any] = pull.counts or {}
    return PullRow(
        connection_id=str(pull.connection_id or "-"),
        status=str(pull.status),
        landed=sum(int(v) for k, v in counts.items() if not k.startswith("_")),
        quarantined=int(counts.get("_quarantined", 0)),
        failed=int(counts.get("_failures", 0)),
        anomalies={
            k[len(ANOMALY_PREFIX) :]: int(v)
            for k, v in sorted(counts.items())
            if k.startswith(ANOMALY_PREFIX)
        },
        error=pull.error,
    )


def row_from_result(result: PullResult) -> PullRow:
    """A :class:`PullRow` from a pull's result (also for pulls that never reached history)."""
    return PullRow(
        connection_id=result.connection_id,
        status=result.status,
        landed=result.landed,
        quarantined=result.quarantined,
        failed=sum(result.failures.values()),
        anomalies=dict(sorted(result.anomalies.items())),
        error=", ".join(result.reasons()) or result.error,
    )


def run_rows(
    cp: ControlPlane, *, tenant_id: str, run_id: str, limit: int = 10_000
) -> list[PullRow]:
    """The pulls recorded for one run of a tenant, oldest first."""
    pulls = [p for p in cp.list_pulls(tenant_id=tenant_id, limit=limit) if p.run_id == run_id]
    return [row_from_history(p) for p in reversed(pulls)]


def all_failed(rows: Sequence[PullRow]) -> bool:
    """True when there were pulls and every one failed."""
    return bool(rows) and all(r.status == "failed" for r in rows)


def summary_line(rows: Sequence[PullRow]) -> str:
    """One line: pulls by status and the failure reasons of the failed ones."""
    by_status = Counter(r.status for r in rows)
    reasons: Counter[str] = Counter()
    for r in rows:
        if r.status == "failed":
            for part in (r.error or "unknown").split(" | ", 1)[0].split(", "):
                reasons[part.split("=", 1)[0]] += 1
    text = ", ".join(f"{n} {s}" for s, n in sorted(by_status.items())) or "no pulls"
    if reasons:
        text += " (failed: " + ", ".join(f"{k} x{v}" for k, v in sorted(reasons.items())) + ")"
    return text


def anomaly_totals(rows: Iterable[PullRow]) -> dict[str, int]:
    """Anomalies of all rows by kind."""
    total: Counter[str] = Counter()
    for r in rows:
        total.update(r.anomalies)
    return dict(sorted(total.items()))


def render_table(rows: Sequence[PullRow]) -> str:
    """A fixed-width table: connection, status, landed, quarantined, failed, anomalies."""
    header = ("connection", "status", "landed", "quarantined", "failed", "anomalies")
    body = [
        (
            r.connection_id,
            r.status,
            str(r.landed),
            str(r.quarantined),
            str(r.failed),
            ", ".join(f"{k}={v}" for k, v in r.anomalies.items()) or "-",
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *body]
    ]
    return "\n".join(lines)


def markdown_table(rows: Sequence[PullRow], *, limit: int = 50) -> str:
    """The table as Markdown for Dagster metadata (the first ``limit`` rows)."""
    out = [
        "| connection | status | landed | quarantined | failed | anomalies |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows[:limit]:
        anomalies = ", ".join(f"{k}={v}" for k, v in r.anomalies.items()) or "-"
        out.append(
            f"| {r.connection_id} | {r.status} | {r.landed} | {r.quarantined} | {r.failed} "
            f"| {anomalies} |"
        )
    if len(rows) > limit:
        out.append(f"| ... {len(rows) - limit} more | | | | | |")
    return "\n".join(out)
