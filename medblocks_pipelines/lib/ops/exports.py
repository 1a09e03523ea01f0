"""Exports: a tenant's warehouse to NDJSON / Parquet files (folder or S3-compatible storage) or to
another FHIR server as transaction bundles.

Delta, backfill and the watermark
    Each destination has a watermark ``export.<destination>`` (control-plane ``watermarks``) holding
    the sequence number of its last *committed* export. No watermark: the next run is a backfill of
    everything. Otherwise the run sends what changed since that export: resources whose
    ``content_hash`` differs from the snapshot of (``resource_key``, ``content_hash``) saved by the
    committed export, and deletions (keys in the snapshot that left the warehouse). Comparing
    content rather than a ``fetched_at`` high-water mark matters: a long pull can land rows with an
    early ``fetched_at`` after a later pull was built and exported, and a time cursor would skip them.

Retries without duplicates
    Every object name is deterministic: ``<root>/<tenant>/<destination>/<seq>/<Type>.ndjson.gz``.
    A retried run reuses the uncommitted sequence number, first removes whatever a failed attempt
    left under it, then writes ``manifest.json`` last (consumers read an export only once its
    manifest exists). FHIR destinations get ``PUT Type/id`` and ``DELETE Type/id`` entries, which are
    idempotent. The snapshot for sequence N is written before the watermark moves to N, in that
    order, so a crash anywhere repeats sequence N rather than skipping or doubling it.

Purpose
    A destination declares the purpose it receives data for (``config.purpose``, a TEFCA Exchange
    Purpose code). Network rows are exported only where the read policy
    (``lib/warehouse/read_policy.py``) allows their ``permitted_purpose`` for that declared
    purpose, so an export declared for payment or operations never carries rows obtained for
    treatment; a destination without a declared purpose carries no network rows. Each run that met
    network rows writes one audit row with the counts exported and withheld, by purpose.

Records
    Every run is a row in ``export_runs`` (counts by type, deletions, bytes, error class) and an
    ``export.completed`` / ``export.failed`` outbox event written in the same transaction.

File formats follow the FHIR Bulk Data manifest (``output`` per type with ``count``, ``deleted``
as NDJSON of transaction Bundles with DELETE entries).

The parts: :mod:`~.export_delta` (what changed since the committed export, the snapshots),
:mod:`~.export_files` (NDJSON / Parquet files and the manifest), :mod:`~.export_fhir`
(transaction bundles to a FHIR server).
"""

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import duckdb
import httpx
import sqlalchemy as sa

from medblocks_pipelines.lib.errors import ConfigError, ExportError, NotFound
from medblocks_pipelines.lib.ops import tables as ot
from medblocks_pipelines.lib.ops.export_delta import prepare_delta, prune_states, save_state
from medblocks_pipelines.lib.ops.export_fhir import send_fhir
from medblocks_pipelines.lib.ops.export_files import write_files
from medblocks_pipelines.lib.ops.rows import ExportDestination, ExportRun
from medblocks_pipelines.lib.registry import ControlPlane
from medblocks_pipelines.lib.registry import schema as rt
from medblocks_pipelines.lib.registry.rows import from_row
from medblocks_pipelines.lib.registry.store import check_id
from medblocks_pipelines.lib.settings import Settings
from medblocks_pipelines.lib.warehouse.build import current_warehouse_path
from medblocks_pipelines.lib.warehouse.read_policy import audit_read, load_read_policy

KINDS = ("ndjson", "parquet", "fhir")
SECRET_PREFIX = "export:"
# A run older than this that never finished is taken as crashed (it no longer blocks new runs).
STALE_AFTER = timedelta(hours=6)


@dataclass
class ExportResult:
    """What one export run did (counts and our own ids only)."""

    destination_id: str
    seq: int
    mode: str
    counts_by_type: dict[str, int] = field(default_factory=dict)
    deleted: int = 0
    files: int = 0
    bytes: int = 0
    bundles: int = 0
    duration_s: float = 0.0

    @property
    def exported(self) -> int:
        return sum(self.counts_by_type.values())

    def as_counts(self) -> dict[str, Any]:
        """The counts stored on the run row and the outbox event."""
        return {
            "exported": self.exported,
            "deleted": self.deleted,
            "by_type": dict(sorted(self.counts_by_type.items())),
            "files": self.files,
            "bytes": self.bytes,
            "bundles": self.bundles,
        }


# -- destinations ----------------------------------------------------------------------------
def add_destination(
    cp: ControlPlane,
    *,
    id: str,
    tenant_id: str,
    kind: str,
    url: str,
    config: Mapping[str, Any] | None = None,
    credentials: Mapping[str, str] | None = None,
) -> None:
    """Create or update an export destination; ``credentials`` go to the vault, never the table.

    ``url``: a folder path or ``file://``/``s3://bucket/prefix`` URL (ndjson, parquet) or a FHIR
    base URL (fhir). ``config``: ``gzip`` (ndjson, default true), ``resource_types``, ``sources``,
    ``bundle_size`` (fhir, default 200), ``endpoint_url`` and ``region`` (S3-compatible storage),
    ``purpose`` (the TEFCA Exchange Purpose the destination receives data for: network rows go
    only where the read policy allows their purpose, ``lib/warehouse/read_policy.py``; without
    one, no network row is exported).
    ``credentials``: ``{"key", "secret"}`` for S3 or ``{"bearer_token"}`` for a FHIR server.
    A FHIR server that takes SMART Backend Services needs no stored secret: ``config``
    ``{"auth": "smart-backend", "client_id": ..., "scope": "system/*.cu system/*.d"}`` signs a
    client assertion with our active key (the one our JWKS publishes) for each token.
    """
    check_id(id, "export destination")
    cp.get_tenant(tenant_id)
    if kind not in KINDS:
        raise ConfigError(f"unknown export kind {kind!r}", hint=f"one of {KINDS}")
    cfg = dict(config or {})
    if kind == "fhir" and httpx.URL(url).scheme not in ("http", "https"):
        raise ConfigError("a FHIR destination needs an http(s) base URL")
    if cfg.get("auth") not in (None, "bearer", "smart-backend"):
        raise ConfigError("auth is 'bearer' (a stored token) or 'smart-backend'")
    if cfg.get("auth") == "smart-backend" and not cfg.get("client_id"):
        raise ConfigError("smart-backend auth needs the client_id registered at the destination")
    if cfg.get("purpose") is not None:
        load_read_policy().rule("export", str(cfg["purpose"]))  # refuses an unknown purpose
    with cp.engine.begin() as conn:
        existing = conn.execute(
            sa.select(ot.export_destinations.c.tenant_id).where(ot.export_destinations.c.id == id)
        ).first()
        if existing and existing[0] != tenant_id:
            raise ConfigError(f"export destination {id!r} belongs to another tenant")
        values = {"tenant_id": tenant_id, "kind": kind, "url": url, "config": cfg, "enabled": True}
        if existing:
            conn.execute(
                ot.export_destinations.update()
                .where(ot.export_destinations.c.id == id)
                .values(**values)
            )
        else:
            conn.execute(
                ot.export_destinations.insert().values(
                    id=id, created_at=datetime.now(UTC), **values
                )
            )
    if credentials:
        cp.vault.put(SECRET_PREFIX + id, json.dumps(dict(credentials)), tenant_id=tenant_id)


def get_destination(cp: ControlPlane, id: str) -> ExportDestination:
    """One destination row (no credentials)."""
    with cp.engine.connect() as conn:
        row = conn.execute(
            sa.select(ot.export_destinations).where(ot.export_destinations.c.id == id)
        ).first()
    if row is None:
        raise NotFound(f"export destination {id!r} not found", hint="medblocks exports list")
    return from_row(ExportDestination, row)


def list_destinations(
    cp: ControlPlane, *, tenant_id: str | None = None, enabled_only: bool = False
) -> list[ExportDestination]:
    """Destinations ordered by id."""
    d = ot.export_destinations
    q = sa.select(d).order_by(d.c.id)
    if tenant_id is not None:
        q = q.where(d.c.tenant_id == tenant_id)
    if enabled_only:
        q = q.where(d.c.enabled.is_(True))
    with cp.engine.connect() as conn:
        return [from_row(ExportDestination, r) for r in conn.execute(q)]


def set_destination_enabled(cp: ControlPlane, id: str, enabled: bool) -> None:
    """Pause or resume a destination."""
    get_destination(cp, id)
    with cp.engine.begin() as conn:
        conn.execute(
            ot.export_destinations.update()
            .where(ot.export_destinations.c.id == id)
            .values(enabled=enabled)
        )


def list_runs(
    cp: ControlPlane, *, destination_id: str | None = None, tenant_id: str | None = None
) -> list[ExportRun]:
    """Export runs, newest first."""
    r = ot.export_runs
    q = sa.select(r).order_by(r.c.id.desc())
    if destination_id is not None:
        q = q.where(r.c.destination_id == destination_id)
    if tenant_id is not None:
        q = q.where(r.c.tenant_id == tenant_id)
    with cp.engine.connect() as conn:
        return [from_row(ExportRun, row) for row in conn.execute(q)]


def watermark_key(destination_id: str) -> str:
    """The control-plane watermark holding the last committed export sequence."""
    return f"export.{destination_id}"


def _credentials(cp: ControlPlane, destination_id: str) -> dict[str, str]:
    secret = cp.vault.get(SECRET_PREFIX + destination_id)
    return json.loads(secret.reveal()) if secret else {}


# -- the run ---------------------------------------------------------------------------------
def run_export(
    cp: ControlPlane,
    settings: Settings,
    destination_id: str,
    *,
    run_id: str | None = None,
    http: httpx.Client | None = None,
    now: datetime | None = None,
) -> ExportResult:
    """Export what changed in the tenant's warehouse since the last committed export."""
    started = time.perf_counter()
    dest = get_destination(cp, destination_id)
    tenant = dest.tenant_id
    last = cp.get_watermark(watermark_key(destination_id))
    seq = int(last) + 1 if last else 1
    mode = "delta" if last else "backfill"
    result = ExportResult(destination_id, seq, mode)
    run_row = _start_run(cp, dest, seq, mode, run_id, now or datetime.now(UTC))
    state_dir = settings.data_dir / "exports" / tenant / destination_id
    try:
        wh_file = current_warehouse_path(settings, tenant)
        if not wh_file.exists():
            raise ExportError(
                f"no warehouse for tenant {tenant} yet",
                hint=f"build it first: medblocks warehouse build --tenant {tenant}",
            )
        policy = load_read_policy()
        rule = policy.rule("export", dest.config.get("purpose"))
        con = duckdb.connect()
        try:
            read = prepare_delta(
                con, wh_file, state_dir, int(last) if last else None, dest.config, rule
            )
            audit_read(
                cp,
                tenant=tenant,
                rule=rule,
                policy=policy,
                counts=read,
                actor=f"export:{destination_id}",
                table="resources",
                ref=f"seq {seq}",
            )
            if dest.kind == "fhir":
                send_fhir(con, dest, _credentials(cp, destination_id), result, http, cp=cp)
            else:
                write_files(con, dest, _credentials(cp, destination_id), result, tenant)
            save_state(con, state_dir, seq)
        finally:
            con.close()
    except Exception as exc:
        error = (
            f"{type(exc).__name__}: {exc}" if isinstance(exc, ExportError) else type(exc).__name__
        )
        result.duration_s = time.perf_counter() - started
        _finish_run(cp, run_row, dest, result, status="failed", error=error[:500])
        if isinstance(exc, ExportError):
            raise
        raise ExportError(
            f"export {destination_id} seq {seq} failed: {type(exc).__name__}",
            hint="re-run it: the same sequence is rewritten, nothing is duplicated",
        ) from exc
    result.duration_s = time.perf_counter() - started
    _finish_run(cp, run_row, dest, result, status="success", error=None)
    prune_states(state_dir, keep=seq)
    return result


def _start_run(
    cp: ControlPlane, dest: ExportDestination, seq: int, mode: str, run_id: str | None, at: datetime
) -> int:
    r = ot.export_runs
    with cp.engine.begin() as conn:
        running = conn.execute(
            sa.select(r.c.id)
            .where(r.c.destination_id == dest.id)
            .where(r.c.status == "running")
            .where(r.c.started_at > at - STALE_AFTER)
        ).first()
        if running:
            raise ExportError(
                f"export {dest.id} is already running (run {running[0]})",
                hint="wait for it, or see `medblocks exports runs` if it is stuck",
            )
        # Crashed runs left "running": close them so the record says what happened.
        conn.execute(
            r.update()
            .where(r.c.destination_id == dest.id)
            .where(r.c.status == "running")
            .values(status="failed", error="abandoned (process died)", finished_at=at)
        )
        res = conn.execute(
            r.insert().values(
                tenant_id=dest.tenant_id,
                destination_id=dest.id,
                seq=seq,
                mode=mode,
                status="running",
                counts={},
                run_id=run_id,
                started_at=at,
            )
        )
        return int(res.inserted_primary_key[0])  # type: ignore[index]


def _finish_run(
    cp: ControlPlane,
    run_row: int,
    dest: ExportDestination,
    result: ExportResult,
    *,
    status: str,
    error: str | None,
) -> None:
    now = datetime.now(UTC)
    counts = result.as_counts()
    with cp.engine.begin() as conn:
        conn.execute(
            ot.export_runs.update()
            .where(ot.export_runs.c.id == run_row)
            .values(status=status, counts=counts, error=error, finished_at=now)
        )
        if status == "success":
            # The watermark moves in the same transaction as the run record and its event.
            key = watermark_key(dest.id)
            exists = conn.execute(
                sa.select(rt.watermarks.c.key).where(rt.watermarks.c.key == key)
            ).first()
            if exists:
                conn.execute(
                    rt.watermarks.update()
                    .where(rt.watermarks.c.key == key)
                    .values(value=str(result.seq), updated_at=now)
                )
            else:
                conn.execute(
                    rt.watermarks.insert().values(key=key, value=str(result.seq), updated_at=now)
                )
        conn.execute(
            rt.events.insert().values(
                tenant_id=dest.tenant_id,
                type="export.completed" if status == "success" else "export.failed",
                payload={
                    "destination_id": dest.id,
                    "kind": dest.kind,
                    "export_run_id": run_row,
                    "seq": result.seq,
                    "mode": result.mode,
                    "counts": counts,
                    "error": error,
                },
                created_at=now,
            )
        )
