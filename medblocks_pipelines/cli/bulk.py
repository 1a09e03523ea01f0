"""``medblocks bulk ...``: look at an organization's Bulk Data export and set its starting ``_since``.

* ``bulk status --tenant T --org O``: the in-flight (or last) export: status, polls and progress,
  the manifest in counts, errors, the types held back for the next sync and the watermark;
* ``bulk set-since --tenant T --org O ISO`` (or ``--clear``): where the next incremental export
  starts (drops the per-type holds).
"""

import json
from typing import Any

import click

from medblocks_pipelines.lib.fhir.bulk_status import org_bulk_status
from medblocks_pipelines.lib.fhir.bulk_sync import set_since


@click.group("bulk")
def bulk() -> None:
    """Bulk Data exports of backend organizations."""


@bulk.command("status")
@click.option("--tenant", required=True)
@click.option("--org", "org_id", required=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def bulk_status(tenant: str, org_id: str, as_json: bool) -> None:
    """The organization's in-flight or last export, its manifest, errors and missing types."""
    from dataclasses import asdict

    from medblocks_pipelines.cli.core import control_plane, print_table

    cp = control_plane()
    cp.get_organization(org_id)  # NotFound with a hint when the id is wrong
    st = org_bulk_status(cp, tenant, org_id)
    if as_json:
        click.echo(json.dumps(asdict(st), indent=2, default=str))
        return
    click.echo(f"watermark (_since of the next export): {st.watermark or '(none: full export)'}")
    if st.holds:
        held = ", ".join(f"{t} since {s or 'the beginning'}" for t, s in sorted(st.holds.items()))
        click.secho(f"types held back (missing from an earlier export): {held}", fg="yellow")
    ex = st.export
    if ex is None:
        click.echo(f"no export yet for {org_id}")
        return
    rows: list[list[Any]] = [
        ["export", ex.export_id],
        ["status", ex.status + (" (in flight)" if ex.in_flight else "")],
        ["kicked off", ex.kicked_off_at],
        ["_since", ex.since or "(full export)"],
        ["transactionTime", ex.transaction_time],
        ["polls", ex.polls],
        ["progress", ex.progress],
        ["files", ", ".join(f"{n} {k}" for k, n in sorted(ex.files.items()))],
        ["landed", ex.landed],
        ["missing types", ", ".join(ex.missing_types)],
        ["error", ex.error],
        ["request", json.dumps(ex.request, sort_keys=True)],
    ]
    print_table(f"bulk export of {org_id}", ["", "value"], rows)
    if ex.manifest_counts:
        print_table(
            "manifest counts",
            ["type", "count"],
            [[t, f"{n:,}"] for t, n in sorted(ex.manifest_counts.items())],
        )


@bulk.command("set-since")
@click.option("--tenant", required=True)
@click.option("--org", "org_id", required=True)
@click.argument("since", required=False)
@click.option("--clear", is_flag=True, help="No _since: the next export is a full one.")
def bulk_set_since(tenant: str, org_id: str, since: str | None, clear: bool) -> None:
    """Set the _since (FHIR instant, e.g. 2026-01-01T00:00:00Z) the next export starts from."""
    from medblocks_pipelines.cli.core import control_plane

    if bool(since) == clear:
        raise click.UsageError("give an ISO instant or --clear (not both)")
    set_since(control_plane(), tenant, org_id, None if clear else since)
    click.echo(f"next export of {org_id} starts from {since or 'the beginning (full)'}")
