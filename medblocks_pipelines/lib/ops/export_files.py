"""File destinations (a folder or S3-compatible storage): one NDJSON or Parquet file per type
under a deterministic name, deletions as transaction Bundles, ``manifest.json`` written last."""

import gzip
import json
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from medblocks_pipelines.lib.errors import ConfigError
from medblocks_pipelines.lib.ops.export_delta import changed_types, record_batches
from medblocks_pipelines.lib.ops.rows import ExportDestination

if TYPE_CHECKING:  # exports.py imports this module
    from medblocks_pipelines.lib.ops.exports import ExportResult


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


def write_files(
    con: duckdb.DuckDBPyConnection,
    dest: ExportDestination,
    creds: Mapping[str, str],
    result: "ExportResult",
    tenant: str,
) -> None:
    """One file per changed type and the deletions under ``<root>/<tenant>/<destination>/<seq>``,
    then the manifest."""
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
    for rtype in changed_types(con):
        sql = (
            "SELECT resource_id, version_id, last_updated, content_hash, source, fetched_at, "
            "resource FROM changed WHERE resource_type = ? ORDER BY source, resource_id"
        )
        if kind == "ndjson":
            name = f"{rtype}.ndjson" + (".gz" if gz else "")
            count, size = _write_ndjson(
                fs, f"{prefix}/{name}", record_batches(con, sql, [rtype]), gz
            )
        else:
            name = f"{rtype}.parquet"
            count, size = _write_parquet(fs, f"{prefix}/{name}", record_batches(con, sql, [rtype]))
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
