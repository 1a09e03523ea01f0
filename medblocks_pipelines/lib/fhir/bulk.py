"""FHIR Bulk Data Access 2.0 ``$export`` client (SPECS.md §3), with vendor adaptations (§3.6).

The steps are separate calls so that nothing waits inside a Dagster run (ARCHITECTURE constraint 3):

* :meth:`BulkClient.kickoff` sends the kick-off (system, ``Patient`` or ``Group``; GET or POST of a
  ``Parameters`` body) and returns the absolute polling URL, which the caller saves at once;
* :meth:`BulkClient.status` makes one status request and says: in progress (with the wait the
  server asked for, ``Retry-After`` as seconds or HTTP-date, clamped), complete (the manifest),
  or failed (an OperationOutcome whose issues are not ``transient``);
* :meth:`BulkClient.download` streams one file to disk (bounded memory), retrying with backoff,
  resuming with ``Range`` + ``If-Range`` when the server allows it, following redirects itself so
  that ``Authorization`` goes only to the FHIR server's origin and only when the manifest says
  ``requiresAccessToken`` (a string ``"true"`` counts);
* :meth:`BulkClient.delete` cleans the export up on the server.

Messages carry status codes and OperationOutcome issue codes, never bodies: bodies may hold PHI.
"""

import email.utils
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx

from medblocks_pipelines.lib.errors import (
    AuthError,
    ConfigError,
    ProtocolError,
    TransientError,
)
from medblocks_pipelines.lib.smart.backend import BackendAuth

FHIR_JSON = "application/fhir+json"
NDJSON = "application/fhir+ndjson"
SYSTEM, PATIENT, GROUP = "system", "patient", "group"
REDIRECTS = (301, 302, 303, 307, 308)
#: Retry-After is clamped into this range (seconds); Cerner once asked for 5 h, cumulus caps 300 s.
MIN_WAIT, MAX_WAIT = 1.0, 300.0
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
# Vendor profile (client side) and requests
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClientProfile:
    """What a vendor's server allows; the client shapes its requests to fit (SPECS §3.6)."""

    name: str
    levels: frozenset[str] = frozenset({SYSTEM, PATIENT, GROUP})
    supports_post: bool = True
    supports_elements: bool = True
    supports_patient_param: bool = True
    type_filter_needs_type: bool = False
    one_export_at_a_time: bool = False
    #: Backend clients must register a JWKS URL and we send ``jku`` (Epic).
    needs_jwks_url: bool = False
    #: When set, ``_type`` values outside this set are dropped (with a warning).
    allowed_types: frozenset[str] | None = None


PROFILES = {
    "generic": ClientProfile("generic"),
    "epic": ClientProfile("epic", levels=frozenset({GROUP}), needs_jwks_url=True),
    "oracle": ClientProfile(
        "oracle",
        levels=frozenset({GROUP}),
        supports_post=False,
        supports_elements=False,
        supports_patient_param=False,
        type_filter_needs_type=True,
        one_export_at_a_time=True,
        allowed_types=frozenset(
            {
                "AllergyIntolerance",
                "CarePlan",
                "CareTeam",
                "Condition",
                "Device",
                "DiagnosticReport",
                "DocumentReference",
                "Encounter",
                "Goal",
                "Immunization",
                "Location",
                "Medication",
                "MedicationRequest",
                "Observation",
                "Organization",
                "Patient",
                "Practitioner",
                "Procedure",
                "Provenance",
            }
        ),
    ),
}
PROFILES["cerner"] = replace(PROFILES["oracle"], name="cerner")


def client_profile(vendor: str | None) -> ClientProfile:
    """The client profile for a source's vendor (unknown vendors get the spec's defaults)."""
    return PROFILES.get((vendor or "generic").lower(), PROFILES["generic"])


@dataclass(frozen=True)
class ExportRequest:
    """One kick-off: level, and the Bulk Data STU2 parameters."""

    level: str = SYSTEM
    group_id: str | None = None
    since: str | None = None
    types: tuple[str, ...] = ()
    type_filters: tuple[str, ...] = ()
    elements: tuple[str, ...] = ()
    patients: tuple[str, ...] = ()
    output_format: str | None = None
    method: str = "GET"
    #: STU3 ``organizeOutputBy`` (e.g. ``Patient``): files of per-patient blocks, no ``type``.
    organize_output_by: str | None = None
    #: ``includeAssociatedData`` values (``LatestProvenanceResources``, ...).
    include_associated_data: tuple[str, ...] = ()
    #: STU3 ``allowPartialManifests``: the manifest may be paged (``link`` relation ``next``).
    allow_partial_manifests: bool = False
    #: ``Prefer: handling=lenient``: the server ignores what it does not support.
    lenient: bool = False

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (stored with the export in the control plane)."""
        return {
            "level": self.level,
            "group_id": self.group_id,
            "since": self.since,
            "types": list(self.types),
            "type_filters": list(self.type_filters),
            "elements": list(self.elements),
            "patients": list(self.patients),
            "output_format": self.output_format,
            "method": self.method,
            "organize_output_by": self.organize_output_by,
            "include_associated_data": list(self.include_associated_data),
            "allow_partial_manifests": self.allow_partial_manifests,
            "lenient": self.lenient,
        }


def adapt_request(req: ExportRequest, profile: ClientProfile) -> tuple[ExportRequest, list[str]]:
    """Shape ``req`` to what ``profile`` allows; returns it and warnings about what changed."""
    warnings: list[str] = []
    if req.level not in profile.levels:
        if GROUP in profile.levels and req.group_id:
            warnings.append(f"{profile.name}: {req.level} export unsupported, using Group")
            req = replace(req, level=GROUP)
        else:
            raise ConfigError(
                f"{profile.name} supports only {sorted(profile.levels)} export",
                hint="set group_id in the organization config",
            )
    if req.patients and not profile.supports_patient_param:
        raise ConfigError(f"{profile.name} does not support the patient parameter")
    if req.patients and req.level == SYSTEM:
        raise ConfigError("the patient parameter does not apply to a system export")
    if req.elements and not profile.supports_elements:
        warnings.append(f"{profile.name}: _elements unsupported, dropped")
        req = replace(req, elements=())
    if profile.allowed_types is not None and req.types:
        kept = tuple(t for t in req.types if t in profile.allowed_types)
        if len(kept) != len(req.types):
            warnings.append(f"{profile.name}: {len(req.types) - len(kept)} _type value(s) dropped")
        req = replace(req, types=kept)
    if req.type_filters and profile.type_filter_needs_type and not req.types:
        types = tuple(dict.fromkeys(f.split("?", 1)[0] for f in req.type_filters))
        warnings.append(f"{profile.name}: _typeFilter needs _type, sending _type for its types")
        req = replace(req, types=types)
    # The patient parameter exists only for POST (SPECS §3.1).
    method = "POST" if req.patients else req.method
    if method == "POST" and not profile.supports_post:
        method = "GET"
    return replace(req, method=method), warnings


# ---------------------------------------------------------------------------------------------
# Status and manifest
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExportStatus:
    """One status answer: ``in_progress`` (wait ``retry_after``), ``complete``, ``failed`` or
    ``expired`` (the status URL answered 404/410: the server no longer knows the export)."""

    state: str
    retry_after: float | None = None
    progress: str | None = None
    manifest: dict[str, Any] | None = None
    http_status: int = 0
    issue_codes: tuple[str, ...] = ()


@dataclass(frozen=True)
class ManifestItem:
    """One file of the manifest."""

    kind: str  # output | deleted | error
    type: str | None
    url: str
    count: int | None
    #: organizeOutputBy: the last block of this file goes on in that file.
    continues_in: str | None = None


@dataclass(frozen=True)
class Manifest:
    """A completion manifest with types coerced (``requiresAccessToken`` may be a string)."""

    transaction_time: str
    requires_access_token: bool
    items: tuple[ManifestItem, ...]
    raw: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)

    @property
    def outputs(self) -> list[ManifestItem]:
        return [i for i in self.items if i.kind == "output"]

    @property
    def expected_counts(self) -> dict[str, int]:
        """Manifest ``count`` per type (types whose files all give a count)."""
        out: Counter[str] = Counter()
        unknown: set[str] = set()
        for item in self.outputs:
            rtype = item.type or "?"
            if item.count is None or item.type is None:
                unknown.add(rtype)
            else:
                out[rtype] += item.count
        return {k: v for k, v in out.items() if k not in unknown}


def coerce_bool(value: Any, *, default: bool) -> bool:
    """JSON booleans, and the strings ``"true"``/``"false"`` some servers send (Oracle Soarian)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return default


def parse_manifest(body: Any) -> Manifest:
    """Validate and coerce a completion manifest (STU2; STU4's ``outcome`` read as ``error``)."""
    if not isinstance(body, dict) or not isinstance(body.get("transactionTime"), str):
        raise ProtocolError("bulk manifest lacks transactionTime")
    items: list[ManifestItem] = []
    for kind, key in (
        ("output", "output"),
        ("deleted", "deleted"),
        ("error", "error"),
        ("error", "outcome"),
    ):
        entries = body.get(key) or []
        if not isinstance(entries, list):
            raise ProtocolError(f"bulk manifest {key} is not an array")
        for entry in entries:
            if not isinstance(entry, dict) or not isinstance(entry.get("url"), str):
                raise ProtocolError(f"bulk manifest {key} entry has no url")
            url = entry["url"]
            if not urlsplit(url).scheme:
                raise ProtocolError(f"bulk manifest {key} url is not absolute")
            count = entry.get("count")
            cont = entry.get("continuesInFile")
            items.append(
                ManifestItem(
                    kind,
                    entry.get("type") if isinstance(entry.get("type"), str) else None,
                    url,
                    int(count)
                    if isinstance(count, int | float) and not isinstance(count, bool)
                    else None,
                    cont if isinstance(cont, str) else None,
                )
            )
    # A missing flag is read as "token required": it is sent only to the FHIR origin anyway.
    requires = coerce_bool(body.get("requiresAccessToken"), default=True)
    return Manifest(body["transactionTime"], requires, tuple(items), body)


#: A "delay" this large is an absolute epoch time (seconds; milliseconds past the second bound):
#: some servers send ``Retry-After: 1767225600`` (seen in the wild, not RFC 9110).
EPOCH_SECONDS, EPOCH_MILLIS = 1_000_000_000, 100_000_000_000


def next_page_url(body: Any) -> str | None:
    """The ``link`` entry with relation ``next`` of a (paged) manifest, if any."""
    links = body.get("link") if isinstance(body, dict) else None
    for link in links if isinstance(links, list) else []:
        if isinstance(link, dict) and link.get("relation") == "next":
            url = link.get("url")
            if isinstance(url, str) and url:
                return url
    return None


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """``Retry-After`` as delay-seconds or an HTTP-date (RFC 9110 §10.2.3), or an absolute epoch
    time (seconds or milliseconds, a vendor quirk); None if absent/bad."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    if text.isdigit():
        number = float(text)
        if number >= EPOCH_SECONDS:
            epoch = number / 1000 if number >= EPOCH_MILLIS else number
            return max(0.0, epoch - (now if now is not None else time.time()))
        return number
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (now if now is not None else time.time()))


def clamp_wait(
    seconds: float | None, fallback: float, *, lo: float = MIN_WAIT, hi: float = MAX_WAIT
) -> float:
    """A wait within ``[lo, hi]``; ``fallback`` when the server gave none."""
    return min(max(seconds if seconds is not None else fallback, lo), hi)


def issue_codes(resp: httpx.Response) -> list[str]:
    """The ``issue.code`` values of an OperationOutcome body (empty when it is not one)."""
    try:
        body = resp.json()
    except ValueError:
        return []
    if not isinstance(body, dict) or body.get("resourceType") != "OperationOutcome":
        return []
    return [str(i.get("code")) for i in body.get("issue") or [] if isinstance(i, dict)]


def origin(url: str) -> tuple[str, str, int | None]:
    """Scheme, host and effective port of a URL (what "same origin" compares)."""
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme.lower(), (parts.hostname or "").lower(), port


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
            return urljoin(url, location)
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
