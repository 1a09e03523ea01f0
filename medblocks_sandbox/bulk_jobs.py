"""An export and its state: the plan a kick-off makes, the output files, the job, the server's
knobs (`BulkConfig`), and `BulkCore`, the state the kick-off, export and file parts share.
"""

import inspect
import secrets
import shutil
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from starlette.requests import Request

from medblocks_sandbox.bulk_auth import Authenticator, TokenInfo, can_read
from medblocks_sandbox.bulk_source import BulkSource
from medblocks_sandbox.bulk_stu3 import Stu3Options
from medblocks_sandbox.faults import FaultInjector
from medblocks_sandbox.fhir_params import PATIENT_COMPARTMENT, SHARED_TYPES
from medblocks_sandbox.profiles import SYSTEM, VendorProfile, get_profile

NDJSON = "application/fhir+ndjson"


SUBSETTED = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "SUBSETTED",
    "display": "Resource encoded in summary mode",
}


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


def _patient_level_type(resource_type: str) -> bool:
    """Types a Patient or Group export can hold: compartment types and shared references."""
    return (
        resource_type == "Patient"
        or resource_type in PATIENT_COMPARTMENT
        or resource_type in SHARED_TYPES
    )


class BulkCore:
    """Source, profile, faults, config, work directory and jobs of one bulk server.

    :class:`~medblocks_sandbox.bulk.BulkServer` is this plus the kick-off, export and file parts.
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
        # A folder of its own is removed by close(), or when a server nobody closed is collected
        # or the process exits (test apps and embedded servers often are never closed).
        self._cleanup = (
            weakref.finalize(self, shutil.rmtree, str(self.work_dir), True)
            if self._own_dir
            else None
        )
        self._jobs: dict[str, ExportJob] = {}
        self._lock = threading.Lock()
        self._presign_key = secrets.token_bytes(32)

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
        if self._cleanup is not None:
            self._cleanup()

    def jobs(self) -> list[ExportJob]:
        """A snapshot of the known export jobs (for tests and the admin view)."""
        with self._lock:
            return list(self._jobs.values())

    async def _authenticate(self, request: Request) -> TokenInfo:
        result: Any = self.authenticator(request)
        if inspect.isawaitable(result):
            result = await result
        if isinstance(result, TokenInfo):
            return result
        # Any object with client_id and scopes will do (the EHR's auth.TokenInfo).
        return TokenInfo(str(result.client_id), frozenset(result.scopes))

    def _expire_jobs(self) -> None:
        now = time.monotonic()
        for job_id, job in list(self._jobs.items()):
            if job.expires_at is not None and job.expires_at <= now:
                del self._jobs[job_id]
                shutil.rmtree(job.directory, ignore_errors=True)
