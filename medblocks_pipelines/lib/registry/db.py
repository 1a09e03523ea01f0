"""Engines for the control plane: SQLite (embedded default) and PostgreSQL, one code path.

SQLite runs in WAL mode with a busy timeout, and every transaction starts with ``BEGIN IMMEDIATE`` so that
concurrent writers (sensors, runs, web requests in other processes) queue on the lock instead of failing
with "database is locked" when a read transaction tries to upgrade to a write.

One engine per URL per process (:func:`make_engine`): an engine is a connection pool, and a pool per
opened store would hold connections nobody closes. :func:`dispose_engines` closes them all (at exit
too); a forked child drops the parent's pools without closing the parent's connections
(SQLAlchemy's "Using Connection Pools with Multiprocessing or os.fork()").

Migrations are an explicit step (``medblocks db upgrade``, :func:`upgrade`). Opening a store only
checks that the schema is at head (:func:`ensure_schema`); the one exception is a brand-new embedded
SQLite database, which is created at head so ``medblocks`` works with no setup step.

Alembic (about half a second of imports) is loaded only when the schema is not already at
:data:`HEAD_REVISION`: the usual open reads the stamp with one query, so a command's first
request (a Bulk kick-off, say) is not held up by migration tooling it does not use.
"""

import atexit
import contextlib
import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from medblocks_pipelines.lib.errors import ConfigError
from medblocks_pipelines.lib.registry.schema import load_all_tables

if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

#: The newest migration in ``migrations/versions`` (``test_db`` checks it against Alembic's own
#: head, so a new migration that forgets to move it fails there).
HEAD_REVISION = "0004"
MIGRATIONS_DIR = Path(__file__).parent / "migrations"
UPGRADE_HINT = "run: medblocks db upgrade"

_ENGINES: dict[str, sa.Engine] = {}
_ENGINES_LOCK = threading.Lock()
#: Alembic is not thread-safe: one bootstrap upgrade at a time in this process (other processes
#: queue on SQLite's write lock, and the loser finds the schema at head).
_UPGRADE_LOCK = threading.Lock()


def normalise_url(url: str) -> str:
    """Make ``postgresql://`` explicit as psycopg2: SQLAlchemy 2.1 would otherwise pick psycopg 3."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg2://" + url.split("://", 1)[1]
    return url


def _wal(cur: Any) -> None:
    """Switch a SQLite file to WAL (persistent: once set, a read says so and nothing is locked).

    The switch needs the file to itself and SQLite answers "database is locked" at once, without
    its busy handler, when another process is connecting to a new file at the same moment (every
    first sensor, run and web worker may be): retry briefly.
    """
    for attempt in range(100):
        try:
            if str(cur.execute("PRAGMA journal_mode").fetchone()[0]).lower() == "wal":
                return
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == 99:
                raise
            time.sleep(0.05)


def _create_engine(url: str) -> sa.Engine:
    """A new engine for (normalised) ``url`` with the pragmas and pool settings concurrent writers need."""
    if url.startswith("sqlite"):
        db_path = url.split("///", 1)[-1]
        if db_path and db_path != ":memory:":
            Path(db_path).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @sa.event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            # Let SQLAlchemy's "begin" event issue the BEGIN itself (pysqlite would defer it).
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA busy_timeout=30000")
            _wal(cur)
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        @sa.event.listens_for(engine, "begin")
        def _on_begin(conn: sa.Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return sa.create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)


def make_engine(url: str) -> sa.Engine:
    """The process's engine for ``url``, created on first use (thread-safe).

    Callers may ``dispose()`` it (that only empties its pool; the engine stays usable).
    """
    key = normalise_url(url)
    with _ENGINES_LOCK:
        engine = _ENGINES.get(key)
        if engine is None:
            engine = _ENGINES[key] = _create_engine(key)
        return engine


def dispose_engines() -> None:
    """Close every pooled connection of every cached engine and forget the engines."""
    with _ENGINES_LOCK:
        engines = list(_ENGINES.values())
        _ENGINES.clear()
    for engine in engines:
        engine.dispose()


def _forget_after_fork() -> None:
    # The child must not use, nor close, the parent's connections: drop the pools without closing.
    # Fresh locks too: another thread of the parent may have held one at the fork.
    global _ENGINES_LOCK, _UPGRADE_LOCK
    _ENGINES_LOCK, _UPGRADE_LOCK = threading.Lock(), threading.Lock()
    for engine in list(_ENGINES.values()):
        engine.dispose(close=False)
    _ENGINES.clear()


atexit.register(dispose_engines)
os.register_at_fork(after_in_child=_forget_after_fork)


def alembic_config(engine: sa.Engine | None = None) -> "Config":
    """An Alembic config bound to ``engine`` (no alembic.ini needed)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if engine is not None:
        cfg.attributes["engine"] = engine
    return cfg


def _scripts() -> "ScriptDirectory":
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config())


@cache
def head_revision() -> str:
    """The newest migration this code ships."""
    head = _scripts().get_current_head()
    if head is None:  # pragma: no cover - the package always ships migrations
        raise ConfigError("no control-plane migrations shipped")
    return head


def current_revision(engine: sa.Engine) -> str | None:
    """The revision the database is at (None: never migrated)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def _stamped_at_head(engine: sa.Engine) -> bool:
    """One query, no Alembic: is the database stamped with :data:`HEAD_REVISION` alone?"""
    try:
        with engine.connect() as conn:
            stamps = conn.exec_driver_sql("SELECT version_num FROM alembic_version").all()
    except sa.exc.DBAPIError:  # no stamp table yet: a new database, or not ours
        return False
    return [row[0] for row in stamps] == [HEAD_REVISION]


def upgrade(engine: sa.Engine, revision: str = "head") -> None:
    """Bring the schema to ``revision`` (idempotent; ``medblocks db upgrade`` runs it)."""
    from alembic import command

    load_all_tables()
    with _UPGRADE_LOCK:
        command.upgrade(alembic_config(engine), revision)


@contextlib.contextmanager
def _first_create_lock(engine: sa.Engine) -> Iterator[None]:
    """An exclusive ``fcntl`` lock beside a SQLite file (``<file>.init.lock``), across processes;
    a memory database needs none (one process)."""
    database = engine.url.database
    if not database or database == ":memory:":
        yield
        return
    lock_path = Path(database).with_name(Path(database).name + ".init.lock")
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _is_empty(engine: sa.Engine) -> bool:
    return not sa.inspect(engine).get_table_names()


def ensure_schema(engine: sa.Engine) -> None:
    """Raise a one-line :class:`ConfigError` unless the schema is at head.

    A brand-new, empty SQLite database (the embedded default, a test's temporary folder) is
    upgraded here instead: there is nothing to migrate, only tables to create. PostgreSQL and
    SQLite databases that hold data always need the explicit ``medblocks db upgrade``.
    """
    if _stamped_at_head(engine):
        return
    current, head = current_revision(engine), head_revision()
    if current == head:
        return
    if engine.dialect.name == "sqlite":
        with _first_create_lock(engine):
            # Sensors, runs and web workers may all open a new file at once: one creates it, the
            # others wait for the lock and find it at head. The creator holds the lock for its
            # whole upgrade, so what is read before the lock may be half done: no revision yet
            # (Alembic's SQLite DDL is not transactional: tables and no stamp), or an earlier
            # revision (the stamp moves one migration at a time). Read again under the lock.
            current = current_revision(engine)
            if current is None and _is_empty(engine):
                upgrade(engine)
                return
        if current == head:
            return
    where = engine.url.render_as_string(hide_password=True)
    if current is None:
        raise ConfigError(
            f"control plane {where} has no schema (head is {head})", hint=UPGRADE_HINT
        )
    known = {rev.revision for rev in _scripts().walk_revisions()}
    if current not in known:
        raise ConfigError(
            f"control plane {where} is at revision {current}, newer than this code (head {head})",
            hint="upgrade medblocks_pipelines on this machine",
        )
    raise ConfigError(
        f"control plane {where} is at revision {current}, behind head {head}", hint=UPGRADE_HINT
    )
