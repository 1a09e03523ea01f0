"""Pull outcomes in Dagster terms: metadata of partial pulls, and failing a run whose every pull failed.

Shared by the patient-access pull and the EHR-launch targeted sync (both run ``lib.fhir.pull``).
"""

from typing import Any

import dagster as dg

from medblocks_pipelines.lib.fhir.pull_batch import BatchResult
from medblocks_pipelines.lib.fhir.pull_report import (
    markdown_table,
    row_from_result,
    summary_line,
)


def pull_outcome_metadata(batch: BatchResult | None) -> dict[str, Any]:
    """Partial pulls, anomalies, out-of-compartment rows and the per-connection table."""
    if batch is None:
        return {"partial_pulls": 0, "anomalies": dg.MetadataValue.json({})}
    rows = [row_from_result(r) for r in batch.results]
    meta = batch.as_metadata()
    return {
        "partial_pulls": int(meta["by_status"].get("partial", 0)),
        "failed_pulls": int(meta["by_status"].get("failed", 0)),
        "anomalies": dg.MetadataValue.json(meta["anomalies"]),
        "outside_patient_compartment": int(meta["outside_patient_compartment"]),
        "pulls": dg.MetadataValue.md(markdown_table(rows)),
        "anomaly_notes": dg.MetadataValue.json(anomaly_notes(batch)),
    }


def anomaly_notes(batch: BatchResult, *, limit: int = 20) -> list[str]:
    """The first notes of the batch's anomalies, per connection (shapes and names, no values)."""
    notes = [f"{r.connection_id}: {n}" for r in batch.results for n in r.anomaly_notes]
    return notes[:limit]


def raise_if_all_failed(batch: BatchResult, what: str) -> None:
    """Fail the run (``dg.Failure``) with a one-line reason when every pull of ``batch`` failed."""
    if not batch.all_failed:
        return
    rows = [row_from_result(r) for r in batch.results]
    meta = batch.as_metadata()
    raise dg.Failure(
        description=f"{what}: every pull failed: {summary_line(rows)}",
        metadata={
            "connections_pulled": int(meta["connections_pulled"]),
            "failures_by_reason": dg.MetadataValue.json(meta["failures_by_reason"]),
            "pulls": dg.MetadataValue.md(markdown_table(rows)),
            "anomaly_notes": dg.MetadataValue.json(anomaly_notes(batch)),
        },
    )
