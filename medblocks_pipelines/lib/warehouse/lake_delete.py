"""Removing one connection's rows from the lake (revoked consent with a delete policy).

Split out of ``lake.py``, which re-exports :func:`delete_connection_data`.
"""

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.compute  # noqa: F401 (pa.compute)
import pyarrow.parquet as pq

from medblocks_pipelines.lib.partitions import normalise_id
from medblocks_pipelines.lib.storage import is_remote, join, open_fs, storage_error


def delete_connection_data(
    lake_root: str | os.PathLike[str], tenant: str, connection_id: str
) -> int:
    """Remove every landed row of one connection (revoked consent with delete policy).

    Files are immutable, so each affected file is rewritten without the connection's rows into a new
    file (temp + rename locally, one PUT in object storage) and the old one removed; the new file
    is in place before the old one goes, so a concurrent build never misses the other rows.
    Returns the number of rows removed.
    """
    if is_remote(lake_root):
        return _delete_connection_data_remote(str(lake_root), tenant, connection_id)
    removed = 0
    base = Path(lake_root) / "resources" / f"tenant={normalise_id(tenant)}"
    if not base.exists():
        return 0
    for path in sorted(base.rglob("*.parquet")):
        table = pq.read_table(path)
        keep, hits = _without_connection(table, connection_id)
        if not hits:
            continue
        if keep.num_rows:
            tmp = path.with_name(path.name + ".tmp")
            pq.write_table(keep, tmp)
            os.replace(tmp, path.with_name("r" + path.name))
        path.unlink()
        removed += hits
    return removed


def _without_connection(table: pa.Table, connection_id: str) -> tuple[pa.Table, int]:
    mask = pa.compute.equal(table["connection"], connection_id)
    hits = pa.compute.sum(mask).as_py() or 0
    return (table.filter(pa.compute.invert(mask)) if hits else table), int(hits)


def _delete_connection_data_remote(lake_url: str, tenant: str, connection_id: str) -> int:
    base = join(lake_url, "resources", f"tenant={normalise_id(tenant)}")
    fs, root = open_fs(base)
    try:
        fs.invalidate_cache(root)
        keys = sorted(
            k for k in (fs.find(root) if fs.exists(root) else []) if k.endswith(".parquet")
        )
        removed = 0
        for key in keys:
            with fs.open(key, "rb") as fh:
                table = pq.read_table(fh)
            keep, hits = _without_connection(table, connection_id)
            if not hits:
                continue
            if keep.num_rows:
                folder, _, name = key.rpartition("/")
                with fs.open(f"{folder}/r{name}", "wb") as out:
                    pq.write_table(keep, out)
            fs.rm_file(key)
            removed += hits
    except OSError as exc:
        raise storage_error("rewrite lake files under", base, exc) from exc
    return removed
