"""The sandbox's FHIR Bulk Data Access 2.0 ``$export`` server (SPECS.md 3).

What it serves, as routes an EHR app mounts (``BulkServer.routes()``) or as a standalone app
(:func:`create_bulk_app`):

* kick-off at system (``/$export``), all-patients (``/Patient/$export``) and Group
  (``/Group/{id}/$export``) level, by GET or by POST of a ``Parameters`` body; ``Accept:
  application/fhir+json`` and ``Prefer: respond-async`` are required (400 otherwise) and
  ``Prefer: handling=lenient`` turns unsupported parameters into ``error`` file entries;
* ``_outputFormat``, ``_since``, ``_type``, ``_typeFilter`` (evaluated by the FHIR store's search
  engine), ``_elements`` (root elements, ``SUBSETTED`` tag) and ``patient`` (POST only);
* status polling: ``202`` with ``X-Progress`` and ``Retry-After`` while the job "works" (a
  configurable duration), ``200`` with the manifest, 4xx/5xx OperationOutcome when it failed,
  ``DELETE`` to cancel or clean up (``202``, then ``404``);
* file download with ``Accept: application/fhir+ndjson``, gzip when the client accepts it, and
  byte ranges (``206``) so a client can resume; a token of the exporting client is required;
* vendor profiles (``profiles.py``) and faults (``faults.py``).

Exports run in a worker thread that streams resources from a :class:`BulkSource` into NDJSON
files under a work directory; nothing is held in memory beyond one resource. A
:class:`NdjsonDirSource` serves pre-generated NDJSON files, unchanged, for an unfiltered system
export (the large-benchmark path).

Wiring (what ``run.py`` does)::

    server = BulkServer(store, authenticator=require_token, profile="oracle", faults=injector)
    app = create_ehr_app(..., extra_routes=server.routes(),      # before /{type}/{id}
                         root_routes=[*fault_admin_routes(injector), *bulk_admin_routes(server)],
                         middleware=[Middleware(FaultMiddleware, faults=injector, ...)])
    # presigned_redirects profiles only: a file host on another port
    storage = ServerThread(bind_socket(), presigned_storage_app([server])).start()
    server.storage_base_url = storage.url

STU3 ``organizeOutputBy=Patient``, ``includeAssociatedData`` (Provenance) and
``allowPartialManifests`` (paged manifests with the ``paged_manifest`` fault) live in
``bulk_stu3.py``; the vendor quirks ``retry_after_epoch``, ``export_expires`` and
``manifest_errors_partial`` are faults (``faults.py``).

Not implemented: the other STU3/4 additions (``_until``, ``Prefer: separate-export-status``, the
``outcome`` rename), Binary and attachments in patient-level exports, ``_elements`` beyond root elements (mandatory
elements are not added back), HAPI-style job reuse, and persistence across restarts (jobs live
in memory; files in the work directory).
"""

import contextlib
import dataclasses
import email.utils
import functools
import gzip
import hashlib
import hmac
import inspect
import itertools
import json
import math
import re
import secrets
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import parse_qsl, urlencode

from fhir.resources.R4B import get_fhir_model_class
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from medblocks_sandbox.bulk_stu3 import (
    BlockWriter,
    Stu3Options,
    associated_provenance,
    manifest_page,
    parse_options,
)
from medblocks_sandbox.errors import FhirHttpError
from medblocks_sandbox.faults import (
    FaultInjector,
    FaultMiddleware,
    fault_admin_routes,
    jwt_client_resolver,
    operation_outcome,
    outcome_response,
)
from medblocks_sandbox.fhir_match import compile_filters, element_values, matches, reference_key
from medblocks_sandbox.fhir_params import PATIENT_COMPARTMENT, SHARED_TYPES
from medblocks_sandbox.fhir_store import format_instant
from medblocks_sandbox.profiles import (
    GROUP,
    PATIENT,
    SYSTEM,
    VendorProfile,
    get_profile,
)

NDJSON = "application/fhir+ndjson"
#: ``_outputFormat`` values a server must accept (SPECS 3.1).
OUTPUT_FORMATS = frozenset({"application/fhir+ndjson", "application/ndjson", "ndjson"})
#: Kick-off parameters this server implements (Bulk Data STU2).
SUPPORTED_PARAMS = frozenset(
    {
        "_outputFormat",
        "_since",
        "_type",
        "_typeFilter",
        "_elements",
        "patient",
        # STU3 (bulk_stu3.py)
        "organizeOutputBy",
        "includeAssociatedData",
        "allowPartialManifests",
    }
)
SUBSETTED = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "SUBSETTED",
    "display": "Resource encoded in summary mode",
}
_INSTANT_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})$")
_ELEMENT_RE = re.compile(r"^(?:(?P<type>[A-Z][A-Za-z]+)\.)?(?P<element>[a-z][A-Za-z0-9]*)$")
_SCOPE_RE = re.compile(r"^system/(?P<type>\*|[A-Z][A-Za-z]+)\.(?P<perm>\*|read|write|[cruds]+)$")
_TYPE_FILTER_SPLIT = re.compile(r",(?=[A-Z][A-Za-z]+\?)")


# ---------------------------------------------------------------------------------------------
# Authentication seam
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenInfo:
    """Who is calling: the client id and the scopes its access token carries."""

    client_id: str
    scopes: frozenset[str]


class CallerInfo(Protocol):
    """What an authenticator returns: ``TokenInfo`` here, or the EHR's ``auth.TokenInfo``."""

    @property
    def client_id(self) -> str:
        """The client the token was issued to."""
        ...

    @property
    def scopes(self) -> Collection[str]:
        """The granted scopes."""
        ...


#: Validates the request's bearer token; raises ``FhirHttpError`` (401/403) when it fails.
Authenticator = Callable[[Request], "CallerInfo | Awaitable[CallerInfo]"]


class StaticTokens:
    """A tiny token issuer/validator for running the bulk server without the EHR's AS.

    Tokens are random strings mapped to :class:`TokenInfo` and an expiry; ``expire`` ends one
    early (the seam the ``expire_token`` fault calls).
    """

    def __init__(self) -> None:
        self._tokens: dict[str, tuple[TokenInfo, float]] = {}
        self._lock = threading.Lock()

    def issue(self, client_id: str, scopes: Iterable[str], *, ttl: float = 300.0) -> str:
        """Issue a bearer token for ``client_id`` with ``scopes`` valid for ``ttl`` seconds."""
        token = secrets.token_urlsafe(24)
        with self._lock:
            self._tokens[token] = (TokenInfo(client_id, frozenset(scopes)), time.time() + ttl)
        return token

    def expire(self, token: str) -> None:
        """Make ``token`` expire now."""
        with self._lock:
            if token in self._tokens:
                self._tokens[token] = (self._tokens[token][0], 0.0)

    def client_of(self, token: str) -> str | None:
        """The client id of a known token (the fault middleware's resolver)."""
        with self._lock:
            found = self._tokens.get(token)
        return found[0].client_id if found else jwt_client_resolver(token)

    def __call__(self, request: Request) -> TokenInfo:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise FhirHttpError(
                401,
                "login",
                "a bearer token is required",
                headers={"WWW-Authenticate": 'Bearer realm="sandbox"'},
            )
        with self._lock:
            found = self._tokens.get(token.strip())
        if found is None or found[1] <= time.time():
            raise FhirHttpError(
                401,
                "expired" if found else "login",
                "the access token is invalid or expired",
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        return found[0]


def auth_server_authenticator(auth_server: Any) -> Authenticator:
    """Adapt the EHR's authorization server (``sandbox.auth.AuthServer``) to the bulk seam.

    Uses its public ``validate_access_token``; answers 401 with an RFC 6750 challenge like the
    EHR's own ``require_token``.
    """

    def authenticate(request: Request) -> TokenInfo:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise FhirHttpError(
                401,
                "login",
                "a bearer access token is required",
                headers={"WWW-Authenticate": 'Bearer realm="bulk"'},
            )
        info = auth_server.validate_access_token(token.strip())
        if info is None:
            raise FhirHttpError(
                401,
                "login",
                "the access token is invalid, expired or revoked",
                headers={"WWW-Authenticate": 'Bearer realm="bulk", error="invalid_token"'},
            )
        return TokenInfo(str(info.client_id), frozenset(info.scopes))

    return authenticate


def can_read(scopes: Iterable[str], resource_type: str) -> bool:
    """Whether system scopes (SMART v1 ``.read``/``.*`` or v2 ``.rs``-style) allow reading a type.

    Granular v2 scopes with a query (``system/Observation.rs?category=...``) do not grant a
    whole-type bulk export, so they are not counted.
    """
    for scope in scopes:
        match = _SCOPE_RE.match(scope)
        if not match or match["type"] not in ("*", resource_type):
            continue
        perm = match["perm"]
        if perm in ("*", "read"):
            return True
        if perm != "write" and "r" in perm and "".join(c for c in "cruds" if c in perm) == perm:
            return True
    return False


def has_system_read(scopes: Iterable[str]) -> bool:
    """Whether any scope is a system-level read scope (bulk export needs one)."""
    return any(
        (m := _SCOPE_RE.match(scope)) is not None and can_read([scope], m["type"])
        for scope in scopes
    )


# ---------------------------------------------------------------------------------------------
# Data seam
# ---------------------------------------------------------------------------------------------
@runtime_checkable
class BulkSource(Protocol):
    """What the export reads. ``sandbox.fhir_store.FhirStore`` satisfies it as it is."""

    def now(self) -> datetime:
        """The clock that stamps ``meta.lastUpdated`` (used for ``transactionTime``)."""
        ...

    def resource_types(self) -> list[str]:
        """Types that have at least one current resource."""
        ...

    def iter_type(self, resource_type: str) -> Iterator[dict[str, Any]]:
        """Current resources of one type, streamed."""
        ...

    def get(self, resource_type: str, resource_id: str) -> dict[str, Any] | None:
        """One current resource (used for Group)."""
        ...

    def changes_since(
        self,
        since: datetime | None,
        *,
        types: Iterable[str] | None = None,
        until: datetime | None = None,
    ) -> tuple[list[dict[str, Any]], list[tuple[str, str, datetime]]]:
        """Changed resources and ``(type, id, deleted_at)`` deletions after ``since``."""
        ...


class NdjsonDirSource:
    """Pre-generated NDJSON files (``Type.ndjson`` / ``Type.000.ndjson[.gz]``) as a bulk source.

    Resources are streamed from disk on every pass; no index is kept. Files whose name does not
    start with the type of their first line are treated as mixed and filtered line by line. No
    deletions are known.
    """

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        self._by_type: dict[str, list[Path]] = {}
        self._mixed: list[Path] = []
        for path in sorted(self.directory.iterdir()):
            if not path.is_file() or not (
                path.name.endswith(".ndjson") or path.name.endswith(".ndjson.gz")
            ):
                continue
            first = _first_type(path)
            if first is None:
                continue
            if re.split(r"[._-]", path.name, maxsplit=1)[0] == first:
                self._by_type.setdefault(first, []).append(path)
            else:
                self._mixed.append(path)
        self._mixed_types = {t for p in self._mixed for t in _types_in(p)} if self._mixed else set()

    def now(self) -> datetime:
        """Wall-clock UTC."""
        return datetime.now(UTC)

    def resource_types(self) -> list[str]:
        """Types found on disk."""
        return sorted(set(self._by_type) | self._mixed_types)

    def raw_files(self, resource_type: str) -> list[Path] | None:
        """The files holding exactly this type, if no mixed file might also hold it."""
        if resource_type in self._mixed_types:
            return None
        return list(self._by_type.get(resource_type, []))

    def iter_type(self, resource_type: str) -> Iterator[dict[str, Any]]:
        """Stream resources of one type from disk."""
        for _, resource in self.iter_type_raw(resource_type):
            yield resource

    def iter_type_raw(self, resource_type: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """Stream ``(line, resource)`` pairs, so an unchanged resource is written back as it
        was read instead of being serialised again."""
        for path in self._by_type.get(resource_type, []):
            for line in _open_lines(path):
                line = line.strip()
                if line:
                    yield line, json.loads(line)
        for path in self._mixed:
            for line in _open_lines(path):
                line = line.strip()
                if line:
                    resource = json.loads(line)
                    if resource.get("resourceType") == resource_type:
                        yield line, resource

    def get(self, resource_type: str, resource_id: str) -> dict[str, Any] | None:
        """Linear scan (only used for Group lookups)."""
        for resource in self.iter_type(resource_type):
            if resource.get("id") == resource_id:
                return resource
        return None

    def changes_since(
        self,
        since: datetime | None,
        *,
        types: Iterable[str] | None = None,
        until: datetime | None = None,
    ) -> tuple[list[dict[str, Any]], list[tuple[str, str, datetime]]]:
        """No tracked deletions; changed resources are not listed here (the export filters)."""
        return [], []


def _open_lines(path: Path) -> Iterator[str]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:  # type: ignore[operator]
        yield from fh


def _first_type(path: Path) -> str | None:
    for line in _open_lines(path):
        if line.strip():
            try:
                value = json.loads(line).get("resourceType")
            except (ValueError, AttributeError):
                return None
            return value if isinstance(value, str) else None
    return None


def _types_in(path: Path) -> set[str]:
    found = set()
    for line in _open_lines(path):
        if line.strip():
            with contextlib.suppress(ValueError, AttributeError):
                found.add(json.loads(line).get("resourceType"))
    return {t for t in found if isinstance(t, str)}


def patients_of(resource: dict[str, Any]) -> frozenset[str]:
    """Patient ids whose compartment holds ``resource`` (FHIR R4 CompartmentDefinition/patient)."""
    rtype = resource.get("resourceType")
    if rtype == "Patient":
        return frozenset({resource.get("id", "")})
    paths = PATIENT_COMPARTMENT.get(str(rtype), ("subject", "patient", "beneficiary"))
    out = set()
    for path in paths:
        for value in element_values(resource, path):
            if isinstance(value, dict) and isinstance(value.get("reference"), str):
                key = reference_key(value["reference"])
                if key and key[0] == "Patient":
                    out.add(key[1])
    return frozenset(out)


@functools.lru_cache(maxsize=512)
def _is_resource_type(name: str) -> bool:
    if not re.fullmatch(r"[A-Z][A-Za-z]+", name):
        return False
    try:
        get_fhir_model_class(name)
    except (KeyError, ValueError, AttributeError):
        return False
    return True


def _parse_instant(text: str) -> datetime:
    if not _INSTANT_RE.match(text):
        hint = " (was a '+' in the zone left unencoded?)" if " " in text else ""
        raise FhirHttpError(400, "invalid", f"_since must be a FHIR instant with a zone{hint}")
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _last_updated(resource: dict[str, Any]) -> datetime | None:
    value = (resource.get("meta") or {}).get("lastUpdated")
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


# ---------------------------------------------------------------------------------------------
# Export request and job
# ---------------------------------------------------------------------------------------------
@dataclass
class ExportPlan:
    """A validated kick-off: what to export for whom."""

    level: str
    group_id: str | None
    types: list[str]
    since: datetime | None
    type_filters: dict[str, list[list[Any]]]
    elements: dict[str | None, set[str]]
    patient_ids: set[str] | None
    #: Group members who joined after ``_since``: all their data is sent (SPECS 3.1).
    late_joiners: set[str]
    issues: list[dict[str, Any]]
    type_given: bool
    scopes: frozenset[str] = frozenset()
    stu3: Stu3Options = field(default_factory=Stu3Options)

    def wants(self, resource_type: str) -> bool:
        """Whether a resource of this type belongs in this export (used for deletions, whose
        type may no longer have any live resource)."""
        if self.type_given:
            return resource_type in self.types
        if self.level != SYSTEM and not _patient_level_type(resource_type):
            return False
        return can_read(self.scopes, resource_type)


@dataclass
class OutputFile:
    """One file of a finished export."""

    kind: str  # output | error | deleted
    type: str
    name: str
    path: Path
    count: int
    #: organizeOutputBy: the last block goes on in this file (its name).
    continues_in: str | None = None


@dataclass
class ExportJob:
    """One export, from kick-off to deletion."""

    id: str
    client_id: str
    request_url: str
    kickoff_path: str
    #: Absolute FHIR base the export was started under; status and file URLs hang off it.
    fhir_base: str
    plan: ExportPlan
    transaction_time: datetime
    created: float
    ready_at: float
    directory: Path
    status: str = "in-progress"  # in-progress | complete | failed
    work_done: bool = False
    progress: str = "queued"
    files: list[OutputFile] = field(default_factory=list)
    failure: tuple[int, str, str] | None = None
    fail_at: float | None = None
    fail_status: int = 500
    count_delta: int = 0
    cancel: threading.Event = field(default_factory=threading.Event)
    expires_at: float | None = None
    gz_lock: threading.Lock = field(default_factory=threading.Lock)
    next_poll_at: float = 0.0
    early_polls: int = 0
    #: export_expires: expire once this many files were downloaded (None: never).
    expire_after: int | None = None
    downloads: int = 0
    expired: bool = False
    #: manifest_errors_partial: types whose files "failed generation".
    failed_types: tuple[str, ...] = ()


@dataclass
class BulkConfig:
    """Tunables of the bulk server (all plain attributes: tests change them at run time)."""

    #: Seconds an export reports 202 before its manifest is ready (simulated work).
    export_seconds: float = 1.0
    #: ``Retry-After`` on a 202 status, in seconds.
    retry_after: int = 1
    #: Lines per output file before a new file starts.
    max_lines_per_file: int = 10_000
    #: Entries per ``deleted`` Bundle.
    deleted_bundle_size: int = 500
    #: How long files stay after completion (the manifest's ``Expires``).
    file_ttl: float = 3600.0
    #: Lifetime of a presigned URL (oracle profile), seconds.
    presign_ttl: int = 300
    #: Answer 429 to a status poll that comes before the last ``Retry-After`` has passed.
    enforce_retry_after: bool = False
    #: With ``enforce_retry_after``: cancel the export after this many early polls (servers may
    #: cancel a job whose client keeps hammering, SPECS 3.2).
    cancel_after_early_polls: int | None = None


class BulkServer:
    """The ``$export`` endpoints over a :class:`BulkSource`, with a profile and faults.

    ``authenticator`` validates the bearer token of every bulk call and returns
    :class:`TokenInfo` (the EHR passes its token validator; tests can pass ``StaticTokens``).
    ``storage_base_url`` is the origin of the presigned-file app (:meth:`storage_app`), needed
    by profiles with ``presigned_redirects``; set it once that server is listening.
    """

    def __init__(
        self,
        source: BulkSource,
        *,
        authenticator: Authenticator,
        profile: str | VendorProfile | None = None,
        faults: FaultInjector | None = None,
        work_dir: Path | str | None = None,
        config: BulkConfig | None = None,
        storage_base_url: str | None = None,
    ) -> None:
        self.source = source
        self.authenticator = authenticator
        self.profile = get_profile(profile)
        self.faults = faults if faults is not None else FaultInjector()
        self.config = config or BulkConfig()
        self.storage_base_url = storage_base_url
        self._own_dir = work_dir is None
        self.work_dir = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="bulk-"))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._jobs: dict[str, ExportJob] = {}
        self._lock = threading.Lock()
        self._presign_key = secrets.token_bytes(32)

    # -- wiring -------------------------------------------------------------------------------
    def routes(self) -> list[BaseRoute]:
        """Routes to mount at the FHIR base, before any ``/{type}/{id}`` route of the EHR."""
        return [
            Route("/$export", self._kickoff_system, methods=["GET", "POST"], name="bulk_export"),
            Route(
                "/Patient/$export",
                self._kickoff_patient,
                methods=["GET", "POST"],
                name="bulk_export_patient",
            ),
            Route(
                "/Group/{group_id}/$export",
                self._kickoff_group,
                methods=["GET", "POST"],
                name="bulk_export_group",
            ),
            Route(
                "/bulk-status/{job_id}", self._status, methods=["GET", "DELETE"], name="bulk_status"
            ),
            Route("/bulk-files/{job_id}/{name}", self._download, methods=["GET"], name="bulk_file"),
        ]

    def storage_app(self) -> Starlette:
        """The presigned-URL file host (another origin) used by ``presigned_redirects``."""
        return presigned_storage_app([self])

    def has_job(self, job_id: str) -> bool:
        """Whether this server knows an export with this id."""
        with self._lock:
            return job_id in self._jobs

    def close(self) -> None:
        """Cancel running exports and remove the work directory if this server made it."""
        with self._lock:
            jobs = list(self._jobs.values())
            self._jobs.clear()
        for job in jobs:
            job.cancel.set()
        if self._own_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def jobs(self) -> list[ExportJob]:
        """A snapshot of the known export jobs (for tests and the admin view)."""
        with self._lock:
            return list(self._jobs.values())

    # -- kick-off -----------------------------------------------------------------------------
    async def _kickoff_system(self, request: Request) -> Response:
        return await self._kickoff(request, SYSTEM, None)

    async def _kickoff_patient(self, request: Request) -> Response:
        return await self._kickoff(request, PATIENT, None)

    async def _kickoff_group(self, request: Request) -> Response:
        return await self._kickoff(request, GROUP, request.path_params["group_id"])

    async def _authenticate(self, request: Request) -> TokenInfo:
        result: Any = self.authenticator(request)
        if inspect.isawaitable(result):
            result = await result
        if isinstance(result, TokenInfo):
            return result
        # Any object with client_id and scopes will do (the EHR's auth.TokenInfo).
        return TokenInfo(str(result.client_id), frozenset(result.scopes))

    async def _kickoff(self, request: Request, level: str, group_id: str | None) -> Response:
        try:
            token = await self._authenticate(request)
            if not has_system_read(token.scopes):
                raise FhirHttpError(403, "forbidden", "bulk export needs system read scopes")
            if level not in self.profile.levels:
                raise FhirHttpError(
                    404, "not-supported", f"{level}-level export is not supported by this server"
                )
            self._check_kickoff_headers(request)
            lenient = "handling=lenient" in request.headers.get("prefer", "").replace(" ", "")
            params = await self._read_params(request)
            plan = await run_in_threadpool(
                self._plan, params, level, group_id, token, lenient, request.method
            )
            job = self._start_job(request, token, plan)
        except FhirHttpError as exc:
            return outcome_response(exc.status, exc.code, str(exc), headers=exc.headers)
        except (OSError, ValueError) as exc:  # the source could not be read (bad file on disk)
            return outcome_response(500, "exception", f"kick-off failed: {type(exc).__name__}")
        # Built from the request rather than url_for: several orgs' apps mounted side by side
        # share route names, and url_for would answer with the first org's prefix.
        status_url = f"{job.fhir_base}/bulk-status/{job.id}"
        return JSONResponse(
            operation_outcome("informational", "export accepted", severity="information"),
            status_code=202,
            headers={"Content-Location": status_url},
            media_type="application/fhir+json",
        )

    def _check_kickoff_headers(self, request: Request) -> None:
        accept = [a.split(";")[0].strip() for a in request.headers.get("accept", "").split(",")]
        if "application/fhir+json" not in accept:
            raise FhirHttpError(400, "invalid", "kick-off requires Accept: application/fhir+json")
        prefer = [p.strip() for p in request.headers.get("prefer", "").split(",")]
        if "respond-async" not in prefer:
            raise FhirHttpError(400, "invalid", "kick-off requires Prefer: respond-async")

    async def _read_params(self, request: Request) -> list[tuple[str, Any]]:
        params: list[tuple[str, Any]] = list(request.query_params.multi_items())
        if request.method != "POST":
            return params
        ctype = request.headers.get("content-type", "").split(";")[0].strip()
        if ctype not in ("application/fhir+json", "application/json"):
            raise FhirHttpError(415, "invalid", "POST kick-off needs a FHIR JSON Parameters body")
        try:
            body = json.loads(await request.body())
        except ValueError:
            raise FhirHttpError(400, "invalid", "the kick-off body is not JSON") from None
        if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
            raise FhirHttpError(400, "invalid", "the kick-off body must be a Parameters resource")
        for item in body.get("parameter") or []:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise FhirHttpError(400, "invalid", "each parameter needs a name")
            values = [v for k, v in item.items() if k.startswith("value")]
            if len(values) != 1:
                raise FhirHttpError(400, "invalid", f"parameter {item['name']} needs one value[x]")
            value = values[0]
            if item["name"] == "patient":
                ref = value.get("reference") if isinstance(value, dict) else None
                key = reference_key(ref) if isinstance(ref, str) else None
                if key is None or key[0] != "Patient":
                    raise FhirHttpError(
                        400, "invalid", "patient needs a valueReference to a Patient"
                    )
                params.append(("patient", key[1]))
            else:
                kind = next(k for k in item if k.startswith("value"))
                params.append((item["name"], _parameter_value(item["name"], kind, value)))
        return params

    def _all_types(self) -> list[str]:
        return list(self.source.resource_types())

    def _plan(
        self,
        params: list[tuple[str, Any]],
        level: str,
        group_id: str | None,
        token: TokenInfo,
        lenient: bool,
        method: str,
    ) -> ExportPlan:
        profile = self.profile
        issues: list[dict[str, Any]] = []
        grouped: dict[str, list[str]] = {}
        for name, value in params:
            grouped.setdefault(name, []).append(value)
        for name in list(grouped):
            if name in profile.unsupported_params:
                raise FhirHttpError(400, "not-supported", f"parameter {name} is not supported")
            if name not in SUPPORTED_PARAMS:
                if not lenient:
                    raise FhirHttpError(400, "not-supported", f"parameter {name} is not supported")
                issues.append(
                    operation_outcome(
                        "not-supported", f"parameter {name} was ignored", severity="warning"
                    )
                )
                del grouped[name]

        if "patient" in grouped and method != "POST":
            raise FhirHttpError(400, "invalid", "patient is only allowed in a POST kick-off")
        if "patient" in grouped and level == SYSTEM:
            raise FhirHttpError(400, "invalid", "patient does not apply to a system export")

        formats = grouped.get("_outputFormat", [])
        if any(f not in OUTPUT_FORMATS for f in formats):
            raise FhirHttpError(400, "not-supported", "_outputFormat must be NDJSON")

        since = None
        if "_since" in grouped:
            if len(grouped["_since"]) > 1:
                raise FhirHttpError(400, "invalid", "_since given more than once")
            since = _parse_instant(grouped["_since"][0])

        # Types: repeated values mean the same as comma-joined ones (the spec), except where
        # a vendor refuses the repetition (Oracle).
        type_values = grouped.get("_type", [])
        if len(type_values) > 1 and profile.reject_repeated_type:
            raise FhirHttpError(400, "invalid", "_type may be given only once")
        requested: list[str] = []
        for value in type_values:
            for name in value.split(","):
                name = name.strip()
                if not name:
                    raise FhirHttpError(400, "invalid", "_type has an empty entry")
                if not _is_resource_type(name):
                    if not lenient:
                        raise FhirHttpError(400, "invalid", f"{name} is not a resource type")
                    issues.append(
                        operation_outcome(
                            "not-supported", f"_type {name} was ignored", severity="warning"
                        )
                    )
                    continue
                if name not in requested:
                    requested.append(name)
        type_given = bool(type_values)
        if profile.allowed_types is not None:
            bad = [t for t in requested if t not in profile.allowed_types]
            if bad:
                raise FhirHttpError(400, "not-supported", f"_type not supported: {bad[0]}")
        if (
            profile.reference_types_need_clinical
            and requested
            and all(t in profile.reference_types_need_clinical for t in requested)
        ):
            raise FhirHttpError(400, "invalid", "reference types need a clinical type alongside")

        if type_given:
            denied = [t for t in requested if not can_read(token.scopes, t)]
            if denied:
                raise FhirHttpError(403, "forbidden", f"no read scope for {denied[0]}")
            types = requested
            if level != SYSTEM:
                # A patient-level export holds the patients' compartments and the shared
                # resources they reference; other types have nothing to give.
                outside = [t for t in types if not _patient_level_type(t)]
                types = [t for t in types if _patient_level_type(t)]
                issues.extend(
                    operation_outcome(
                        "not-supported",
                        f"{t} is outside the patient compartment",
                        severity="information",
                    )
                    for t in outside
                )
        else:
            available = self._all_types()
            if level != SYSTEM:
                available = [t for t in available if _patient_level_type(t)]
            types = []
            for t in available:
                if can_read(token.scopes, t):
                    types.append(t)
                else:
                    issues.append(
                        operation_outcome(
                            "forbidden", f"{t} omitted: not authorised", severity="information"
                        )
                    )

        type_filters = self._parse_type_filters(
            grouped.get("_typeFilter", []), types, type_given, lenient, issues
        )
        elements = self._parse_elements(grouped.get("_elements", []), lenient, issues)
        stu3 = parse_options(grouped, level, lenient, issues)

        patient_ids: set[str] | None = None
        late: set[str] = set()
        if level == GROUP:
            assert group_id is not None
            group = self.source.get("Group", group_id)
            if group is None:
                raise FhirHttpError(404, "not-found", f"Group/{group_id} is not known")
            patient_ids, late = _group_members(group, since)
        elif level == PATIENT:
            patient_ids = {r["id"] for r in self.source.iter_type("Patient") if "id" in r}
        if "patient" in grouped:
            assert patient_ids is not None
            asked = set(grouped["patient"])
            known = (
                patient_ids
                if level == PATIENT
                else {r["id"] for r in self.source.iter_type("Patient") if "id" in r}
            )
            unknown = sorted(asked - known)
            if unknown:
                if not lenient:
                    raise FhirHttpError(400, "not-found", "a requested patient is not known here")
                issues.append(
                    operation_outcome(
                        "not-found",
                        f"{len(unknown)} requested patient(s) not found",
                        severity="warning",
                    )
                )
            patient_ids &= asked
            late &= asked
        return ExportPlan(
            level,
            group_id,
            types,
            since,
            type_filters,
            elements,
            patient_ids,
            late,
            issues,
            type_given,
            token.scopes,
            stu3,
        )

    def _parse_type_filters(
        self,
        values: list[str],
        types: list[str],
        type_given: bool,
        lenient: bool,
        issues: list[dict[str, Any]],
    ) -> dict[str, list[list[Any]]]:
        profile = self.profile
        if values and profile.type_filter_requires_type and not type_given:
            raise FhirHttpError(400, "invalid", "_typeFilter needs _type")
        out: dict[str, list[list[Any]]] = {}
        for value in values:
            for query in _TYPE_FILTER_SPLIT.split(value):
                rtype, sep, qs = query.partition("?")
                if not sep or not _is_resource_type(rtype):
                    raise FhirHttpError(400, "invalid", "_typeFilter entries are Type?query")
                if type_given and rtype not in types:
                    raise FhirHttpError(400, "invalid", f"_typeFilter type {rtype} not in _type")
                if rtype in profile.unfilterable_types:
                    raise FhirHttpError(400, "not-supported", f"{rtype} cannot be filtered")
                pairs = parse_qsl(qs, keep_blank_values=True)
                if not pairs:
                    raise FhirHttpError(400, "invalid", "_typeFilter query is empty")
                for name, _ in pairs:
                    base = name.partition(":")[0]
                    if base in profile.blocked_filter_params:
                        raise FhirHttpError(
                            400, "not-supported", f"{base} is not allowed in _typeFilter"
                        )
                    if name.startswith("_") and name not in ("_id", "_lastUpdated"):
                        # _include, _sort, _count... are not filters (SPECS 3.1).
                        raise FhirHttpError(400, "invalid", f"{name} is not allowed in _typeFilter")
                try:
                    compiled = compile_filters(rtype, pairs)
                except FhirHttpError:
                    if not lenient:
                        raise
                    issues.append(
                        operation_outcome(
                            "not-supported",
                            f"a _typeFilter for {rtype} was ignored",
                            severity="warning",
                        )
                    )
                    continue
                if profile.type_filter_one_per_type and rtype in out:
                    raise FhirHttpError(400, "invalid", f"one _typeFilter per type ({rtype})")
                out.setdefault(rtype, []).append(compiled)
        return out

    def _parse_elements(
        self, values: list[str], lenient: bool, issues: list[dict[str, Any]]
    ) -> dict[str | None, set[str]]:
        out: dict[str | None, set[str]] = {}
        for value in values:
            for item in value.split(","):
                match = _ELEMENT_RE.match(item.strip())
                if not match or (match["type"] and not _is_resource_type(match["type"])):
                    if not lenient:
                        raise FhirHttpError(
                            400, "invalid", "_elements entries are element or Type.element"
                        )
                    issues.append(
                        operation_outcome(
                            "not-supported", "an _elements entry was ignored", severity="warning"
                        )
                    )
                    continue
                out.setdefault(match["type"], set()).add(match["element"])
        return out

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

    # -- status -------------------------------------------------------------------------------
    def _expire_jobs(self) -> None:
        now = time.monotonic()
        for job_id, job in list(self._jobs.items()):
            if job.expires_at is not None and job.expires_at <= now:
                del self._jobs[job_id]
                shutil.rmtree(job.directory, ignore_errors=True)

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


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
class _Cancelled(Exception):
    """The export was deleted while running."""


#: The value[x] the Bulk Data IG gives each POST kick-off parameter (besides ``valueString``).
_PARAMETER_TYPES = {
    "_since": "valueInstant",
    "_until": "valueInstant",
    "includeAssociatedData": "valueCode",
    "allowPartialManifests": "valueBoolean",
}


def _parameter_value(name: str, kind: str, value: Any) -> str:
    """A POST parameter's value as the query-string text the planner reads; 400 for a value[x]
    the IG does not give that parameter."""
    allowed = {"valueString", _PARAMETER_TYPES.get(name, "valueString")}
    if kind not in allowed:
        raise FhirHttpError(400, "invalid", f"parameter {name} cannot be a {kind}")
    if kind == "valueBoolean":
        if not isinstance(value, bool):
            raise FhirHttpError(400, "invalid", f"parameter {name} must be a boolean")
        return "true" if value else "false"
    if not isinstance(value, str):
        raise FhirHttpError(400, "invalid", f"parameter {name} must be a string")
    return value


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


def _patient_level_type(resource_type: str) -> bool:
    """Types a Patient or Group export can hold: compartment types and shared references."""
    return (
        resource_type == "Patient"
        or resource_type in PATIENT_COMPARTMENT
        or resource_type in SHARED_TYPES
    )


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


def _group_members(group: dict[str, Any], since: datetime | None) -> tuple[set[str], set[str]]:
    members: set[str] = set()
    late: set[str] = set()
    for member in group.get("member") or []:
        if not isinstance(member, dict) or member.get("inactive") is True:
            continue
        ref = (member.get("entity") or {}).get("reference")
        key = reference_key(ref) if isinstance(ref, str) else None
        if key is None or key[0] != "Patient":
            continue
        members.add(key[1])
        start = (member.get("period") or {}).get("start")
        if since is not None and isinstance(start, str):
            with contextlib.suppress(ValueError):
                joined = datetime.fromisoformat(start.replace("Z", "+00:00"))
                if (joined if joined.tzinfo else joined.replace(tzinfo=UTC)) > since:
                    late.add(key[1])
    return members, late


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


def presigned_storage_app(servers: list[BulkServer]) -> Starlette:
    """One presigned-file host for several bulk servers (e.g. every Oracle-like org).

    Serve it on its own port (another origin) and set each server's ``storage_base_url`` to its
    URL. The list is read per request, so servers can be appended after the app is built.
    """

    async def presigned(request: Request) -> Response:
        job_id = request.path_params["job_id"]
        owner = next((s for s in servers if s.has_job(job_id)), None)
        if owner is None and servers:
            owner = servers[0]  # it still answers 400/403/404 in the right order
        if owner is None:
            return _s3_error(404, "NoSuchKey", "The specified key does not exist.")
        return await owner._presigned(request)

    return Starlette(
        routes=[
            Route("/presigned/{job_id}/{name}", presigned, methods=["GET"], name="presigned_file"),
        ]
    )


def bulk_admin_routes(
    server: BulkServer, *, prefix: str = "/_sandbox/bulk", admin_token: str | None = None
) -> list[BaseRoute]:
    """Admin API of a bulk server: ``GET`` shows its profile, config and jobs; ``PATCH`` (or
    ``POST``) with a JSON object changes :class:`BulkConfig` fields (e.g. ``export_seconds``).
    With ``admin_token`` set, calls need the ``X-Sandbox-Admin`` header to match it.
    """
    fields = {f.name: f.type for f in dataclasses.fields(BulkConfig)}

    async def handler(request: Request) -> Response:
        if admin_token is not None and request.headers.get("x-sandbox-admin") != admin_token:
            return JSONResponse({"error": "forbidden"}, status_code=403)
        if request.method in ("PATCH", "POST"):
            try:
                changes = json.loads(await request.body())
                if not isinstance(changes, dict):
                    raise ValueError("a JSON object of config fields")
                updates = {}
                for name, value in changes.items():
                    if name not in fields:
                        raise ValueError(f"unknown config field {name}")
                    updates[name] = _coerce(name, value, getattr(server.config, name))
            except (ValueError, TypeError) as exc:
                return JSONResponse(
                    {"error": "invalid_config", "detail": str(exc)}, status_code=400
                )
            for name, value in updates.items():
                setattr(server.config, name, value)
        return JSONResponse(
            {
                "profile": server.profile.name,
                "config": dataclasses.asdict(server.config),
                "jobs": [
                    {
                        "id": j.id,
                        "client_id": j.client_id,
                        "status": j.status,
                        "level": j.plan.level,
                        "files": len(j.files),
                        "resources": sum(f.count for f in j.files if f.kind == "output"),
                    }
                    for j in server.jobs()
                ],
            }
        )

    return [Route(prefix, handler, methods=["GET", "PATCH", "POST"], name="sandbox_bulk")]


def _coerce(name: str, value: Any, current: Any) -> Any:
    """Check an admin config value against the field's current type."""
    if value is None and name == "cancel_after_early_polls":
        return None
    if isinstance(current, bool) or name == "enforce_retry_after":
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false")
        return value
    if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative number")
    if name in ("export_seconds", "file_ttl"):
        return float(value)
    if int(value) != value:
        raise ValueError(f"{name} must be a whole number")
    return int(value)


def create_bulk_app(
    server: BulkServer,
    *,
    client_resolver: Callable[[str], str | None] | None = None,
    admin_token: str | None = None,
) -> Starlette:
    """A standalone bulk app: the bulk routes, the fault and bulk admin APIs (under
    ``/_sandbox``) and the fault middleware."""
    resolver = client_resolver
    if resolver is None:
        resolver = (
            server.authenticator.client_of
            if isinstance(server.authenticator, StaticTokens)
            else jwt_client_resolver
        )
    if isinstance(server.authenticator, StaticTokens) and server.faults.on_token_expired is None:
        server.faults.on_token_expired = server.authenticator.expire
    return Starlette(
        routes=[
            *fault_admin_routes(server.faults, admin_token=admin_token),
            *bulk_admin_routes(server, admin_token=admin_token),
            *server.routes(),
        ],
        middleware=[Middleware(FaultMiddleware, faults=server.faults, client_resolver=resolver)],
    )
