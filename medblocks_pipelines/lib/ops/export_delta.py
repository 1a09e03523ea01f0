"""What an export run sends: the rows changed or deleted since the destination's committed
export (compared by content hash against that export's saved snapshot), filtered by the read
policy; and the snapshots themselves (see :mod:`~.exports` on why content, not time)."""

import secrets as pysecrets
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from medblocks_pipelines.lib.warehouse.read_policy import (
    ConsumerRule,
    ReadCounts,
    consumer_filter,
    read_counts,
)

# Reference targets first, so a strict receiver can resolve references in later bundles.
_TYPE_ORDER = ("Organization", "Location", "Practitioner", "PractitionerRole", "Patient")
_STATE_SCHEMA = pa.schema([("resource_key", pa.string()), ("content_hash", pa.string())])


# -- delta -----------------------------------------------------------------------------------
def _state_file(state_dir: Path, seq: int) -> Path:
    return state_dir / f"state-{seq:06d}.parquet"


def prepare_delta(
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


def save_state(con: duckdb.DuckDBPyConnection, state_dir: Path, seq: int) -> None:
    """Save this run's (resource_key, content_hash) snapshot atomically: the next delta reads it."""
    state_dir.mkdir(parents=True, exist_ok=True)
    final = _state_file(state_dir, seq)
    tmp = final.with_suffix(f".{pysecrets.token_hex(4)}.tmp")
    con.execute(
        f"COPY (SELECT resource_key, content_hash FROM current ORDER BY resource_key) "
        f"TO '{tmp}' (FORMAT parquet)"
    )
    tmp.replace(final)


def prune_states(state_dir: Path, *, keep: int) -> None:
    """Remove snapshots older than sequence ``keep`` (only the committed one is ever read)."""
    for path in state_dir.glob("state-*.parquet"):
        try:
            n = int(path.stem.split("-")[1])
        except (IndexError, ValueError):
            continue
        if n < keep:
            path.unlink(missing_ok=True)


def changed_types(con: duckdb.DuckDBPyConnection) -> list[str]:
    """The resource types in ``changed``, reference targets first."""
    found = [r[0] for r in con.execute("SELECT DISTINCT resource_type FROM changed").fetchall()]
    first = [t for t in _TYPE_ORDER if t in found]
    return first + sorted(t for t in found if t not in _TYPE_ORDER)


def record_batches(
    con: duckdb.DuckDBPyConnection, sql: str, params: list[Any], size: int = 2000
) -> Iterator[pa.RecordBatch]:
    """Arrow record batches of ``sql``, streamed (a type may not fit in memory)."""
    reader = con.sql(sql, params=params).to_arrow_reader(size)
    yield from reader
