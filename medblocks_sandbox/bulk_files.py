"""Status polling, the manifest, cancel/delete, and file serving (NDJSON, gzip, byte ranges,
presigned redirects to another origin) of the bulk server.
"""

import email.utils
import gzip
import hashlib
import hmac
import math
import shutil
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response

from medblocks_sandbox.bulk_auth import TokenInfo
from medblocks_sandbox.bulk_jobs import NDJSON, BulkCore, ExportJob, OutputFile
from medblocks_sandbox.bulk_stu3 import manifest_page
from medblocks_sandbox.errors import FhirHttpError
from medblocks_sandbox.faults import outcome_response
from medblocks_sandbox.fhir_store import format_instant


class FileEndpoints(BulkCore):
    """`bulk-status/{job}`, `bulk-files/{job}/{name}` and the presigned file host."""

    # -- status -------------------------------------------------------------------------------
    async def _job_for(self, request: Request) -> tuple[ExportJob, TokenInfo]:
        token = await self._authenticate(request)
        with self._lock:
            self._expire_jobs()
            job = self._jobs.get(request.path_params["job_id"])
        if job is None:
            raise FhirHttpError(404, "not-found", "no such export (finished, deleted or expired)")
        if self.profile.owner_only and job.client_id != token.client_id:
            raise FhirHttpError(403, "forbidden", "this export belongs to another client")
        return job, token

    async def _status(self, request: Request) -> Response:
        try:
            job, token = await self._job_for(request)
            if job.expired:
                raise FhirHttpError(404, "not-found", "no such export (expired)")
        except FhirHttpError as exc:
            return outcome_response(exc.status, exc.code, str(exc), headers=exc.headers)
        where = {"client_id": token.client_id, "path": request.url.path, "method": "GET"}
        if request.method == "DELETE":
            with self._lock:
                self._jobs.pop(job.id, None)
            job.cancel.set()
            if job.work_done or job.status != "in-progress":
                await run_in_threadpool(shutil.rmtree, job.directory, True)
            return outcome_response(202, "informational", "export deleted", severity="information")
        now = time.monotonic()
        if job.status == "in-progress" and job.fail_at is not None and now >= job.fail_at:
            job.status = "failed"
            job.failure = (job.fail_status, "exception", "the export failed while running")
            job.cancel.set()
        if job.status == "failed":
            assert job.failure is not None
            if job.expires_at is None:
                job.expires_at = now + self.config.file_ttl
            status, code, message = job.failure
            return outcome_response(status, code, message)
        retry_after = self.profile.retry_after_seconds or self.config.retry_after
        if self.config.enforce_retry_after and now < job.next_poll_at:
            job.early_polls += 1
            limit = self.config.cancel_after_early_polls
            if limit is not None and job.early_polls >= limit:
                with self._lock:
                    self._jobs.pop(job.id, None)
                job.cancel.set()
            return outcome_response(
                429,
                "throttled",
                "polled before Retry-After had passed",
                headers={"Retry-After": str(max(1, math.ceil(job.next_poll_at - now)))},
            )
        if not job.work_done or now < job.ready_at:
            job.next_poll_at = now + retry_after
            epoch = self.faults.peek("retry_after_epoch", **where)
            retry_value = str(retry_after)
            if epoch is not None:
                # A vendor quirk: an absolute time instead of a delay.
                scale = 1000 if epoch.params.get("milliseconds") else 1
                retry_value = str(int((time.time() + retry_after) * scale))
            return Response(
                status_code=202,
                headers={"X-Progress": self._progress(job, now), "Retry-After": retry_value},
            )
        if job.status == "in-progress":
            job.status = "complete"
            job.expires_at = now + self.config.file_ttl
        manifest = self._manifest(request, job)
        paged = self.faults.peek("paged_manifest", **where)
        if paged is not None and job.plan.stu3.partial_manifests:
            try:
                page = int(request.query_params.get("page", "1"))
            except ValueError:
                return outcome_response(400, "invalid", "page must be a number")
            status_url = f"{job.fhir_base}/bulk-status/{job.id}"
            manifest = manifest_page(manifest, page, int(paged.params["page_size"]), status_url)
        return JSONResponse(
            manifest,
            headers={
                "Expires": _http_date(time.time() + (job.expires_at or now) - now),
            },
        )

    def _progress(self, job: ExportJob, now: float) -> str:
        if self.profile.progress_style == "opaque":
            return "in-progress"
        span = max(job.ready_at - job.created, 1e-6)
        percent = min(99, int((now - job.created) / span * 100))
        return f"{percent}% complete; {job.progress}"[:99]

    def _manifest(self, request: Request, job: ExportJob) -> dict[str, Any]:
        def item(f: OutputFile) -> dict[str, Any]:
            entry: dict[str, Any] = {"url": f"{job.fhir_base}/bulk-files/{job.id}/{f.name}"}
            if f.type:  # organizeOutputBy files have no type
                entry["type"] = f.type
            if f.kind == "output":
                entry["count"] = max(0, f.count + job.count_delta)
            if f.continues_in:
                entry["continuesInFile"] = f"{job.fhir_base}/bulk-files/{job.id}/{f.continues_in}"
            return entry

        requires: bool | str = True
        if self.profile.requires_access_token_as_string:
            requires = "true"
        return {
            "transactionTime": format_instant(job.transaction_time),
            "request": job.request_url,
            "requiresAccessToken": requires,
            "output": [item(f) for f in job.files if f.kind == "output"],
            "deleted": [item(f) for f in job.files if f.kind == "deleted"],
            "error": [item(f) for f in job.files if f.kind == "error"],
        }

    # -- download -----------------------------------------------------------------------------
    async def _download(self, request: Request) -> Response:
        try:
            job, _ = await self._job_for(request)
            found = self._ready_file(job, request.path_params["name"])
            _check_accept(request)
        except FhirHttpError as exc:
            return outcome_response(exc.status, exc.code, str(exc), headers=exc.headers)
        if self.profile.presigned_redirects:
            if not self.storage_base_url:
                return outcome_response(500, "exception", "no presigned storage is configured")
            return RedirectResponse(self._presign(job.id, found.name), status_code=307)
        return await self._serve(request, job, found)

    def _ready_file(self, job: ExportJob, name: str) -> OutputFile:
        if job.expired or (job.expire_after is not None and job.downloads >= job.expire_after):
            job.expired = True
            raise FhirHttpError(410, "not-found", "the export has expired")
        if job.status != "complete":
            raise FhirHttpError(404, "not-found", "files are available once the export completes")
        for f in job.files:
            if f.name == name:
                return f
        raise FhirHttpError(404, "not-found", "no such file in this export")

    def _presign(self, job_id: str, name: str) -> str:
        expires = int(time.time()) + self.config.presign_ttl
        signature = self._signature(job_id, name, expires)
        base = (self.storage_base_url or "").rstrip("/")
        return f"{base}/presigned/{job_id}/{name}?" + urlencode(
            {"X-Expires": expires, "X-Signature": signature}
        )

    def _signature(self, job_id: str, name: str, expires: int) -> str:
        message = f"{job_id}/{name}/{expires}".encode()
        return hmac.new(self._presign_key, message, hashlib.sha256).hexdigest()

    async def _presigned(self, request: Request) -> Response:
        # A presigned URL is its own credential; S3 refuses a second mechanism with 400.
        if "authorization" in request.headers:
            return _s3_error(400, "InvalidArgument", "Only one auth mechanism allowed")
        job_id, name = request.path_params["job_id"], request.path_params["name"]
        try:
            expires = int(request.query_params.get("X-Expires", ""))
        except ValueError:
            return _s3_error(403, "AccessDenied", "Missing or bad signature")
        given = request.query_params.get("X-Signature", "")
        if not hmac.compare_digest(given, self._signature(job_id, name, expires)):
            return _s3_error(403, "AccessDenied", "Signature does not match")
        if expires < time.time():
            return _s3_error(403, "AccessDenied", "Request has expired")
        with self._lock:
            job = self._jobs.get(job_id)
        try:
            if job is None:
                raise FhirHttpError(404, "not-found", "gone")
            found = self._ready_file(job, name)
        except FhirHttpError:
            return _s3_error(404, "NoSuchKey", "The specified key does not exist.")
        return await self._serve(request, job, found)

    async def _serve(self, request: Request, job: ExportJob, found: OutputFile) -> Response:
        job.downloads += 1
        wants_gzip = _accepts_gzip(request.headers.get("accept-encoding", ""))
        path = await run_in_threadpool(_representation, job, found, wants_gzip)
        headers = {"Vary": "Accept-Encoding", "Cache-Control": "no-store"}
        if wants_gzip:
            headers["Content-Encoding"] = "gzip"
        return FileResponse(path, media_type=NDJSON, headers=headers)


def _representation(job: ExportJob, found: OutputFile, gzipped: bool) -> Path:
    """The file to send: the stored bytes, or a gzip/plain copy made once per export."""
    is_gz = found.path.name.endswith(".gz")
    if is_gz == gzipped:
        return found.path
    target = job.directory / ("repr." + found.name + (".gz" if gzipped else ".plain"))
    with job.gz_lock:
        if not target.exists():
            partial = target.with_suffix(target.suffix + ".part")
            if gzipped:
                with (
                    open(found.path, "rb") as src,
                    gzip.open(partial, "wb", 1) as dst,
                ):  # fast: made on first request
                    shutil.copyfileobj(src, dst, 1 << 20)
            else:
                with gzip.open(found.path, "rb") as src, open(partial, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            partial.replace(target)
    return target


def _accepts_gzip(header: str) -> bool:
    for part in header.split(","):
        coding, _, params = part.strip().partition(";")
        if coding.strip().lower() in ("gzip", "x-gzip"):
            q = params.strip()
            return not (q.startswith("q=") and float(q[2:] or 0) == 0)
    return False


def _check_accept(request: Request) -> None:
    header = request.headers.get("accept")
    if not header:
        return
    allowed = {NDJSON, "application/ndjson", "*/*", "application/*"}
    if not any(a.split(";")[0].strip() in allowed for a in header.split(",")):
        raise FhirHttpError(406, "not-supported", "files are application/fhir+ndjson")


def _http_date(epoch: float) -> str:
    return email.utils.formatdate(epoch, usegmt=True)


def _s3_error(status: int, code: str, message: str) -> Response:
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f"<Error><Code>{code}</Code><Message>{message}</Message></Error>"
    )
    return Response(body, status_code=status, media_type="application/xml")
