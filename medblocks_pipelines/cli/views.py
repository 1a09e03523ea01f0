"""``medblocks views``: SQL on FHIR ViewDefinitions.

``test`` runs the official conformance suite and writes the standard test report; ``list``,
``show`` and ``compile`` inspect the shipped and user views (``MEDBLOCKS_VIEWS_DIR``);
``dictionary`` prints the markdown data dictionary.
"""

import json
import sys
from decimal import Decimal
from pathlib import Path

import click

from medblocks_pipelines.lib.errors import ViewDefinitionError
from medblocks_pipelines.lib.warehouse.views import (
    PROVENANCE_COLUMNS,
    compile_view,
    data_dictionary,
    load_core_views,
    run_test_suite,
)
from medblocks_pipelines.lib.warehouse.views.runner import default_suite_dir

__all__ = ["views"]


@click.group("views")
def views() -> None:
    """SQL on FHIR v2 ViewDefinitions compiled to DuckDB."""


@views.command("test")
@click.argument(
    "directory", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path)
)
@click.option(
    "--report",
    "report_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the test report (JSON, standard SQL on FHIR format) here.",
)
def test_command(directory: Path | None, report_path: Path | None) -> None:
    """Run the conformance suite in DIRECTORY (default: MEDBLOCKS_SOF_TESTS or ../shared)."""
    if directory is None:
        directory = default_suite_dir()
        if directory is None:
            raise click.UsageError(
                "no suite directory given and none found (set MEDBLOCKS_SOF_TESTS)"
            )
    report = run_test_suite(directory)
    if not report:
        raise click.UsageError(f"no suite files (*.json with tests) in {directory}")
    passed = failed = 0
    for file_name, suite in report.items():
        ok = sum(1 for t in suite["tests"] if t["result"]["passed"])
        bad = len(suite["tests"]) - ok
        passed += ok
        failed += bad
        mark = click.style("ok", fg="green") if not bad else click.style("FAIL", fg="red")
        click.echo(f"{mark:>4} {file_name}: {ok}/{len(suite['tests'])}")
        for t in suite["tests"]:
            if not t["result"]["passed"]:
                click.echo(f"       - {t['name']}: {t['result'].get('error', '')}")
    if report_path is not None:
        report_path.parent.mkdir(parents=True, exist_ok=True)
        report_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
        click.echo(f"report written to {report_path}")
    click.echo(f"passed {passed}, failed {failed}, total {passed + failed}")
    if failed:
        sys.exit(1)


@views.command("list")
def list_command() -> None:
    """List the shipped and user views."""
    for name, view in load_core_views().items():
        compiled = compile_view(view)
        click.echo(f"{name:<32} {compiled.resource:<22} {len(compiled.columns)} columns")


def _get(name: str) -> dict[str, object]:
    found = load_core_views()
    if name not in found:
        raise click.UsageError(f"no view named {name!r}; see `medblocks views list`")
    return found[name]


@views.command("show")
@click.argument("name")
def show_command(name: str) -> None:
    """Print a view's ViewDefinition JSON."""
    click.echo(json.dumps(_get(name), indent=2, default=str))


@views.command("compile")
@click.argument("target")
@click.option("--table", default="resources", show_default=True, help="Table to read from.")
@click.option(
    "--provenance/--no-provenance",
    default=True,
    show_default=True,
    help="Carry the provenance columns of the resources table.",
)
def compile_command(target: str, table: str, provenance: bool) -> None:
    """Print the DuckDB SQL of TARGET (a ViewDefinition JSON file or a view name)."""
    path = Path(target)
    if path.is_file():
        try:
            view = json.loads(path.read_text(), parse_float=Decimal)
        except json.JSONDecodeError as exc:
            raise ViewDefinitionError(f"{path.name}: not valid JSON ({exc.msg})") from exc
    else:
        view = _get(target)
    compiled = compile_view(
        view, table=table, passthrough_columns=PROVENANCE_COLUMNS if provenance else ()
    )
    click.echo(compiled.sql)


@views.command("dictionary")
def dictionary_command() -> None:
    """Print the markdown data dictionary of every view."""
    click.echo(data_dictionary(load_core_views()))
