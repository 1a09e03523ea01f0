"""FHIR Bulk Data Access 2.0 ``$export`` client (SPECS.md §3), with vendor adaptations (§3.6).

The steps are separate calls so that nothing waits inside a Dagster run (ARCHITECTURE constraint 3):

* :meth:`BulkClient.kickoff` sends the kick-off (system, ``Patient`` or ``Group``; GET or POST of a
  ``Parameters`` body) and returns the absolute polling URL, which the caller saves at once;
* :meth:`BulkClient.status` makes one status request and says: in progress (with the wait the
  server asked for, ``Retry-After`` as seconds, HTTP-date or absolute epoch, clamped), complete
  (the manifest, its ``link[next]`` pages merged), failed (an OperationOutcome whose issues are not
  ``transient``) or expired (404/410: the server no longer knows the export);
* :meth:`BulkClient.download` streams one file to disk (bounded memory), retrying with backoff,
  resuming with ``Range`` + ``If-Range`` when the server allows it, following redirects itself so
  that ``Authorization`` goes only to the FHIR server's origin and only when the manifest says
  ``requiresAccessToken`` (a string ``"true"`` counts);
* :meth:`BulkClient.delete` cleans the export up on the server.

Request shaping (vendor profiles), status answers and manifest parsing are in
:mod:`bulk_manifest` and re-exported here. A file answering 410 raises :class:`ExportExpired`.

Messages carry status codes and OperationOutcome issue codes, never bodies: bodies may hold PHI.
"""

import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import httpx

from medblocks_pipelines.lib.errors import (
    AuthError,
    ConfigError,
    ProtocolError,
    TransientError,
)
from medblocks_pipelines.lib.fhir.bulk_manifest import (
    EPOCH_MILLIS,
    EPOCH_SECONDS,
    GROUP,
    MAX_WAIT,
    MIN_WAIT,
    PATIENT,
    PROFILES,
    SYSTEM,
    ClientProfile,
    ExportRequest,
    ExportStatus,
    Manifest,
    ManifestItem,
    adapt_request,
    clamp_wait,
    client_profile,
    coerce_bool,
    issue_codes,
    next_page_url,
    origin,
    parse_manifest,
    parse_retry_after,
)
from medblocks_pipelines.lib.smart.backend import BackendAuth

#: Request shaping and manifest parsing live in bulk_manifest; importable from here too.
__all__ = [
    "BulkClient",
    "CHUNK",
    "ClientProfile",
    "DownloadResult",
    "EPOCH_MILLIS",
    "EPOCH_SECONDS",
    "ExportExpired",
    "ExportFailed",
    "ExportRequest",
    "ExportStatus",
    "FHIR_JSON",
    "GROUP",
    "KickoffRefused",
    "MAX_WAIT",
    "MIN_WAIT",
    "Manifest",
    "ManifestItem",
    "NDJSON",
    "PATIENT",
    "PROFILES",
    "REDIRECTS",
    "SYSTEM",
    "adapt_request",
    "clamp_wait",
    "client_profile",
    "coerce_bool",
    "issue_codes",
    "iter_lines",
    "next_page_url",
    "origin",
    "parse_manifest",
    "parse_retry_after",
]

FHIR_JSON = "application/fhir+json"
NDJSON = "application/fhir+ndjson"
REDIRECTS = (301, 302, 303, 307, 308)
CHUNK = 1 << 20


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------
class KickoffRefused(ProtocolError):
    """The server refused the kick-off (4xx with an OperationOutcome); retrying will not help."""

    def __init__(self, status: int, issue_codes: list[str]) -> None:
        codes = ", ".join(issue_codes) or "no OperationOutcome"
        super().__init__(
            f"bulk kick-off refused: HTTP {status} ({codes})",
            hint="check the export parameters against the server's limits",
        )
        self.status = status
        self.issue_codes = issue_codes


class ExportExpired(ProtocolError):
    """The export is gone on the server: its files answer 410, or its status URL 404/410.

    Nothing can be fetched from it any more; the caller abandons it and kicks off anew from the
    same watermark (SPECS §3.2: files vanish after the manifest's ``Expires``).
    """

    def __init__(self, what: str, status: int) -> None:
        super().__init__(f"bulk export expired: {what} answered HTTP {status}")
        self.status = status


class ExportFailed(ProtocolError):
    """The export job failed on the server (status request answered 4xx/5xx, not transient)."""

    def __init__(self, status: int, issue_codes: list[str]) -> None:
        codes = ", ".join(issue_codes) or "no OperationOutcome"
        super().__init__(f"bulk export failed: HTTP {status} ({codes})")
        self.status = status
        self.issue_codes = issue_codes


# ---------------------------------------------------------------------------------------------
# Downloads
# ---------------------------------------------------------------------------------------------
@dataclass
class DownloadResult:
    """A file on disk, as the server sent it (``gzip`` when it came gzip-encoded)."""

    url: str
    path: Path
    bytes: int
    gzip: bool
    attempts: int
    resumed_bytes: int = 0


class BulkClient:
    """Talks to one FHIR server's Bulk Data endpoints with a backend token (or none)."""

    def __init__(
        self,
        fhir_base_url: str,
        *,
        http: httpx.Client,
        auth: BackendAuth | None = None,
        profile: ClientProfile | None = None,
        accept_gzip: bool = True,
        max_attempts: int = 6,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
        min_wait: float = MIN_WAIT,
        max_wait: float = MAX_WAIT,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.base = fhir_base_url.rstrip("/")
        self.http = http
        self.auth = auth
        self.profile = profile or PROFILES["generic"]
        self.accept_gzip = accept_gzip
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.min_wait = min_wait
        self.max_wait = max_wait
        self.sleep = sleep
        #: Origins that may receive our bearer token: the FHIR server's only.
        self.token_origins = {origin(self.base)}

    def __repr__(self) -> str:
        return f"BulkClient({self.base!r}, profile={self.profile.name!r})"

    # -- helpers -------------------------------------------------------------------------------
    def _auth_headers(self, url: str) -> dict[str, str]:
        if self.auth is None or origin(url) not in self.token_origins:
            return {}
        return self.auth.headers()

    def _backoff(self, attempt: int) -> float:
        # Full jitter keeps parallel downloads from retrying in lockstep.
        return random.uniform(0, min(self.backoff_cap, self.backoff_base * 2**attempt))

    def _wait_for(self, resp: httpx.Response, attempt: int) -> float:
        asked = parse_retry_after(resp.headers.get("retry-after"))
        return clamp_wait(
            asked,
            self._backoff(attempt),
            lo=0.0 if asked is None else self.min_wait,
            hi=self.max_wait,
        )

    def _request(
        self, method: str, url: str, *, retry_auth: bool = True, **kwargs: Any
    ) -> httpx.Response:
        """One request with a fresh token; a 401 renews the token once."""
        headers = dict(kwargs.pop("headers", {}))
        sent = self._auth_headers(url)
        try:
            resp = self.http.request(method, url, headers={**headers, **sent}, **kwargs)
        except httpx.TransportError as exc:
            raise TransientError(f"{method} failed: {type(exc).__name__}") from exc
        if resp.status_code == 401 and sent and retry_auth and self.auth is not None:
            self.auth.invalidate(sent["Authorization"].split(" ", 1)[1])
            return self._request(method, url, retry_auth=False, headers=headers, **kwargs)
        return resp

    # -- kick-off ------------------------------------------------------------------------------
    def kickoff_url(self, req: ExportRequest) -> str:
        """The kick-off endpoint for the request's level."""
        if req.level == SYSTEM:
            return f"{self.base}/$export"
        if req.level == PATIENT:
            return f"{self.base}/Patient/$export"
        if req.level == GROUP and req.group_id:
            return f"{self.base}/Group/{req.group_id}/$export"
        raise ConfigError("a Group export needs a group id")

    def kickoff(self, req: ExportRequest, *, lenient: bool = False) -> str:
        """Start an export; returns the absolute polling URL (``Content-Location``).

        Raises :class:`KickoffRefused` on 4xx (except 429), ``TransientError`` on 429/5xx (with
        the server's ``Retry-After``), ``ProtocolError`` on an answer that is not ``202``.
        """
        url = self.kickoff_url(req)
        prefer = "respond-async" + (", handling=lenient" if lenient or req.lenient else "")
        headers = {"Accept": FHIR_JSON, "Prefer": prefer}
        params: list[tuple[str, str]] = []
        if req.output_format:
            params.append(("_outputFormat", req.output_format))
        if req.since:
            params.append(("_since", req.since))
        # One comma-joined _type: Oracle refuses a repeated one (SPECS §3.1).
        if req.types:
            params.append(("_type", ",".join(req.types)))
        if req.type_filters:
            params.append(("_typeFilter", ",".join(req.type_filters)))
        if req.elements:
            params.append(("_elements", ",".join(req.elements)))
        if req.organize_output_by:
            params.append(("organizeOutputBy", req.organize_output_by))
        if req.include_associated_data:
            params.append(("includeAssociatedData", ",".join(req.include_associated_data)))
        if req.allow_partial_manifests:
            params.append(("allowPartialManifests", "true"))
        if req.method == "POST":
            body = {
                "resourceType": "Parameters",
                "parameter": [_parameter(k, v) for k, v in params]
                + [
                    {"name": "patient", "valueReference": {"reference": f"Patient/{p}"}}
                    for p in req.patients
                ],
            }
            resp = self._request(
                "POST", url, headers={**headers, "Content-Type": FHIR_JSON}, json=body
            )
        else:
            resp = self._request("GET", url, headers=headers, params=params)
        if resp.status_code == 202:
            location = resp.headers.get("content-location")
            if not location:
                raise ProtocolError("bulk kick-off answered 202 without Content-Location")
            return urljoin(url, str(location))
        if resp.status_code == 429 or resp.status_code >= 500:
            raise TransientError(
                f"bulk kick-off: HTTP {resp.status_code}",
                retry_after=parse_retry_after(resp.headers.get("retry-after")),
            )
        if resp.status_code in (401, 403):
            raise AuthError(
                f"bulk kick-off: HTTP {resp.status_code} ({', '.join(issue_codes(resp))})"
            )
        if 400 <= resp.status_code < 500:
            raise KickoffRefused(resp.status_code, issue_codes(resp))
        raise ProtocolError(f"bulk kick-off: unexpected HTTP {resp.status_code}")

    # -- status --------------------------------------------------------------------------------
    def status(self, polling_url: str) -> ExportStatus:
        """One status request (never raises for a still-running export)."""
        try:
            resp = self._request("GET", polling_url, headers={"Accept": "application/json"})
        except TransientError:
            return ExportStatus("in_progress", None, "status request failed", http_status=0)
        code = resp.status_code
        if code == 202:
            return ExportStatus(
                "in_progress",
                parse_retry_after(resp.headers.get("retry-after")),
                (resp.headers.get("x-progress") or "")[:100] or None,
                http_status=202,
            )
        if code == 200:
            try:
                body = resp.json()
            except ValueError:
                # An HTML maintenance page with 200 is a failed status check, not a manifest.
                return ExportStatus(
                    "in_progress", None, "status answer was not JSON", http_status=200
                )
            try:
                body = self._follow_pages(body)
            except TransientError:
                return ExportStatus(
                    "in_progress", None, "a manifest page could not be read", http_status=200
                )
            return ExportStatus("complete", manifest=body, http_status=200)
        codes = tuple(issue_codes(resp))
        if code in (404, 410):
            # The server no longer knows the export: expired (or deleted) on its side.
            return ExportStatus("expired", http_status=code, issue_codes=codes)
        if code == 429 or "transient" in codes or (code >= 500 and not codes):
            # Throttled, or the status check failed rather than the job (SPECS §3.2).
            return ExportStatus(
                "in_progress",
                parse_retry_after(resp.headers.get("retry-after")),
                f"HTTP {code}",
                http_status=code,
                issue_codes=codes,
            )
        return ExportStatus("failed", http_status=code, issue_codes=codes)

    def _follow_pages(self, body: Any, *, max_pages: int = 10_000) -> Any:
        """Merge a paged manifest (``link`` relation ``next``, STU3 ``allowPartialManifests``)
        into one: ``output``, ``deleted`` and ``error`` of every page, in order."""
        url = next_page_url(body)
        if url is None or not isinstance(body, dict):
            return body
        merged = {k: v for k, v in body.items() if k != "link"}
        for key in ("output", "deleted", "error"):
            merged[key] = list(body.get(key) or [])
        seen: set[str] = set()
        while url is not None:
            if url in seen or len(seen) >= max_pages:
                raise ProtocolError("bulk manifest pages loop")
            seen.add(url)
            resp = self._request("GET", url, headers={"Accept": "application/json"})
            if resp.status_code in (429,) or resp.status_code >= 500:
                raise TransientError(f"bulk manifest page: HTTP {resp.status_code}")
            if resp.status_code != 200:
                raise ProtocolError(f"bulk manifest page: HTTP {resp.status_code}")
            try:
                page = resp.json()
            except ValueError:
                raise TransientError("bulk manifest page was not JSON") from None
            if not isinstance(page, dict):
                raise ProtocolError("bulk manifest page is not an object")
            for key in ("output", "deleted", "error"):
                merged[key].extend(page.get(key) or [])
            url = next_page_url(page)
        return merged

    def next_wait(self, status: ExportStatus, polls: int) -> float:
        """How long to wait before the next status request (clamped; exponential by default)."""
        return clamp_wait(
            status.retry_after,
            min(self.max_wait, 2.0 ** min(polls, 8)),
            lo=self.min_wait,
            hi=self.max_wait,
        )

    def wait(
        self,
        polling_url: str,
        *,
        timeout: float = 30 * 24 * 3600,
        on_status: Callable[[ExportStatus], None] | None = None,
    ) -> Manifest:
        """Poll until complete (for CLIs; Dagster uses the sensor instead)."""
        deadline = time.monotonic() + timeout
        polls = 0
        while True:
            st = self.status(polling_url)
            if on_status is not None:
                on_status(st)
            if st.state == "complete":
                return parse_manifest(st.manifest)
            if st.state == "failed":
                raise ExportFailed(st.http_status, list(st.issue_codes))
            if st.state == "expired":
                raise ExportExpired("the status URL", st.http_status)
            wait = self.next_wait(st, polls)
            if time.monotonic() + wait > deadline:
                raise TransientError("bulk export did not complete in time")
            polls += 1
            self.sleep(wait)

    def delete(self, polling_url: str) -> int:
        """``DELETE`` the export (cancel, or clean up after download); returns the status."""
        try:
            resp = self._request("DELETE", polling_url, headers={"Accept": FHIR_JSON})
        except TransientError:
            return 0
        return resp.status_code

    # -- download ------------------------------------------------------------------------------
    def _open(
        self,
        url: str,
        headers: dict[str, str],
        requires_token: bool,
    ) -> tuple[httpx.Response, str]:
        """Send a GET, following redirects ourselves: the token never crosses origins."""
        current = url
        for _ in range(6):
            sent = self._auth_headers(current) if requires_token else {}
            req = self.http.build_request("GET", current, headers={**headers, **sent})
            resp = self.http.send(req, stream=True, follow_redirects=False)
            if resp.status_code in REDIRECTS and resp.headers.get("location"):
                resp.close()
                current = urljoin(current, resp.headers["location"])
                continue
            if resp.status_code == 401 and sent and self.auth is not None:
                self.auth.invalidate(sent["Authorization"].split(" ", 1)[1])
            return resp, current
        raise ProtocolError("too many redirects for a bulk file")

    def download(
        self,
        url: str,
        dest: Path,
        *,
        requires_token: bool,
        max_bytes: int | None = None,
        accept: str = NDJSON,
    ) -> DownloadResult:
        """Stream one file to ``dest`` (``dest`` + ``.gz`` when gzip-encoded); retries, resumes.

        Raises ``TransientError`` when ``max_attempts`` are used up, ``ProtocolError`` on a
        definite refusal (4xx other than 401/408/429).
        """
        dest.parent.mkdir(parents=True, exist_ok=True)
        gz_path = dest.with_name(dest.name + ".gz")
        have = 0
        validator: str | None = None
        encoded: bool | None = None
        resumable = False
        resumed = 0
        last = "no attempt"
        for attempt in range(self.max_attempts):
            headers = {
                "Accept": accept,
                "Accept-Encoding": "gzip" if self.accept_gzip else "identity",
            }
            if have and resumable and validator:
                headers["Range"] = f"bytes={have}-"
                headers["If-Range"] = validator
            try:
                resp, final_url = self._open(url, headers, requires_token)
            except httpx.TransportError as exc:
                last = type(exc).__name__
                self.sleep(self._backoff(attempt))
                continue
            try:
                code = resp.status_code
                if code in (401, 408, 429) or code >= 500:
                    last = f"HTTP {code}"
                    wait = 0.0 if code == 401 else self._wait_for(resp, attempt)
                    resp.close()
                    self.sleep(wait)
                    continue
                if code == 410:
                    raise ExportExpired("a file", code)
                if code not in (200, 206):
                    raise ProtocolError(f"bulk file download: HTTP {code}")
                ctype = resp.headers.get("content-type", "").split(";")[0].strip().lower()
                if accept == NDJSON and ctype in ("text/html", "application/xml", "text/xml"):
                    # A maintenance page or a storage error document, not NDJSON.
                    last = f"content-type {ctype}"
                    resp.close()
                    self.sleep(self._backoff(attempt))
                    continue
                is_gz = resp.headers.get("content-encoding", "").lower() in ("gzip", "x-gzip")
                start = 0
                if code == 206:
                    start = _range_start(resp.headers.get("content-range"))
                    if start != have or encoded is None or is_gz != encoded:
                        raise ProtocolError("bulk file range answer does not fit the partial file")
                    resumed += have
                else:
                    have = 0
                encoded = is_gz
                resumable = resp.headers.get("accept-ranges", "").lower() == "bytes"
                validator = resp.headers.get("etag") or resp.headers.get("last-modified")
                target = gz_path if is_gz else dest
                (dest if is_gz else gz_path).unlink(missing_ok=True)
                with open(target, "ab" if start else "wb") as fh:
                    try:
                        # No chunk size: a chunker would hold back bytes received before a drop.
                        for chunk in resp.iter_raw():
                            fh.write(chunk)
                            have += len(chunk)
                            if max_bytes is not None and have > max_bytes:
                                raise ProtocolError("bulk file exceeds the size limit")
                    except (httpx.TransportError, httpx.StreamError) as exc:
                        last = f"dropped after {have} bytes: {type(exc).__name__}"
                        self.sleep(self._backoff(attempt))
                        continue
                return DownloadResult(final_url, target, have, is_gz, attempt + 1, resumed)
            finally:
                resp.close()
        raise TransientError(
            f"bulk file download gave up after {self.max_attempts} attempts ({last})"
        )


def _parameter(name: str, value: str) -> dict[str, Any]:
    """One ``Parameters.parameter`` of a POST kick-off, with the value[x] the IG gives it."""
    if name == "_since":
        return {"name": name, "valueInstant": value}
    if name == "allowPartialManifests":
        return {"name": name, "valueBoolean": value == "true"}
    if name == "includeAssociatedData":
        return {"name": name, "valueCode": value}
    return {"name": name, "valueString": value}


def _range_start(content_range: str | None) -> int:
    # "bytes 100-199/200"
    if not content_range or not content_range.startswith("bytes "):
        return -1
    try:
        return int(content_range[6:].split("-", 1)[0])
    except ValueError:
        return -1


def iter_lines(path: Path, *, gzipped: bool) -> Iterator[bytes]:
    """Lines of a (gzip) NDJSON file, streamed."""
    import gzip

    opener: Any = gzip.open if gzipped else open
    with opener(path, "rb") as fh:
        yield from fh
