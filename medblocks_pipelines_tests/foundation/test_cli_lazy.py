"""`medblocks --help` loads no command module: no Dagster, DuckDB, Polars or sandbox import, and the
listing's short help (read from source) is what the commands themselves say."""

import subprocess
import sys

import click
import pytest

from medblocks_pipelines.cli import PLUGINS, main
from medblocks_pipelines.cli.lazy import LazyGroup, load_command, short_help, source_help

HEAVY = ("dagster", "duckdb", "polars", "sqlalchemy", "medblocks_sandbox")


def _imported_by(*args: str) -> set[str]:
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "medblocks_pipelines.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Commands:" in proc.stdout
    return {
        line.rsplit("|", 1)[1].strip()
        for line in proc.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }


@pytest.mark.parametrize(
    "args", [("--help",), ("sync", "--help"), ("warehouse", "--help"), ("db", "--help")]
)
def test_help_imports_nothing_heavy(args: tuple[str, ...]) -> None:
    modules = _imported_by(*args)
    assert "medblocks_pipelines.cli" in modules  # the parse saw the imports
    heavy = sorted(m for m in modules if m.split(".")[0] in HEAVY or m.startswith(HEAVY))
    assert heavy == []


def test_running_a_command_loads_it() -> None:
    sync = main.commands["sync"]
    assert isinstance(sync, LazyGroup)
    ctx = click.Context(sync)
    assert "backend" in sync.list_commands(ctx)
    assert isinstance(sync.get_command(ctx, "backend"), click.Command)
    assert "backend" in sync.commands


@pytest.mark.parametrize("target", sorted({t for t, _, _ in PLUGINS}))
def test_source_help_is_the_commands_own(target: str) -> None:
    command = load_command(target)
    assert command is not None, target
    assert source_help(target), f"{target} has no help"
    limit = 60
    assert short_help(source_help(target), limit) == (command.get_short_help_str(limit))
