"""Runtime settings of the platform, read from the environment.

The embedded default keeps everything under ``./data``; production points ``MEDBLOCKS_DATABASE_URL`` at
PostgreSQL and ``MEDBLOCKS_LAKE_ROOT`` / ``MEDBLOCKS_WAREHOUSE_DIR`` at shared storage: a folder every
machine mounts, or an object-store URL such as ``s3://bucket/lake`` (see ``lib/storage.py``).
``MEDBLOCKS_PUBLIC_BASE_URL`` is how EHRs and browsers reach ``medblocks serve`` (behind TLS or a
reverse proxy: ``https://host`` or ``https://host/prefix``).
"""

import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from medblocks_pipelines.lib.errors import ConfigError
from medblocks_pipelines.lib.storage import is_remote

PUBLIC_BASE_URL_ENV = "MEDBLOCKS_PUBLIC_BASE_URL"


def normalize_public_base_url(url: str) -> str:
    """``scheme://host[:port][/prefix]`` with no trailing slash, or :class:`ConfigError`.

    Every URL we hand out (redirect URIs, the JWKS URL, CDS ``aud``, card links, cookie paths) is
    built from this one value, so it must be absolute http(s), without query or fragment.
    """
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"public base URL {url!r} is not an absolute http(s) URL",
            hint=f"set {PUBLIC_BASE_URL_ENV} to how peers reach us, e.g. https://host/medblocks",
        )
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ConfigError(f"public base URL {url!r} must not carry a query, fragment or user")
    path = parts.path.rstrip("/")
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc.lower(), path, "", ""))


def public_path_prefix(public_base_url: str) -> str:
    """The path part of the public base URL (``""`` or ``/prefix``, never a trailing slash)."""
    return urllib.parse.urlsplit(public_base_url).path.rstrip("/")


@dataclass(frozen=True)
class Settings:
    """Where the control plane, the lake and the warehouses live.

    ``lake_root`` and ``warehouse_dir`` are always local folders. When the lake is in object
    storage (``lake_url``), ``lake_root`` is this machine's mirror of it, which builds read; when
    warehouses are published to object storage (``warehouse_url``), ``warehouse_dir`` holds this
    machine's builds and downloaded copies.
    """

    data_dir: Path
    database_url: str
    lake_root: Path
    warehouse_dir: Path
    lake_url: str | None = None
    warehouse_url: str | None = None
    #: ``MEDBLOCKS_PUBLIC_BASE_URL`` (normalised), or None: ``medblocks serve`` then uses its
    #: own ``http://host:port`` (development on loopback only).
    public_base_url: str | None = None

    @property
    def lake(self) -> str | Path:
        """Where lake writers write: the object-store URL, or the local lake folder."""
        return self.lake_url or self.lake_root

    def ensure_dirs(self) -> None:
        """Create the data folders (idempotent)."""
        for path in (self.data_dir, self.lake_root, self.warehouse_dir):
            path.mkdir(parents=True, exist_ok=True)


def _local(value: str | None) -> Path | None:
    if not value:
        return None
    return Path(value[len("file://") :] if value.startswith("file://") else value)


def get_settings(data_dir: str | os.PathLike[str] | None = None) -> Settings:
    """Build settings from the environment; ``data_dir`` overrides ``MEDBLOCKS_DATA_DIR``."""
    root = Path(data_dir or os.environ.get("MEDBLOCKS_DATA_DIR") or "data").resolve()
    url = os.environ.get("MEDBLOCKS_DATABASE_URL") or f"sqlite:///{root / 'control.db'}"
    lake_env = os.environ.get("MEDBLOCKS_LAKE_ROOT")
    warehouse_env = os.environ.get("MEDBLOCKS_WAREHOUSE_DIR")
    lake_url = lake_env.rstrip("/") if lake_env and is_remote(lake_env) else None
    warehouse_url = (
        warehouse_env.rstrip("/") if warehouse_env and is_remote(warehouse_env) else None
    )
    lake = root / "lake-mirror" if lake_url else _local(lake_env) or root / "lake"
    warehouse = root / "warehouse" if warehouse_url else _local(warehouse_env) or root / "warehouse"
    public = os.environ.get(PUBLIC_BASE_URL_ENV)
    return Settings(
        data_dir=root,
        database_url=url,
        lake_root=lake,
        warehouse_dir=warehouse,
        lake_url=lake_url,
        warehouse_url=warehouse_url,
        public_base_url=normalize_public_base_url(public) if public else None,
    )
