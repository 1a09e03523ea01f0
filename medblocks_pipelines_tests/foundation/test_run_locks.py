"""The run admission lock: exclusive on this host (file lock) and, with a PostgreSQL control plane,
across hosts (advisory lock); released from another thread (the admission watcher does that)."""

import threading
from pathlib import Path

import pytest
import sqlalchemy as sa

from medblocks_pipelines.lib.registry.db import normalise_url
from medblocks_pipelines.lib.runs.locks import HostAndClusterLock, try_file_lock


def test_file_lock_is_exclusive_and_released_from_another_thread(tmp_path: Path) -> None:
    path = tmp_path / "admission.lock"
    lock = HostAndClusterLock(path, None, "dagster-run-admission")
    lock.acquire()
    assert try_file_lock(path) is None  # held
    releaser = threading.Thread(target=lock.release)
    releaser.start()
    releaser.join()
    lock.release()  # idempotent
    handle = try_file_lock(path)
    assert handle is not None
    handle.close()


@pytest.mark.postgres
def test_advisory_lock_holds_across_sessions(tmp_path: Path, pg_database_url: str) -> None:
    lock = HostAndClusterLock(tmp_path / "a.lock", pg_database_url, "dagster-run-admission")
    engine = sa.create_engine(normalise_url(pg_database_url), poolclass=sa.pool.NullPool)
    try:
        lock.acquire()
        with engine.connect() as other:  # another host: its own session
            taken = other.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": lock.key})
            assert taken.scalar() is False
        threading.Thread(target=lock.release).start()
        with engine.connect() as other:
            for _ in range(200):
                got = other.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": lock.key})
                if got.scalar():
                    break
                threading.Event().wait(0.05)
            else:
                raise AssertionError("the advisory lock was never released")
            other.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": lock.key})
    finally:
        lock.release()
        engine.dispose()
