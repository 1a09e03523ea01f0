"""Running Dagster jobs from the CLI: the same jobs the UI runs, through Dagster's public API.

The embedded default keeps its Dagster instance under ``<data_dir>/dagster_home`` (SQLite storage, no
server); production sets ``DAGSTER_HOME`` to a folder holding ``deploy/dagster.yaml`` (PostgreSQL).

A run executes in the CLI's process (``JobDefinition.execute_in_process(instance=...)``: no daemon,
no second load of the code location), after two steps:

- crash recovery (``defs.shared.run_recovery``): runs of this host whose process is gone are marked
  failed, their pool slots freed, their pull rows failed, their temporary files removed;
- admission (``cli.admission``): the run waits while the instance's run limits
  (``max_concurrent_runs``, ``tag_concurrency_limits`` on ``medblocks/tenant`` and
  ``medblocks/source``) are reached, counting every in-progress run of the instance.

Each run carries the process's identity (``medblocks/host``, ``medblocks/pid``,
``medblocks/pid_start``) and a heartbeat tag renewed every 30 s (``medblocks/heartbeat``), so
recovery can tell later that it died, on this host by its pid, on another by its heartbeat.

Loading definitions and executing run inside a new, empty ``contextvars.Context``. Dagster reads the
defs-state storage for loading from a context variable that any Dagster context sets on entry and
resets on exit, and a context left to the garbage collector resets it late, to whatever it held
then (possibly a storage whose instance is gone: the CI failures of ``run_job`` before). In an empty
context the variable starts unset (this code location has no state-backed components, so no
state is the right state), and a late reset by a context entered elsewhere cannot touch it: the
token belongs to another ``Context``, so Dagster's reset raises ``ValueError`` inside and sets the
variable to None, which is again "no state". Nothing here writes Dagster's private variables.
"""

import contextvars
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import dagster as dg

from medblocks_pipelines.lib.errors import ConfigError
from medblocks_pipelines.lib.runs.process import this_process
from medblocks_pipelines.lib.settings import get_settings

if TYPE_CHECKING:
    from medblocks_pipelines.lib.registry import ControlPlane

T = TypeVar("T")

# The repo-root dagster.yaml is this plus its storage under data/dagster_home, for `dagster dev` run
# without DAGSTER_HOME (foundation/test_dagster_yaml.py keeps the two equal).
EMBEDDED_DAGSTER_YAML = """\
# Embedded default instance: SQLite storage in this folder (written by `medblocks`).
telemetry:
  enabled: false
concurrency:
  runs:
    max_concurrent_runs: 4
    tag_concurrency_limits:
      - key: medblocks/tenant
        value:
          applyLimitPerUniqueValue: true
        limit: 2
      - key: medblocks/source
        value:
          applyLimitPerUniqueValue: true
        limit: 2
  pools:
    default_limit: 2
# The CLI's own runs are recovered by the CLI (cli/runtime.py); this frees slots of ended runs.
run_monitoring:
  enabled: true
  free_slots_after_run_end_seconds: 60
"""


def ensure_dagster_home() -> Path:
    """Point ``DAGSTER_HOME`` at the embedded instance unless it is already set."""
    home = os.environ.get("DAGSTER_HOME")
    if home:
        return Path(home)
    path = get_settings().data_dir / "dagster_home"
    path.mkdir(parents=True, exist_ok=True)
    cfg = path / "dagster.yaml"
    if not cfg.exists():
        cfg.write_text(EMBEDDED_DAGSTER_YAML)
    os.environ["DAGSTER_HOME"] = str(path)
    return path


def get_instance() -> dg.DagsterInstance:
    """The Dagster instance the CLI records runs in (the UI shows them)."""
    ensure_dagster_home()
    return dg.DagsterInstance.get()


def in_fresh_context(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call ``fn`` in a new, empty ``contextvars.Context`` (see the module docstring)."""
    return contextvars.Context().run(fn, *args, **kwargs)


def _load() -> dg.Definitions:
    from medblocks_pipelines.definitions import defs

    definitions = defs()
    # Dagster builds the repository lazily, on the first resolve: build it here, in this context.
    definitions.get_repository_def()
    return definitions


def load_definitions() -> dg.Definitions:
    """The code location's definitions, as the webserver loads them, built in a fresh context."""
    return in_fresh_context(_load)


def sync_registry_partitions(instance: dg.DagsterInstance) -> dict[str, int]:
    """Bring dynamic partitions in line with the registry before running a partitioned job."""
    from medblocks_pipelines.defs.shared.resources import PlatformResource
    from medblocks_pipelines.defs.shared.sensors import sync_partitions

    return sync_partitions(instance, PlatformResource())


def recover_dead_runs(
    instance: dg.DagsterInstance,
    *,
    repair: bool = True,
    control_plane: "ControlPlane | None" = None,
) -> Any:
    """Crash recovery for this host (see ``defs.shared.run_recovery``); returns its report."""
    from medblocks_pipelines.cli.core import control_plane as open_cp
    from medblocks_pipelines.defs.shared.run_recovery import recover

    cp = control_plane or open_cp()
    try:
        return recover(instance, control_plane=cp, settings=get_settings(), repair=repair)
    finally:
        if control_plane is None:
            cp.engine.dispose()


def process_tags() -> dict[str, str]:
    """Tags that let crash recovery tell later whether this process still runs."""
    me = this_process()
    return {
        "medblocks/launched_by": "cli",
        "medblocks/host": me.host,
        "medblocks/pid": str(me.pid),
        "medblocks/pid_start": me.start,
        "medblocks/heartbeat": str(int(time.time())),
    }


def run_job(
    job_name: str,
    *,
    partition_key: str | None = None,
    run_config: dict[str, Any] | None = None,
    tags: Mapping[str, str] | None = None,
    instance: dg.DagsterInstance | None = None,
    definitions: dg.Definitions | None = None,
    on_admitted: Callable[[str, threading.Event], object] | None = None,
) -> dg.ExecuteInProcessResult:
    """Execute ``job_name`` for one partition once the instance's run limits allow it; raise if
    it failed. ``definitions``: already loaded ones (a command running several jobs loads once).
    ``on_admitted(run_id, recorded)`` is called once the run has its slot, just before Dagster
    starts it: work begun there (``cli.backend``'s landing) overlaps the run's own start-up and
    belongs to that run; ``recorded`` is set once the run is in storage (admission's watcher)."""
    from medblocks_pipelines.cli.admission import admitted
    from medblocks_pipelines.cli.core import control_plane as open_cp
    from medblocks_pipelines.cli.run_errors import check_partition, echo_run_warnings, run_failure

    instance = instance or get_instance()
    sync_registry_partitions(instance)
    definitions = definitions or load_definitions()
    try:
        job = definitions.resolve_job_def(job_name)
    except dg.DagsterInvariantViolationError as exc:
        raise ConfigError(f"no Dagster job named {job_name}") from exc
    config = dict(run_config or {})
    # Runs show their logs in the UI. With --verbose (DEBUG logging) the terminal gets them all;
    # otherwise Dagster's console stays quiet (a step failure would print its whole stack) and the
    # run's own warnings are repeated one line each after it (echo_run_warnings).
    verbose = logging.getLogger().isEnabledFor(logging.DEBUG)
    level = "DEBUG" if verbose else "CRITICAL"
    config.setdefault("loggers", {"console": {"config": {"log_level": level}}})
    run_tags = {**(tags or {}), **process_tags()}
    run_id = str(uuid.uuid4())
    home = Path(os.environ.get("DAGSTER_HOME") or get_settings().data_dir)
    cp = open_cp()
    try:
        if partition_key is not None:
            check_partition(job, partition_key, instance, cp)
        with admitted(
            instance,
            run_tags,
            run_id,
            lock_path=home / ".medblocks-run-admission.lock",
            database_url=get_settings().database_url,
            recover=lambda: recover_dead_runs(instance, control_plane=cp),
        ) as recorded:
            if on_admitted is not None:
                on_admitted(run_id, recorded)
            result = in_fresh_context(
                job.execute_in_process,
                instance=instance,
                partition_key=partition_key,
                run_config=config,
                tags=run_tags,
                run_id=run_id,
                raise_on_error=False,
            )
    finally:
        cp.engine.dispose()
    if not verbose:
        echo_run_warnings(instance, result.run_id)
    if not result.success:
        raise run_failure(result, job_name)
    return result
