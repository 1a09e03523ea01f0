"""``medblocks doctor``: what a crash left behind, and ``--repair`` to clear it.

Shows (and with ``--repair`` fixes) runs of this host whose process is gone, pool slots held by
ended runs, ``pull_history`` rows still ``running`` and bulk exports still ``downloading`` for runs
that died or failed, and orphaned download folders and half-built warehouse files. Every CLI run and ``dead_run_recovery_sensor`` do the same
repair on their own; this is the operator's view of it (docs/OPERATIONS.md, runbook).
"""

import click

from medblocks_pipelines.cli.core import print_table


@click.command()
@click.option("--repair", is_flag=True, help="Fix what is shown (idempotent).")
def doctor(repair: bool) -> None:
    """Show what crashed runs left behind; --repair clears it."""
    from medblocks_pipelines.cli.runtime import get_instance, recover_dead_runs

    report = recover_dead_runs(get_instance(), repair=repair)
    done = "repaired" if repair else "found"
    rows = [["dead run", r, "process gone"] for r in report.dead_runs]
    rows += [["pool slots", r, ", ".join(pools) or "-"] for r, pools in report.slot_runs.items()]
    rows += [["running pull", str(p.pull_id), p.reason] for p in report.stale_pulls]
    rows += [["downloading export", e.export_id, e.reason] for e in report.stale_exports]
    rows += [["leftover file", str(p), "-"] for p in report.orphan_paths]
    if report.clean:
        click.echo("nothing to repair: no dead runs, held slots, stale pulls or leftover files")
        return
    print_table(f"crash leftovers ({done})", ["kind", "id", "detail"], rows)
    if not repair:
        click.echo("run `medblocks doctor --repair` to fix them (CLI runs also do it on start)")
