"""Bounded landing of big NDJSON files: one DuckDB pass per chunk of lines, never a whole file.

The fast path (``LakeWriter.add_ndjson_file``) builds a temporary table of every line it lands;
a whole 300 MB file in one table under a 512 MB memory limit runs out of memory. Files larger
than :func:`chunk_bytes` (a share of the landing memory limit) are split here on line boundaries
into chunk files in a scratch folder and landed one chunk at a time, so memory is bounded by the
chunk, whatever the file size. A gzip file is decompressed into chunks when it is big; one that
cannot be decompressed whole (a truncated download) is landed line by line instead.

Conflicting duplicates ((type, id, versionId) repeated with other content) are checked across the
chunks of a file through a ``seen`` table of first hashes in the landing connection
(:func:`flag_seen_conflicts`), so splitting a file changes no outcome. Each landing connection
gets the memory limit, a spill folder (``temp_directory``) and ``MEDBLOCKS_LANDING_THREADS``.
"""

import gzip
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import duckdb

from medblocks_pipelines.lib.settings import Tuning
from medblocks_pipelines.lib.warehouse.ndjson_sql import CONFLICT_SQL

# DuckDB memory per landing connection; with the chunk size it bounds a landing's RSS.
LANDING_MEMORY_LIMIT = Tuning.from_env().landing_memory_limit  # MEDBLOCKS_LANDING_MEMORY_LIMIT

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 1 << 10}
_UNITS |= {"mib": 1 << 20, "gib": 1 << 30, "k": 10**3, "m": 10**6, "g": 10**9}

_BLOCK = 1 << 20


def memory_limit_bytes(limit: str | None = None) -> int:
    """``512MB``, ``1GiB``... in bytes (512 MB when unreadable)."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([a-zA-Z]*)\s*", limit or LANDING_MEMORY_LIMIT)
    if not m or m.group(2).lower() not in _UNITS:
        return 512 * 10**6
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


#: The bulk landing's batch size (``bulk_land.COALESCE_BYTES``): batches land in one pass.
MAX_CHUNK_BYTES = 64 << 20


def chunk_bytes() -> int:
    """Largest NDJSON chunk landed in one pass: an eighth of the memory limit (the table holds
    each line and the values the checks read), at most ``MAX_CHUNK_BYTES``, unless
    ``MEDBLOCKS_LANDING_CHUNK_BYTES`` says."""
    given = Tuning.from_env().landing_chunk_bytes
    if given:
        return given
    return max(1 << 20, min(MAX_CHUNK_BYTES, memory_limit_bytes() // 8))


def configure(con: duckdb.DuckDBPyConnection, scratch: Path, threads: int | None = None) -> None:
    """Settings of one landing connection: bounded memory, a place to spill, thread count
    (``MEDBLOCKS_LANDING_THREADS``, else ``threads``: parallel landing workers share the cores,
    else DuckDB's default)."""
    con.execute("SET preserve_insertion_order=false")
    con.execute(f"SET memory_limit='{LANDING_MEMORY_LIMIT}'")
    con.execute(f"SET temp_directory='{str(scratch).replace(chr(39), chr(39) * 2)}'")
    given = Tuning.from_env().landing_threads
    if given or threads:
        con.execute(f"SET threads={int(given or threads or 1)}")


@dataclass(frozen=True)
class Chunk:
    """Lines of a file: ``first_line`` lines come before them (for line numbers in reasons)."""

    path: Path
    first_line: int
    owned: bool  # a chunk file of ours (removed once landed), not the caller's file


def split(path: Path, scratch: Path, limit: int) -> list[Chunk] | None:
    """The chunks of ``path`` (the file itself when small enough); ``None`` for a gzip file that
    cannot be decompressed whole (the caller lands it line by line)."""
    gz = path.name.endswith(".gz")
    size = path.stat().st_size
    # A gzip file's text is typically 8-15x its size: small ones are read by DuckDB directly.
    if size <= (limit // 16 if gz else limit):
        return [Chunk(path, 0, owned=False)]
    try:
        return _split(path, scratch, limit, gz)
    except (EOFError, gzip.BadGzipFile, zlib.error):
        for leftover in scratch.glob("chunk-*.ndjson"):
            leftover.unlink()
        return None


def _split(path: Path, scratch: Path, limit: int, gz: bool) -> list[Chunk]:
    chunks: list[Chunk] = []
    first = lines = size = 0
    out = None
    opener = gzip.open if gz else open
    with opener(path, "rb") as src:
        while block := src.read(_BLOCK):
            while block:
                if out is None:
                    target = scratch / f"chunk-{len(chunks):05d}.ndjson"
                    out = open(target, "wb")  # noqa: SIM115 (closed when the chunk is full)
                    chunks.append(Chunk(target, first, owned=True))
                # Cut at the first line end once the chunk holds `limit` bytes.
                nl = block.find(b"\n", max(limit - size - 1, 0))
                if nl < 0:
                    out.write(block)
                    size += len(block)
                    lines += block.count(b"\n")
                    break
                head, block = block[: nl + 1], block[nl + 1 :]
                out.write(head)
                lines += head.count(b"\n")
                out.close()
                out = None
                first, lines, size = first + lines, 0, 0
    if out is not None:
        out.close()
    return chunks


SEEN_SQL = "CREATE TEMP TABLE seen (rtype VARCHAR, rid VARCHAR, vid VARCHAR, h VARCHAR)"


def flag_seen_conflicts(con: duckdb.DuckDBPyConnection) -> None:
    """Quarantine rows conflicting with an earlier chunk's first version of their key.

    Run before the in-chunk check (``flag_conflicts``), then :func:`remember` the chunk's keys.
    """
    con.execute(
        f"""
        UPDATE rows SET reason = {CONFLICT_SQL}
        FROM seen
        WHERE rows.reason IS NULL AND rows.vid IS NOT NULL AND rows.rtype = seen.rtype
          AND rows.rid = seen.rid AND rows.vid = seen.vid AND rows.h <> seen.h
        """
    )


def remember(con: duckdb.DuckDBPyConnection) -> None:
    """Add the first version of each new (type, id, versionId) of this chunk to ``seen``."""
    con.execute(
        """
        INSERT INTO seen
        SELECT rtype, rid, vid, arg_min(h, recno) FROM rows
        ANTI JOIN seen s ON s.rtype = rows.rtype AND s.rid = rows.rid AND s.vid = rows.vid
        WHERE reason IS NULL AND vid IS NOT NULL
        GROUP BY rtype, rid, vid
        """
    )
