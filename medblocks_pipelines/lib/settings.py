"""Runtime settings of the platform: the one place that reads ``MEDBLOCKS_*`` from the environment.

The embedded default keeps everything under ``./data``; production points ``MEDBLOCKS_DATABASE_URL`` at
PostgreSQL and ``MEDBLOCKS_LAKE_ROOT`` / ``MEDBLOCKS_WAREHOUSE_DIR`` at shared storage: a folder every
machine mounts, or an object-store URL such as ``s3://bucket/lake`` (see ``lib/storage.py``).
``MEDBLOCKS_PUBLIC_BASE_URL`` is how EHRs and browsers reach ``medblocks serve`` (behind TLS or a
reverse proxy: ``https://host`` or ``https://host/prefix``).

:class:`Settings` (where things live, which services to use) and :class:`Tuning` (sizes, limits and
intervals, ``Settings.tuning``) are typed, and every variable they read is listed in
:data:`ENV_VARS` with its meaning (``docs/OPERATIONS.md``, "Settings"). Code takes the values from a
settings object handed in, or builds one with :meth:`Settings.from_env` / :meth:`Tuning.from_env`
at its boundary; nothing else in ``lib`` reads the environment. Names and defaults are those the
call sites used before they moved here.
"""

import json
import os
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from medblocks_pipelines.lib.errors import ConfigError
from medblocks_pipelines.lib.storage import is_remote

PUBLIC_BASE_URL_ENV = "MEDBLOCKS_PUBLIC_BASE_URL"

#: Every variable the settings read, with what it sets (the reference ``docs/OPERATIONS.md`` lists).
ENV_VARS: dict[str, str] = {
    "MEDBLOCKS_DATA_DIR": "folder of the embedded default (control.db, lake, warehouse); ./data",
    "MEDBLOCKS_DATABASE_URL": "control plane: sqlite:///... or postgresql://...",
    "MEDBLOCKS_LAKE_ROOT": "the lake: a folder or an object-store URL",
    "MEDBLOCKS_WAREHOUSE_DIR": "the warehouses: a folder or an object-store URL",
    "MEDBLOCKS_PUBLIC_BASE_URL": "how EHRs and browsers reach medblocks serve",
    "MEDBLOCKS_SECRET_KEY": "vault Fernet keys, newest first, comma-separated (else data/secret.key)",
    "MEDBLOCKS_REDIS_URL": "Redis shared by processes: rate limits, CDS jti replay cache",
    "MEDBLOCKS_STORAGE_OPTIONS": "extra fsspec options for object storage (JSON object)",
    "MEDBLOCKS_VIEWS_DIR": "folder of extra ViewDefinitions",
    "MEDBLOCKS_READ_POLICY": "an operator's warehouse read-policy file",
    "MEDBLOCKS_WEBHOOK_ALLOW_PRIVATE": "1: webhook receivers on private addresses (development)",
    "MEDBLOCKS_CDS_TERMINOLOGY_URL": "FHIR terminology server for CDS ingredient lookups",
    "MEDBLOCKS_CDS_INGREDIENT_CONCEPTMAP": "ConceptMap URL the terminology server translates with",
    "MEDBLOCKS_CDS_PACKS_DIR": "folder of extra CDS knowledge packs",
    "MEDBLOCKS_CDS_DEFAULT_PACKS": "0/false/no/off: leave out the shipped CDS packs",
    "MEDBLOCKS_SOF_TESTS": "the SQL on FHIR conformance suite copy (tests)",
    # Tuning
    "MEDBLOCKS_LANDING_MEMORY_LIMIT": "DuckDB memory per landing connection; 512MB",
    "MEDBLOCKS_LANDING_CHUNK_BYTES": "NDJSON bytes landed in one pass (default from the memory limit)",
    "MEDBLOCKS_LANDING_THREADS": "DuckDB threads per landing connection",
    "MEDBLOCKS_MAX_LINE_BYTES": "longest NDJSON line accepted; 16 MiB",
    "MEDBLOCKS_BENCH_SKIP_VALIDATION": "1: no FHIR validation at landing (benchmark baseline only)",
    "MEDBLOCKS_WAREHOUSE_MEMORY_LIMIT": "DuckDB memory of a warehouse build; 512MB",
    "MEDBLOCKS_COMPACT_SMALL_BYTES": "a lake file below this is small; 4 MiB",
    "MEDBLOCKS_COMPACT_MIN_FILES": "small files in a partition before it is compacted; 32",
    "MEDBLOCKS_COMPACT_GROUP_BYTES": "most bytes compacted into one file; 64 MiB",
    "MEDBLOCKS_WAREHOUSE_POLL_SECONDS": "CDS: how often a new warehouse is looked for; 15",
    "MEDBLOCKS_CDS_AUDIT_FLUSH_SECONDS": "CDS: audit rows written at least this often; 0.2",
    "MEDBLOCKS_WEBHOOK_BATCH": "webhook deliveries per sensor tick; 100",
    "MEDBLOCKS_WEBHOOK_TIMEOUT_S": "seconds one webhook POST may take (at most 10)",
    "MEDBLOCKS_WEBHOOK_DEADLINE_S": "seconds of delivery per sensor tick; 20",
    "MEDBLOCKS_WAREHOUSE_DEBOUNCE_S": "quiet seconds after a landing before a rebuild; 60",
    "MEDBLOCKS_WAREHOUSE_MAX_WAIT_S": "longest a landing waits for its rebuild; 600",
    "MEDBLOCKS_RUN_HEARTBEAT_TIMEOUT_S": "age of a CLI run's heartbeat before it counts as dead; 600",
    "MEDBLOCKS_CLI_FULL_EXIT": "1: the medblocks command ends with the interpreter's full teardown",
}

_T = TypeVar("_T")
_FALSE = ("0", "false", "no", "off")


def _env(env: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if env is None else env


def _text(env: Mapping[str, str], name: str) -> str | None:
    """The variable's value; unset and empty are the same (None)."""
    return env.get(name) or None


def _strict(env: Mapping[str, str], name: str, parse: Callable[[str], _T], default: _T) -> _T:
    """Parsed value, the default when unset; a value that does not parse is an error."""
    value = _text(env, name)
    if value is None:
        return default
    try:
        return parse(value)
    except ValueError as exc:
        raise ConfigError(f"{name}={value!r} is not a valid {parse.__name__}") from exc


def _lenient(env: Mapping[str, str], name: str, default: float) -> float:
    """A number where a bad value falls back to the default (the sensors' bounds)."""
    try:
        return float(env.get(name, default))
    except ValueError:
        return default


def _from_env(name: str) -> Callable[[], str | None]:
    """Default of a field left out when :class:`Settings` is built by hand: as from_env reads it."""
    return lambda: _text(os.environ, name)


def _storage_options(raw: str | None) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            "MEDBLOCKS_STORAGE_OPTIONS is not valid JSON", hint="give a JSON object"
        ) from exc
    if not isinstance(value, dict):
        raise ConfigError("MEDBLOCKS_STORAGE_OPTIONS must be a JSON object")
    return value


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
class Tuning:
    """Sizes, limits and intervals (``MEDBLOCKS_*`` in :data:`ENV_VARS`, defaults as shipped).

    Read at import where a module keeps its value in a constant (tests patch those constants), and
    at call time elsewhere, as the code did before these moved here.
    """

    landing_memory_limit: str = "512MB"
    landing_chunk_bytes: int | None = None
    landing_threads: int | None = None
    max_line_bytes: int = 16 * 1024 * 1024
    skip_validation: bool = False
    warehouse_memory_limit: str = "512MB"
    compact_small_bytes: int = 4 * 1024 * 1024
    compact_min_files: int = 32
    compact_group_bytes: int = 64 * 1024 * 1024
    warehouse_poll_seconds: float = 15.0
    cds_audit_flush_seconds: float = 0.2
    webhook_batch: int = 100
    #: None: the sensor's own bound (``defs/shared/webhooks.TIMEOUT_S``).
    webhook_timeout_s: float | None = None
    webhook_deadline_s: float = 20.0
    warehouse_debounce_s: float = 60.0
    warehouse_max_wait_s: float = 600.0
    run_heartbeat_timeout_s: float = 600.0
    #: The ``medblocks`` command ends with the interpreter's teardown (cli/quick_exit.py).
    cli_full_exit: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Tuning":
        """The knobs from ``env`` (default ``os.environ``)."""
        e, d = _env(env), cls()
        timeout = e.get("MEDBLOCKS_WEBHOOK_TIMEOUT_S")
        return cls(
            landing_memory_limit=e.get("MEDBLOCKS_LANDING_MEMORY_LIMIT", d.landing_memory_limit),
            landing_chunk_bytes=_strict(e, "MEDBLOCKS_LANDING_CHUNK_BYTES", int, None),
            landing_threads=_strict(e, "MEDBLOCKS_LANDING_THREADS", int, None),
            max_line_bytes=_strict(e, "MEDBLOCKS_MAX_LINE_BYTES", int, d.max_line_bytes),
            skip_validation=e.get("MEDBLOCKS_BENCH_SKIP_VALIDATION") == "1",
            warehouse_memory_limit=e.get(
                "MEDBLOCKS_WAREHOUSE_MEMORY_LIMIT", d.warehouse_memory_limit
            ),
            compact_small_bytes=_strict(
                e, "MEDBLOCKS_COMPACT_SMALL_BYTES", int, d.compact_small_bytes
            ),
            compact_min_files=_strict(e, "MEDBLOCKS_COMPACT_MIN_FILES", int, d.compact_min_files),
            compact_group_bytes=_strict(
                e, "MEDBLOCKS_COMPACT_GROUP_BYTES", int, d.compact_group_bytes
            ),
            warehouse_poll_seconds=_strict(
                e, "MEDBLOCKS_WAREHOUSE_POLL_SECONDS", float, d.warehouse_poll_seconds
            ),
            cds_audit_flush_seconds=_strict(
                e, "MEDBLOCKS_CDS_AUDIT_FLUSH_SECONDS", float, d.cds_audit_flush_seconds
            ),
            webhook_batch=int(_lenient(e, "MEDBLOCKS_WEBHOOK_BATCH", d.webhook_batch)),
            webhook_timeout_s=(
                _lenient(e, "MEDBLOCKS_WEBHOOK_TIMEOUT_S", float("inf")) if timeout else None
            ),
            webhook_deadline_s=_lenient(e, "MEDBLOCKS_WEBHOOK_DEADLINE_S", d.webhook_deadline_s),
            warehouse_debounce_s=_lenient(
                e, "MEDBLOCKS_WAREHOUSE_DEBOUNCE_S", d.warehouse_debounce_s
            ),
            warehouse_max_wait_s=_lenient(
                e, "MEDBLOCKS_WAREHOUSE_MAX_WAIT_S", d.warehouse_max_wait_s
            ),
            run_heartbeat_timeout_s=_strict(
                e, "MEDBLOCKS_RUN_HEARTBEAT_TIMEOUT_S", float, d.run_heartbeat_timeout_s
            ),
            cli_full_exit=e.get("MEDBLOCKS_CLI_FULL_EXIT") == "1",
        )


@dataclass(frozen=True)
class Settings:
    """Where the control plane, the lake and the warehouses live.

    ``lake_root`` and ``warehouse_dir`` are always local folders. When the lake is in object
    storage (``lake_url``), ``lake_root`` is this machine's mirror of it, which builds read; when
    warehouses are published to object storage (``warehouse_url``), ``warehouse_dir`` holds this
    machine's builds and downloaded copies.

    A field after ``public_base_url`` left out when building ``Settings`` by hand (tests, tools)
    takes its value from the environment, as :meth:`from_env` reads it.
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
    #: ``MEDBLOCKS_SECRET_KEY``: the vault's Fernet keys, newest first, comma-separated; None:
    #: the key file ``data_dir/secret.key``.
    secret_key: str | None = field(default_factory=_from_env("MEDBLOCKS_SECRET_KEY"), repr=False)
    #: ``MEDBLOCKS_REDIS_URL``: shared rate limits and the CDS replay cache; None: per process / SQL.
    redis_url: str | None = field(
        default_factory=lambda: (_text(os.environ, "MEDBLOCKS_REDIS_URL") or "").strip() or None
    )
    #: ``MEDBLOCKS_STORAGE_OPTIONS`` parsed: extra fsspec options for object storage.
    storage_options: Mapping[str, Any] = field(
        default_factory=lambda: _storage_options(os.environ.get("MEDBLOCKS_STORAGE_OPTIONS"))
    )
    #: ``MEDBLOCKS_VIEWS_DIR``: extra ViewDefinitions.
    views_dir: Path | None = field(
        default_factory=lambda: _path(_text(os.environ, "MEDBLOCKS_VIEWS_DIR"))
    )
    #: ``MEDBLOCKS_READ_POLICY``: the operator's read-policy file (None: the newest shipped).
    read_policy: str | None = field(default_factory=_from_env("MEDBLOCKS_READ_POLICY"))
    #: ``MEDBLOCKS_WEBHOOK_ALLOW_PRIVATE=1``: receivers on loopback/private addresses allowed.
    webhook_allow_private: bool = field(
        default_factory=lambda: os.environ.get("MEDBLOCKS_WEBHOOK_ALLOW_PRIVATE") == "1"
    )
    #: ``MEDBLOCKS_CDS_TERMINOLOGY_URL`` (no trailing slash) and its ``..._INGREDIENT_CONCEPTMAP``.
    cds_terminology_url: str | None = field(
        default_factory=lambda: _url(_text(os.environ, "MEDBLOCKS_CDS_TERMINOLOGY_URL"))
    )
    cds_ingredient_conceptmap: str | None = field(
        default_factory=_from_env("MEDBLOCKS_CDS_INGREDIENT_CONCEPTMAP")
    )
    #: ``MEDBLOCKS_CDS_PACKS_DIR`` and whether the shipped packs load (``..._DEFAULT_PACKS``).
    cds_packs_dir: Path | None = field(
        default_factory=lambda: _path(_text(os.environ, "MEDBLOCKS_CDS_PACKS_DIR"))
    )
    cds_default_packs: bool = field(
        default_factory=lambda: _default_packs(os.environ.get("MEDBLOCKS_CDS_DEFAULT_PACKS"))
    )
    #: ``MEDBLOCKS_SOF_TESTS``: a copy of the SQL on FHIR conformance suite.
    sof_tests_dir: Path | None = field(
        default_factory=lambda: _path(_text(os.environ, "MEDBLOCKS_SOF_TESTS"))
    )
    tuning: Tuning = field(default_factory=Tuning.from_env)

    @classmethod
    def from_env(
        cls, data_dir: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
    ) -> "Settings":
        """Settings from ``env`` (default ``os.environ``); ``data_dir`` overrides
        ``MEDBLOCKS_DATA_DIR``. The one reader of the environment (with :meth:`Tuning.from_env`)."""
        return _settings_from_env(data_dir, env)

    @property
    def lake(self) -> str | Path:
        """Where lake writers write: the object-store URL, or the local lake folder."""
        return self.lake_url or self.lake_root

    def ensure_dirs(self) -> None:
        """Create the data folders (idempotent)."""
        for path in (self.data_dir, self.lake_root, self.warehouse_dir):
            path.mkdir(parents=True, exist_ok=True)


def _url(value: str | None) -> str | None:
    return value.rstrip("/") if value else None


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


def _default_packs(value: str | None) -> bool:
    return (value or "1").strip().lower() not in _FALSE


def _local(value: str | None) -> Path | None:
    if not value:
        return None
    return Path(value[len("file://") :] if value.startswith("file://") else value)


def _settings_from_env(
    data_dir: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    e = _env(env)
    root = Path(data_dir or e.get("MEDBLOCKS_DATA_DIR") or "data").resolve()
    url = e.get("MEDBLOCKS_DATABASE_URL") or f"sqlite:///{root / 'control.db'}"
    lake_env = e.get("MEDBLOCKS_LAKE_ROOT")
    warehouse_env = e.get("MEDBLOCKS_WAREHOUSE_DIR")
    lake_url = lake_env.rstrip("/") if lake_env and is_remote(lake_env) else None
    warehouse_url = (
        warehouse_env.rstrip("/") if warehouse_env and is_remote(warehouse_env) else None
    )
    lake = root / "lake-mirror" if lake_url else _local(lake_env) or root / "lake"
    warehouse = root / "warehouse" if warehouse_url else _local(warehouse_env) or root / "warehouse"
    public = e.get(PUBLIC_BASE_URL_ENV)
    return Settings(
        data_dir=root,
        database_url=url,
        lake_root=lake,
        warehouse_dir=warehouse,
        lake_url=lake_url,
        warehouse_url=warehouse_url,
        public_base_url=normalize_public_base_url(public) if public else None,
        secret_key=_text(e, "MEDBLOCKS_SECRET_KEY"),
        redis_url=(e.get("MEDBLOCKS_REDIS_URL") or "").strip() or None,
        storage_options=_storage_options(e.get("MEDBLOCKS_STORAGE_OPTIONS")),
        views_dir=_path(_text(e, "MEDBLOCKS_VIEWS_DIR")),
        read_policy=_text(e, "MEDBLOCKS_READ_POLICY"),
        webhook_allow_private=e.get("MEDBLOCKS_WEBHOOK_ALLOW_PRIVATE") == "1",
        cds_terminology_url=_url(_text(e, "MEDBLOCKS_CDS_TERMINOLOGY_URL")),
        cds_ingredient_conceptmap=_text(e, "MEDBLOCKS_CDS_INGREDIENT_CONCEPTMAP"),
        cds_packs_dir=_path(_text(e, "MEDBLOCKS_CDS_PACKS_DIR")),
        cds_default_packs=_default_packs(e.get("MEDBLOCKS_CDS_DEFAULT_PACKS")),
        sof_tests_dir=_path(_text(e, "MEDBLOCKS_SOF_TESTS")),
        tuning=Tuning.from_env(e),
    )


def env_is_set(name: str) -> bool:
    """Whether ``name`` has a value (Dagster resources bind ``dg.EnvVar`` only to those)."""
    return bool(os.environ.get(name))


def with_overrides(overrides: Mapping[str, str | None]) -> Mapping[str, str]:
    """The environment with ``overrides`` (variable name to value; None: unchanged) laid over it."""
    return {**os.environ, **{k: v for k, v in overrides.items() if v is not None}}


def get_settings(
    data_dir: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    """:meth:`Settings.from_env` (the name most callers use)."""
    return _settings_from_env(data_dir, env)
