"""Run admission for CLI runs: the instance's run concurrency limits hold for them too.

Why not the run queue: a run submitted to the instance's run coordinator (``QueuedRunCoordinator``)
only starts when a ``dagster-daemon`` dequeues it and a run launcher starts a worker that loads the
code location again: a daemon the embedded default does not run, and seconds of start-up per run.
So the CLI keeps executing in its own process (``job.execute_in_process``, public API) and admits
itself first, the way the daemon's dequeuer does: under a lock (a file lock on this host plus a
PostgreSQL advisory lock when the control plane is PostgreSQL), it counts the instance's in-progress
runs against the instance's own ``concurrency.runs`` settings (``max_concurrent_runs`` and
``tag_concurrency_limits``, read through ``DagsterInstance.get_concurrency_config()``), and waits
while a limit is reached. The lock is held until its own run is recorded, so two CLIs never take the
same slot. Runs the daemon launches count against CLI runs and the daemon counts CLI runs in turn
(both read the same run storage); only the daemon does not take the lock (a run it dequeues in the
same instant can exceed a limit by one).

Before each count, runs of this host whose process is gone are recovered (``run_recovery``), so a
``kill -9``-ed run never holds a slot.
"""

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg

from medblocks_pipelines.defs.shared.run_recovery import HEARTBEAT_TAG, IN_PROGRESS
from medblocks_pipelines.lib.runs.locks import HostAndClusterLock

log = logging.getLogger(__name__)
HEARTBEAT_SECONDS = 30.0


def _limit_match(
    limit: Mapping[str, Any], tags: Mapping[str, str]
) -> tuple[str, str | None] | None:
    """(key, value to count or None for any value) when ``limit`` applies to a run with ``tags``."""
    key = limit["key"]
    if key not in tags:
        return None
    value = limit.get("value")
    if isinstance(value, Mapping) and value.get("applyLimitPerUniqueValue"):
        return key, tags[key]
    if value is None:
        return key, None
    return (key, str(value)) if tags[key] == str(value) else None


def blocking_limit(instance: dg.DagsterInstance, tags: Mapping[str, str]) -> str | None:
    """Which run limit a new run with ``tags`` would exceed now (None: it may start)."""
    config = instance.get_concurrency_config().run_queue_config
    if config is None:
        return None
    runs = instance.get_runs(dg.RunsFilter(statuses=IN_PROGRESS))
    if 0 <= config.max_concurrent_runs <= len(runs):
        return f"{len(runs)} runs in progress (max_concurrent_runs {config.max_concurrent_runs})"
    for limit in config.tag_concurrency_limits or []:
        match = _limit_match(limit, tags)
        if match is None:
            continue
        key, value = match
        count = sum(1 for r in runs if key in r.tags and (value is None or r.tags[key] == value))
        if count >= int(limit["limit"]):
            return f"{count} run(s) with {key}={tags[key]} in progress (limit {limit['limit']})"
    return None


@contextmanager
def admitted(
    instance: dg.DagsterInstance,
    tags: Mapping[str, str],
    run_id: str,
    *,
    lock_path: Path,
    database_url: str | None,
    recover: Callable[[], object],
    poll_seconds: float = 1.0,
) -> Iterator[threading.Event]:
    """Wait for a free slot, then run the block; the slot is ours once run ``run_id`` is recorded.

    The block must create run ``run_id`` (``execute_in_process(run_id=...)``); a helper thread
    releases the admission lock as soon as the run is in storage (or when the block ends), then
    records a heartbeat tag on the run every ``HEARTBEAT_SECONDS`` until the block ends. The
    block gets an event that is set once the run is in storage (never, if it ends before)."""
    lock = HostAndClusterLock(lock_path, database_url, "dagster-run-admission")
    said = False
    while True:
        lock.acquire()
        try:
            recover()
            reason = blocking_limit(instance, tags)
        except BaseException:
            lock.release()
            raise
        if reason is None:
            break
        lock.release()
        if not said:
            log.warning("waiting for a run slot: %s", reason)
            said = True
        time.sleep(poll_seconds)
    done, recorded = threading.Event(), threading.Event()

    def release_once_recorded_then_beat() -> None:
        try:
            while not done.is_set():
                if instance.get_run_by_id(run_id) is not None:
                    recorded.set()
                    break
                done.wait(0.05)
        finally:
            lock.release()
        # A heartbeat lets other hosts tell that this run is alive (they cannot see our pid).
        while not done.wait(HEARTBEAT_SECONDS):
            try:
                instance.add_run_tags(run_id, {HEARTBEAT_TAG: str(int(time.time()))})
            except Exception as exc:  # a missed beat must not fail the run; the next one retries
                log.warning("run %s: heartbeat not recorded (%s)", run_id[:8], type(exc).__name__)

    watcher = threading.Thread(
        target=release_once_recorded_then_beat, name="run-admission", daemon=True
    )
    watcher.start()
    try:
        yield recorded
    finally:
        done.set()
        watcher.join()
