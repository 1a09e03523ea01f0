"""A lock over this host (``fcntl`` file lock) and, when the control plane is PostgreSQL, over
every host sharing it (a session advisory lock), which another thread may release.

The run admission of the CLI takes it while it counts in-progress runs and until its own run is
recorded, so two processes never both see a free slot.
"""

import fcntl
import hashlib
import threading
from pathlib import Path
from typing import IO, Any


class HostAndClusterLock:
    """``acquire()`` blocks; ``release()`` is idempotent and thread-safe."""

    def __init__(self, path: Path, database_url: str | None, name: str) -> None:
        self.path, self.database_url, self.name = path, database_url, name
        self._guard = threading.Lock()
        self._fh: IO[str] | None = None
        self._engine: Any = None
        self._conn: Any = None
        self.key = int.from_bytes(
            hashlib.blake2b(name.encode(), digest_size=8).digest(), "big", signed=True
        )

    def acquire(self) -> None:
        """Take the file lock, then the advisory lock (PostgreSQL control plane only)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a")  # noqa: SIM115 - held until release()
        fcntl.flock(fh, fcntl.LOCK_EX)
        self._fh = fh
        url = self._pg_url()
        if url is None:
            return
        import sqlalchemy as sa

        try:
            # Not the cached pool of db.make_engine, on purpose: a session advisory lock lives as
            # long as its connection, so closing ours (release, or this process dying) must end
            # the session; a pooled connection would outlive release() still holding the lock.
            self._engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
            self._conn = self._engine.connect()
            self._conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": self.key})
            self._conn.commit()
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Give both locks back (a no-op when not held)."""
        with self._guard:
            if self._conn is not None:
                import sqlalchemy as sa

                try:
                    self._conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
                    self._conn.commit()
                finally:
                    self._conn.close()
                    self._engine.dispose()
                    self._conn = self._engine = None
            if self._fh is not None:
                fcntl.flock(self._fh, fcntl.LOCK_UN)
                self._fh.close()
                self._fh = None

    def _pg_url(self) -> str | None:
        if not self.database_url:
            return None
        from medblocks_pipelines.lib.registry.db import normalise_url

        url = normalise_url(self.database_url)
        return url if url.startswith("postgresql") else None


def try_file_lock(path: Path) -> IO[str] | None:
    """Take ``path``'s file lock without waiting: the open file (close it to release) or None
    when another process holds it."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a")  # noqa: SIM115 - returned to the caller
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        return None
    return fh
