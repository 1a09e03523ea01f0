"""Running Dagster jobs from the CLI: the same jobs the UI runs, executed in-process.

The embedded default keeps its Dagster instance under ``<data_dir>/dagster_home`` (SQLite storage, no
server); production sets ``DAGSTER_HOME`` to a folder holding the PostgreSQL ``dagster.yaml``.
"""

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg

from medblocks_pipelines.lib.errors import ConfigError, MedblocksError
from medblocks_pipelines.lib.settings import get_settings

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


def load_definitions() -> dg.Definitions:
    """The code location's definitions, as the webserver loads them."""
    from medblocks_pipelines.definitions import defs

    return defs()


@contextmanager
def pinned_definitions_context(instance: dg.DagsterInstance) -> Iterator[None]:
    """Pin Dagster's definitions-loading context to ``instance``'s defs-state for a block.

    Dagster reads the defs-state storage from a context variable. Any Dagster context left to the
    garbage collector (an instance entered inside a sensor, resource or op context that was never
    exited) resets that variable when it is finalized, to whatever it held back then: possibly a
    storage whose instance is gone. That can happen before or during a load, and a load context
    built with no state info reads the variable itself. So the load context is built here from
    this instance's storage, with explicit (possibly empty) state info, and pinned for the block.
    """
    from dagster._core.definitions.definitions_load_context import (
        DefinitionsLoadContext,
        DefinitionsLoadType,
    )
    from dagster._core.definitions.repository_definition import RepositoryLoadData
    from dagster._core.storage.defs_state.base import set_defs_state_storage
    from dagster_shared.serdes.objects.models.defs_state_info import DefsStateInfo

    storage = instance.defs_state_storage
    state_info = storage.get_latest_defs_state_info() if storage is not None else None
    load_context = DefinitionsLoadContext(
        DefinitionsLoadType.INITIALIZATION,
        RepositoryLoadData(defs_state_info=state_info or DefsStateInfo(info_mapping={})),
    )
    with set_defs_state_storage(storage), DefinitionsLoadContext.scoped(load_context):
        yield


def _load_definitions_for(instance: dg.DagsterInstance) -> dg.Definitions:
    """Load the code location against ``instance``'s defs-state, whatever the variable says."""
    with pinned_definitions_context(instance):
        definitions = load_definitions()
        # Dagster builds the repository lazily, on the first resolve: build it here, pinned too.
        definitions.get_repository_def()
    return definitions


def sync_registry_partitions(instance: dg.DagsterInstance) -> dict[str, int]:
    """Bring dynamic partitions in line with the registry before running a partitioned job."""
    from medblocks_pipelines.defs.shared.resources import PlatformResource
    from medblocks_pipelines.defs.shared.sensors import sync_partitions

    return sync_partitions(instance, PlatformResource())


def run_job(
    job_name: str,
    *,
    partition_key: str | None = None,
    run_config: dict[str, Any] | None = None,
    tags: dict[str, str] | None = None,
    instance: dg.DagsterInstance | None = None,
) -> dg.ExecuteInProcessResult:
    """Execute ``job_name`` in-process for one partition and raise if it failed."""
    instance = instance or get_instance()
    sync_registry_partitions(instance)
    definitions = _load_definitions_for(instance)
    try:
        job = definitions.resolve_job_def(job_name)
    except dg.DagsterInvariantViolationError as exc:
        raise ConfigError(f"no Dagster job named {job_name}") from exc
    config = dict(run_config or {})
    # Runs show their logs in the UI; the terminal gets warnings only unless --verbose (DEBUG logging).
    level = "DEBUG" if logging.getLogger().isEnabledFor(logging.DEBUG) else "WARNING"
    config.setdefault("loggers", {"console": {"config": {"log_level": level}}})
    with pinned_definitions_context(instance):
        result = job.execute_in_process(
            instance=instance,
            partition_key=partition_key,
            run_config=config,
            tags=tags or {},
            raise_on_error=False,
        )
    if not result.success:
        failures = [
            e.event_specific_data.error.message.splitlines()[0]  # type: ignore[union-attr]
            for e in result.all_events
            if e.is_step_failure and e.event_specific_data is not None
        ]
        raise MedblocksError(
            f"run {result.run_id[:8]} of {job_name} failed: " + ("; ".join(failures) or "see UI"),
            hint="open the Dagster UI (`dagster dev`) to see the run's logs",
        )
    return result
