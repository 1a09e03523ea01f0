"""The ``medblocks`` command: the operator's entry point.

Errors print one clear line plus a hint and exit non-zero; ``--verbose`` shows the stack.
Pattern modules contribute their commands through :data:`PLUGINS`, imported only when used
(``cli/lazy.py``): ``medblocks --help`` imports neither Dagster nor DuckDB nor the sandbox.
"""

import logging
import os
import sys
from typing import Any

import click

from medblocks_pipelines.cli.lazy import LazyGroup, load_command
from medblocks_pipelines.lib.errors import MedblocksError

# (module:attribute, parent group or None for top level, command name)
PLUGINS: list[tuple[str, str | None, str]] = [
    ("medblocks_pipelines.cli.db:db", None, "db"),
    ("medblocks_pipelines.cli.views:views", None, "views"),
    ("medblocks_pipelines.cli.backend:sync_backend", "sync", "backend"),
    ("medblocks_pipelines.cli.backend:keys", None, "keys"),
    ("medblocks_pipelines.cli.bulk:bulk", None, "bulk"),
    ("medblocks_pipelines.cli.patient_access:sync_patient_access", "sync", "patient-access"),
    ("medblocks_pipelines.cli.patient_access:connections_link", "connections", "link"),
    ("medblocks_pipelines.cli.patient_access:connections_revoke", "connections", "revoke"),
    ("medblocks_pipelines.cli.patient_access:connections_refresh", "connections", "refresh"),
    ("medblocks_pipelines.cli.network:network_sync", "sync", "network"),
    ("medblocks_pipelines.cli.network:audit_list", "audit", "list"),
    ("medblocks_pipelines.cli.udap:network", None, "network"),
    ("medblocks_pipelines.cli.clinician_workflow:sync_clinician", "sync", "clinician"),
    ("medblocks_pipelines.cli.warehouse_extra:identity", "warehouse", "identity"),
    ("medblocks_pipelines.cli.ops:webhooks", None, "webhooks"),
    ("medblocks_pipelines.cli.ops:exports", None, "exports"),
    ("medblocks_pipelines.cli.doctor:doctor", None, "doctor"),
    ("medblocks_pipelines.cli.orgs_config:orgs_show", "orgs", "show"),
    ("medblocks_pipelines.cli.orgs_config:orgs_set_config", "orgs", "set-config"),
]


class MedblocksGroup(LazyGroup):
    """A group that turns our errors into one line + hint instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MedblocksError as exc:
            if ctx.find_root().params.get("verbose"):
                raise
            click.secho(f"error: {exc}", fg="red", err=True)
            if exc.hint:
                click.echo(f"hint: {exc.hint}", err=True)
            sys.exit(1)
        except (OSError, ValueError) as exc:
            if ctx.find_root().params.get("verbose"):
                raise
            click.secho(f"error: {type(exc).__name__}: {exc}", fg="red", err=True)
            click.echo("hint: run again with --verbose for the stack", err=True)
            sys.exit(1)


@click.group(cls=MedblocksGroup)
@click.option(
    "--verbose", "--debug", "-v", "verbose", is_flag=True, help="Show stack traces and debug logs."
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    envvar="MEDBLOCKS_DATA_DIR",
    help="Where the embedded default keeps its files (default ./data).",
)
def main(verbose: bool, data_dir: str | None) -> None:
    """medblocks_pipelines: four integration patterns, one warehouse per tenant."""
    if data_dir:
        os.environ["MEDBLOCKS_DATA_DIR"] = os.path.abspath(data_dir)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def run() -> None:
    """The ``medblocks`` console entry point: :func:`main`, then a quick exit (``quick_exit``:
    the interpreter's teardown after a command that loaded Dagster costs ~0.5 s)."""
    from medblocks_pipelines.cli.quick_exit import exit_now

    try:
        main()  # standalone mode: ends in SystemExit, whatever happened
    except SystemExit as exc:
        exit_now(exc.code)


def _attach_plugins() -> None:
    from medblocks_pipelines.cli import core

    core.register(main)
    for target, parent, name in PLUGINS:
        group = main if parent is None else main.commands.get(parent)
        if isinstance(group, LazyGroup):
            group.add_lazy(name, target)
        elif isinstance(group, click.Group):  # a parent that is not lazy: load it now
            command = load_command(target)
            if command is not None:
                group.add_command(command, name)


_attach_plugins()
