"""The per-tenant warehouse: a DuckDB file built from the lake and published atomically.

A build writes ``<warehouse_dir>/.<tenant>.<token>.building.duckdb``, checkpoints and closes it, then
``os.replace``-s it over ``<warehouse_dir>/<tenant>.duckdb``. Readers (analysts, the CDS service) that
opened the old file keep reading it; new readers get the new one; nobody ever sees a half-built file.
Builds of one tenant are serialized by a file lock, by a PostgreSQL advisory lock when the control
plane is on PostgreSQL (builders on several machines), and by a Dagster pool in the pipelines.

With an object-store lake (``settings.lake_url``) a build first mirrors the tenant's lake files to
local disk, under the lock; with an object-store warehouse location (``settings.warehouse_url``) the
published file is also uploaded there, and :func:`open_warehouse` on any machine reads the newest
published copy (see ``lib/storage.py``).

Base tables:
- ``resource_versions``: every distinct version landed, deduplicated by
  ``(source, resource_type, resource_id, content_hash)``, keeping the first fetch (so re-runs change
  nothing); metadata only, with ``lake_file``/``lake_row`` pointing at the version's JSON in the lake.
- ``resources``: the latest version of each resource per source, tombstones applied.
- ``version_conflicts``: each (source, type, id, versionId) that arrived with more than one
  content (a source that changed a resource without a new versionId): flagged, never resolved
  silently; ``resources`` keeps the most recently fetched content (deterministic for a lake).
- ``tombstones``: deletions reported by sources.
- ``resource_sightings``: each current resource with every pattern, organization and connection
  that delivered it (and, for network deliveries, the exchange purpose), first and last fetch,
  number of runs.

Network rows carry ``permitted_purpose`` and ``network_query_id`` (why and by which audited query
they came in) into ``resource_versions`` and ``resources``; lake files written before those
columns existed read as nulls (``_with_late_columns``).
- ``quarantine``: bad records with their reason, deduplicated.
- ``pull_history``: the control plane's pull rows for this tenant.
Then each step in ``steps`` adds its tables (views, identity, unified record).
"""

import fcntl
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import pyarrow as pa

from medblocks_pipelines.lib.errors import StorageError, WarehouseError
from medblocks_pipelines.lib.partitions import normalise_id
from medblocks_pipelines.lib.registry.rows import Pull
from medblocks_pipelines.lib.settings import Settings, Tuning
from medblocks_pipelines.lib.storage import fetch_if_changed, join, put_file, remember_signature
from medblocks_pipelines.lib.warehouse.lake_layout import (
    LATE_PROVENANCE_COLUMNS,
    QUARANTINE_SCHEMA,
    RESOURCE_SCHEMA,
    mirror_tenant,
    quarantine_glob,
    resources_glob,
)

if TYPE_CHECKING:
    from medblocks_pipelines.lib.registry import ControlPlane

log = logging.getLogger(__name__)

# DuckDB memory for a build (the rest spills to disk): a tenant of any size builds in bounded RSS.
# 512 MB: DuckDB's resident memory runs past its limit (Parquet scans, the final checkpoint: 10M
# resources peaked ~780 MiB over the process's base at 640 MB, ~680 at 512 MB), and a bulk sync
# and build in one process (~250 MiB after landing) must stay under 1 GiB at 10M resources
# (bench_bulk_ingest). Measured cost: about 5% more build time at 10M, none seen at 1M.
WAREHOUSE_MEMORY_LIMIT = (
    Tuning.from_env().warehouse_memory_limit
)  # MEDBLOCKS_WAREHOUSE_MEMORY_LIMIT


@dataclass
class BuildContext:
    """What a build step may use besides the DuckDB connection."""

    tenant: str
    settings: Settings
    control_plane: "ControlPlane | None" = None
    run_id: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


BuildStep = Callable[[duckdb.DuckDBPyConnection, BuildContext], dict[str, int]]


@dataclass
class BuildResult:
    """Where the published warehouse is and how many rows each table holds."""

    tenant: str
    path: Path
    table_counts: dict[str, int]
    duration_s: float
    step_timings: dict[str, float]
    storage: dict[str, Any] = field(default_factory=dict)


def warehouse_path(settings: Settings, tenant: str) -> Path:
    """The published warehouse file of ``tenant``."""
    return settings.warehouse_dir / f"{normalise_id(tenant)}.duckdb"


@contextmanager
def tenant_build_lock(settings: Settings, tenant: str) -> Iterator[None]:
    """Serialize builds of one tenant: across processes on this machine (a file lock) and, when
    the control plane is on PostgreSQL, across machines (an advisory lock keyed by the tenant).
    A Dagster pool does it across runs too."""
    settings.warehouse_dir.mkdir(parents=True, exist_ok=True)
    lock_path = settings.warehouse_dir / f".{normalise_id(tenant)}.lock"
    with open(lock_path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            with _cluster_lock(settings.database_url, f"warehouse-build:{normalise_id(tenant)}"):
                yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextmanager
def _cluster_lock(database_url: str, name: str) -> Iterator[None]:
    """A session-level PostgreSQL advisory lock named ``name`` (nothing on SQLite: one machine)."""
    from medblocks_pipelines.lib.registry.db import normalise_url

    url = normalise_url(database_url)
    if not url.startswith("postgresql"):
        yield
        return
    import hashlib

    import sqlalchemy as sa

    key = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big", signed=True)
    # Its own unpooled engine, not db.make_engine's: the session advisory lock must end with this
    # connection (a pooled one would keep the session, and a lock a bug left, after close).
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            conn.commit()
            try:
                yield
            finally:
                conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()
    finally:
        engine.dispose()


def default_steps() -> list[BuildStep]:
    """The steps after the base tables: views, identity and the unified record, in order."""
    from medblocks_pipelines.lib.warehouse.steps import STEPS

    return list(STEPS)


def _has_files(glob: str) -> bool:
    base = glob.split("**")[0]
    return Path(base).exists() and any(Path(base).rglob("*.parquet"))


def _sql_str(value: str) -> str:
    return value.replace("'", "''")


def _empty_arrow(schema: pa.Schema) -> pa.Table:
    return schema.empty_table()


def _with_late_columns(con: duckdb.DuckDBPyConnection, source: str, view: str) -> None:
    """``view`` = ``source`` plus, as nulls, the provenance columns older lake files lack
    (``union_by_name`` adds a column only when at least one file has it)."""
    present = {r[0] for r in con.execute(f"DESCRIBE {source}").fetchall()}
    extra = "".join(f", NULL::VARCHAR AS {c}" for c in LATE_PROVENANCE_COLUMNS if c not in present)
    con.execute(f"CREATE TEMP VIEW {view} AS SELECT *{extra} FROM {source}")


def build_base_tables(
    con: duckdb.DuckDBPyConnection, settings: Settings, tenant: str, pulls: Sequence[Pull]
) -> None:
    """Create the base tables from the lake into ``con``."""
    rglob = resources_glob(settings.lake_root, tenant)
    if _has_files(rglob):
        # filename + file_row_number point at each row's text in the lake, so the JSON is read
        # once, for the rows that become current, and never copied into resource_versions.
        # lake_file names the file where the lake lives: the object-store URL when this build
        # reads a local mirror of it, so the pointer means the same thing on every machine.
        lake_file = "filename"
        if settings.lake_url:
            skip = len(str(settings.lake_root)) + 1
            lake_file = f"'{_sql_str(settings.lake_url)}' || substr(filename, {skip})"
        con.execute(
            f"CREATE TEMP VIEW lake_files AS SELECT *, {lake_file} AS lake_file "
            f"FROM read_parquet('{_sql_str(rglob)}', hive_partitioning=false, "
            "union_by_name=true, filename=true, file_row_number=true)"
        )
        _with_late_columns(con, "lake_files", "lake_rows")
    else:
        empty = _empty_arrow(RESOURCE_SCHEMA)  # noqa: F841 (referenced by name in SQL)
        con.execute(
            "CREATE TEMP TABLE lake_rows AS SELECT *, NULL::VARCHAR AS filename, "
            "NULL::BIGINT AS file_row_number, NULL::VARCHAR AS lake_file FROM empty"
        )

    # One row per distinct version; the first fetch wins so a re-run reproduces the same rows.
    # Metadata only: every version's JSON stays in the lake file the row points at.
    con.execute(
        """
        CREATE TABLE resource_versions AS
        SELECT resource_type, resource_id, version_id, last_updated,
               try_cast(last_updated AS TIMESTAMPTZ) AS last_updated_ts, content_hash,
               tenant, pattern, source, organization, connection,
               source || '/' || resource_type || '/' || resource_id AS resource_key,
               fetched_at, run_id, origin, permitted_purpose, network_query_id,
               lake_file, file_row_number AS lake_row
        FROM lake_rows
        WHERE NOT deleted
        QUALIFY row_number() OVER (
            PARTITION BY source, resource_type, resource_id, content_hash
            ORDER BY fetched_at, run_id, origin) = 1
        """
    )
    con.execute(
        """
        CREATE TABLE tombstones AS
        SELECT resource_type, resource_id, last_updated AS deleted_at,
               try_cast(last_updated AS TIMESTAMPTZ) AS deleted_at_ts,
               tenant, pattern, source, organization, connection,
               source || '/' || resource_type || '/' || resource_id AS resource_key,
               fetched_at, run_id, origin
        FROM lake_rows
        WHERE deleted
        QUALIFY row_number() OVER (
            PARTITION BY source, resource_type, resource_id, last_updated
            ORDER BY fetched_at, run_id, origin) = 1
        """
    )
    # Same versionId, different content: which one is right cannot be known; flag every such
    # version (the lake keeps each content; within one file the landing already quarantined the
    # later ones). `resources` below still picks deterministically: latest fetch, then hash.
    con.execute(
        """
        CREATE TABLE version_conflicts AS
        WITH repeated AS (  -- a cheap count first: the ordered list() only for the few repeats
            SELECT resource_key, version_id FROM resource_versions
            WHERE version_id IS NOT NULL
            GROUP BY ALL
            HAVING count(*) > 1
        )
        SELECT resource_key, source, resource_type, resource_id, version_id,
               count(*) AS contents, min(fetched_at) AS first_fetched_at,
               max(fetched_at) AS last_fetched_at,
               list(origin ORDER BY fetched_at, origin) AS origins
        FROM resource_versions
        SEMI JOIN repeated USING (resource_key, version_id)
        GROUP BY ALL
        ORDER BY resource_key, version_id
        """
    )
    # Each lake file a version points at gets a small number, so the pointers the join below
    # matches on are two integers, not a path per row (a 10M-row build then joins within its
    # memory limit instead of spilling long strings).
    # (filename too: a batch below reads only its own files, by a filter on filename that
    # DuckDB pushes into the Parquet scan.)
    con.execute(
        """
        CREATE TEMP TABLE lake_file_ids AS
        SELECT filename, lake_file, row_number() OVER (ORDER BY lake_file) AS file_id
        FROM (SELECT DISTINCT filename, lake_file FROM lake_rows WHERE NOT deleted)
        """
    )
    # Latest state per resource at a source: source time first (lastUpdated, deletion time), a
    # tombstone wins a tie, then versionId, then when we saw it.
    con.execute(
        """
        CREATE TEMP TABLE current_rows AS
        WITH states AS (
            SELECT resource_key, false AS deleted, last_updated_ts AS ts,
                   try_cast(version_id AS BIGINT) AS vnum, fetched_at, content_hash,
                   file_id, lake_row
            FROM resource_versions JOIN lake_file_ids USING (lake_file)
            UNION ALL
            SELECT resource_key, true, deleted_at_ts, NULL, fetched_at, NULL, NULL, NULL
            FROM tombstones
        )
        SELECT file_id, lake_row FROM states
        QUALIFY row_number() OVER (
            PARTITION BY resource_key
            ORDER BY ts DESC NULLS LAST, deleted DESC, vnum DESC NULLS LAST,
                     fetched_at DESC, content_hash) = 1
            AND NOT deleted
        """
    )
    # The JSON column is stored zstd-compressed: DuckDB's default (dictionary/FSST) analysis of
    # kilobyte-long texts costs more CPU than the rest of the table and compresses them ~2x,
    # zstd ~15x (bench_bulk_ingest: the warehouse file is a tenth of the size).
    con.execute(RESOURCES_DDL)
    _insert_resources(con)
    con.execute("DROP TABLE current_rows")
    con.execute("DROP TABLE lake_file_ids")

    # Every relationship that delivered each current resource: the same EHR record can arrive by a
    # backend export and by a patient's own connection; `resources` keeps one row, this keeps both.
    # In two plain aggregations, each spilling past the memory limit: count(DISTINCT run_id) in
    # one did not (1M resources: out of memory at 200 MB), nor the two in one statement.
    con.execute(
        """
        CREATE TEMP TABLE sighting_runs AS
        SELECT l.source || '/' || l.resource_type || '/' || l.resource_id AS resource_key,
               l.pattern, l.organization, l.connection, l.permitted_purpose, l.run_id,
               min(l.fetched_at) AS first_fetched_at, max(l.fetched_at) AS last_fetched_at
        FROM lake_rows l
        SEMI JOIN resources v
          ON v.source = l.source AND v.resource_type = l.resource_type
         AND v.resource_id = l.resource_id
        WHERE NOT l.deleted
        GROUP BY ALL
        """
    )
    con.execute(
        """
        CREATE TABLE resource_sightings AS
        SELECT resource_key, pattern, organization, connection, permitted_purpose,
               min(first_fetched_at) AS first_fetched_at, max(last_fetched_at) AS last_fetched_at,
               count(run_id) AS runs  -- = count(DISTINCT run_id): one row per run above
        FROM sighting_runs
        GROUP BY ALL
        ORDER BY ALL
        """
    )
    con.execute("DROP TABLE sighting_runs")

    qglob = quarantine_glob(settings.lake_root, tenant)
    if _has_files(qglob):
        con.execute(
            f"CREATE TEMP VIEW quarantine_files AS SELECT * FROM read_parquet("
            f"'{_sql_str(qglob)}', hive_partitioning=false, union_by_name=true)"
        )
        _with_late_columns(con, "quarantine_files", "quarantine_rows")
        con.execute(
            """
            CREATE TABLE quarantine AS
            SELECT * FROM quarantine_rows
            QUALIFY row_number() OVER (
                PARTITION BY source, origin, reason, raw_hash ORDER BY fetched_at, run_id) = 1
            """
        )
    else:
        empty_q = _empty_arrow(QUARANTINE_SCHEMA)  # noqa: F841
        con.execute("CREATE TABLE quarantine AS SELECT * FROM empty_q")

    pull_rows = [
        {
            "id": int(p.id),
            "pattern": p.pattern,
            "source": p.source_id,
            "organization": p.organization_id,
            "connection": p.connection_id,
            "run_id": p.run_id,
            "started_at": p.started_at,
            "finished_at": p.finished_at,
            "status": p.status,
            "counts": json.dumps(p.counts or {}, sort_keys=True),
            "error": p.error,
        }
        for p in pulls
    ]
    pull_schema = pa.schema(
        [
            ("id", pa.int64()),
            ("pattern", pa.string()),
            ("source", pa.string()),
            ("organization", pa.string()),
            ("connection", pa.string()),
            ("run_id", pa.string()),
            ("started_at", pa.timestamp("us", tz="UTC")),
            ("finished_at", pa.timestamp("us", tz="UTC")),
            ("status", pa.string()),
            ("counts", pa.string()),
            ("error", pa.string()),
        ]
    )
    pulls_arrow = pa.Table.from_pylist(pull_rows, schema=pull_schema)  # noqa: F841
    con.execute("CREATE TABLE pull_history AS SELECT * FROM pulls_arrow ORDER BY id")


#: Current rows whose JSON one INSERT copies into ``resources``. One INSERT over the whole lake
#: held memory in proportion to it (10M resources: out of memory at a 640 MB limit); a batch of
#: lake files at a time holds a batch's worth, whatever the lake's size.
RESOURCES_BATCH_ROWS = 500_000


def _file_batches(
    per_file: Sequence[tuple[int, str, int]], batch_rows: int
) -> list[list[tuple[int, str, int]]]:
    """Consecutive ``(file_id, filename, current rows)`` groups of about ``batch_rows`` rows (a
    file with more rows is a batch of its own: lake files are bounded by landing and
    compaction)."""
    batches: list[list[tuple[int, str, int]]] = []
    batch: list[tuple[int, str, int]] = []
    rows = 0
    for item in per_file:
        if batch and rows + item[2] > batch_rows:
            batches.append(batch)
            batch, rows = [], 0
        batch.append(item)
        rows += item[2]
    if batch:
        batches.append(batch)
    return batches


def _insert_resources(con: duckdb.DuckDBPyConnection) -> None:
    """Copy each current row (``current_rows``) with its JSON from the lake into ``resources``.

    A semi-join on the small pointer table: only the current rows' JSON is read, never hashed.
    Batches of whole lake files, in file order: a row's pointer names its file, so a batch sees
    every current row of its files and nothing else; the filter on ``filename`` makes DuckDB open
    only the batch's files. The rows are those of one INSERT over the lake; they are stored in
    lake-file order (the one INSERT left them in its hash table's order).
    """
    per_file = [
        (int(fid), str(name), int(n))
        for fid, name, n in con.execute(
            "SELECT file_id, filename, count(*) FROM current_rows JOIN lake_file_ids "
            "USING (file_id) GROUP BY ALL ORDER BY file_id"
        ).fetchall()
    ]
    # The pointers are the hash join's build side, the lake rows (with their JSON) stream past
    # them, as written. Left to itself DuckDB builds on whichever side it estimates smaller,
    # and a file's row count can look smaller than the pointers: it then held the JSON of every
    # row in a hash table (10M resources: out of memory at 640 MB; 1M: at 256 MB).
    (disabled,) = con.execute("SELECT current_setting('disabled_optimizers')").fetchone() or ("",)
    fixed = ",".join(x for x in (disabled, "join_order", "build_side_probe_side") if x)
    con.execute(f"SET disabled_optimizers = '{_sql_str(fixed)}'")
    try:
        _insert_batches(con, per_file)
    finally:
        con.execute(f"SET disabled_optimizers = '{_sql_str(disabled)}'")


def _insert_batches(
    con: duckdb.DuckDBPyConnection, per_file: Sequence[tuple[int, str, int]]
) -> None:
    """One INSERT per batch of files; the two filters (files, their ids) keep both join sides to
    the batch."""
    for batch in _file_batches(per_file, RESOURCES_BATCH_ROWS):
        names = ", ".join(f"'{_sql_str(name)}'" for _, name, _ in batch)
        con.execute(
            f"""
            INSERT INTO resources
            SELECT source || '/' || resource_type || '/' || resource_id AS resource_key,
                   resource_type, resource_id, version_id, last_updated, content_hash, resource,
                   tenant, pattern, source, organization, connection, fetched_at, run_id,
                   permitted_purpose, network_query_id
            FROM lake_rows l
            JOIN lake_file_ids f ON l.filename = f.filename
            SEMI JOIN current_rows c ON c.file_id = f.file_id AND c.lake_row = l.file_row_number
            WHERE l.filename IN ({names})
              AND f.file_id BETWEEN {batch[0][0]} AND {batch[-1][0]}
            """
        )


#: ``resources``: the JSON text zstd-compressed (see ``build_base_tables``).
RESOURCES_DDL = """
    CREATE TABLE resources (
        resource_key VARCHAR, resource_type VARCHAR, resource_id VARCHAR, version_id VARCHAR,
        last_updated VARCHAR, content_hash VARCHAR, resource VARCHAR USING COMPRESSION zstd,
        tenant VARCHAR, pattern VARCHAR, source VARCHAR, organization VARCHAR, connection VARCHAR,
        fetched_at TIMESTAMPTZ, run_id VARCHAR, permitted_purpose VARCHAR,
        network_query_id VARCHAR
    )
"""


def table_counts(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    """Row counts of every base table and view in the main schema."""
    names = [
        r[0]
        for r in con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main' "
            "AND table_catalog = current_database() ORDER BY table_name"
        ).fetchall()
    ]
    out: dict[str, int] = {}
    for name in names:
        row = con.execute(f'SELECT count(*) FROM "{name}"').fetchone()
        out[name] = int(row[0]) if row else 0
    return out


def build_warehouse(
    tenant: str,
    *,
    settings: Settings,
    control_plane: "ControlPlane | None" = None,
    steps: Sequence[BuildStep] | None = None,
    run_id: str | None = None,
    options: dict[str, Any] | None = None,
) -> BuildResult:
    """Build ``tenant``'s warehouse from the lake and publish it atomically."""
    started = time.perf_counter()
    settings.warehouse_dir.mkdir(parents=True, exist_ok=True)
    pulls = control_plane.list_pulls(tenant_id=tenant, limit=100_000) if control_plane else []
    ctx = BuildContext(
        tenant=tenant,
        settings=settings,
        control_plane=control_plane,
        run_id=run_id,
        options=dict(options or {}),
    )
    steps = default_steps() if steps is None else list(steps)
    final = warehouse_path(settings, tenant)
    storage: dict[str, Any] = {}
    with tenant_build_lock(settings, tenant):
        if ctx.options.get("compact", True):
            # Lake maintenance under the same lock: small files of a folder become one file.
            from medblocks_pipelines.lib.warehouse.compaction import compact_tenant

            compaction = compact_tenant(settings.lake, tenant)
            if compaction.folders:
                storage.update(compaction.as_metadata())
        if settings.lake_url:
            # Under the lock: this build sees every file landed before any earlier build finished.
            storage.update(
                mirror_tenant(settings.lake_url, settings.lake_root, tenant).as_metadata()
            )
        tmp = (
            settings.warehouse_dir
            / f".{normalise_id(tenant)}.{secrets.token_hex(4)}.building.duckdb"
        )
        timings: dict[str, float] = {}
        try:
            con = duckdb.connect(str(tmp))
            try:
                # Bounded memory whatever the lake size: DuckDB spills past the limit.
                con.execute(f"SET memory_limit='{WAREHOUSE_MEMORY_LIMIT}'")
                spill = settings.warehouse_dir / f".spill-{normalise_id(tenant)}"
                con.execute(f"SET temp_directory='{spill}'")
                t0 = time.perf_counter()
                build_base_tables(con, settings, tenant, pulls)
                timings["base"] = time.perf_counter() - t0
                for step in steps:
                    t0 = time.perf_counter()
                    step(con, ctx)
                    timings[getattr(step, "__name__", repr(step))] = time.perf_counter() - t0
                counts = table_counts(con)
                con.execute("CHECKPOINT")
            finally:
                con.close()
            os.replace(tmp, final)
            # The CDS index's shared facts of the warehouse just replaced go with it.
            from medblocks_pipelines.lib.warehouse.shared_facts import remove_tenant_files

            remove_tenant_files(final)
            if settings.warehouse_url:
                url = published_url(settings, tenant)
                t0 = time.perf_counter()
                storage["published_bytes"] = put_file(final, url)
                storage["publish_seconds"] = round(time.perf_counter() - t0, 3)
                remember_signature(url, final)
        except duckdb.Error as exc:
            raise WarehouseError(
                f"warehouse build for tenant {tenant} failed: {type(exc).__name__}",
                hint="run with --verbose for the DuckDB error",
            ) from exc
        finally:
            tmp.unlink(missing_ok=True)
            Path(str(tmp) + ".wal").unlink(missing_ok=True)
            shutil.rmtree(
                settings.warehouse_dir / f".spill-{normalise_id(tenant)}", ignore_errors=True
            )
    return BuildResult(
        tenant=tenant,
        path=final,
        table_counts=counts,
        duration_s=time.perf_counter() - started,
        step_timings=timings,
        storage=storage,
    )


def published_url(settings: Settings, tenant: str) -> str:
    """Where ``tenant``'s warehouse is published in object storage (``settings.warehouse_url``)."""
    return join(str(settings.warehouse_url), f"{normalise_id(tenant)}.duckdb")


def refresh_published(settings: Settings, tenant: str) -> bool:
    """Bring this machine's copy of ``tenant``'s published warehouse up to date.

    Downloads only when the published object changed. When the store cannot be reached but a local
    copy exists, the local copy is kept (and the failure logged): readers get the last good
    warehouse rather than an error. Returns True when a new copy arrived.
    """
    path = warehouse_path(settings, tenant)
    try:
        return fetch_if_changed(published_url(settings, tenant), path)
    except StorageError as exc:
        if path.exists():
            log.warning("keeping the local warehouse of tenant %s: %s", tenant, exc)
            return False
        if "does not exist" in str(exc):
            return False  # nothing published yet: open_warehouse says how to build it
        raise


def current_warehouse_path(settings: Settings, tenant: str) -> Path:
    """The local file of ``tenant``'s warehouse, refreshed from object storage first when the
    warehouses are published there (it may not exist: nothing built yet)."""
    if settings.warehouse_url:
        refresh_published(settings, tenant)
    return warehouse_path(settings, tenant)


def open_warehouse(tenant: str, *, settings: Settings) -> duckdb.DuckDBPyConnection:
    """Open ``tenant``'s published warehouse read-only (safe while a new build runs)."""
    path = current_warehouse_path(settings, tenant)
    if not path.exists():
        raise WarehouseError(
            f"no warehouse for tenant {tenant} yet",
            hint=f"build it with `medblocks warehouse build --tenant {tenant}`",
        )
    return duckdb.connect(str(path), read_only=True)
