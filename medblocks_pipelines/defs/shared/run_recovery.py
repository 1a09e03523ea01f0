"""Crash recovery without a human: runs whose process is gone, and what they left behind.

A run started by the ``medblocks`` CLI executes inside the CLI's process and carries its identity
as tags (``medblocks/host``, ``medblocks/pid``, ``medblocks/pid_start``, written by
``cli.runtime``) and a heartbeat (``medblocks/heartbeat``, every 30 s). A ``kill -9`` leaves that
run ``STARTED`` forever: Dagster has no run worker to monitor for it (``run_monitoring`` in
``dagster.yaml`` covers runs a run launcher started, and frees the slots of finished runs after
``free_slots_after_run_end_seconds``). :func:`recover` finds
in-progress CLI runs whose process is gone (on this host: the pid no longer runs; recorded on
another host: no heartbeat for ``MEDBLOCKS_RUN_HEARTBEAT_TIMEOUT_S``, 600 s), and, with
``repair=True``:

1. marks them failed (``DagsterInstance.report_run_failed``), which lets the run queue and the
   CLI's admission count them out;
2. frees the op-concurrency (pool) slots held or claimed by any run that has ended, dead or not
   (``instance.event_log_storage.free_concurrency_slots_for_run``, the call Dagster's own daemon
   makes; marking a run failed alone does not free them);
3. closes their ``pull_history`` rows as ``failed`` with the reason, and puts bulk exports they
   left ``downloading`` back to ``ready`` (as a failed land run does);
4. removes their download folders (``bulk_work/``) and half-built warehouse files.

It runs at the start of every CLI run, in ``dead_run_recovery_sensor`` (deployments with the
daemon) and in ``medblocks doctor --repair``; ``medblocks doctor`` shows the same report
without changing anything. Files a run of another host left are that host's to remove (its next
CLI run or sensor).
"""

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dagster as dg

from medblocks_pipelines.lib.runs import leftovers
from medblocks_pipelines.lib.runs.process import is_alive, this_host
from medblocks_pipelines.lib.settings import Settings, Tuning

if TYPE_CHECKING:
    from medblocks_pipelines.lib.registry import ControlPlane

LAUNCHED_BY_TAG = "medblocks/launched_by"
HOST_TAG = "medblocks/host"
HEARTBEAT_TAG = "medblocks/heartbeat"
PID_TAG = "medblocks/pid"
PID_START_TAG = "medblocks/pid_start"
IN_PROGRESS = [
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]
ENDED = [dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED]


@dataclass
class RecoveryReport:
    """What a crash left (``repair=False``) or what was repaired (``repair=True``)."""

    dead_runs: list[str] = field(default_factory=list)
    slot_runs: dict[str, list[str]] = field(default_factory=dict)  # run id -> pools
    stale_pulls: list[leftovers.StalePull] = field(default_factory=list)
    stale_exports: list[leftovers.StalePull] = field(default_factory=list)
    orphan_paths: list[Path] = field(default_factory=list)
    repaired: bool = False

    @property
    def clean(self) -> bool:
        return not (
            self.dead_runs
            or self.slot_runs
            or self.stale_pulls
            or self.stale_exports
            or self.orphan_paths
        )


def heartbeat_timeout_seconds() -> float:
    """How old a CLI run's last heartbeat may be before another host calls the run dead."""
    return Tuning.from_env().run_heartbeat_timeout_s  # MEDBLOCKS_RUN_HEARTBEAT_TIMEOUT_S


def _run_is_dead(run: dg.DagsterRun, host: str, now: float) -> bool:
    tags = run.tags
    if tags.get(HOST_TAG) == host and tags.get(PID_TAG, "").isdigit():
        # this host sees the process itself: that answer wins over the heartbeat
        return not is_alive(int(tags[PID_TAG]), tags.get(PID_START_TAG, ""))
    beat = tags.get(HEARTBEAT_TAG, "")
    return beat.isdigit() and now - int(beat) > heartbeat_timeout_seconds()


def dead_runs(instance: dg.DagsterInstance) -> list[dg.DagsterRun]:
    """In-progress CLI runs whose process is gone: on this host by pid, elsewhere by a heartbeat
    older than ``MEDBLOCKS_RUN_HEARTBEAT_TIMEOUT_S`` (600 s)."""
    host, now = this_host(), time.time()
    runs = instance.get_runs(dg.RunsFilter(statuses=IN_PROGRESS, tags={LAUNCHED_BY_TAG: "cli"}))
    return [run for run in runs if _run_is_dead(run, host, now)]


def _slot_holders(instance: dg.DagsterInstance, dead: set[str]) -> dict[str, list[str]]:
    """Runs that hold or wait for pool slots although they ended (or are dead), with the pools."""
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return {}
    run_ids = storage.get_concurrency_run_ids()
    if not run_ids:
        return {}
    ended = {
        r.run_id for r in instance.get_runs(dg.RunsFilter(run_ids=sorted(run_ids), statuses=ENDED))
    }
    holders = (ended | dead) & set(run_ids)
    out: dict[str, list[str]] = {run_id: [] for run_id in sorted(holders)}
    for key in sorted(storage.get_concurrency_keys()):
        info = storage.get_concurrency_info(key)
        for run_id in {s.run_id for s in info.claimed_slots} | {
            s.run_id for s in info.pending_steps
        }:
            if run_id in out:
                out[run_id].append(key)
    return out


def _run_outcome(instance: dg.DagsterInstance, dead: set[str]) -> Any:
    def outcome(run_id: str) -> str | None:
        if run_id in dead:
            return f"run {run_id[:8]} died: its process is gone (crash recovery)"
        run = instance.get_run_by_id(run_id)
        # a successful run that left its row open is a bug to see, not a crash to repair
        if run is None or run.status not in (
            dg.DagsterRunStatus.FAILURE,
            dg.DagsterRunStatus.CANCELED,
        ):
            return None
        return f"run {run_id[:8]} ended {run.status.value} before its work was recorded"

    return outcome


def recover(
    instance: dg.DagsterInstance, *, control_plane: "ControlPlane", settings: Settings, repair: bool
) -> RecoveryReport:
    """Find (and with ``repair``, clear) what dead runs left: see the module docstring."""
    dead = dead_runs(instance)
    dead_ids = {run.run_id for run in dead}
    report = RecoveryReport(dead_runs=sorted(dead_ids), repaired=repair)
    if repair:
        for run in dead:
            instance.report_run_failed(
                run, "The process running this run is gone (killed or crashed): crash recovery."
            )
    report.slot_runs = _slot_holders(instance, dead_ids)
    if repair:
        for run_id in report.slot_runs:
            instance.event_log_storage.free_concurrency_slots_for_run(run_id)
    report.stale_pulls = leftovers.stale_pulls(
        control_plane.running_pulls(), _run_outcome(instance, dead_ids)
    )
    report.stale_exports = leftovers.stale_downloads(
        control_plane.list_bulk_exports(status="downloading"), _run_outcome(instance, dead_ids)
    )
    if repair:
        leftovers.fail_pulls(control_plane, report.stale_pulls)
        leftovers.release_downloads(control_plane, report.stale_exports)
    live = [
        r.run_id
        for r in instance.get_runs(dg.RunsFilter(statuses=IN_PROGRESS))
        if r.run_id not in dead_ids
    ]
    report.orphan_paths = leftovers.remove_orphans(settings, live, dry_run=not repair)
    return report
