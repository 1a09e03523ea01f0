"""Download and land a finished export: parallel downloads, per-type batches landed on worker
threads, deleted files as tombstones, error files counted, attachments fetched; then the
watermark moves and the export is deleted on the server."""

import concurrent.futures as cf
import json
import queue
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
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
from medblocks_pipelines.lib.settings import Settings
from medblocks_pipelines.lib.warehouse.lake import LakeWriter, Provenance


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
    if row["status"] == "completed":
        report = SyncReport(
            export_id, watermark=row.get("transaction_time"), since=row.get("since")
        )
        report.warnings.append("export already landed; nothing to do")
        return report
    if row["status"] in ("failed", "cancelled", "expired"):
        raise ProtocolError(f"export {export_id} is {row['status']}; kick off a new one")
    if row["status"] == "starting" or not row.get("polling_url"):
        raise TransientError(f"export {export_id} is not kicked off yet")
    tenant, org_id = row["tenant_id"], row["organization_id"]
    cfg = org_config(cp, tenant, org_id)
    own = http is None
    http = http or make_http()
    pull_id = cp.start_pull(
        tenant_id=tenant,
        pattern=PATTERN,
        source_id=cfg.source_id,
        organization_id=org_id,
        connection_id=row.get("connection_id"),
        run_id=run_id,
    )
    report = SyncReport(export_id, since=row.get("since"))
    try:
        client = make_client(cp, cfg, http, **(client_kwargs or {}))
        manifest, gone = _current_manifest(cp, client, row)
        cp.update_bulk_export(export_id, status="downloading", run_id=run_id)
        report.expected_by_type = manifest.expected_counts
        prov = Provenance(tenant, PATTERN, cfg.source_id, org_id, row.get("connection_id"), run_id)
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
            client.delete(row["polling_url"])
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


def _summarise(report: SyncReport, writer: LakeWriter) -> None:
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
    cp: ControlPlane, row: dict[str, Any], manifest: Manifest, report: SyncReport
) -> None:
    """Move the watermark over what was delivered; hold back the types that failed."""
    tenant, org_id = row["tenant_id"], row["organization_id"]
    request = row.get("request") or {}
    moved = wm.advance(
        cp,
        tenant,
        org_id,
        transaction_time=manifest.transaction_time,
        export_since=row.get("since"),
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
            "export_id": row["id"],
            "organization_id": org_id,
            "missing_types": list(moved.missing_types),
            "watermark_held_back": moved.held_back,
            "resume_since": moved.resume_since,
            "transaction_time": manifest.transaction_time,
        },
    )


def _record_completion(
    cp: ControlPlane, row: dict[str, Any], manifest: Manifest, report: SyncReport, pull_id: Any
) -> None:
    counts = {
        **{k: v for k, v in (row.get("counts") or {}).items() if k.startswith("_")},
        "landed": report.landed,
        "quarantined": report.quarantined,
        "deleted": report.deleted,
        "files": report.files,
        "attachments": report.attachments,
        "missing_types": report.missing_types,
    }
    cp.update_bulk_export(
        row["id"],
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
    if row.get("connection_id"):
        cp.update_connection(row["connection_id"], last_pull_at=datetime.now(UTC))


def abandon_expired(cp: ControlPlane, row: dict[str, Any], reason: str) -> None:
    """Record that the server no longer has the export (status ``expired`` + an outbox event);
    the watermark is untouched, so the next kick-off asks for the same data again."""
    cp.update_bulk_export(row["id"], status="expired", error=reason[:500])
    cp.emit_event(
        row["tenant_id"],
        "backend.export.expired",
        {
            "export_id": row["id"],
            "organization_id": row.get("organization_id"),
            "reason": reason[:200],
            "since": row.get("since"),
        },
    )


def _current_manifest(
    cp: ControlPlane, client: BulkClient, row: dict[str, Any]
) -> tuple[Manifest, int]:
    """The manifest, and the status code if the server no longer knows the export (else 0)."""
    # Ask again: file URLs (presigned ones especially) may have changed or expired since the
    # sensor saw the manifest. Fall back to the stored manifest if the server no longer answers
    # (its files then tell whether the export is gone: 404/410 -> ExportExpired).
    st = client.status(row["polling_url"])
    if st.state == "complete":
        manifest = parse_manifest(st.manifest)
        cp.update_bulk_export(
            row["id"], manifest=manifest.raw, transaction_time=manifest.transaction_time
        )
        return manifest, 0
    if st.state == "expired" and row.get("manifest") is None:
        raise ExportExpired("the status URL", st.http_status)
    if st.state == "failed" and row.get("manifest") is None:
        raise ExportFailed(st.http_status, list(st.issue_codes))
    if row.get("manifest") is not None:
        return parse_manifest(row["manifest"]), st.http_status if st.state == "expired" else 0
    raise TransientError("the export is not complete yet", retry_after=st.retry_after)


#: Small plain files of one type are appended into a batch of up to this size before landing:
#: each landing has a fixed cost, and servers such as HAPI write ~1000 resources per file. A
#: type's batch also lands as soon as its last file is in, so landing overlaps the downloads.
COALESCE_BYTES = 64 << 20


class _Batches:
    """Per-type batch files of downloaded plain NDJSON, landed when large enough.

    Landing runs on ``workers`` threads, each with its own :class:`LakeWriter` (the lake is
    append-only files, so writers never touch each other's output; DuckDB releases the GIL).
    :meth:`finish` waits for them and merges their stats into the main writer's.
    """

    def __init__(
        self,
        writer: LakeWriter,
        work: Path,
        export_id: str,
        received: Counter[str],
        *,
        workers: int = 2,
        limit: int = COALESCE_BYTES,
    ) -> None:
        self.writer, self.work, self.export_id = writer, work, export_id
        self.received, self.limit = received, limit
        self.open: dict[str, tuple[Path, Any, int]] = {}
        self.serial = 0
        self._lock = threading.Lock()
        self._writers: queue.Queue[LakeWriter] = queue.Queue()
        self._all = [writer.sibling() for _ in range(max(1, workers))]
        for w in self._all:
            self._writers.put(w)
        self._pool = cf.ThreadPoolExecutor(
            max_workers=len(self._all), thread_name_prefix="bulk-land"
        )
        self._futures: list[cf.Future[None]] = []

    def _land(self, path: Path, rtype: str, origin: str, remove: bool) -> None:
        w = self._writers.get()
        try:
            before = w.stats.landed + w.stats.quarantined
            # A manifest type is checked per line; files organized by patient hold many types.
            expected = rtype if rtype.isalnum() else None
            w.add_ndjson_file(path, origin=origin, expected_type=expected)
            got = w.stats.landed + w.stats.quarantined - before
        finally:
            self._writers.put(w)
            if remove:
                path.unlink(missing_ok=True)
        with self._lock:
            self.received[rtype] += got

    def land_file(self, path: Path, rtype: str, origin: str, *, remove: bool) -> None:
        # Bound the queue: a landing backlog would hold downloaded files on disk. Wait on the
        # pending ones only (a done future in the set would return at once: a busy loop).
        pending = [f for f in self._futures if not f.done()]
        while len(pending) >= 2 * len(self._all):
            cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            pending = [f for f in pending if not f.done()]
        self._futures.append(self._pool.submit(self._land, path, rtype, origin, remove))

    def add(self, got: DownloadResult, rtype: str, *, last: bool = False) -> None:
        """Take a downloaded file of ``rtype``; ``last``: the type's last file in the manifest
        (its batch lands now, while other files still download)."""
        if got.gzip or (rtype not in self.open and got.bytes >= self.limit):
            # Big enough alone (or compressed): landed as downloaded, no copy into a batch.
            origin = f"{self.export_id}/{Path(urlsplit(got.url).path).name}"
            self.land_file(got.path, rtype, origin, remove=True)
            return
        if rtype in self.open and self.open[rtype][2] + got.bytes > self.limit:
            self.flush(rtype)  # a batch stays within one landing chunk (no split)
        if rtype not in self.open:
            self.serial += 1
            path = self.work / f"batch-{self.serial:05d}.ndjson"
            self.open[rtype] = (path, open(path, "wb"), 0)  # noqa: SIM115 (closed in flush)
        path, fh, size = self.open[rtype]
        with open(got.path, "rb") as src:
            shutil.copyfileobj(src, fh, 1 << 20)
            if got.bytes:
                src.seek(-1, 2)
                if src.read(1) != b"\n":
                    fh.write(b"\n")
        got.path.unlink(missing_ok=True)
        size += got.bytes
        self.open[rtype] = (path, fh, size)
        if size >= self.limit or last:
            self.flush(rtype)

    def flush(self, rtype: str) -> None:
        path, fh, _ = self.open.pop(rtype)
        fh.close()
        self.land_file(path, rtype, f"{self.export_id}/{rtype}/{path.stem}", remove=True)

    def finish(self) -> None:
        """Land what is left, wait for every landing, merge stats (raises the first error)."""
        for rtype in list(self.open):
            self.flush(rtype)
        for fut in self._futures:
            fut.result()

    def close(self) -> None:
        """Stop workers, close writers (flushing their quarantine rows), merge their stats."""
        self._pool.shutdown(wait=True)
        for path, fh, _ in self.open.values():
            fh.close()
            path.unlink(missing_ok=True)
        self.open.clear()
        main = self.writer.stats
        for w in self._all:
            stats = w.close()
            main.counts_by_type.update(stats.counts_by_type)
            main.quarantined += stats.quarantined
            main.quarantine_reasons.update(stats.quarantine_reasons)
            main.files += stats.files
            main.bytes += stats.bytes
        self._all = []


def _download_and_land(
    client: BulkClient,
    manifest: Manifest,
    writer: LakeWriter,
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
    batches = _Batches(writer, work, report.export_id, received, workers=cfg.land_workers)
    # Output files still to come per type: a type's batch lands once its last file is in.
    to_come = Counter(item.type or "(by patient)" for item in items if item.kind == "output")
    try:
        with cf.ThreadPoolExecutor(
            max_workers=cfg.max_parallel, thread_name_prefix="bulk-dl"
        ) as pool:
            futures = {
                pool.submit(
                    client.download,
                    item.url,
                    work / _file_name(item, n),
                    requires_token=manifest.requires_access_token,
                ): item
                for n, item in enumerate(items)
            }
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
                    batches.add(got, rtype, last=not to_come[rtype])  # the batch owns the file
                elif item.kind == "deleted":
                    _land_deleted(got, writer, manifest.transaction_time, origin)
                else:
                    errors_dir.mkdir(parents=True, exist_ok=True)
                    _count_outcomes(got, errors, codes, writer, origin, report)
                    shutil.copyfile(got.path, errors_dir / got.path.name)
                if item.kind != "output":
                    got.path.unlink(missing_ok=True)
                done += 1
                if progress is not None:
                    progress("files", done, total)
        batches.finish()
    finally:
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
    got: DownloadResult, writer: LakeWriter, transaction_time: str, origin: str
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
    writer: LakeWriter,
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
