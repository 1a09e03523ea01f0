"""The CDS index's facts, shared by every serving process through one memory-mapped file.

``medblocks serve --workers N`` loads each tenant's index in every worker. The facts frame is most
of an index (100k persons: ~500 MiB per worker when each held its own copy). The first worker to
load a published warehouse writes the frame as an uncompressed Arrow IPC file beside it
(``<warehouse_dir>/.cds-index/<tenant>.<inode>-<mtime_ns>-<size>.<policy>.arrow``, written to a
temporary name and linked into place, so the first writer's file stays when several write at once);
every worker then maps that file (``pyarrow.memory_map``
and ``polars.from_arrow``, which keeps the strings in the mapped buffers), so the text of the facts
sits once in the page cache, shared, instead of once per process. A later worker finds the file
and skips the facts query altogether.

The name carries the published file's signature and the read policy's version, so a new publish or
a policy change gets a new file. The warehouse build removes a tenant's files when it publishes
(:func:`remove_tenant_files`: the facts of a warehouse that is gone, rows of a revoked consent
among them, do not outlive it on disk), and a serving process removes the others' when it writes
its own (a process still serving an earlier snapshot keeps its mapping: Linux keeps an unlinked
file's pages until they are unmapped). A server that mirrors a warehouse from object storage
cleans its own folder the second way.

Here, beside the build, rather than in ``lib/cds`` (its one reader), because the files are derived
from a publish and the build must remove them with it. Anything that goes wrong here (no room, a read-only
folder, a damaged file) leaves the frame in process memory, as before: the index never fails for
want of sharing, and a damaged file is written again.

The files are only ever put in place whole (link, or a rename over a damaged one) or removed,
never written in place: a file truncated or
rewritten under a mapping makes the processes reading it fault (SIGBUS). Remove the folder to
reclaim its space; never edit a file in it.
"""

import contextlib
import hashlib
import logging
import os
import secrets
from pathlib import Path

import polars as pl
import pyarrow as pa

log = logging.getLogger(__name__)

FOLDER = ".cds-index"


def shared_path(published: Path, signature: tuple[int, int, int], policy: str | None) -> Path:
    """Where the facts of ``published`` at ``signature`` under read policy ``policy`` are kept."""
    tag = hashlib.sha256((policy or "").encode()).hexdigest()[:12]
    ino, mtime, size = signature
    # Tenant file names are normalised ids ([a-z0-9-]): "<stem>." never matches another tenant.
    return published.parent / FOLDER / f"{published.stem}.{ino}-{mtime}-{size}.{tag}.arrow"


def map_facts(path: Path) -> pl.DataFrame | None:
    """The facts frame over the mapped file at ``path`` (None when there is none, or it is
    unreadable)."""
    try:
        source = pa.memory_map(str(path))
        table = pa.ipc.open_file(source).read_all()
    except FileNotFoundError:
        return None
    except (OSError, pa.ArrowException) as exc:
        log.warning(
            "cds index: shared facts unreadable, loading them again (%s)", type(exc).__name__
        )
        return None
    frame = pl.from_arrow(table)
    return frame if isinstance(frame, pl.DataFrame) else None


def share_facts(path: Path, facts: pl.DataFrame) -> pl.DataFrame:
    """Write ``facts`` to ``path`` (unless another process already has) and return the frame over
    the mapped file; ``facts`` itself when the file cannot be written or read back."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        mapped = map_facts(path)
        if mapped is None:  # none yet, or a damaged one: (re)write it
            damaged = path.exists()
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(3)}.tmp")
            try:
                facts.write_ipc(tmp, compression="uncompressed")
                if damaged:
                    os.replace(tmp, path)
                else:
                    # Workers starting together all load at once: the first file in place wins
                    # (a link fails where a rename would replace), so every one maps the same
                    # file and its pages are in memory once.
                    with contextlib.suppress(FileExistsError):
                        os.link(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
            mapped = map_facts(path)
        _remove(path.parent, path.name.split(".", 1)[0], keep=path)  # earlier publishes'
    except OSError as exc:
        log.warning("cds index: facts kept in this process (%s)", type(exc).__name__)
        return facts
    if mapped is None or mapped.schema != facts.schema or mapped.height != facts.height:
        return facts
    return mapped


def remove_tenant_files(published: Path) -> None:
    """Remove every shared facts file of ``published``'s tenant (the build, as it publishes)."""
    _remove(published.parent / FOLDER, published.stem, keep=None)


def _remove(folder: Path, stem: str, *, keep: Path | None) -> None:
    """Remove tenant ``stem``'s files in ``folder`` but ``keep``, and temporary files a killed
    writer left; a writer at work on ``keep`` keeps its own."""
    if not folder.is_dir():
        return
    for other in folder.iterdir():
        name = other.name.lstrip(".")
        if other == keep or not name.startswith(f"{stem}.") or ".arrow" not in name:
            continue
        if keep is not None and other.name.startswith(f".{keep.name}."):
            continue  # another process writing this same file right now
        other.unlink(missing_ok=True)
