"""Object storage for the lake and the published warehouses, through fsspec.

``MEDBLOCKS_LAKE_ROOT`` and ``MEDBLOCKS_WAREHOUSE_DIR`` take a local folder or an object-store URL
(``s3://bucket/prefix``; ``gs://`` and ``az://`` work when gcsfs/adlfs are installed). With URLs,
several machines land into one lake and publish tenant warehouses that every other machine reads.

How each side uses the store, and why it stays correct without a shared file system:

- Lake files are immutable and uniquely named, written whole by one PUT (an object appears
  complete or not at all), so writers need no coordination.
- A warehouse build mirrors the tenant's lake prefix to local disk first (only files it does not
  have yet: names never change content), because DuckDB scans local Parquet far faster than through
  a Python file system, and the build runs under the tenant's build lock so it sees at least every
  file landed before the lock was taken.
- A published warehouse is one object, uploaded after the local atomic rename. Readers download a
  new copy when the object's ETag changes, into a temporary file renamed over their local copy,
  so a reader never opens a half-downloaded file.

Credentials come from the standard environment of each backend (``AWS_ACCESS_KEY_ID``,
``AWS_ENDPOINT_URL`` for S3-compatible servers, instance roles...), never from our database.
``MEDBLOCKS_STORAGE_OPTIONS`` may add fsspec options as JSON (for example
``{"client_kwargs": {"region_name": "eu-west-1"}}``).
"""

import os
import secrets
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medblocks_pipelines.lib.errors import ConfigError, StorageError

if TYPE_CHECKING:  # imported when storage is used: `medblocks --help` reads settings without it
    import fsspec

LOCAL_PROTOCOLS = {"file", "local"}


def is_remote(location: str | os.PathLike[str] | None) -> bool:
    """True when ``location`` is an object-store URL rather than a local folder."""
    if location is None or isinstance(location, os.PathLike):
        return False
    protocol, sep, _ = str(location).partition("://")
    return bool(sep) and protocol.lower() not in LOCAL_PROTOCOLS


def storage_options() -> dict[str, Any]:
    """Extra fsspec options from ``MEDBLOCKS_STORAGE_OPTIONS`` (JSON object), if set."""
    from medblocks_pipelines.lib.settings import Settings  # settings imports this module

    return dict(Settings.from_env().storage_options)


def open_fs(url: str) -> tuple["fsspec.AbstractFileSystem", str]:
    """The file system serving ``url`` and the path inside it (no trailing slash)."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url, **storage_options())
    except (ImportError, ValueError) as exc:
        raise ConfigError(
            f"unsupported storage URL scheme in {url.split('://', 1)[0]}://",
            hint="use a local folder or s3://bucket/prefix",
        ) from exc
    return fs, str(path).rstrip("/")


def join(base: str, *parts: str) -> str:
    """``base/part/part`` for a URL or an fsspec path."""
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts if p)])


def _describe(exc: BaseException) -> str:
    # Class name and errno-ish code only: messages of storage clients can carry signed URLs.
    code = getattr(exc, "errno", None) or getattr(exc, "code", None)
    return f"{type(exc).__name__}{f' ({code})' if code else ''}"


def storage_error(action: str, url: str, exc: BaseException) -> StorageError:
    """A one-line error naming the action and the location (bucket/prefix, never credentials)."""
    return StorageError(
        f"cannot {action} {url}: {_describe(exc)}",
        hint="check the object-store URL, its credentials (AWS_* variables) and that it is reachable",
    )


def put_file(local: Path, url: str) -> int:
    """Upload ``local`` to ``url`` as one object; returns its size."""
    fs, path = open_fs(url)
    size = local.stat().st_size
    try:
        fs.put_file(str(local), path)
    except Exception as exc:  # noqa: BLE001 (botocore/aiohttp raise many types; all mean "not stored")
        raise storage_error("upload to", url, exc) from exc
    return size


def signature(url: str) -> str | None:
    """An identity of the object at ``url`` (ETag and size), or None when there is none."""
    fs, path = open_fs(url)
    try:
        fs.invalidate_cache(path)
        info = fs.info(path)
    except FileNotFoundError:
        return None
    except Exception as exc:  # noqa: BLE001
        raise storage_error("read", url, exc) from exc
    tag = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
    return f"{tag}:{info.get('size')}"


def fetch_if_changed(url: str, local: Path) -> bool:
    """Make ``local`` a copy of the object at ``url``; download only when the object changed.

    The last seen signature is kept next to the copy (``.<name>.sig``). The download goes to a
    temporary file renamed over ``local``: readers holding the old file keep their snapshot.
    Returns True when a new copy was written. Raises :class:`StorageError` when the object does
    not exist or cannot be read.
    """
    sig = signature(url)
    if sig is None:
        raise StorageError(f"{url} does not exist", hint="build or publish it first")
    marker = local.with_name(f".{local.name}.sig")
    if local.exists() and marker.exists() and marker.read_text() == sig:
        return False
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.{secrets.token_hex(4)}.download")
    fs, path = open_fs(url)
    try:
        fs.get_file(path, str(tmp))
        os.replace(tmp, local)
    except Exception as exc:  # noqa: BLE001
        raise storage_error("download", url, exc) from exc
    finally:
        tmp.unlink(missing_ok=True)
    marker.write_text(sig)
    return True


def remember_signature(url: str, local: Path) -> None:
    """Record that ``local`` is the object now at ``url`` (after this machine uploaded it)."""
    sig = signature(url)
    if sig is not None:
        local.with_name(f".{local.name}.sig").write_text(sig)


@dataclass
class MirrorStats:
    """What one mirror pass did: counts and bytes only."""

    files: int = 0
    downloaded: int = 0
    removed: int = 0
    bytes_downloaded: int = 0
    seconds: float = 0.0

    def add(self, other: "MirrorStats") -> None:
        """Fold another pass's counts into these (several prefixes of one build)."""
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_metadata(self) -> dict[str, Any]:
        return {
            "mirror_files": self.files,
            "mirror_downloaded": self.downloaded,
            "mirror_removed": self.removed,
            "mirror_bytes_downloaded": self.bytes_downloaded,
            "mirror_seconds": round(self.seconds, 3),
        }


def mirror(url: str, local: Path, *, suffix: str = ".parquet") -> MirrorStats:
    """Make the ``*suffix`` files under ``local`` equal those under the prefix ``url``.

    Files whose name is present locally with the same size are kept (lake files never change
    content under one name); the rest download concurrently into temporary names and are renamed
    into place; local files the store no longer has (a rewrite after a consent deletion) are removed.
    """
    started = time.perf_counter()
    stats = MirrorStats()
    fs, root = open_fs(url)
    # A prefix with no objects is an empty lake; a missing bucket is a wrong URL, and mirroring
    # "nothing" from it would publish an empty warehouse over a good one.
    bucket = root.split("/", 1)[0]
    try:
        fs.invalidate_cache(root)
        if not bucket or not fs.exists(bucket):
            raise StorageError(
                f"cannot list {url}: bucket {bucket or '(none)'} does not exist or is not readable",
                hint="check MEDBLOCKS_LAKE_ROOT and the storage credentials",
            )
        listing = fs.find(root, detail=True) if fs.exists(root) else {}
    except StorageError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise storage_error("list", url, exc) from exc
    wanted: dict[str, int] = {}
    for key, info in listing.items():
        rel = key[len(root) :].lstrip("/")
        if rel.endswith(suffix) and info.get("type", "file") == "file":
            wanted[rel] = int(info.get("size") or 0)
    stats.files = len(wanted)
    have: dict[str, int] = {}
    if local.exists():
        for path in local.rglob(f"*{suffix}"):
            have[path.relative_to(local).as_posix()] = path.stat().st_size
    missing = sorted(rel for rel, size in wanted.items() if have.get(rel) != size)
    if missing:
        token = secrets.token_hex(4)
        targets = [local / rel for rel in missing]
        temps = [t.with_name(f"{t.name}.{token}.download") for t in targets]
        for t in targets:
            t.parent.mkdir(parents=True, exist_ok=True)
        try:
            # One batched call: fsspec's async backends fetch these concurrently.
            fs.get([f"{root}/{rel}" for rel in missing], [str(t) for t in temps])
            for tmp, target in zip(temps, targets, strict=True):
                os.replace(tmp, target)
        except Exception as exc:  # noqa: BLE001
            raise storage_error("download from", url, exc) from exc
        finally:
            for tmp in temps:
                tmp.unlink(missing_ok=True)
        stats.downloaded = len(missing)
        stats.bytes_downloaded = sum(wanted[rel] for rel in missing)
    for rel in sorted(set(have) - set(wanted)):
        (local / rel).unlink(missing_ok=True)
        stats.removed += 1
    stats.seconds = time.perf_counter() - started
    return stats
