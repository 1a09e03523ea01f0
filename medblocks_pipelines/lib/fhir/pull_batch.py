"""Many connections' pulls: grouped by source (one CapabilityStatement, app registration, rate
limiter and worker pool each), one connection's failure never failing the others; and which
connections are due."""

import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from medblocks_pipelines.lib.errors import MedblocksError
from medblocks_pipelines.lib.fhir.client import Limiter, limiter_for
from medblocks_pipelines.lib.fhir.pull import PATTERN, PullResult, pull_connection
from medblocks_pipelines.lib.registry import ControlPlane
from medblocks_pipelines.lib.registry.rows import Source
from medblocks_pipelines.lib.smart.discovery import fetch_smart_configuration
from medblocks_pipelines.lib.smart.launch import source_discovery, supported_types
from medblocks_pipelines.lib.smart.tokens import ClientAuth


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
