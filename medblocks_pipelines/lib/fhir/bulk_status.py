"""What ``medblocks bulk status`` shows: an organization's in-flight (or last) Bulk export, its
manifest in counts, its errors and the types held back, from the control plane only (no request
to the server). PHI-free: ids of our own, statuses, counts and resource type names.
"""

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from medblocks_pipelines.lib.fhir import bulk_watermarks as wm
from medblocks_pipelines.lib.fhir.bulk import parse_manifest
from medblocks_pipelines.lib.fhir.bulk_config import IN_FLIGHT
from medblocks_pipelines.lib.registry import ControlPlane
from medblocks_pipelines.lib.registry.rows import BulkExport


@dataclass
class ExportView:
    """One export as the CLI shows it."""

    export_id: str
    status: str
    in_flight: bool
    kicked_off_at: str
    since: str | None
    transaction_time: str | None
    polls: int
    progress: str | None
    error: str | None
    request: dict[str, Any]
    files: dict[str, int] = field(default_factory=dict)  # output/deleted/error -> files
    manifest_counts: dict[str, int] = field(default_factory=dict)  # type -> count
    landed: int | None = None
    missing_types: list[str] = field(default_factory=list)


@dataclass
class OrgBulkStatus:
    """The organization's watermark, holds and its current (or last) export."""

    tenant: str
    org_id: str
    watermark: str | None
    holds: dict[str, str | None]
    export: ExportView | None


def _view(row: BulkExport) -> ExportView:
    counts = row.counts or {}
    view = ExportView(
        export_id=row.id,
        status=row.status,
        in_flight=row.status in IN_FLIGHT,
        kicked_off_at=row.kicked_off_at.isoformat(timespec="seconds"),
        since=row.since,
        transaction_time=row.transaction_time,
        polls=int(counts.get("_polls", 0)),
        progress=counts.get("_progress"),
        error=row.error,
        request={k: v for k, v in (row.request or {}).items() if v not in (None, [], False)},
        landed=counts.get("landed"),
        missing_types=list(counts.get("missing_types") or []),
    )
    if row.manifest:
        manifest = parse_manifest(row.manifest)
        view.files = dict(Counter(i.kind for i in manifest.items))
        view.manifest_counts = manifest.expected_counts
    return view


def org_bulk_status(cp: ControlPlane, tenant: str, org_id: str) -> OrgBulkStatus:
    """The in-flight export of the organization, else its most recent one."""
    rows = cp.list_bulk_exports(tenant_id=tenant, organization_id=org_id)
    flying = [r for r in rows if r.status in IN_FLIGHT]
    chosen = flying or rows
    row = chosen[-1] if chosen else None
    return OrgBulkStatus(
        tenant,
        org_id,
        cp.get_watermark(wm.watermark_key(tenant, org_id)),
        wm.holds(cp, tenant, org_id),
        _view(row) if row is not None else None,
    )
