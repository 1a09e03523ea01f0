"""What the CLI says when a run it executed fails or names a partition the registry does not have.

One line each: the root cause of a failed step (the user code's exception, not Dagster's
``DagsterExecutionStepExecutionError`` around it), or which registry entry is missing, with a hint
naming a real command. The run's logs keep the stack (the UI, or ``--verbose``).
"""

import logging
from typing import TYPE_CHECKING, Any

import dagster as dg

from medblocks_pipelines.lib.errors import ConfigError, MedblocksError, NotFound, RunFailed
from medblocks_pipelines.lib.partitions import normalise_id, split_partition_key

if TYPE_CHECKING:
    from medblocks_pipelines.lib.registry import ControlPlane

logger = logging.getLogger("medblocks_pipelines.cli")

LOGS_HINT = "the run's logs: `make ui`, then Runs > {run}; or run again with --verbose"


def root_cause(error: Any) -> str:
    """``Class: message`` of the first error in a serialized chain that is not Dagster's wrapper."""
    err = error
    while err.cause is not None and (err.cls_name or "").startswith("Dagster"):
        err = err.cause
    lines = (err.message or "").strip().splitlines()
    first = lines[0] if lines else ""
    head, sep, rest = first.partition(": ")
    name = err.cls_name or head.rsplit(".", 1)[-1]
    # Dagster writes `module.Class: message`; keep the class's short name.
    text = rest if sep and head.rsplit(".", 1)[-1] == name else first
    if name == "Failure" and text:  # dg.Failure: an asset's own one-line reason
        return text
    return f"{name}: {text}" if text else name


def run_failure(result: dg.ExecuteInProcessResult, job_name: str) -> RunFailed:
    """One error for a failed run: every failed step's root cause, once each."""
    causes: list[str] = []
    for event in result.all_events:
        data = event.event_specific_data if event.is_step_failure else None
        error = getattr(data, "error", None)
        if error is not None:
            cause = root_cause(error)
            if cause not in causes:
                causes.append(cause)
    run = result.run_id[:8]
    message = "; ".join(causes) or f"run {run} of {job_name} failed"
    return RunFailed(message, run_id=result.run_id, hint=LOGS_HINT.format(run=run))


def echo_run_warnings(instance: dg.DagsterInstance, run_id: str) -> None:
    """Re-log the run's own warnings and errors (not Dagster's events, whose stacks the terminal
    does not need) through Python logging, one line each."""
    for entry in instance.all_logs(run_id):
        level = entry.level
        if isinstance(level, str):
            level = logging.getLevelName(level.upper())
        if entry.is_dagster_event or not isinstance(level, int) or level < logging.WARNING:
            continue
        where = f"{entry.step_key}: " if entry.step_key else ""
        logger.log(level, "%s%s", where, entry.user_message)


def check_partition(
    job: dg.JobDefinition, partition_key: str, instance: dg.DagsterInstance, cp: "ControlPlane"
) -> None:
    """Raise one clear line when ``partition_key`` is not a partition of ``job`` (after the
    registry's partitions were synced): which tenant, organization or source is missing."""
    pdef = job.partitions_def
    if not isinstance(pdef, dg.DynamicPartitionsDefinition) or not pdef.name:
        return
    if instance.has_dynamic_partition(pdef.name, partition_key):
        return
    raise unknown_partition(cp, pdef.name, partition_key)


def unknown_partition(cp: "ControlPlane", partitions_name: str, key: str) -> MedblocksError:
    """The missing registry entry behind an unknown partition ``key`` of ``partitions_name``."""
    parts = split_partition_key(key)
    tenant = parts[0]
    if tenant not in {normalise_id(t.id) for t in cp.list_tenants()}:
        return NotFound(
            f"tenant {tenant} is not in the registry",
            hint="list them: medblocks tenants list (add one: medblocks tenants add ID --name N)",
        )
    other = parts[1] if len(parts) > 1 else ""
    if partitions_name in ("backend_orgs", "clinician_orgs"):
        orgs = {normalise_id(o.id): o for o in cp.list_organizations(tenant)}
        if other not in orgs:
            return NotFound(
                f"organization {other} not found for tenant {tenant}",
                hint=f"list them: medblocks orgs list --tenant {tenant}",
            )
        pattern = "backend" if partitions_name == "backend_orgs" else "clinician_workflow"
        return ConfigError(
            f"organization {other}'s source {orgs[other].source_id} does not list the "
            f"{pattern} pattern",
            hint="each source's patterns: medblocks sources list",
        )
    if partitions_name in ("patient_access_sources", "network_scopes"):
        if other not in {normalise_id(s.id) for s in cp.list_sources()}:
            return NotFound(
                f"source {other} is not in the registry", hint="list them: medblocks sources list"
            )
        what = "a patient-access" if partitions_name == "patient_access_sources" else "a network"
        return ConfigError(
            f"source {other} is not {what} source of tenant {tenant}",
            hint="each source's patterns: medblocks sources list; the tenant's settings: "
            "medblocks tenants list",
        )
    return NotFound(
        f"no {partitions_name} partition {key}", hint="list them: medblocks tenants list"
    )
