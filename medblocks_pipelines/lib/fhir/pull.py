"""The patient-access pull: one connection's US Core (or CMS Patient Access) records into the lake.

For one active connection (SPECS §1.10, §1.11), also the EHR-launch targeted sync:

1. read ``Patient/{id}``;
2. search each type the server's CapabilityStatement declares, the grant allows and we know
   (``search_plan``), with only the parameters the server declares (``Observation`` by category
   when it can, else by patient alone), ``_lastUpdated=gt<since>`` after the first full pull,
   following every ``next`` link the client judges safe (same origin and base, the search's
   parameters kept; see ``client``);
3. follow references to Practitioner, PractitionerRole, Organization, Location and Medication on the
   same server (never sending the token elsewhere), and fetch ``Binary`` content of documents;
4. land every resource once per pull (dedupe on type, id and content) with provenance, through a
   :class:`LakeWriter` scoped to the connection's patient (``compartment``): anything outside the
   patient's compartment is quarantined as ``outside_patient_compartment``; quarantine what is
   malformed, count OperationOutcomes inside searchsets, and record anomalies (``next`` links that
   lost the search's parameters, ``Bundle.total`` not matching what came, no CapabilityStatement).

A pull with failed searches, anomalies or quarantined rows is ``partial`` (with reasons in pull
history; the watermark stays so the next pull is full); an auth failure (refresh refused, consent
revoked) or every search failing ends that connection's pull as ``failed``; :func:`pull_batch`
never lets one connection fail the others. Pull history and the incremental watermark are per
connection.
"""

import base64
import hashlib
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from medblocks_pipelines.lib.errors import (
    AuthError,
    ConsentRevoked,
    IncompleteSearch,
    MedblocksError,
    PagingLoopError,
    ProtocolError,
    TransientError,
)
from medblocks_pipelines.lib.fhir.client import (
    FhirClient,
    FhirRequestError,
    Limiter,
    dumps_exact,
    limiter_for,
    loads_exact,
    outcome_issues,
)
from medblocks_pipelines.lib.fhir.compartment import PatientScope
from medblocks_pipelines.lib.fhir.search_plan import (  # noqa: F401 (re-exported)
    OBSERVATION_CATEGORIES,
    Query,
    plan_queries,
)
from medblocks_pipelines.lib.registry import ControlPlane
from medblocks_pipelines.lib.registry.rows import Source
from medblocks_pipelines.lib.smart.discovery import fetch_smart_configuration
from medblocks_pipelines.lib.smart.launch import source_discovery, supported_types
from medblocks_pipelines.lib.smart.tokens import ClientAuth, TokenManager
from medblocks_pipelines.lib.warehouse.lake import LakeWriter, Provenance

PATTERN = "patient_access"
#: Types whose references we follow (SPECS §1.11: "plus the referenced Practitioner, Organization
#: and Location"; Medication because MedicationRequest.medication can be a reference).
FOLLOW_TYPES = frozenset(
    {"Practitioner", "PractitionerRole", "Organization", "Location", "Medication"}
)
DEFAULT_CADENCE = timedelta(hours=24)
#: Re-pull overlap: our clock and the server's may differ; landing dedupes what comes twice.
WATERMARK_OVERLAP = timedelta(minutes=5)


def watermark_key(connection_id: str) -> str:
    """The control-plane watermark of a connection's last fully successful pull."""
    return f"{PATTERN}/{connection_id}/since"


@dataclass
class PullResult:
    """What one connection's pull did (counts and our ids only)."""

    connection_id: str
    status: str = "success"  # success | partial | failed
    counts: Counter[str] = field(default_factory=Counter)
    quarantined: int = 0
    duplicates: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    outcome_issues: Counter[str] = field(default_factory=Counter)
    skipped_types: dict[str, str] = field(default_factory=dict)
    requests: int = 0
    refreshes: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    retry_reasons: Counter[str] = field(default_factory=Counter)
    error: str | None = None
    since: str | None = None
    pull_id: int | None = None
    seconds: float = 0.0
    #: What the server did wrong without failing a request (``next_link_lost_parameters``,
    #: ``total_mismatch``, ``no_capability_statement``...), and PHI-free notes on each.
    anomalies: Counter[str] = field(default_factory=Counter)
    anomaly_notes: list[str] = field(default_factory=list)
    #: Resources quarantined because they are outside the connection's patient compartment.
    outside_compartment: int = 0
    #: Resources a category-limited grant excluded when the server could not filter by category.
    filtered_locally: int = 0

    def anomaly(self, kind: str, note: str) -> None:
        """Record one anomaly (a note is kept for the first few of each pull)."""
        self.anomalies[kind] += 1
        if len(self.anomaly_notes) < 20:
            self.anomaly_notes.append(note)

    @property
    def landed(self) -> int:
        """Resources landed (reference and Binary fetches included)."""
        return sum(v for k, v in self.counts.items() if not k.startswith("_"))

    def reasons(self) -> list[str]:
        """Why this pull is not a plain success, as ``reason=count`` strings (PHI-free)."""
        out = [f"{k}={v}" for k, v in sorted(self.failures.items())]
        out += [f"{k}={v}" for k, v in sorted(self.anomalies.items())]
        if self.quarantined:
            out.append(f"quarantined={self.quarantined}")
        return out

    def history_counts(self) -> dict[str, int]:
        """Counts for ``pull_history.counts``: by type plus a few ``_``-prefixed totals."""
        out = {k: int(v) for k, v in sorted(self.counts.items())}
        out.update(
            {
                "_quarantined": self.quarantined,
                "_outside_patient_compartment": self.outside_compartment,
                "_duplicates": self.duplicates,
                "_requests": self.requests,
                "_failures": sum(self.failures.values()),
                **{f"_anomaly:{k}": int(v) for k, v in sorted(self.anomalies.items())},
            }
        )
        return out


class _Puller:
    """One connection's pull; state for dedupe and reference following."""

    def __init__(self, client: FhirClient, writer: LakeWriter, result: PullResult) -> None:
        self.client = client
        self.w = writer
        self.r = result
        self.seen: set[tuple[str, str, str]] = set()
        self.have: set[tuple[str, str]] = set()
        self.refs: dict[tuple[str, str], None] = {}
        self.binaries: dict[str, None] = {}

    # -- landing -------------------------------------------------------------------------------
    def land(self, resource: Any, *, origin: str, follow: bool = True) -> None:
        if not isinstance(resource, dict):
            self.w.quarantine(dumps_exact(resource), "not a JSON object", origin=origin)
            self.r.quarantined += 1
            return
        text = dumps_exact(resource)
        rtype, rid = resource.get("resourceType"), resource.get("id")
        if isinstance(rtype, str) and isinstance(rid, str) and rid:
            key = (rtype, rid, hashlib.md5(text.encode(), usedforsecurity=False).hexdigest())
            if key in self.seen:
                self.r.duplicates += 1
                return
            self.seen.add(key)
        if not self.w.add(text, origin=origin):
            self.r.quarantined += 1
            return
        self.r.counts[str(rtype)] += 1
        self.have.add((str(rtype), str(rid)))
        if follow:
            self._collect(resource)

    def _collect(self, resource: dict[str, Any]) -> None:
        for ref in _references(resource):
            key = self._local_key(ref)
            if key and key[0] in FOLLOW_TYPES:
                self.refs.setdefault(key, None)
        if resource.get("resourceType") == "DocumentReference":
            for content in resource.get("content") or []:
                att = content.get("attachment") if isinstance(content, dict) else None
                if isinstance(att, dict) and isinstance(att.get("url"), str) and "data" not in att:
                    self.binaries.setdefault(att["url"], None)

    def _local_key(self, ref: str) -> tuple[str, str] | None:
        if ref.startswith("#") or ref.startswith("urn:"):
            return None
        if ref.startswith(("http://", "https://")):
            if not self.client.same_origin(ref) or not ref.startswith(self.client.base_url + "/"):
                # Another server: our token must not go there (SPECS §1.11).
                self.r.counts["_foreign_references_skipped"] += 1
                return None
            ref = ref[len(self.client.base_url) + 1 :]
        parts = ref.split("/")
        if len(parts) == 2 and all(parts):
            return parts[0], parts[1]
        if len(parts) == 4 and parts[2] == "_history":
            return parts[0], parts[1]
        return None

    # -- steps ---------------------------------------------------------------------------------
    def search(self, query: Query) -> None:
        total: int | None = None
        matches = 0
        pages = self.client.search(
            query.resource_type, list(query.params), on_anomaly=self.r.anomaly
        )
        for page in pages:
            if page.number == 1 and isinstance(page.bundle.get("total"), int):
                total = int(page.bundle["total"])
            for entry in page.bundle.get("entry") or []:
                if not isinstance(entry, dict):
                    self.w.quarantine(
                        dumps_exact(entry), "bundle entry is not an object", origin=query.label
                    )
                    self.r.quarantined += 1
                    continue
                resource = entry.get("resource")
                mode = (entry.get("search") or {}).get("mode")
                if mode == "outcome" or (
                    isinstance(resource, dict)
                    and resource.get("resourceType") == "OperationOutcome"
                ):
                    issues = outcome_issues(resource)
                    for severity, code in issues or [("error", "unknown")]:
                        self.r.outcome_issues[f"{severity}:{code}"] += 1
                    if any(s in ("error", "fatal") for s, _c in issues):
                        self.r.failures["outcome_in_searchset"] += 1
                    continue
                if resource is None:
                    self.w.quarantine(
                        dumps_exact(entry), "bundle entry without a resource", origin=query.label
                    )
                    self.r.quarantined += 1
                    continue
                if mode == "match" or (
                    mode is None
                    and isinstance(resource, dict)
                    and resource.get("resourceType") == query.resource_type
                ):
                    matches += 1
                if query.keep_categories and not _has_category(resource, query.keep_categories):
                    self.r.filtered_locally += 1
                    continue
                self.land(resource, origin=query.label)
        if total is not None and total != matches:
            self.r.anomaly(
                "total_mismatch", f"{query.label}: Bundle.total {total}, {matches} matches received"
            )

    def follow_references(self, *, depth: int = 2) -> None:
        for _ in range(depth):
            todo = [k for k in self.refs if k not in self.have]
            self.refs.clear()
            if not todo:
                return
            for rtype, rid in todo:
                self.have.add((rtype, rid))
                try:
                    self.land(self.client.read(rtype, rid), origin=f"ref:{rtype}")
                except FhirRequestError as exc:
                    # A dangling or hidden reference is the source's data, not a failed pull.
                    self.r.counts[f"_reference_http_{exc.status}"] += 1

    def fetch_binaries(self) -> None:
        for url in list(self.binaries):
            absolute = urllib.parse.urljoin(self.client.base_url + "/", url)
            if not self.client.same_origin(absolute):
                self.r.counts["_binary_foreign_skipped"] += 1
                continue
            try:
                resp = self.client.request(
                    "GET", absolute, accept="application/fhir+json", expect_json=False
                )
            except FhirRequestError as exc:
                self.r.counts[f"_binary_http_{exc.status}"] += 1
                continue
            ctype = resp.headers.get("content-type", "").split(";")[0].strip()
            if "json" in ctype:
                try:
                    self.land(loads_exact(resp.content), origin="binary")
                except ValueError:
                    self.w.quarantine(resp.content, "Binary body is not JSON", origin="binary")
                    self.r.quarantined += 1
                continue
            # Raw content (the server ignored our Accept): keep it as a Binary resource.
            rid = urllib.parse.urlsplit(absolute).path.rstrip("/").split("/")[-1]
            self.land(
                {
                    "resourceType": "Binary",
                    "id": rid,
                    "contentType": ctype or "application/octet-stream",
                    "data": base64.b64encode(resp.content).decode(),
                },
                origin="binary",
            )


def _last_updated(resource: Mapping[str, Any]) -> str | None:
    meta = resource.get("meta")
    value = meta.get("lastUpdated") if isinstance(meta, dict) else None
    if not isinstance(value, str):
        return None
    # Compare as UTC instants in our watermark's format.
    try:
        instant = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return instant.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _has_category(resource: Any, codes: Sequence[str]) -> bool:
    if not isinstance(resource, dict):
        return True  # not ours to judge: landing quarantines it
    cats = resource.get("category")
    for cat in cats if isinstance(cats, list) else [cats]:
        for coding in (cat or {}).get("coding") or [] if isinstance(cat, dict) else []:
            if isinstance(coding, dict) and coding.get("code") in codes:
                return True
    return False


def _references(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for k, v in value.items():
            if k == "reference" and isinstance(v, str):
                yield v
            elif isinstance(v, dict | list):
                yield from _references(v)
    elif isinstance(value, list):
        for v in value:
            yield from _references(v)


# ---------------------------------------------------------------------------------------------
# one connection
# ---------------------------------------------------------------------------------------------
def _pull_patient(
    puller: "_Puller",
    patient_id: str,
    *,
    since: str | None,
    kind: str,
    granted: Any,
    supported: set[str],
    capability: Mapping[str, Any] | None,
    config: Mapping[str, Any],
) -> None:
    """Read the Patient, run the planned searches, follow references, fetch Binary content."""
    result, client = puller.r, puller.client
    patient = client.read("Patient", patient_id)
    # The Patient is read on every pull (no search to filter it), but what it references
    # is followed only when it changed since the last complete pull.
    changed = since is None or _last_updated(patient) is None or str(_last_updated(patient)) > since
    puller.land(patient, origin="Patient", follow=changed)
    queries, result.skipped_types = plan_queries(
        kind=kind,
        patient_id=patient_id,
        supported=supported,
        granted=granted,
        since=since,
        config=config,
        capability=capability,
    )
    failed = 0
    for query in queries:
        before = sum(result.failures.values())
        try:
            puller.search(query)
        except ConsentRevoked:
            raise
        except AuthError as exc:
            # One search refused (401 after a refresh, 403) while the Patient read worked:
            # that type is refused, the others go on. The message names the type, status and
            # body kind ("text/plain body, not an OperationOutcome"), never ids.
            result.failures["search_refused"] += 1
            result.anomaly_notes.append(f"{query.label}: {exc}")
        except IncompleteSearch:
            result.failures["search_incomplete"] += 1
        except PagingLoopError:
            result.failures["paging_loop"] += 1
        except FhirRequestError as exc:
            result.failures[f"http_{exc.status}"] += 1
        except TransientError:
            result.failures["transient"] += 1
        except ProtocolError:
            result.failures["protocol"] += 1
        failed += sum(result.failures.values()) > before
    if queries and failed == len(queries):
        result.error = "all_searches_failed"
    puller.follow_references()
    puller.fetch_binaries()


def _status(result: PullResult) -> str:
    """``failed`` when no search worked; ``partial`` with failures, anomalies or quarantined
    rows (the watermark then stays, so the next pull is a full one); else ``success``."""
    if result.error == "all_searches_failed":
        return "failed"
    if result.failures or result.anomalies or result.quarantined:
        return "partial"
    return "success"


def pull_connection(
    cp: ControlPlane,
    connection_id: str,
    *,
    lake_root: str | Path,
    run_id: str,
    http: httpx.Client,
    limiter: Limiter | None = None,
    client_auth: ClientAuth | None = None,
    supported: set[str] | None = None,
    full: bool = False,
    client_options: Mapping[str, Any] | None = None,
    capability: Mapping[str, Any] | None = None,
    anomalies: Sequence[tuple[str, str]] = (),
) -> PullResult:
    """Pull one connection into the lake; always returns (never raises for pull failures).

    ``capability`` is the source's CapabilityStatement (searches follow what it declares);
    ``anomalies`` are source-level ones to record on this pull (no CapabilityStatement...).
    """
    started = time.perf_counter()
    conn = cp.get_connection(connection_id)
    result = PullResult(connection_id)
    if conn.state != "active":
        result.status, result.error = "failed", f"connection is {conn.state}"
        return result
    source = cp.get_source(conn.source_id)
    cfg = source.config or {}
    # The relationship that authorized this pull is the connection's own pattern: a patient's
    # consent (patient_access) or an EHR launch's targeted sync (clinician_workflow).
    pattern = str(conn.pattern)
    pull_id = cp.start_pull(
        tenant_id=conn.tenant_id,
        pattern=pattern,
        source_id=conn.source_id,
        organization_id=conn.organization_id,
        connection_id=connection_id,
        run_id=run_id,
    )
    result.pull_id = pull_id
    pulled_at = datetime.now(UTC)
    since = None if full else cp.get_watermark(watermark_key(connection_id))
    result.since = since
    tokens = TokenManager(cp, connection_id, http=http, client_auth=client_auth)
    client = FhirClient(
        str(source.fhir_base_url),
        http=http,
        tokens=tokens,
        limiter=limiter,
        **dict(client_options or {}),
    )
    prov = Provenance(
        tenant=conn.tenant_id,
        pattern=pattern,
        source=conn.source_id,
        organization=conn.organization_id,
        connection=connection_id,
        run_id=run_id,
    )
    patient_id = conn.source_patient_id
    scope = PatientScope.of(str(patient_id)) if patient_id else None
    for kind, note in anomalies:
        result.anomaly(kind, note)
    try:
        if scope is None:
            raise ProtocolError("connection has no patient id")
        # Every row lands through the patient-scope check: whatever a server answers, nothing
        # outside this patient's compartment lands under this connection.
        with LakeWriter(lake_root, prov, patient_scope=scope) as writer:
            puller = _Puller(client, writer, result)
            _pull_patient(
                puller,
                str(patient_id),
                since=since,
                kind=source.kind,
                granted=tokens.granted,
                supported=supported or set(),
                capability=capability,
                config=cfg,
            )
        result.status = _status(result)
    except ConsentRevoked:
        result.status, result.error = "failed", "refresh_refused"
        result.failures["refresh_refused"] += 1
    except AuthError:
        result.status, result.error = "failed", "unauthorized"
        result.failures["unauthorized"] += 1
    except FhirRequestError as exc:
        result.status, result.error = "failed", f"patient_read_http_{exc.status}"
        result.failures[result.error] += 1
    except TransientError:
        result.status, result.error = "failed", "transient"
        result.failures["transient"] += 1
    except MedblocksError as exc:
        result.status, result.error = "failed", type(exc).__name__
        result.failures[result.error] += 1
    if scope is not None:
        result.outside_compartment = scope.outside
    result.requests = client.stats.requests
    result.statuses = client.stats.statuses
    result.retry_reasons = client.stats.retry_reasons
    result.refreshes = tokens.refreshes
    result.seconds = time.perf_counter() - started
    error = ", ".join(result.reasons()) or result.error
    if error and result.anomaly_notes:
        # What the server did, in shapes and parameter names only (no values, no PHI).
        error += " | " + "; ".join(result.anomaly_notes[:5])
    cp.finish_pull(pull_id, status=result.status, counts=result.history_counts(), error=error)
    if result.status == "success":
        # Only a complete pull moves the watermark: a failed search must be retried in full.
        mark = (pulled_at - WATERMARK_OVERLAP).strftime("%Y-%m-%dT%H:%M:%SZ")
        cp.set_watermark(watermark_key(connection_id), mark)
    cadence = timedelta(hours=float(cfg.get("pull_cadence_hours") or 24))
    cp.update_connection(connection_id, last_pull_at=pulled_at, next_pull_due=pulled_at + cadence)
    return result


# ---------------------------------------------------------------------------------------------
# a batch
# ---------------------------------------------------------------------------------------------
@dataclass
class BatchResult:
    """A batch of connections pulled for one tenant and source."""

    results: list[PullResult] = field(default_factory=list)
    seconds: float = 0.0
    requests: int = 0

    @property
    def by_status(self) -> Counter[str]:
        return Counter(r.status for r in self.results)

    @property
    def resources_by_type(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for r in self.results:
            total.update({k: v for k, v in r.counts.items() if not k.startswith("_")})
        return total

    @property
    def statuses(self) -> Counter[int]:
        total: Counter[int] = Counter()
        for r in self.results:
            total.update(r.statuses)
        return total

    @property
    def failures_by_reason(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for r in self.results:
            total.update(r.failures)
        return total

    @property
    def anomalies(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for r in self.results:
            total.update(r.anomalies)
        return total

    @property
    def all_failed(self) -> bool:
        """True when there were pulls and every one failed."""
        return bool(self.results) and all(r.status == "failed" for r in self.results)

    def as_metadata(self) -> dict[str, Any]:
        """PHI-free summary for Dagster metadata."""
        return {
            "connections_pulled": len(self.results),
            "by_status": dict(self.by_status),
            "resources": sum(self.resources_by_type.values()),
            "resources_by_type": dict(sorted(self.resources_by_type.items())),
            "failures_by_reason": dict(sorted(self.failures_by_reason.items())),
            "quarantined": sum(r.quarantined for r in self.results),
            "outside_patient_compartment": sum(r.outside_compartment for r in self.results),
            "anomalies": dict(sorted(self.anomalies.items())),
            "duplicates_skipped": sum(r.duplicates for r in self.results),
            "requests": self.requests,
            "http_429": self.statuses.get(429, 0),
            "token_refreshes": sum(r.refreshes for r in self.results),
            "seconds": round(self.seconds, 3),
        }


def _capability(
    cp: ControlPlane, source: Source, *, http: httpx.Client
) -> tuple[dict[str, Any] | None, list[tuple[str, str]]]:
    """The source's CapabilityStatement (cached per source by discovery) and source anomalies.

    A server without a usable ``/metadata`` is still pulled (the known type list, US Core
    parameters) when its SMART configuration answers; the pulls record the anomaly.
    """
    source_id = str(source.id)
    try:
        _smart, cap = source_discovery(cp, source_id, http=http)
    except MedblocksError as exc:
        try:
            fetch_smart_configuration(str(source.fhir_base_url), client=http)
        except (MedblocksError, httpx.HTTPError):
            raise exc from None
        return None, [("no_capability_statement", "GET metadata gave no CapabilityStatement")]
    if not supported_types(cap):
        return cap, [("no_capability_statement", "the CapabilityStatement lists no types")]
    return cap, []


def source_limiter(source: Source) -> Limiter | None:
    """The limiter of a source from ``config.rate_limit`` ({requests, per_seconds}): shared by
    every process through Redis when ``MEDBLOCKS_REDIS_URL`` is set, else per process."""
    rl = (source.config or {}).get("rate_limit")
    if not rl:
        return None
    return limiter_for(str(source.id), int(rl["requests"]), float(rl.get("per_seconds", 1.0)))


def pull_batch(
    cp: ControlPlane,
    connection_ids: Sequence[str],
    *,
    lake_root: str | Path,
    run_id: str,
    http: httpx.Client | None = None,
    concurrency: int | None = None,
    full: bool = False,
    on_result: Callable[[PullResult], None] | None = None,
    client_options: Mapping[str, Any] | None = None,
) -> BatchResult:
    """Pull connections (any mix of sources) with a per-source limiter and worker pool.

    Errors of one connection are contained in its :class:`PullResult`; nothing raises but
    misconfiguration of a whole source (no client id), which fails its connections.
    """
    started = time.perf_counter()
    own = http is None
    # Grouped by source (one limiter and pool each) and pattern (one app registration each).
    by_source: dict[tuple[str, str], list[str]] = {}
    for cid in connection_ids:
        conn = cp.get_connection(cid)
        by_source.setdefault((conn.source_id, conn.pattern), []).append(cid)
    batch = BatchResult()
    lock = threading.Lock()
    max_workers = concurrency or 4
    client = http or httpx.Client(
        timeout=30.0, limits=httpx.Limits(max_connections=max_workers * 2 + 4)
    )
    try:
        for (source_id, pattern), ids in by_source.items():
            source = cp.get_source(source_id)
            workers = concurrency or int((source.config or {}).get("concurrency") or 4)
            try:
                cap, source_anomalies = _capability(cp, source, http=client)
                supported = supported_types(cap or {})
                auth = ClientAuth.from_source(source, cp, pattern=pattern)
            except MedblocksError as exc:
                for cid in ids:
                    failed = PullResult(cid, status="failed", error=f"source:{type(exc).__name__}")
                    failed.failures[str(failed.error)] += 1
                    batch.results.append(failed)
                continue
            limiter = source_limiter(source)

            def one(
                cid: str,
                limiter: Limiter | None = limiter,
                auth: ClientAuth = auth,
                supported: set[str] = supported,
                cap: dict[str, Any] | None = cap,
                source_anomalies: list[tuple[str, str]] = source_anomalies,
            ) -> PullResult:
                try:
                    res = pull_connection(
                        cp,
                        cid,
                        lake_root=lake_root,
                        run_id=run_id,
                        http=client,
                        limiter=limiter,
                        client_auth=auth,
                        supported=supported,
                        full=full,
                        client_options=client_options,
                        capability=cap,
                        anomalies=source_anomalies,
                    )
                except Exception as exc:  # noqa: BLE001 (one connection never fails the batch)
                    reason = f"crash:{type(exc).__name__}"
                    res = PullResult(cid, status="failed", error=reason)
                    res.failures[reason] += 1
                with lock:
                    batch.results.append(res)
                    batch.requests += res.requests
                if on_result is not None:
                    on_result(res)
                return res

            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pull") as pool:
                list(pool.map(one, ids))
    finally:
        if own:
            client.close()
    batch.seconds = time.perf_counter() - started
    return batch


def due_connections(
    cp: ControlPlane,
    *,
    tenant_id: str,
    source_id: str,
    now: datetime | None = None,
    limit: int | None = None,
) -> list[str]:
    """Active patient-access connections of a tenant and source whose next pull is due."""
    now = now or datetime.now(UTC)
    rows = cp.list_connections(
        tenant_id=tenant_id, pattern=PATTERN, state="active", source_id=source_id
    )
    due = [r for r in rows if r.next_pull_due is None or r.next_pull_due <= now]
    due.sort(key=lambda r: r.next_pull_due or datetime.min.replace(tzinfo=UTC))
    ids = [r.id for r in due]
    return ids[:limit] if limit else ids


# Revocation lives in its own module; re-exported for the callers that import it from here.
from medblocks_pipelines.lib.fhir.revocation import (  # noqa: E402
    RevokeResult,
    refresh_failed_connections,
    revoke_connection,
)

__all__ = [
    "OBSERVATION_CATEGORIES",
    "PATTERN",
    "BatchResult",
    "PullResult",
    "Query",
    "RevokeResult",
    "due_connections",
    "plan_queries",
    "pull_batch",
    "pull_connection",
    "refresh_failed_connections",
    "revoke_connection",
    "watermark_key",
]
