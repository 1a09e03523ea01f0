"""The export worker: starts a job and, in a thread, streams resources from the source into NDJSON
files of at most `max_lines` lines (`_elements` subsetting, deleted entries for `_since`, the
`ndjson_truncate` / `ndjson_malformed` faults).
"""

import itertools
import json
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from starlette.requests import Request

from medblocks_sandbox.bulk_auth import TokenInfo
from medblocks_sandbox.bulk_jobs import SUBSETTED, BulkCore, ExportJob, ExportPlan, OutputFile
from medblocks_sandbox.bulk_source import _last_updated, _open_lines, patients_of
from medblocks_sandbox.bulk_stu3 import (
    BlockWriter,
    associated_provenance,
)
from medblocks_sandbox.errors import FhirHttpError
from medblocks_sandbox.faults import (
    operation_outcome,
)
from medblocks_sandbox.fhir_match import matches
from medblocks_sandbox.fhir_params import PATIENT_COMPARTMENT
from medblocks_sandbox.profiles import PATIENT, SYSTEM


class ExportWorker(BulkCore):
    """Starting and running exports (a worker thread per job)."""

    def _start_job(self, request: Request, token: TokenInfo, plan: ExportPlan) -> ExportJob:
        where: dict[str, Any] = {
            "client_id": token.client_id,
            "path": request.url.path,
            "method": request.method,
        }
        with self._lock:
            self._expire_jobs()
            if self.profile.one_export_per_client and any(
                j.client_id == token.client_id and j.status == "in-progress"
                for j in self._jobs.values()
            ):
                raise FhirHttpError(
                    429,
                    "throttled",
                    "an export for this client is already in progress",
                    headers={"Retry-After": str(self.config.retry_after)},
                )
            job_id = uuid.uuid4().hex
            now = time.monotonic()
            duration = self.config.export_seconds + self.profile.extra_export_seconds
            directory = self.work_dir / job_id
            directory.mkdir()
            job = ExportJob(
                id=job_id,
                client_id=token.client_id,
                request_url=str(request.url),
                kickoff_path=request.url.path,
                fhir_base=_fhir_base(request, plan),
                plan=plan,
                transaction_time=self.source.now(),
                created=now,
                ready_at=now + duration,
                directory=directory,
            )
            failure = self.faults.take("export_fail", **where)
            if failure is not None:
                job.fail_at = now + duration * float(failure["at_fraction"])
                job.fail_status = int(failure["status"])
            mismatch = self.faults.take("count_mismatch", **where)
            if mismatch is not None:
                job.count_delta = int(mismatch["delta"])
            expires = self.faults.take("export_expires", **where)
            if expires is not None:
                job.expire_after = int(expires["after_downloads"])
            partial = self.faults.take("manifest_errors_partial", **where)
            if partial is not None:
                job.failed_types = tuple(partial["types"])
            content_faults = {
                kind: self.faults.take(kind, **where)
                for kind in ("ndjson_truncate", "ndjson_malformed")
            }
            huge = self.faults.peek("huge_page", **where) is not None
            self._jobs[job_id] = job
        worker = threading.Thread(
            target=self._run,
            args=(job, content_faults, huge),
            name=f"bulk-{job_id[:8]}",
            daemon=True,
        )
        worker.start()
        return job

    # -- the worker ---------------------------------------------------------------------------
    def _run(
        self, job: ExportJob, content_faults: dict[str, dict[str, Any] | None], huge: bool
    ) -> None:
        try:
            self._export(job, content_faults, huge)
            job.work_done = True
        except _Cancelled:
            pass
        except Exception as exc:  # a crash of the export becomes a failed job, not a dead thread
            job.failure = (500, "exception", f"export failed: {type(exc).__name__}")
            job.status = "failed"
            job.work_done = True
        if job.cancel.is_set():
            shutil.rmtree(job.directory, ignore_errors=True)

    def _export(
        self, job: ExportJob, content_faults: dict[str, dict[str, Any] | None], huge: bool
    ) -> None:
        plan = job.plan
        max_lines = 2**62 if huge else self.config.max_lines_per_file
        damage = _LineDamage(content_faults)
        passthrough = (
            plan.level == SYSTEM
            and plan.since is None
            and not plan.type_filters
            and not plan.elements
            and not damage.active
            and hasattr(self.source, "raw_files")
        )
        exported: set[tuple[str, str]] | None = set() if plan.stu3.associated else None
        blocks = plan.stu3.organize_by is not None
        for n, rtype in enumerate(plan.types):
            if job.cancel.is_set():
                raise _Cancelled
            job.progress = f"exporting {rtype} ({n + 1} of {len(plan.types)} types)"
            if rtype in job.failed_types or (blocks and _in_compartment(rtype)):
                continue  # failed "generation" (fault), or written as patient blocks below
            if exported is not None:
                exported.update((rtype, r.get("id", "")) for r, _ in self._select(job, rtype))
            raw = self.source.raw_files(rtype) if passthrough else None  # type: ignore[attr-defined]
            if raw is not None:
                for path in raw:
                    job.files.append(
                        OutputFile("output", rtype, path.name, path, _count_lines(path))
                    )
                continue
            with _SplitWriter(job, "output", rtype, max_lines) as writer:
                for resource, raw in self._select(job, rtype):
                    writer.write(damage.apply(raw if raw is not None else _dumps(resource)))
        if blocks:
            self._write_blocks(job, damage, max_lines, exported)
        if exported is not None:
            self._write_associated(job, exported, max_lines)
        if plan.since is not None:
            self._write_deleted(job)
        failures = [
            operation_outcome("exception", f"Export of {t} resources failed", severity="error")
            for t in plan.types
            if t in job.failed_types
        ]
        if plan.issues or failures:
            with _SplitWriter(job, "error", "OperationOutcome", max_lines) as writer:
                for issue in [*plan.issues, *failures]:
                    writer.write(_dumps(issue))

    def _write_blocks(
        self,
        job: ExportJob,
        damage: "_LineDamage",
        max_lines: int,
        exported: set[tuple[str, str]] | None,
    ) -> None:
        """organizeOutputBy=Patient: each patient's compartment resources as one block (held
        in memory per export: the sandbox's populations are small)."""
        by_patient: dict[str, list[str]] = {}
        for rtype in job.plan.types:
            if rtype in job.failed_types or not _in_compartment(rtype):
                continue
            for resource, raw in self._select(job, rtype):
                owners = sorted(patients_of(resource) & (job.plan.patient_ids or set()))
                if not owners:
                    continue
                if exported is not None:
                    exported.add((rtype, resource.get("id", "")))
                text = damage.apply(raw if raw is not None else _dumps(resource))
                by_patient.setdefault(owners[0], []).append(text)

        def open_file(serial: int) -> tuple[str, Any, Callable[[int, str | None], None]]:
            name = f"patients.{serial:03d}.ndjson"
            path = job.directory / name
            fh = open(path, "w", encoding="utf-8")  # noqa: SIM115 (closed by BlockWriter)

            def record(count: int, continues: str | None) -> None:
                job.files.append(OutputFile("output", "", name, path, count, continues))

            return name, fh, record

        writer = BlockWriter(open_file, max_lines)
        for patient_id in sorted(by_patient):
            writer.block(patient_id, by_patient[patient_id])
        writer.close()

    def _write_associated(
        self, job: ExportJob, exported: set[tuple[str, str]], max_lines: int
    ) -> None:
        """includeAssociatedData: Provenance targeting exported resources (once each)."""
        if "Provenance" not in self.source.resource_types():
            return
        already = {i for t, i in exported if t == "Provenance"}
        latest = "RelevantProvenanceResources" not in job.plan.stu3.associated
        chosen = associated_provenance(self.source.iter_type("Provenance"), exported, latest)
        with _SplitWriter(job, "output", "Provenance", max_lines) as writer:
            for prov in chosen:
                if prov.get("id") not in already:
                    writer.write(_dumps(prov))

    def _select(self, job: ExportJob, rtype: str) -> Iterator[tuple[dict[str, Any], str | None]]:
        """The resources of one type this export holds, with their source line if unchanged."""
        plan = job.plan
        filters = plan.type_filters.get(rtype)
        elements = plan.elements.get(rtype, set()) | plan.elements.get(None, set())
        in_compartment = rtype in PATIENT_COMPARTMENT or rtype == "Patient"
        raw_rows = getattr(self.source, "iter_type_raw", None)
        rows: Iterator[tuple[str | None, dict[str, Any]]] = (
            raw_rows(rtype)
            if raw_rows is not None
            else ((None, r) for r in self.source.iter_type(rtype))
        )
        for count, (raw, resource) in enumerate(rows):
            if count % 256 == 0 and job.cancel.is_set():
                raise _Cancelled
            late = False
            if plan.patient_ids is not None and in_compartment:
                members = patients_of(resource)
                if not members & plan.patient_ids:
                    continue
                late = bool(members & plan.late_joiners)
            if plan.since is not None and not late:
                updated = _last_updated(resource)
                if updated is not None and updated <= plan.since:
                    continue
            if filters is not None and not any(matches(resource, f) for f in filters):
                continue
            if elements:
                yield _subset(resource, elements), None
            else:
                yield resource, raw

    def _write_deleted(self, job: ExportJob) -> None:
        plan = job.plan
        _, deletions = self.source.changes_since(plan.since)
        history = getattr(self.source, "history", None)
        entries = []
        for rtype, rid, _deleted_at in deletions:
            if not plan.wants(rtype):
                continue
            if plan.patient_ids is not None and rtype in PATIENT_COMPARTMENT:
                # The compartment of a deleted resource is that of its last live version.
                last = None
                if history is not None:
                    last = next(
                        (
                            v.resource
                            for v in reversed(history(rtype, rid))
                            if v.resource is not None
                        ),
                        None,
                    )
                if last is None or not patients_of(last) & plan.patient_ids:
                    continue
            entries.append({"request": {"method": "DELETE", "url": f"{rtype}/{rid}"}})
        size = max(1, self.config.deleted_bundle_size)
        with _SplitWriter(job, "deleted", "Bundle", 2**62) as writer:
            for start in range(0, len(entries), size):
                writer.write(
                    _dumps(
                        {
                            "resourceType": "Bundle",
                            "type": "transaction",
                            "entry": entries[start : start + size],
                        }
                    )
                )


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
class _Cancelled(Exception):
    """The export was deleted while running."""


def _fhir_base(request: Request, plan: ExportPlan) -> str:
    """The absolute FHIR base of a kick-off request (its URL minus the operation path)."""
    suffix = {SYSTEM: "/$export", PATIENT: "/Patient/$export"}.get(
        plan.level, f"/Group/{plan.group_id}/$export"
    )
    path = request.url.path
    base_path = path[: -len(suffix)] if path.endswith(suffix) else path.rsplit("/$export", 1)[0]
    return str(request.url.replace(path=base_path, query="")).rstrip("/")


def _in_compartment(resource_type: str) -> bool:
    """Types written as patient blocks under organizeOutputBy=Patient."""
    return resource_type == "Patient" or resource_type in PATIENT_COMPARTMENT


def _dumps(resource: dict[str, Any]) -> str:
    return json.dumps(resource, separators=(",", ":"), ensure_ascii=False)


def _count_lines(path: Path) -> int:
    return sum(1 for line in _open_lines(path) if line.strip())


def _subset(resource: dict[str, Any], elements: set[str]) -> dict[str, Any]:
    keep = elements | {"resourceType", "id", "meta"}
    out = {k: v for k, v in resource.items() if k in keep}
    meta = dict(out.get("meta") or {})
    meta["tag"] = [*(meta.get("tag") or []), SUBSETTED]
    out["meta"] = meta
    return out


class _LineDamage:
    """Applies ``ndjson_truncate`` / ``ndjson_malformed`` faults to the lines of one export."""

    def __init__(self, faults: dict[str, dict[str, Any] | None]) -> None:
        truncate, malformed = faults.get("ndjson_truncate"), faults.get("ndjson_malformed")
        self.truncate_at = int(truncate["line"]) if truncate else None
        self.malformed_at = int(malformed["line"]) if malformed else None
        self.active = truncate is not None or malformed is not None
        self.line = 0

    def apply(self, line: str) -> str:
        self.line += 1
        if self.line == self.truncate_at:
            return line[: max(1, len(line) // 2)]
        if self.line == self.malformed_at:
            return '{"resourceType": "Observation", "id": oops,,}'
        return line


class _SplitWriter:
    """Writes lines into ``<n>.<Type>.ndjson`` files of at most ``max_lines`` lines."""

    def __init__(self, job: ExportJob, kind: str, rtype: str, max_lines: int) -> None:
        self.job, self.kind, self.rtype, self.max_lines = job, kind, rtype, max_lines
        self._fh: Any = None
        self._file: OutputFile | None = None
        self._serial = itertools.count(1)

    def __enter__(self) -> "_SplitWriter":
        return self

    def write(self, line: str) -> None:
        if self._file is None or self._file.count >= self.max_lines:
            self._close()
            prefix = {"output": "", "error": "error.", "deleted": "deleted."}[self.kind]
            name = f"{prefix}{self.rtype}.{next(self._serial):03d}.ndjson"
            path = self.job.directory / name
            self._fh = open(path, "w", encoding="utf-8")  # noqa: SIM115 (closed in _close)
            self._file = OutputFile(self.kind, self.rtype, name, path, 0)
        self._fh.write(line)
        self._fh.write("\n")
        self._file.count += 1

    def _close(self) -> None:
        if self._fh is not None and self._file is not None:
            self._fh.close()
            self.job.files.append(self._file)
        self._fh = None

    def __exit__(self, *exc: object) -> None:
        self._close()
