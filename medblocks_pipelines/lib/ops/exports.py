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
"""

import gzip
import json
import secrets as pysecrets
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import fsspec
import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import sqlalchemy as sa

from medblocks_pipelines.lib.errors import ConfigError, ExportError, MedblocksError, NotFound
from medblocks_pipelines.lib.ops import tables as ot
from medblocks_pipelines.lib.ops.rows import ExportDestination, ExportRun
from medblocks_pipelines.lib.registry import ControlPlane
from medblocks_pipelines.lib.registry import schema as rt
from medblocks_pipelines.lib.registry.rows import from_row
from medblocks_pipelines.lib.registry.store import check_id
from medblocks_pipelines.lib.settings import Settings
from medblocks_pipelines.lib.warehouse.build import current_warehouse_path
from medblocks_pipelines.lib.warehouse.read_policy import (
    ConsumerRule,
    ReadCounts,
    audit_read,
    consumer_filter,
    load_read_policy,
    read_counts,
)

KINDS = ("ndjson", "parquet", "fhir")
SECRET_PREFIX = "export:"
# A run older than this that never finished is taken as crashed (it no longer blocks new runs).
STALE_AFTER = timedelta(hours=6)
# Reference targets first, so a strict receiver can resolve references in later bundles.
_TYPE_ORDER = ("Organization", "Location", "Practitioner", "PractitionerRole", "Patient")
_STATE_SCHEMA = pa.schema([("resource_key", pa.string()), ("content_hash", pa.string())])


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
            read = _prepare_delta(
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
                _send_fhir(con, dest, _credentials(cp, destination_id), result, http, cp=cp)
            else:
                _write_files(con, dest, _credentials(cp, destination_id), result, tenant)
            _save_state(con, state_dir, seq)
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
    _prune_states(state_dir, keep=seq)
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


# -- delta -----------------------------------------------------------------------------------
def _state_file(state_dir: Path, seq: int) -> Path:
    return state_dir / f"state-{seq:06d}.parquet"


def _prepare_delta(
    con: duckdb.DuckDBPyConnection,
    wh_file: Path,
    state_dir: Path,
    last_seq: int | None,
    config: Mapping[str, Any],
    rule: ConsumerRule,
) -> ReadCounts:
    """Temp tables ``current``, ``changed`` and ``deleted`` for this run; ``current`` holds only
    the rows the read policy lets this destination carry. Returns the network rows' counts."""
    con.execute(f"ATTACH '{wh_file}' AS wh (READ_ONLY)")
    present = set(con.sql("SELECT * FROM wh.resources LIMIT 0").columns)
    extra = "".join(
        f", NULL::VARCHAR AS {c}"
        for c in ("permitted_purpose", "network_query_id")
        if c not in present
    )
    con.execute(f"CREATE TEMP VIEW wh_rows AS SELECT *{extra} FROM wh.resources")
    read = read_counts(con, "wh_rows", rule)
    where, params = [consumer_filter(rule)], []
    if config.get("resource_types"):
        where.append("resource_type IN (SELECT unnest(?))")
        params.append(list(config["resource_types"]))
    if config.get("sources"):
        where.append("source IN (SELECT unnest(?))")
        params.append(list(config["sources"]))
    con.execute(
        "CREATE TEMP TABLE current AS SELECT resource_key, resource_type, resource_id, version_id,"
        " last_updated, content_hash, resource, source, fetched_at FROM wh_rows WHERE "
        + " AND ".join(where),
        params,
    )
    con.execute("DROP VIEW wh_rows")
    con.execute("DETACH wh")
    prev = _state_file(state_dir, last_seq) if last_seq else None
    if prev is not None and prev.exists():
        con.execute(
            f"CREATE TEMP TABLE prev AS SELECT * FROM read_parquet('{prev}')"  # noqa: S608
        )
    else:
        # No committed export, or its snapshot is gone: send everything (a backfill; names and
        # PUTs are idempotent, but deletions since then cannot be known).
        empty = _STATE_SCHEMA.empty_table()  # noqa: F841 (read by name in SQL)
        con.execute("CREATE TEMP TABLE prev AS SELECT * FROM empty")
    con.execute(
        """
        CREATE TEMP TABLE changed AS
        SELECT c.* FROM current c LEFT JOIN prev p USING (resource_key)
        WHERE p.content_hash IS DISTINCT FROM c.content_hash
        """
    )
    con.execute(
        """
        CREATE TEMP TABLE deleted AS
        SELECT p.resource_key,
               split_part(p.resource_key, '/', 2) AS resource_type,
               split_part(p.resource_key, '/', 3) AS resource_id
        FROM prev p ANTI JOIN current c USING (resource_key)
        """
    )
    return read


def _save_state(con: duckdb.DuckDBPyConnection, state_dir: Path, seq: int) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    final = _state_file(state_dir, seq)
    tmp = final.with_suffix(f".{pysecrets.token_hex(4)}.tmp")
    con.execute(
        f"COPY (SELECT resource_key, content_hash FROM current ORDER BY resource_key) "
        f"TO '{tmp}' (FORMAT parquet)"
    )
    tmp.replace(final)


def _prune_states(state_dir: Path, *, keep: int) -> None:
    for path in state_dir.glob("state-*.parquet"):
        try:
            n = int(path.stem.split("-")[1])
        except (IndexError, ValueError):
            continue
        if n < keep:
            path.unlink(missing_ok=True)


def _types(con: duckdb.DuckDBPyConnection) -> list[str]:
    found = [r[0] for r in con.execute("SELECT DISTINCT resource_type FROM changed").fetchall()]
    first = [t for t in _TYPE_ORDER if t in found]
    return first + sorted(t for t in found if t not in _TYPE_ORDER)


def _batches(
    con: duckdb.DuckDBPyConnection, sql: str, params: list[Any], size: int = 2000
) -> Iterator[pa.RecordBatch]:
    reader = con.sql(sql, params=params).to_arrow_reader(size)
    yield from reader


# -- files -----------------------------------------------------------------------------------
def _filesystem(
    dest: ExportDestination, creds: Mapping[str, str]
) -> tuple[fsspec.AbstractFileSystem, str]:
    url: str = dest.url
    cfg = dest.config
    if url.startswith("s3://"):
        kwargs: dict[str, Any] = {}
        client_kwargs: dict[str, Any] = {}
        if cfg.get("endpoint_url"):
            client_kwargs["endpoint_url"] = cfg["endpoint_url"]
        if cfg.get("region"):
            client_kwargs["region_name"] = cfg["region"]
        if creds.get("key"):
            kwargs.update(key=creds["key"], secret=creds.get("secret"))
        fs = fsspec.filesystem("s3", client_kwargs=client_kwargs, **kwargs)
        return fs, url[len("s3://") :].rstrip("/")
    if url.startswith("file://"):
        url = url[len("file://") :]
    if "://" in url:
        raise ConfigError("export destinations support folders and s3:// URLs")
    return fsspec.filesystem("file", auto_mkdir=True), str(Path(url).resolve())


def _write_files(
    con: duckdb.DuckDBPyConnection,
    dest: ExportDestination,
    creds: Mapping[str, str],
    result: ExportResult,
    tenant: str,
) -> None:
    fs, root = _filesystem(dest, creds)
    prefix = f"{root}/{tenant}/{dest.id}/{result.seq:06d}"
    # Leftovers of a failed attempt at this sequence go first: retries never add duplicates.
    if fs.exists(prefix):
        fs.rm(prefix, recursive=True)
    if hasattr(fs, "invalidate_cache"):
        fs.invalidate_cache()
    kind = dest.kind
    gz = bool(dest.config.get("gzip", True)) if kind == "ndjson" else False
    output: list[dict[str, Any]] = []
    for rtype in _types(con):
        sql = (
            "SELECT resource_id, version_id, last_updated, content_hash, source, fetched_at, "
            "resource FROM changed WHERE resource_type = ? ORDER BY source, resource_id"
        )
        if kind == "ndjson":
            name = f"{rtype}.ndjson" + (".gz" if gz else "")
            count, size = _write_ndjson(fs, f"{prefix}/{name}", _batches(con, sql, [rtype]), gz)
        else:
            name = f"{rtype}.parquet"
            count, size = _write_parquet(fs, f"{prefix}/{name}", _batches(con, sql, [rtype]))
        result.counts_by_type[rtype] = count
        result.files += 1
        result.bytes += size
        output.append({"type": rtype, "url": name, "count": count})
    deleted: list[dict[str, Any]] = []
    n_deleted = int(con.execute("SELECT count(*) FROM deleted").fetchall()[0][0])
    if n_deleted:
        name = "deleted.ndjson" + (".gz" if gz else "")
        lines = _deletion_bundles(con)
        size = _write_lines(fs, f"{prefix}/{name}", lines, gz)
        result.deleted = n_deleted
        result.files += 1
        result.bytes += size
        deleted.append({"type": "Bundle", "url": name, "count": n_deleted})
    manifest = {
        # FHIR Bulk Data manifest shape; urls are relative to the manifest.
        "transactionTime": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "requiresAccessToken": False,
        "output": output,
        "deleted": deleted,
        "error": [],
        "extension": {"seq": result.seq, "mode": result.mode, "format": kind},
    }
    body = json.dumps(manifest, indent=2).encode()
    with fs.open(f"{prefix}/manifest.json", "wb") as fh:
        fh.write(body)
    result.files += 1
    result.bytes += len(body)


def _ndjson_lines(batches: Iterator[pa.RecordBatch]) -> Iterator[tuple[int, bytes]]:
    for batch in batches:
        resources = batch.column("resource").to_pylist()
        chunk = "\n".join(resources) + "\n"
        yield len(resources), chunk.encode()


def _write_ndjson(
    fs: fsspec.AbstractFileSystem, path: str, batches: Iterator[pa.RecordBatch], gz: bool
) -> tuple[int, int]:
    count = 0

    def chunks() -> Iterator[bytes]:
        nonlocal count
        for n, data in _ndjson_lines(batches):
            count += n
            yield data

    size = _write_lines(fs, path, chunks(), gz)
    return count, size


def _write_lines(
    fs: fsspec.AbstractFileSystem, path: str, chunks: Iterator[bytes], gz: bool
) -> int:
    with fs.open(path, "wb") as raw:
        if gz:
            # mtime=0: the same content gives the same bytes, so a retry rewrites identical objects.
            with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=6) as fh:
                for data in chunks:
                    fh.write(data)
        else:
            for data in chunks:
                raw.write(data)
    return int(fs.size(path))


def _write_parquet(
    fs: fsspec.AbstractFileSystem, path: str, batches: Iterator[pa.RecordBatch]
) -> tuple[int, int]:
    count = 0
    writer: pq.ParquetWriter | None = None
    with fs.open(path, "wb") as raw:
        for batch in batches:
            if writer is None:
                writer = pq.ParquetWriter(raw, batch.schema, compression="zstd")
            writer.write_batch(batch)
            count += batch.num_rows
        if writer is not None:
            writer.close()
    return count, int(fs.size(path))


def _deletion_bundles(con: duckdb.DuckDBPyConnection, per_bundle: int = 500) -> Iterator[bytes]:
    rows = con.execute(
        "SELECT resource_type, resource_id FROM deleted ORDER BY resource_type, resource_id"
    ).fetchall()
    for i in range(0, len(rows), per_bundle):
        bundle = {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {"request": {"method": "DELETE", "url": f"{t}/{rid}"}}
                for t, rid in rows[i : i + per_bundle]
            ],
        }
        yield (json.dumps(bundle, separators=(",", ":")) + "\n").encode()


# -- FHIR ------------------------------------------------------------------------------------
def _send_fhir(
    con: duckdb.DuckDBPyConnection,
    dest: ExportDestination,
    creds: Mapping[str, str],
    result: ExportResult,
    http: httpx.Client | None,
    *,
    cp: ControlPlane | None = None,
) -> None:
    size = int(dest.config.get("bundle_size", 200))
    headers = {
        "content-type": "application/fhir+json",
        "accept": "application/fhir+json",
    }
    if creds.get("bearer_token"):
        headers["authorization"] = f"Bearer {creds['bearer_token']}"
    client = http or httpx.Client(timeout=60.0)
    bearer = (
        _BackendBearer(cp, dest, client) if dest.config.get("auth") == "smart-backend" else None
    )

    def post(entries: list[bytes]) -> None:
        _post_bundle(client, dest, headers, entries, result, bearer=bearer)

    try:
        for rtype in _types(con):
            entries: list[bytes] = []
            count = 0
            for batch in _batches(
                con,
                "SELECT resource_id, resource FROM changed WHERE resource_type = ? "
                "ORDER BY source, resource_id",
                [rtype],
            ):
                for rid, text in zip(
                    batch.column("resource_id").to_pylist(),
                    batch.column("resource").to_pylist(),
                    strict=True,
                ):
                    # The landed JSON goes in verbatim (decimals keep their precision).
                    entries.append(
                        b'{"fullUrl":"'
                        + f"{dest.url.rstrip('/')}/{rtype}/{rid}".encode()
                        + b'","resource":'
                        + text.encode()
                        + b',"request":{"method":"PUT","url":"'
                        + f"{rtype}/{rid}".encode()
                        + b'"}}'
                    )
                    count += 1
                    if len(entries) >= size:
                        post(entries)
                        entries = []
            if entries:
                post(entries)
            result.counts_by_type[rtype] = count
        rows = con.execute(
            "SELECT resource_type, resource_id FROM deleted ORDER BY resource_type, resource_id"
        ).fetchall()
        for i in range(0, len(rows), size):
            entries = [
                json.dumps({"request": {"method": "DELETE", "url": f"{t}/{rid}"}}).encode()
                for t, rid in rows[i : i + size]
            ]
            post(entries)
        result.deleted = len(rows)
    finally:
        if http is None:
            client.close()


class _BackendBearer:
    """``Authorization`` for a destination that takes SMART Backend Services tokens."""

    def __init__(
        self, cp: ControlPlane | None, dest: ExportDestination, http: httpx.Client
    ) -> None:
        from medblocks_pipelines.lib.smart.backend import BackendAuth
        from medblocks_pipelines.lib.smart.keys import KeyStore

        if cp is None:
            raise ExportError("smart-backend auth needs the control plane (our signing key)")
        cfg = dest.config
        self.auth = BackendAuth(
            client_id=str(cfg["client_id"]),
            scope=str(cfg.get("scope") or "system/*.cud"),
            key=KeyStore(cp.vault).active,
            http=http,
            token_endpoint=cfg.get("token_endpoint"),
            fhir_base_url=dest.url,
            jku=cfg.get("jku"),
        )

    def value(self) -> str:
        try:
            return f"Bearer {self.auth.token()}"
        except MedblocksError as exc:
            raise ExportError(f"no token for the FHIR destination: {exc}", hint=exc.hint) from exc

    def expired(self, header: str) -> None:
        self.auth.invalidate(header.removeprefix("Bearer "))


def _post_bundle(
    client: httpx.Client,
    dest: ExportDestination,
    headers: dict[str, str],
    entries: list[bytes],
    result: ExportResult,
    *,
    bearer: "_BackendBearer | None" = None,
) -> None:
    body = b'{"resourceType":"Bundle","type":"transaction","entry":[' + b",".join(entries) + b"]}"
    for attempt in (1, 2):
        sent = dict(headers)
        if bearer is not None:
            sent["authorization"] = bearer.value()
        try:
            resp = client.post(dest.url.rstrip("/") + "/", content=body, headers=sent)
        except httpx.HTTPError as exc:
            raise ExportError(
                f"FHIR destination {dest.id} unreachable: {type(exc).__name__}"
            ) from exc
        if resp.status_code == 401 and bearer is not None and attempt == 1:
            bearer.expired(sent["authorization"])  # revoked or expired early: one fresh token
            continue
        break
    if resp.status_code != 200:
        raise ExportError(
            f"FHIR destination {dest.id} refused a transaction: HTTP {resp.status_code}",
            hint="the destination's OperationOutcome is in its own logs; fix and re-run",
        )
    try:
        reply = resp.json()
    except ValueError as exc:
        raise ExportError(f"FHIR destination {dest.id} answered with non-JSON") from exc
    if reply.get("resourceType") != "Bundle" or reply.get("type") != "transaction-response":
        raise ExportError(f"FHIR destination {dest.id} did not answer a transaction-response")
    statuses = [str((e.get("response") or {}).get("status", "")) for e in reply.get("entry", [])]
    if len(statuses) != len(entries) or not all(s[:1] == "2" for s in statuses):
        raise ExportError(f"FHIR destination {dest.id} did not accept every entry of a transaction")
    result.bundles += 1
    result.bytes += len(body)
