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
history). The watermark is kept per search: a partial pull moves the ``since`` of each search that
ran clean (no failure, anomaly or quarantined row while it ran) and holds the others, so the next
pull repeats in full only what went wrong, not every search because one server quirk recurs. When
following references or fetching Binary content went wrong, nothing moves (those came from the
searches' results, which an incremental pull would not see again); an auth failure (refresh refused, consent
revoked) or every search failing ends that connection's pull as ``failed``;
:func:`~.pull_batch.pull_batch` never lets one connection fail the others. Pull history and the
incremental watermark are per connection.

The parts: :mod:`~.pull_fetch` (the searches, reference following and Binary fetches of one
pull), :mod:`~.pull_batch` (many connections with a per-source limiter and worker pool).
"""

import time
from collections import Counter
from collections.abc import Mapping, Sequence
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
from medblocks_pipelines.lib.fhir.client import FhirClient, FhirRequestError, Limiter
from medblocks_pipelines.lib.fhir.compartment import PatientScope
from medblocks_pipelines.lib.fhir.pull_fetch import Puller, last_updated
from medblocks_pipelines.lib.fhir.search_plan import (  # noqa: F401 (re-exported)
    OBSERVATION_CATEGORIES,
    Query,
    plan_queries,
)
from medblocks_pipelines.lib.registry import ControlPlane
from medblocks_pipelines.lib.smart.tokens import ClientAuth, TokenManager
from medblocks_pipelines.lib.warehouse.lake import LakeWriter, Provenance

PATTERN = "patient_access"
DEFAULT_CADENCE = timedelta(hours=24)
#: Re-pull overlap: our clock and the server's may differ; landing dedupes what comes twice.
WATERMARK_OVERLAP = timedelta(minutes=5)


def watermark_key(connection_id: str) -> str:
    """The control-plane watermark of a connection's last fully successful pull."""
    return f"{PATTERN}/{connection_id}/since"


def search_watermark_key(connection_id: str, label: str) -> str:
    """One search's watermark (``label``: the PHI-free query label, e.g. ``Observation:vital-signs``),
    newer than the connection's after a partial pull that ran that search clean."""
    return f"{watermark_key(connection_id)}/{label}"


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
    #: Labels of the searches that ran clean (their watermark moves even on a partial pull).
    clean_searches: list[str] = field(default_factory=list)
    #: Labels of the searches whose watermark was held (they repeat from their old ``since``).
    held_searches: list[str] = field(default_factory=list)

    def trouble(self) -> tuple[int, int, int]:
        """Failures, anomalies and quarantined rows so far (to tell which step added some)."""
        return sum(self.failures.values()), sum(self.anomalies.values()), self.quarantined

    def hold_all_searches(self) -> None:
        """No search's watermark may move (what went wrong is not tied to one search)."""
        self.held_searches += self.clean_searches
        self.clean_searches = []

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
                "_searches_held": len(self.held_searches),
                **{f"_anomaly:{k}": int(v) for k, v in sorted(self.anomalies.items())},
            }
        )
        return out


# ---------------------------------------------------------------------------------------------
# one connection
# ---------------------------------------------------------------------------------------------
def _pull_patient(
    puller: "Puller",
    patient_id: str,
    *,
    since: str | None,
    search_since: Mapping[str, str | None],
    kind: str,
    granted: Any,
    supported: set[str],
    capability: Mapping[str, Any] | None,
    config: Mapping[str, Any],
) -> None:
    """Read the Patient, run the planned searches, follow references, fetch Binary content.

    ``search_since`` overrides ``since`` per query label (a search's own watermark). Records which
    searches ran clean in ``result.clean_searches`` and which were held in ``held_searches``.
    """
    result, client = puller.r, puller.client
    patient = client.read("Patient", patient_id)
    # The Patient is read on every pull (no search to filter it), but what it references
    # is followed only when it changed since the last complete pull.
    changed = since is None or last_updated(patient) is None or str(last_updated(patient)) > since
    puller.land(patient, origin="Patient", follow=changed)
    queries, result.skipped_types = plan_queries(
        kind=kind,
        patient_id=patient_id,
        supported=supported,
        granted=granted,
        since=since,
        since_by_label=search_since,
        config=config,
        capability=capability,
    )
    failed = 0
    for query in queries:
        trouble = result.trouble()
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
        failed += sum(result.failures.values()) > trouble[0]
        if result.trouble() == trouble:
            result.clean_searches.append(query.label)
        else:
            result.held_searches.append(query.label)
    if queries and failed == len(queries):
        result.error = "all_searches_failed"
    trouble = result.trouble()
    puller.follow_references()
    puller.fetch_binaries()
    if result.trouble() != trouble:
        # What went wrong came from the searches' results: hold every search.
        result.hold_all_searches()


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
    mark_key = watermark_key(connection_id)
    since = None if full else cp.get_watermark(mark_key)
    # Per-search marks (``search_watermark_key``): ``<mark_key>/<label>``.
    search_keys = cp.list_watermarks(mark_key + "/")
    search_since = {} if full else {k[len(mark_key) + 1 :]: v for k, v in search_keys.items() if v}
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
            puller = Puller(client, writer, result)
            _pull_patient(
                puller,
                str(patient_id),
                since=since,
                search_since=search_since,
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
    mark = (pulled_at - WATERMARK_OVERLAP).strftime("%Y-%m-%dT%H:%M:%SZ")
    if result.status == "success":
        # A complete pull moves the connection's watermark; the per-search ones are then stale.
        cp.set_watermark(mark_key, mark)
        for key, value in search_keys.items():
            if value:
                cp.set_watermark(key, None)
    elif result.status == "partial":
        # Each search that ran clean moves; the others repeat from their old ``since``.
        for label in result.clean_searches:
            cp.set_watermark(search_watermark_key(connection_id, label), mark)
    else:
        result.hold_all_searches()
    cadence = timedelta(hours=float(cfg.get("pull_cadence_hours") or 24))
    cp.update_connection(connection_id, last_pull_at=pulled_at, next_pull_due=pulled_at + cadence)
    return result


# Revocation lives in its own module; re-exported for the callers that import it from here.
from medblocks_pipelines.lib.fhir.revocation import (  # noqa: E402
    RevokeResult,
    refresh_failed_connections,
    revoke_connection,
)

__all__ = [
    "OBSERVATION_CATEGORIES",
    "PATTERN",
    "PullResult",
    "Query",
    "RevokeResult",
    "plan_queries",
    "pull_connection",
    "refresh_failed_connections",
    "revoke_connection",
    "search_watermark_key",
    "watermark_key",
]
