"""Download and land a finished export: parallel downloads, per-type batches landed on worker
threads, deleted files as tombstones, error files counted, attachments fetched; then the
watermark moves and the export is deleted on the server."""

import concurrent.futures as cf
import json
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx

from medblocks_pipelines.lib.errors import (
    MedblocksError,
    ProtocolError,
    TransientError,
)
from medblocks_pipelines.lib.fhir import bulk_watermarks as wm
from medblocks_pipelines.lib.fhir.bulk import (
    BulkClient,
    DownloadResult,
    ExportExpired,
    ExportFailed,
    Manifest,
    ManifestItem,
    iter_lines,
    parse_manifest,
)
from medblocks_pipelines.lib.fhir.bulk_config import (
    PATTERN,
    OrgConfig,
    export_org,
    make_client,
    make_http,
    org_config,
)
from medblocks_pipelines.lib.fhir.bulk_files import (
    attachment_refs,
    download_attachments,
    strip_block_headers,
)
from medblocks_pipelines.lib.registry import ControlPlane
from medblocks_pipelines.lib.registry.rows import BulkExport
from medblocks_pipelines.lib.settings import Settings

if TYPE_CHECKING:
    # The lake (DuckDB, PyArrow: about a second of imports) loads when something lands, so a
    # CLI sync's kick-off does not wait for it (see land_export).
    from medblocks_pipelines.lib.warehouse.lake import LakeWriter


# ---------------------------------------------------------------------------------------------
# Download and land
# ---------------------------------------------------------------------------------------------
@dataclass
class SyncReport:
    """What a landed export gave: PHI-free counts for metadata, pull history and the CLI."""

    export_id: str
    status: str = "success"  # success | partial
    counts_by_type: dict[str, int] = field(default_factory=dict)
    received_by_type: dict[str, int] = field(default_factory=dict)
    expected_by_type: dict[str, int] = field(default_factory=dict)
    count_mismatches: dict[str, dict[str, int]] = field(default_factory=dict)
    quarantined: int = 0
    quarantine_reasons: dict[str, int] = field(default_factory=dict)
    deleted: int = 0
    error_entries: dict[str, int] = field(default_factory=dict)
    error_codes: dict[str, int] = field(default_factory=dict)
    files: int = 0
    bytes_downloaded: int = 0
    resumed_bytes: int = 0
    attachments: int = 0
    tokens_fetched: int = 0
    watermark: str | None = None
    since: str | None = None
    duration_s: float = 0.0
    warnings: list[str] = field(default_factory=list)
    #: Types the error files say failed (their holds keep them for the next sync).
    failed_types: set[str] = field(default_factory=set)
    #: Error-severity issues naming no type (the whole watermark is then held back).
    unnamed_errors: int = 0
    missing_types: list[str] = field(default_factory=list)
    held_back: bool = False
    attachments_inlined: int = 0
    attachment_failures: int = 0

    @property
    def landed(self) -> int:
        return sum(self.counts_by_type.values())

    def as_metadata(self) -> dict[str, Any]:
        """Flat, PHI-free."""
        return {
            "export_id": self.export_id,
            "status": self.status,
            "landed": self.landed,
            "by_type": dict(sorted(self.counts_by_type.items())),
            "expected_by_type": dict(sorted(self.expected_by_type.items())),
            "count_mismatches": self.count_mismatches,
            "quarantined": self.quarantined,
            "quarantine_reasons": self.quarantine_reasons,
            "deleted": self.deleted,
            "error_entries": self.error_entries,
            "error_codes": self.error_codes,
            "files": self.files,
            "bytes": self.bytes_downloaded,
            "resumed_bytes": self.resumed_bytes,
            "attachments": self.attachments,
            "tokens_fetched": self.tokens_fetched,
            "watermark": self.watermark,
            "since": self.since,
            "missing_types": self.missing_types,
            "watermark_held_back": self.held_back,
            "attachments_inlined": self.attachments_inlined,
            "attachment_failures": self.attachment_failures,
            "duration_s": round(self.duration_s, 3),
            "warnings": self.warnings,
        }


ProgressFn = Callable[[str, int, int], None]  # (phase, done, total)


def _file_name(item: ManifestItem, n: int) -> str:
    tail = Path(urlsplit(item.url).path).name or "file"
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in tail)[:80]
    return f"{n:05d}.{item.kind}.{safe}"


def land_export(
    cp: ControlPlane,
    settings: Settings,
    export_id: str,
    *,
    run_id: str,
    http: httpx.Client | None = None,
    progress: ProgressFn | None = None,
    delete_when_done: bool = True,
    client_kwargs: dict[str, Any] | None = None,
) -> SyncReport:
    """Download every file of a finished export and land it; then watermark and DELETE.

    Files download in parallel (the source's ``max_parallel_downloads``) into a work folder and
    land one at a time as they arrive (``LakeWriter.add_ndjson_file``), so disk and memory stay
    bounded by the files in flight. If any file cannot be fetched the run fails before the
    watermark moves or the export is deleted: a rerun lands everything again, and the warehouse
    deduplicates identical versions. The watermark moves only over the types delivered
    (:mod:`bulk_watermarks`). An export the server has forgotten (status 404/410, files 410) is
    abandoned as ``expired`` (:class:`ExportExpired`): the next kick-off starts from the same
    watermark.
    """
    started = time.monotonic()
    row = cp.get_bulk_export(export_id)
    if row.status == "completed":
        report = SyncReport(export_id, watermark=row.transaction_time, since=row.since)
        report.warnings.append("export already landed; nothing to do")
        return report
    if row.status in ("failed", "cancelled", "expired"):
        raise ProtocolError(f"export {export_id} is {row.status}; kick off a new one")
    if row.status == "starting" or not row.polling_url:
        raise TransientError(f"export {export_id} is not kicked off yet")
    tenant, org_id = row.tenant_id, export_org(row)
    cfg = org_config(cp, tenant, org_id)
    own = http is None
    http = http or make_http()
    pull_id = cp.start_pull(
        tenant_id=tenant,
        pattern=PATTERN,
        source_id=cfg.source_id,
        organization_id=org_id,
        connection_id=row.connection_id,
        run_id=run_id,
    )
    report = SyncReport(export_id, since=row.since)
    try:
        client = make_client(cp, cfg, http, **(client_kwargs or {}))
        manifest, gone = _current_manifest(cp, client, row)
        cp.update_bulk_export(export_id, status="downloading", run_id=run_id)
        report.expected_by_type = manifest.expected_counts
        from medblocks_pipelines.lib.warehouse.lake import LakeWriter, Provenance

        prov = Provenance(tenant, PATTERN, cfg.source_id, org_id, row.connection_id, run_id)
        work = settings.data_dir / "bulk_work" / export_id / run_id[:12]
        errors_dir = settings.data_dir / "bulk_errors" / export_id
        with LakeWriter(settings.lake, prov) as writer:
            try:
                _download_and_land(
                    client, manifest, writer, report, work, errors_dir, cfg, settings, progress
                )
            except TransientError as exc:
                if gone:  # the status URL is gone too: the files will not come back
                    raise ExportExpired("the status URL", gone) from exc
                raise
            writer.flush()
        _summarise(report, writer)
        report.tokens_fetched = client.auth.tokens_fetched if client.auth else 0
        _advance_watermarks(cp, row, manifest, report)
        if delete_when_done:
            client.delete(row.polling_url)
        shutil.rmtree(work, ignore_errors=True)
        report.duration_s = time.monotonic() - started
        _record_completion(cp, row, manifest, report, pull_id)
        return report
    except ExportExpired as exc:
        cp.finish_pull(pull_id, status="failed", counts={}, error=type(exc).__name__)
        abandon_expired(cp, row, str(exc))
        raise
    except Exception as exc:
        cp.finish_pull(pull_id, status="failed", counts={}, error=type(exc).__name__)
        # Our own errors carry ids and counts only; anything else is named, not quoted (a parser
        # message could echo record content).
        detail = (
            f"{type(exc).__name__}: {exc}"
            if isinstance(exc, MedblocksError)
            else (type(exc).__name__)
        )
        cp.update_bulk_export(export_id, status="ready", error=detail[:500])
        raise
    finally:
        if own:
            http.close()


def _summarise(report: SyncReport, writer: "LakeWriter") -> None:
    """Counts from the writer, the manifest comparison and the status."""
    stats = writer.stats
    report.counts_by_type = dict(stats.counts_by_type)
    report.quarantined = stats.quarantined
    report.quarantine_reasons = dict(stats.quarantine_reasons)
    report.deleted = stats.tombstones
    for rtype, expected in report.expected_by_type.items():
        got = report.received_by_type.get(rtype, 0)
        if got != expected:
            report.count_mismatches[rtype] = {"manifest": expected, "received": got}
    if report.count_mismatches:
        report.warnings.append(
            f"counts differ from the manifest for {len(report.count_mismatches)} type(s)"
        )
    serious = sum(n for s, n in report.error_entries.items() if s in ("error", "fatal"))
    if report.quarantined or report.count_mismatches or serious:
        report.status = "partial"


def _advance_watermarks(
    cp: ControlPlane, row: BulkExport, manifest: Manifest, report: SyncReport
) -> None:
    """Move the watermark over what was delivered; hold back the types that failed."""
    tenant, org_id = row.tenant_id, export_org(row)
    request = row.request or {}
    moved = wm.advance(
        cp,
        tenant,
        org_id,
        transaction_time=manifest.transaction_time,
        export_since=row.since,
        requested_types=request.get("types") or (),
        failed_types=report.failed_types,
        unnamed_errors=report.unnamed_errors,
    )
    report.watermark = moved.watermark
    report.missing_types = list(moved.missing_types)
    report.held_back = moved.held_back
    if not moved.missing_types:
        return
    report.status = "partial"
    what = (
        "the watermark is held back (error files name no type)"
        if moved.held_back
        else f"{len(moved.missing_types)} type(s) held back for the next sync"
    )
    report.warnings.append(f"export reported failed types {', '.join(moved.missing_types)}: {what}")
    cp.emit_event(
        tenant,
        "backend.export.partial",
        {
            "export_id": row.id,
            "organization_id": org_id,
            "missing_types": list(moved.missing_types),
            "watermark_held_back": moved.held_back,
            "resume_since": moved.resume_since,
            "transaction_time": manifest.transaction_time,
        },
    )


def _record_completion(
    cp: ControlPlane, row: BulkExport, manifest: Manifest, report: SyncReport, pull_id: Any
) -> None:
    counts = {
        **{k: v for k, v in (row.counts or {}).items() if k.startswith("_")},
        "landed": report.landed,
        "quarantined": report.quarantined,
        "deleted": report.deleted,
        "files": report.files,
        "attachments": report.attachments,
        "missing_types": report.missing_types,
    }
    cp.update_bulk_export(
        row.id,
        status="completed",
        counts=counts,
        transaction_time=manifest.transaction_time,
        error=(
            f"partial: failed types {', '.join(report.missing_types)}"
            if report.missing_types
            else None
        ),
    )
    cp.finish_pull(
        pull_id,
        status=report.status,
        counts={
            **report.counts_by_type,
            "_deleted": report.deleted,
            "_quarantined": report.quarantined,
        },
    )
    if row.connection_id:
        cp.update_connection(row.connection_id, last_pull_at=datetime.now(UTC))


def abandon_expired(cp: ControlPlane, row: BulkExport, reason: str) -> None:
    """Record that the server no longer has the export (status ``expired`` + an outbox event);
    the watermark is untouched, so the next kick-off asks for the same data again."""
    cp.update_bulk_export(row.id, status="expired", error=reason[:500])
    cp.emit_event(
        row.tenant_id,
        "backend.export.expired",
        {
            "export_id": row.id,
            "organization_id": row.organization_id,
            "reason": reason[:200],
            "since": row.since,
        },
    )


# ---------------------------------------------------------------------------------------------
# Landing begun before the run's step (the CLI's hand-off)
# ---------------------------------------------------------------------------------------------
_EARLY: dict[tuple[str, str], "cf.Future[SyncReport]"] = {}
_EARLY_LOCK = threading.Lock()


def start_early_landing(
    cp: ControlPlane,
    settings: Settings,
    export_id: str,
    *,
    run_id: str,
    when: Callable[[], object] | None = None,
) -> "cf.Future[SyncReport]":
    """Begin :func:`land_export` for run ``run_id`` on a thread of this process, now.

    ``medblocks sync backend`` calls it once its Dagster run is admitted, just before Dagster
    starts the run, so the download overlaps the run's start-up (about a second of the
    CLI's time) instead of following it. The run's land step takes the landing over
    (:func:`take_early_landing`) and reports it as its own: same run id in provenance, pull
    history and the export row. ``when()`` blocks until the landing may begin (the CLI waits
    for the run to be in Dagster's storage, so crash recovery can always find the run a pull
    row names) or raises to cancel it. The caller must wait for the future before it exits.
    """
    future: cf.Future[SyncReport] = cf.Future()

    def work() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            if when is not None:
                when()
            future.set_result(land_export(cp, settings, export_id, run_id=run_id))
        except BaseException as exc:  # handed to whoever waits: the step, or the CLI
            future.set_exception(exc)

    with _EARLY_LOCK:
        _EARLY[(export_id, run_id)] = future
    threading.Thread(target=work, name=f"bulk-land-{export_id[:8]}", daemon=True).start()
    return future


def take_early_landing(export_id: str, run_id: str) -> "cf.Future[SyncReport] | None":
    """The landing this process began for ``export_id`` under run ``run_id``, once (else None)."""
    with _EARLY_LOCK:
        return _EARLY.pop((export_id, run_id), None)


def _current_manifest(
    cp: ControlPlane, client: BulkClient, row: BulkExport
) -> tuple[Manifest, int]:
    """The manifest, and the status code if the server no longer knows the export (else 0)."""
    # Ask again: file URLs (presigned ones especially) may have changed or expired since the
    # sensor saw the manifest. Fall back to the stored manifest if the server no longer answers
    # (its files then tell whether the export is gone: 404/410 -> ExportExpired).
    if not row.polling_url:  # checked by land_export; typed here
        raise TransientError(f"export {row.id} is not kicked off yet")
    st = client.status(row.polling_url)
    if st.state == "complete":
        manifest = parse_manifest(st.manifest)
        cp.update_bulk_export(
            row.id, manifest=manifest.raw, transaction_time=manifest.transaction_time
        )
        return manifest, 0
    if st.state == "expired" and row.manifest is None:
        raise ExportExpired("the status URL", st.http_status)
    if st.state == "failed" and row.manifest is None:
        raise ExportFailed(st.http_status, list(st.issue_codes))
    if row.manifest is not None:
        return parse_manifest(row.manifest), st.http_status if st.state == "expired" else 0
    raise TransientError("the export is not complete yet", retry_after=st.retry_after)


def _download_and_land(
    client: BulkClient,
    manifest: Manifest,
    writer: "LakeWriter",
    report: SyncReport,
    work: Path,
    errors_dir: Path,
    cfg: OrgConfig,
    settings: Settings,
    progress: ProgressFn | None,
) -> None:
    items = list(manifest.items)
    total = len(items)
    work.mkdir(parents=True, exist_ok=True)
    done = 0
    received: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    codes: Counter[str] = Counter()
    attachment_urls: list[tuple[str, str]] = []
    failures: list[str] = []
    expired: list[ExportExpired] = []
    from medblocks_pipelines.lib.fhir.bulk_land_pool import Batches

    batches = Batches(writer, work, report.export_id, received, workers=cfg.land_workers)
    # Output files still to come per type: a type's batch lands once its last file is in.
    to_come = Counter(item.type or "(by patient)" for item in items if item.kind == "output")
    # Disk stays bounded: a download starts only while fewer than `backlog` files are being
    # downloaded or wait, downloaded, to land; a permit comes back once its file is landed (or
    # copied into a batch, or handled here). `stop` ends waiting downloads if this loop fails.
    backlog = threading.Semaphore(cfg.max_parallel + 2 * cfg.land_workers)
    stop = threading.Event()

    def fetch(item: ManifestItem, dest: Path) -> DownloadResult:
        while not backlog.acquire(timeout=0.2):
            if stop.is_set():
                raise TransientError("the landing stopped")
        try:
            return client.download(item.url, dest, requires_token=manifest.requires_access_token)
        except BaseException:
            backlog.release()
            raise

    try:
        with cf.ThreadPoolExecutor(
            max_workers=cfg.max_parallel, thread_name_prefix="bulk-dl"
        ) as pool:
            # Largest files first (by the manifest's counts): the file that takes longest to
            # download and land starts at once instead of becoming the tail after the others.
            order = sorted(range(total), key=lambda n: -(items[n].count or 0))
            futures = {
                pool.submit(fetch, items[n], work / _file_name(items[n], n)): items[n]
                for n in order
            }
            try:
                for fut in cf.as_completed(futures):
                    item = futures[fut]
                    try:
                        got: DownloadResult = fut.result()
                    except (TransientError, ProtocolError) as exc:
                        failures.append(f"{item.kind} file ({type(exc).__name__})")
                        if isinstance(exc, ExportExpired):
                            expired.append(exc)
                        continue
                    report.files += 1
                    report.bytes_downloaded += got.bytes
                    report.resumed_bytes += got.resumed_bytes
                    origin = f"{report.export_id}/{Path(urlsplit(item.url).path).name}"
                    if item.kind == "output":
                        if item.type is None:
                            # organizeOutputBy: per-patient blocks of any type, with header lines.
                            got = strip_block_headers(got)
                        if cfg.attachments and item.type in ("DocumentReference", None):
                            attachment_urls.extend(
                                attachment_refs(got.path, got.gzip, cfg.fhir_base_url)
                            )
                        rtype = item.type or "(by patient)"
                        to_come[rtype] -= 1
                        # The batch owns the file now; its permit comes back once it is gone.
                        batches.add(got, rtype, last=not to_come[rtype], on_done=backlog.release)
                    elif item.kind == "deleted":
                        _land_deleted(got, writer, manifest.transaction_time, origin)
                    else:
                        errors_dir.mkdir(parents=True, exist_ok=True)
                        _count_outcomes(got, errors, codes, writer, origin, report)
                        shutil.copyfile(got.path, errors_dir / got.path.name)
                    if item.kind != "output":
                        got.path.unlink(missing_ok=True)
                        backlog.release()
                    done += 1
                    if progress is not None:
                        progress("files", done, total)
            except BaseException:
                stop.set()  # downloads waiting for a permit end instead of waiting forever
                raise
        batches.finish()
    finally:
        stop.set()
        batches.close()
    report.received_by_type = dict(received)
    report.error_entries = dict(errors)
    report.error_codes = dict(codes)
    if errors:
        report.warnings.append(
            "export reported "
            + ", ".join(f"{n} {s}" for s, n in sorted(errors.items()))
            + " issue(s) in its error files"
        )
    if expired:
        raise expired[0]
    if failures:
        raise TransientError(
            f"{len(failures)} of {total} bulk files could not be downloaded",
            hint="rerun the land job; landed files deduplicate",
        )
    if attachment_urls:
        got_att = download_attachments(
            client,
            attachment_urls,
            settings.data_dir / "attachments" / f"tenant={cfg.tenant}" / f"source={cfg.source_id}",
            export_id=report.export_id,
            requires_token=manifest.requires_access_token,
        )
        report.attachments = got_att.downloaded + got_att.inlined
        report.attachments_inlined = got_att.inlined
        report.attachment_failures = got_att.failed


def _land_deleted(
    got: DownloadResult, writer: "LakeWriter", transaction_time: str, origin: str
) -> None:
    """Each line is a transaction Bundle of ``DELETE Type/id`` entries (SPECS §3.2)."""
    for lineno, raw in enumerate(iter_lines(got.path, gzipped=got.gzip), start=1):
        if not raw.strip():
            continue
        try:
            bundle = json.loads(raw)
        except ValueError:
            writer.quarantine(raw, "malformed JSON in deleted file", origin=f"{origin}:{lineno}")
            continue
        if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
            writer.quarantine(raw, "deleted file line is not a Bundle", origin=f"{origin}:{lineno}")
            continue
        when_bundle = bundle.get("timestamp") or (bundle.get("meta") or {}).get("lastUpdated")
        for entry in bundle.get("entry") or []:
            req = entry.get("request") if isinstance(entry, dict) else None
            url = req.get("url") if isinstance(req, dict) else None
            parts = url.split("/") if isinstance(url, str) else []
            if not isinstance(req, dict) or req.get("method") != "DELETE" or len(parts) < 2:
                writer.quarantine(
                    json.dumps(entry),
                    "deleted entry is not DELETE Type/id",
                    resource_type="Bundle",
                    origin=f"{origin}:{lineno}",
                )
                continue
            rtype, rid = parts[-2], parts[-1]
            resp = entry.get("response") if isinstance(entry.get("response"), dict) else {}
            when = resp.get("lastModified") or when_bundle or transaction_time
            writer.add_tombstone(rtype, rid, deleted_at=str(when), origin=f"{origin}:{lineno}")


def _count_outcomes(
    got: DownloadResult,
    severities: Counter[str],
    codes: Counter[str],
    writer: "LakeWriter",
    origin: str,
    report: SyncReport,
) -> None:
    for lineno, raw in enumerate(iter_lines(got.path, gzipped=got.gzip), start=1):
        if not raw.strip():
            continue
        try:
            outcome = json.loads(raw)
        except ValueError:
            writer.quarantine(raw, "malformed JSON in error file", origin=f"{origin}:{lineno}")
            continue
        issues = outcome.get("issue") if isinstance(outcome, dict) else None
        for issue in issues or []:
            if isinstance(issue, dict):
                severity = str(issue.get("severity", "unknown"))
                severities[severity] += 1
                codes[str(issue.get("code", "unknown"))] += 1
                if severity in ("error", "fatal"):
                    named = wm.types_named(issue)
                    report.failed_types |= named
                    report.unnamed_errors += not named
