"""The landing lake: immutable Parquet files, one row per fetched resource version.

Layout (hive-style, so DuckDB and Polars prune by directory)::

    <lake>/resources/tenant=T/pattern=P/source=S/resource_type=R/<run_id>-<n>.parquet
    <lake>/quarantine/tenant=T/pattern=P/source=S/<run_id>-<n>.parquet

Each file is written to ``*.parquet.tmp`` and renamed, so readers (and a warehouse build) never see a partial
file, and a run killed mid-write leaves only whole files behind. With the lake in object storage
(``s3://...``) each file is staged locally and uploaded as one object, which appears whole or not at
all (see ``lib/storage.py``). Files are never rewritten: a re-run adds
new files and the warehouse build deduplicates by ``(source, resource_type, resource_id, content_hash)``.

The resource JSON is stored exactly as the source sent it (decimals such as ``7.10`` keep their precision).
Rows that fail the checks at the door go to quarantine with the reason, never rewritten: not UTF-8,
not a JSON object, a line over ``max_line_bytes``, a truncated gzip's tail, the FHIR R4 checks of
``lib/fhir/validate.py`` (known type, id, the file's type, required elements, primitive formats),
and a later line of a file that repeats a (type, id, versionId) with other content.
"""

import json
import os
import secrets
import shutil
import tempfile
import weakref
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from medblocks_pipelines.lib.errors import LandingError
from medblocks_pipelines.lib.fhir import validate
from medblocks_pipelines.lib.fhir.compartment import PatientScope
from medblocks_pipelines.lib.partitions import normalise_id
from medblocks_pipelines.lib.settings import Tuning
from medblocks_pipelines.lib.storage import is_remote, open_fs
from medblocks_pipelines.lib.warehouse.lake_delete import (
    delete_connection_data as delete_connection_data,
)
from medblocks_pipelines.lib.warehouse.lake_layout import (
    LATE_PROVENANCE_COLUMNS as LATE_PROVENANCE_COLUMNS,
)
from medblocks_pipelines.lib.warehouse.lake_layout import (
    MAX_RAW_CHARS,
    QUARANTINE_SCHEMA,
    RESOURCE_SCHEMA,
    LandingStats,
    content_hash,
)
from medblocks_pipelines.lib.warehouse.lake_layout import Provenance as Provenance
from medblocks_pipelines.lib.warehouse.lake_layout import mirror_tenant as mirror_tenant
from medblocks_pipelines.lib.warehouse.lake_layout import quarantine_glob as quarantine_glob
from medblocks_pipelines.lib.warehouse.lake_layout import resources_glob as resources_glob
from medblocks_pipelines.lib.warehouse.ndjson_chunks import (
    LANDING_MEMORY_LIMIT,  # noqa: F401 (re-exported: where it was)
    SEEN_SQL,
    Chunk,
    chunk_bytes,
    flag_seen_conflicts,
    remember,
)
from medblocks_pipelines.lib.warehouse.ndjson_chunks import configure as configure_landing
from medblocks_pipelines.lib.warehouse.ndjson_chunks import split as split_ndjson
from medblocks_pipelines.lib.warehouse.ndjson_lines import MAX_LINE_BYTES, read_lines
from medblocks_pipelines.lib.warehouse.ndjson_sql import (
    conflict_text,
    explain_rejected,
    flag_conflicts,
    rows_sql,
)


def _now() -> datetime:
    return datetime.now(UTC)


class LakeWriter:
    """Writes one run's rows into the lake. Use as a context manager; rows flush in batches."""

    def __init__(
        self,
        lake_root: str | os.PathLike[str],
        provenance: Provenance,
        *,
        batch_rows: int = 20_000,
        patient_scope: PatientScope | None = None,
        max_line_bytes: int = MAX_LINE_BYTES,
    ) -> None:
        if provenance.pattern == "network" and not (
            provenance.permitted_purpose and provenance.network_query_id
        ):
            # A network row must say why it was let in, or no consumer may ever read it.
            raise LandingError(
                "network rows need the permitted purpose and the network query id",
                hint="set Provenance.permitted_purpose and network_query_id from the audited query",
            )
        # ``patient_scope``: a patient-scoped connection lands only its patient's compartment;
        # anything else is quarantined (lib/fhir/compartment.py).
        self.patient_scope = patient_scope
        # With an object-store lake, files are staged in a private local folder and uploaded
        # whole; ``root`` is where files are staged (the lake itself when it is local).
        self.lake = lake_root
        self._remote: tuple[Any, str] | None = None
        if is_remote(lake_root):
            self._remote = open_fs(str(lake_root))
            self.root = Path(tempfile.mkdtemp(prefix="medblocks-lake-"))
        else:
            self.root = Path(lake_root)
        self.prov = provenance
        self.batch_rows = batch_rows
        self.max_line_bytes = max_line_bytes
        #: DuckDB threads of a fast-path landing (None: DuckDB's default, every core).
        self.landing_threads: int | None = None
        # FHIR validation at the door; off only for the ingest benchmark's baseline and for
        # tests that need a lake landed before the checks existed.
        self.validate = not Tuning.from_env().skip_validation  # MEDBLOCKS_BENCH_SKIP_VALIDATION
        # (type, id, versionId) -> content hash of the current file's rows (line-by-line pass).
        self._seen: dict[tuple[str, str, str], str] | None = None
        self.stats = LandingStats()
        self._fetched_at = _now()
        self._rows: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
        self._quarantine: list[tuple[Any, ...]] = []
        self._seq = 0
        self._tag = secrets.token_hex(3)
        self._closed = False
        #: The fast path's DuckDB connection, its scratch folder and the threads it was set to.
        self._landing: (
            tuple[duckdb.DuckDBPyConnection, Path, weakref.finalize[[str], LakeWriter], int | None]
            | None
        )
        self._landing = None
        #: A fast-path statement failed on the connection (it may be invalidated): replace it.
        self._landing_failed = False
        self._dirs = {
            "tenant": normalise_id(provenance.tenant),
            "pattern": normalise_id(provenance.pattern),
            "source": normalise_id(provenance.source),
        }

    def __repr__(self) -> str:
        return f"LakeWriter(tenant={self.prov.tenant!r}, source={self.prov.source!r})"

    def sibling(self) -> "LakeWriter":
        """A new writer to the same lake with the same provenance (parallel landing threads)."""
        return LakeWriter(
            self.lake,
            self.prov,
            batch_rows=self.batch_rows,
            patient_scope=self.patient_scope,
            max_line_bytes=self.max_line_bytes,
        )

    # -- context manager -----------------------------------------------------------------------
    def __enter__(self) -> "LakeWriter":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Flush what is complete even when the caller failed: every row landed is a row not lost,
        # and re-runs deduplicate.
        self.close()

    # -- adding rows ---------------------------------------------------------------------------
    def add(
        self,
        resource: dict[str, Any] | str | bytes,
        *,
        origin: str | None = None,
        expected_type: str | None = None,
    ) -> bool:
        """Land one resource; returns False when it was quarantined instead.

        Bytes must be UTF-8 (never rewritten); the resource must pass the FHIR checks of
        ``lib/fhir/validate.py`` (and be an ``expected_type`` when given).
        """
        if isinstance(resource, dict):
            obj: Any = resource
            text = json.dumps(resource, separators=(",", ":"), ensure_ascii=False)
        else:
            if isinstance(resource, bytes):
                try:
                    resource = resource.decode("utf-8")
                except UnicodeDecodeError as exc:
                    bad = f"invalid_utf8: byte {exc.start} is not UTF-8"
                    self.quarantine(resource.strip(), bad, origin=origin)
                    return False
            text = resource.strip()
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                self.quarantine(text, f"malformed JSON: {exc.msg} at char {exc.pos}", origin=origin)
                return False
        reason = _invalid_reason(obj, expected_type) if self.validate else _structure_reason(obj)
        if reason is None and self.patient_scope is not None:
            reason = self.patient_scope.check(obj)
        if reason is None:
            reason = self._conflict_reason(obj, text)
        if reason:
            rtype = obj.get("resourceType") if isinstance(obj, dict) else None
            self.quarantine(
                text, reason, resource_type=rtype if isinstance(rtype, str) else None, origin=origin
            )
            return False
        meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
        rtype = obj["resourceType"]
        self._append(
            rtype,
            (
                text,
                rtype,
                obj["id"],
                _str_or_none(meta.get("versionId")),
                _str_or_none(meta.get("lastUpdated")),
                content_hash(text),
                False,
                origin,
            ),
        )
        return True

    def add_tombstone(
        self,
        resource_type: str,
        resource_id: str,
        *,
        deleted_at: str | None = None,
        origin: str | None = None,
    ) -> None:
        """Land a deletion: the resource is gone at the source as of ``deleted_at`` (source time)."""
        self._append(
            resource_type,
            (None, resource_type, resource_id, None, deleted_at, None, True, origin),
        )
        self.stats.tombstones += 1

    def quarantine(
        self,
        raw: str | bytes,
        reason: str,
        *,
        resource_type: str | None = None,
        origin: str | None = None,
    ) -> None:
        """Keep a bad record with the reason; it is reported, never dropped silently."""
        # Undecodable bytes stay visible as \\xNN escapes: the evidence is kept, not rewritten.
        text = raw.decode("utf-8", "backslashreplace") if isinstance(raw, bytes) else raw
        self._quarantine.append(
            (text[:MAX_RAW_CHARS], reason, resource_type, origin, content_hash(text))
        )
        self.stats.quarantined += 1
        self.stats.quarantine_reasons[_reason_class(reason)] += 1
        if len(self._quarantine) >= self.batch_rows:
            self._flush_quarantine()

    def add_ndjson_file(
        self,
        path: str | os.PathLike[str],
        *,
        origin: str | None = None,
        expected_type: str | None = None,
    ) -> None:
        """Land a whole (optionally gzipped) NDJSON file at DuckDB scan speed.

        Each line is parsed once: DuckDB reads the objects, extracts the fields the lake needs and
        every element the FHIR checks read in one multi-path ``json_extract``, evaluates the checks
        (``validate.valid_sql``) into a temporary table, and writes the Parquet files from it.
        Rows of another type than ``expected_type`` (the type the file holds, when known) are
        quarantined. A file larger than the chunk size (a share of ``LANDING_MEMORY_LIMIT``) is
        landed chunk by chunk (``ndjson_chunks``), so no file size runs out of memory. A file
        (chunk) DuckDB cannot read whole (malformed lines, bytes that are not UTF-8, a
        truncated gzip) falls back to a line-by-line pass, so every bad line is quarantined with
        its line number and reason and every good one still lands.
        """
        path = Path(path)
        origin = origin or path.name
        if not path.exists():
            raise LandingError(f"NDJSON file {path.name} does not exist")
        if self.patient_scope is not None:
            # The scope check reads each resource's references: the line-by-line path does it.
            self._add_lines_slow(path, origin, expected_type)
            return
        con, scratch = self._landing_connection()
        work = Path(tempfile.mkdtemp(prefix="file-", dir=scratch))  # this file's chunks
        try:
            chunks = split_ndjson(path, work, chunk_bytes())
            if chunks is None:  # a gzip stream that ends early: line by line
                self._add_lines_slow(path, origin, expected_type)
                return
            if len(chunks) > 1:
                con.execute(SEEN_SQL)
            records = 0
            for chunk in chunks:
                records += self._land_chunk(con, chunk, origin, expected_type, records, len(chunks))
                if chunk.owned:
                    chunk.path.unlink()
            con.execute("DROP TABLE IF EXISTS seen")
        except BaseException:
            # A connection a statement failed on may hold a half-built temp table, or be
            # invalidated (DuckDB after an out-of-memory): the next file gets a fresh one.
            self._close_landing_connection()
            raise
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _landing_connection(self) -> tuple[duckdb.DuckDBPyConnection, Path]:
        """This writer's DuckDB connection for the fast path, opened on first use and kept for
        every later file (opening one costs ~20 ms, as much as landing a small file; an export
        of many small files paid it per file). One writer is used by one thread at a time (the
        landing pool gives each worker its own sibling), so the connection is never shared."""
        threads = self.landing_threads
        if self._landing is not None and self._landing[3] == threads and not self._landing_failed:
            return self._landing[0], self._landing[1]
        self._close_landing_connection()
        scratch = Path(tempfile.mkdtemp(prefix="medblocks-landing-"))
        # Removed on close(), or when a writer nobody closed is collected.
        cleanup = weakref.finalize(self, _remove_scratch, str(scratch))
        con = duckdb.connect()
        try:
            configure_landing(con, scratch, threads)
        except BaseException:
            con.close()
            cleanup()
            raise
        self._landing = (con, scratch, cleanup, threads)
        return con, scratch

    def _close_landing_connection(self) -> None:
        self._landing_failed = False
        if self._landing is not None:
            con, _, cleanup, _ = self._landing
            self._landing = None
            try:
                con.close()
            finally:
                cleanup()

    def _land_chunk(
        self,
        con: duckdb.DuckDBPyConnection,
        chunk: Chunk,
        origin: str,
        expected_type: str | None,
        first: int,
        of: int,
    ) -> int:
        """Land one chunk of a file through DuckDB; returns how many records it held."""
        sql = rows_sql(chunk.path, self.max_line_bytes, self.validate, expected_type, first)
        try:
            con.execute(sql)
        except duckdb.Error:
            # Unreadable as a whole (e.g. a gzip stream that ends early): line by line. The
            # connection is replaced after this file (an error may have invalidated it).
            self._landing_failed = True
            return self._add_lines_slow(chunk.path, origin, expected_type, chunk.first_line)
        got = con.execute("SELECT count(*), count(*) FILTER (raw IS NULL) FROM rows").fetchone()
        if got and got[1]:
            con.execute("DROP TABLE rows")
            return self._add_lines_slow(chunk.path, origin, expected_type, chunk.first_line)
        if self.validate:
            explain_rejected(con, expected_type)
        if of > 1:  # conflicts with earlier chunks' first versions, then within the chunk
            flag_seen_conflicts(con)
        flag_conflicts(con)
        if of > 1:
            remember(con)
        self._copy_fast(con, origin)
        return int(got[0]) if got else 0

    # -- internals -----------------------------------------------------------------------------
    def _conflict_reason(self, obj: dict[str, Any], text: str) -> str | None:
        # The line-by-line twin of _flag_conflicts_sql (only while a file is read line by line).
        meta = obj.get("meta")
        vid = meta.get("versionId") if isinstance(meta, dict) else None
        if self._seen is None or vid is None:
            return None
        rtype, rid, vid = obj["resourceType"], obj["id"], str(vid)
        digest = content_hash(text)
        if self._seen.setdefault((rtype, rid, vid), digest) == digest:
            return None
        return conflict_text(rtype, rid, vid)

    def _add_lines_slow(
        self, path: Path, origin: str, expected_type: str | None = None, first_line: int = 0
    ) -> int:
        """Line by line (``first_line``: lines of the file before this chunk); returns the lines
        read."""
        self._seen = {}
        lines = 0
        try:
            for line in read_lines(path, max_line=self.max_line_bytes, keep=MAX_RAW_CHARS):
                lines = line.lineno
                where = f"{origin}:{line.lineno + first_line}"
                if line.problem is None:
                    self.add(line.data, origin=where, expected_type=expected_type)
                    continue
                if line.problem.startswith("truncated_gzip") and line.data.strip():
                    # A tail that is a whole resource (cut just before its newline) still lands.
                    try:
                        whole = isinstance(json.loads(line.data), dict)
                    except (json.JSONDecodeError, UnicodeDecodeError):
                        whole = False
                    if whole:
                        self.add(line.data, origin=where, expected_type=expected_type)
                        self.quarantine(b"", line.problem, origin=where)
                        continue
                self.quarantine(line.data, line.problem, origin=where)
        finally:
            self._seen = None
        return lines

    def _copy_fast(self, con: duckdb.DuckDBPyConnection, origin: str) -> None:
        p = self.prov
        fetched = self._fetched_at.isoformat()
        for raw, reason, rtype, recno in con.execute(
            f"SELECT left(raw, {MAX_RAW_CHARS}), reason, rtype, recno FROM rows "
            "WHERE reason IS NOT NULL ORDER BY recno"
        ).fetchall():
            self.quarantine(raw, reason, resource_type=rtype, origin=f"{origin}#{recno}")
        counts = con.execute(
            "SELECT rtype, count(*) FROM rows WHERE reason IS NULL GROUP BY rtype ORDER BY rtype"
        ).fetchall()
        for rtype, n in counts:
            out = self._next_path(rtype)
            tmp = out.with_name(out.name + ".tmp")
            con.execute(
                f"""
                COPY (
                  SELECT raw AS resource, rtype AS resource_type, rid AS resource_id,
                         vid AS version_id, lu AS last_updated, h AS content_hash,
                         false AS deleted,
                         ? AS tenant, ? AS pattern, ? AS source,
                         ?::VARCHAR AS organization, ?::VARCHAR AS connection,
                         ?::TIMESTAMPTZ AS fetched_at, ? AS run_id,
                         ? || '#' || recno AS origin,
                         ?::VARCHAR AS permitted_purpose, ?::VARCHAR AS network_query_id
                  FROM rows
                  WHERE reason IS NULL AND rtype = ?
                ) TO '{_sql_str(str(tmp))}' (FORMAT parquet, COMPRESSION zstd)
                """,
                [
                    p.tenant,
                    p.pattern,
                    p.source,
                    p.organization,
                    p.connection,
                    fetched,
                    p.run_id,
                    origin,
                    p.permitted_purpose,
                    p.network_query_id,
                    rtype,
                ],
            )
            self.stats.bytes += self._publish(tmp, out)
            self.stats.counts_by_type[rtype] += int(n)
            self.stats.files += 1
        con.execute("DROP TABLE rows")

    def _append(self, rtype: str, row: tuple[Any, ...]) -> None:
        rows = self._rows[rtype]
        rows.append(row)
        if not row[6]:
            self.stats.counts_by_type[rtype] += 1
        if len(rows) >= self.batch_rows:
            self._flush_type(rtype)

    def _next_path(self, rtype: str) -> Path:
        d = self._dirs
        folder = (
            self.root
            / "resources"
            / f"tenant={d['tenant']}"
            / f"pattern={d['pattern']}"
            / f"source={d['source']}"
            / f"resource_type={rtype}"
        )
        folder.mkdir(parents=True, exist_ok=True)
        self._seq += 1
        return folder / f"{normalise_id(self.prov.run_id)}-{self._tag}-{self._seq:05d}.parquet"

    def _provenance_arrays(self, n: int) -> dict[str, pa.Array]:
        """The provenance columns every lake and quarantine row carries, for ``n`` rows."""
        p = self.prov
        return {
            "tenant": pa.array([p.tenant] * n, pa.string()),
            "pattern": pa.array([p.pattern] * n, pa.string()),
            "source": pa.array([p.source] * n, pa.string()),
            "organization": pa.array([p.organization] * n, pa.string()),
            "connection": pa.array([p.connection] * n, pa.string()),
            "fetched_at": pa.array([self._fetched_at] * n, pa.timestamp("us", tz="UTC")),
            "run_id": pa.array([p.run_id] * n, pa.string()),
            "permitted_purpose": pa.array([p.permitted_purpose] * n, pa.string()),
            "network_query_id": pa.array([p.network_query_id] * n, pa.string()),
        }

    def _flush_type(self, rtype: str) -> None:
        rows = self._rows.pop(rtype, [])
        if not rows:
            return
        cols = list(zip(*rows, strict=True))
        n = len(rows)
        table = pa.table(
            {
                "resource": pa.array(cols[0], pa.string()),
                "resource_type": pa.array(cols[1], pa.string()),
                "resource_id": pa.array(cols[2], pa.string()),
                "version_id": pa.array(cols[3], pa.string()),
                "last_updated": pa.array(cols[4], pa.string()),
                "content_hash": pa.array(cols[5], pa.string()),
                "deleted": pa.array(cols[6], pa.bool_()),
                **self._provenance_arrays(n),
                "origin": pa.array(cols[7], pa.string()),
            },
            schema=RESOURCE_SCHEMA,
        )
        self._write(table, self._next_path(rtype))

    def _flush_quarantine(self) -> None:
        rows, self._quarantine = self._quarantine, []
        if not rows:
            return
        p = self.prov
        n = len(rows)
        cols = list(zip(*rows, strict=True))
        table = pa.table(
            {
                "raw": pa.array(cols[0], pa.string()),
                "reason": pa.array(cols[1], pa.string()),
                "resource_type": pa.array(cols[2], pa.string()),
                "origin": pa.array(cols[3], pa.string()),
                "raw_hash": pa.array(cols[4], pa.string()),
                **self._provenance_arrays(n),
            },
            schema=QUARANTINE_SCHEMA,
        )
        d = self._dirs
        folder = (
            self.root
            / "quarantine"
            / f"tenant={d['tenant']}"
            / f"pattern={d['pattern']}"
            / f"source={d['source']}"
        )
        folder.mkdir(parents=True, exist_ok=True)
        self._seq += 1
        self._write(table, folder / f"{normalise_id(p.run_id)}-{self._tag}-{self._seq:05d}.parquet")

    def _write(self, table: pa.Table, out: Path) -> None:
        tmp = out.with_name(out.name + ".tmp")
        try:
            pq.write_table(table, tmp, compression="zstd")
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise LandingError(f"cannot write lake file {out.name}: {exc.strerror}") from exc
        self.stats.bytes += self._publish(tmp, out)
        self.stats.files += 1

    def _publish(self, tmp: Path, out: Path) -> int:
        """Move a complete staged file to its place in the lake; returns its size."""
        size = tmp.stat().st_size
        if self._remote is None:
            try:
                os.replace(tmp, out)
            except OSError as exc:
                tmp.unlink(missing_ok=True)
                raise LandingError(f"cannot write lake file {out.name}: {exc.strerror}") from exc
            return size
        fs, base = self._remote
        key = f"{base}/{out.relative_to(self.root).as_posix()}"
        try:
            fs.put_file(str(tmp), key)
        except Exception as exc:  # noqa: BLE001 (any client error means the file is not stored)
            raise LandingError(
                f"cannot upload lake file {out.name}: {type(exc).__name__}",
                hint="check the lake URL (MEDBLOCKS_LAKE_ROOT) and its credentials",
            ) from exc
        finally:
            tmp.unlink(missing_ok=True)
        return size

    def flush(self) -> None:
        """Write every buffered row now."""
        for rtype in list(self._rows):
            self._flush_type(rtype)
        self._flush_quarantine()

    def close(self) -> LandingStats:
        """Flush and finish; returns the stats. Idempotent."""
        if not self._closed:
            try:
                self.flush()
            finally:
                self._closed = True
                self._close_landing_connection()
                if self._remote is not None:
                    shutil.rmtree(self.root, ignore_errors=True)
        return self.stats


def _structure_reason(obj: Any) -> str | None:
    # What the lake itself needs (the benchmark's no-validation baseline checks only this).
    return validate.invalid_reason(obj, structure_only=True)


def _invalid_reason(obj: Any, expected_type: str | None = None) -> str | None:
    return validate.invalid_reason(obj, expected_type)


def _reason_class(reason: str) -> str:
    # Reasons carry positions ("at char 12"); metadata groups them by kind.
    return reason.split(":", 1)[0]


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def _remove_scratch(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _sql_str(value: str) -> str:
    return value.replace("'", "''")


def remove_tree(path: Path) -> None:
    """Delete a lake subtree (tests)."""
    shutil.rmtree(path, ignore_errors=True)
