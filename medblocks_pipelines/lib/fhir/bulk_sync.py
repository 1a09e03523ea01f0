"""Organization-scoped backend syncs: kick-off, poll, download + land, built on the bulk client.

Used by the Dagster assets and sensor in ``defs/backend`` and by ``medblocks sync backend``; no
Dagster import here. Where things live:

* source config (``cp.add_source(..., config=...)``): ``backend_client_id`` (or ``client_id``),
  ``backend_scope`` (or ``scope``; default ``system/*.rs``), ``jku`` (true: send our JWKS URL, needed by Epic), ``jwks_url``,
  ``max_parallel_downloads`` (per-source limit, default 4), ``attachments`` (bool),
  ``accept_gzip`` (default true);
* organization config: ``group_id``, ``level`` (``system``/``patient``/``group``; default group
  when a group id is set), ``types``, ``type_filters``, ``elements``, ``cadence`` (cron),
  ``client_id`` (overrides the source's);
* the next ``_since`` is the watermark ``backend/<tenant>/<org>/since`` (the last
  ``transactionTime``); a full re-sync clears it;
* every kick-off is saved with ``cp.save_bulk_export`` before anything else happens.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import httpx

from medblocks_pipelines.lib.errors import (
    ConfigError,
    NotFound,
    ProtocolError,
    TransientError,
)
from medblocks_pipelines.lib.fhir import bulk_watermarks as wm
from medblocks_pipelines.lib.fhir.bulk import (
    ExportExpired,
    ExportFailed,
    ExportStatus,
    adapt_request,
    client_profile,
    parse_manifest,
)
from medblocks_pipelines.lib.fhir.bulk_config import (
    DEFAULT_SCOPE,
    IN_FLIGHT,
    PATTERN,
    OrgConfig,
    activate_connection,
    backend_connection,
    export_org,
    make_client,
    make_http,
    org_config,
)
from medblocks_pipelines.lib.fhir.bulk_land import (
    ProgressFn,
    SyncReport,
    abandon_expired,
    land_export,
)
from medblocks_pipelines.lib.fhir.bulk_watermarks import watermark_key
from medblocks_pipelines.lib.registry import ControlPlane
from medblocks_pipelines.lib.registry.rows import BulkExport
from medblocks_pipelines.lib.settings import Settings

__all__ = [
    "DEFAULT_SCOPE",
    "IN_FLIGHT",
    "PATTERN",
    "OrgConfig",
    "ProgressFn",
    "SyncReport",
    "backend_connection",
    "land_export",
    "make_client",
    "make_http",
    "org_config",
    "watermark_key",
]


# ---------------------------------------------------------------------------------------------
# Kick-off
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KickoffResult:
    """A saved export: new, or an in-flight one reused (one export at a time per org)."""

    export_id: str
    reused: bool
    since: str | None
    warnings: tuple[str, ...] = ()


def in_flight_export(cp: ControlPlane, tenant: str, org_id: str) -> BulkExport | None:
    """The organization's export that is kicked off but not yet landed, if any."""
    rows = cp.list_bulk_exports(status=IN_FLIGHT, tenant_id=tenant, organization_id=org_id)
    return rows[-1] if rows else None


#: A ``starting`` reservation older than this is a crashed kick-off: it is abandoned.
STALE_START = timedelta(minutes=10)


def kickoff_export(
    cp: ControlPlane,
    tenant: str,
    org_id: str,
    *,
    full: bool = False,
    run_id: str | None = None,
    http: httpx.Client | None = None,
    public_jwks_url: str | None = None,
    patients: tuple[str, ...] = (),
) -> KickoffResult:
    """Start an export for the organization and save its polling URL at once.

    Reuses an in-flight export of the same organization instead of starting a second one (some
    servers allow one at a time; waiting for it is the sensor's job). The in-flight slot is
    claimed in the control plane *before* the kick-off request (a unique index makes the claim
    atomic), so of two concurrent syncs only one reaches the server; the other reuses its export.
    ``full`` clears the watermark and its holds so the export has no ``_since``. ``patients``
    (or the organization's ``patients`` config) makes a patient-list export (POST).
    """
    existing = in_flight_export(cp, tenant, org_id)
    if existing is not None and _stale_start(existing):
        cp.update_bulk_export(existing.id, status="failed", error="kick-off never answered")
        existing = None
    if existing is not None and not full:
        return KickoffResult(existing.id, True, existing.since)
    cfg = org_config(cp, tenant, org_id, public_jwks_url=public_jwks_url)
    if full:
        wm.clear(cp, tenant, org_id)
        if existing is not None:
            cancel_export(cp, existing.id, http=http)
    since = wm.effective_since(cp, tenant, org_id)
    req, warnings = adapt_request(
        replace(cfg.request, since=since, patients=patients or cfg.request.patients),
        client_profile(cfg.vendor),
    )
    conn_id = backend_connection(cp, cfg)
    # The HTTP client is ready before the export is reserved: the kick-off request follows the
    # reservation at once (a first client costs ~0.5 s of imports and TLS set-up).
    own = http is None
    http = http or make_http()
    export_id = cp.reserve_bulk_export(
        tenant_id=tenant,
        source_id=cfg.source_id,
        organization_id=org_id,
        connection_id=conn_id,
        request=req.as_dict(),
        since=since,
        run_id=run_id,
    )
    try:
        if export_id is None:
            # Another sync of this organization claimed the slot between our check and insert.
            winner = in_flight_export(cp, tenant, org_id)
            if winner is None:
                raise TransientError("a concurrent kick-off of this organization ended; try again")
            return KickoffResult(winner.id, True, winner.since)
        try:
            polling_url = make_client(cp, cfg, http).kickoff(req)
        except BaseException:
            cp.delete_bulk_export(export_id)  # nothing was started on the server
            raise
    finally:
        if own:
            http.close()
    cp.start_bulk_export(export_id, polling_url=polling_url)
    activate_connection(cp, conn_id)
    return KickoffResult(export_id, False, since, tuple(warnings))


def _stale_start(row: BulkExport) -> bool:
    started = row.kicked_off_at
    return (
        row.status == "starting"
        and started is not None
        and datetime.now(UTC) - started > STALE_START
    )


def set_since(cp: ControlPlane, tenant: str, org_id: str, since: str | None) -> None:
    """Set (or with ``None`` clear) the organization's starting ``_since`` and drop its holds.

    ``since`` must be a FHIR instant with a time zone (``2026-01-01T00:00:00Z``).
    """
    org = cp.get_organization(org_id)
    if org.tenant_id != tenant:
        raise NotFound(f"organization {org_id} does not belong to tenant {tenant}")
    if since is not None:
        try:
            when = datetime.fromisoformat(since.replace("Z", "+00:00"))
        except ValueError:
            raise ConfigError(f"_since {since!r} is not an ISO instant") from None
        if when.tzinfo is None:
            raise ConfigError("_since needs a time zone", hint="e.g. 2026-01-01T00:00:00Z")
    wm.clear(cp, tenant, org_id)
    cp.set_watermark(watermark_key(tenant, org_id), since)


def cancel_export(cp: ControlPlane, export_id: str, *, http: httpx.Client | None = None) -> None:
    """DELETE an in-flight export on the server and mark it cancelled."""
    row = cp.get_bulk_export(export_id)
    own = http is None
    http = http or make_http()
    try:
        if row.polling_url:  # a reservation whose kick-off never answered has none
            cfg = org_config(cp, row.tenant_id, export_org(row))
            make_client(cp, cfg, http).delete(row.polling_url)
    except (ProtocolError, ConfigError):
        pass  # the server may have dropped it already; our record still ends here
    finally:
        if own:
            http.close()
    cp.update_bulk_export(export_id, status="cancelled")


# ---------------------------------------------------------------------------------------------
# Polling (one request; the sensor calls this on each tick)
# ---------------------------------------------------------------------------------------------
def poll_export(
    cp: ControlPlane,
    export_id: str,
    *,
    http: httpx.Client | None = None,
    min_wait: float = 1.0,
    max_wait: float = 300.0,
) -> ExportStatus:
    """Poll an export once and record the answer: ready (manifest saved), failed, or next poll."""
    row = cp.get_bulk_export(export_id)
    if row.status == "starting" or not row.polling_url:
        # Reserved by a kick-off still waiting for the server's answer.
        return ExportStatus("in_progress", min_wait, "kick-off in progress")
    cfg = org_config(cp, row.tenant_id, export_org(row))
    own = http is None
    http = http or make_http()
    try:
        client = make_client(cp, cfg, http, min_wait=min_wait, max_wait=max_wait)
        st = client.status(row.polling_url)
    finally:
        if own:
            http.close()
    polls = int((row.counts or {}).get("_polls", 0)) + 1
    counts = {**(row.counts or {}), "_polls": polls}
    if st.progress:
        counts["_progress"] = st.progress[:100]
    if st.state == "complete":
        manifest = parse_manifest(st.manifest)
        cp.update_bulk_export(
            export_id,
            status="ready",
            manifest=manifest.raw,
            transaction_time=manifest.transaction_time,
            counts=counts,
        )
    elif st.state == "expired":
        cp.update_bulk_export(export_id, counts=counts)
        abandon_expired(cp, row, f"status URL answered HTTP {st.http_status}")
    elif st.state == "failed":
        cp.update_bulk_export(
            export_id,
            status="failed",
            counts=counts,
            error=f"HTTP {st.http_status} ({', '.join(st.issue_codes) or 'no OperationOutcome'})",
        )
    else:
        wait = client.next_wait(st, polls)
        cp.update_bulk_export(
            export_id, counts=counts, next_poll_at=datetime.now(UTC) + timedelta(seconds=wait)
        )
    return st


def due_exports(
    cp: ControlPlane, *, now: datetime | None = None, limit: int = 50
) -> list[BulkExport]:
    """Kicked-off exports whose next poll time has come, oldest first."""
    now = now or datetime.now(UTC)
    out = []
    for row in cp.list_bulk_exports(status="kicked_off"):
        when = row.next_poll_at
        if when is not None and when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        if when is None or when <= now:
            out.append(row)
    return out[:limit]


# ---------------------------------------------------------------------------------------------
# Whole sync without Dagster (CLI fallback, demo, benchmarks)
# ---------------------------------------------------------------------------------------------
def wait_for_export(
    cp: ControlPlane,
    export_id: str,
    *,
    http: httpx.Client | None = None,
    timeout: float = 3600.0,
    min_wait: float = 1.0,
    on_status: Callable[[ExportStatus], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> BulkExport:
    """Poll (recording each answer) until the export is ready; returns its row."""
    deadline = time.monotonic() + timeout
    while True:
        row = cp.get_bulk_export(export_id)
        if row.status in ("ready", "downloading", "completed"):
            return row
        if row.status == "expired":
            raise ExportExpired("the status URL", 404)
        if row.status in ("failed", "cancelled"):
            raise ExportFailed(0, [row.error or row.status])
        st = poll_export(cp, export_id, http=http, min_wait=min_wait)
        if on_status is not None:
            on_status(st)
        if st.state == "complete":
            continue
        if st.state == "failed":
            raise ExportFailed(st.http_status, list(st.issue_codes))
        if st.state == "expired":
            raise ExportExpired("the status URL", st.http_status)
        nxt = cp.get_bulk_export(export_id).next_poll_at
        if nxt is None:  # a concurrent kick-off has not saved its polling URL yet
            sleep(min_wait)
            continue
        if nxt.tzinfo is None:
            nxt = nxt.replace(tzinfo=UTC)
        wait = max(0.0, (nxt - datetime.now(UTC)).total_seconds())
        if time.monotonic() + wait > deadline:
            raise TransientError(f"export {export_id} not ready within {timeout:.0f} s")
        sleep(wait)


def sync_organization(
    cp: ControlPlane,
    settings: Settings,
    tenant: str,
    org_id: str,
    *,
    run_id: str,
    full: bool = False,
    http: httpx.Client | None = None,
    timeout: float = 3600.0,
    min_wait: float = 1.0,
    progress: ProgressFn | None = None,
) -> SyncReport:
    """Kick off (or resume), wait and land one organization's export, without Dagster.

    An export that expired on the server before it could be landed is abandoned and one new
    export is kicked off from the same watermark.
    """
    for attempt in (1, 2):
        kicked = kickoff_export(cp, tenant, org_id, full=full, run_id=run_id, http=http)
        try:
            wait_for_export(cp, kicked.export_id, http=http, timeout=timeout, min_wait=min_wait)
            report = land_export(
                cp, settings, kicked.export_id, run_id=run_id, http=http, progress=progress
            )
        except ExportExpired:
            if attempt == 2:
                raise
            full = False  # the watermark was cleared already if it was asked for
            continue
        report.warnings = list(kicked.warnings) + report.warnings
        if attempt == 2:
            report.warnings.insert(0, "the first export expired on the server; kicked off anew")
        return report
    raise AssertionError("unreachable")
