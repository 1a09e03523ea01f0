"""`medblocks-sandbox generate`: write a synthetic population (or a streamed scale data set) to disk.

Attached to the sandbox command in :mod:`medblocks_sandbox.cli`.
"""

from pathlib import Path

import click

from medblocks_sandbox.generator import (
    PopulationSpec,
    evolve,
    generate_population,
    stream_bulk_ndjson,
    write_ndjson,
)


@click.command()
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("data/synthetic"),
    show_default=True,
    help="Output folder.",
)
@click.option("--seed", type=int, default=42, show_default=True)
@click.option(
    "--persons",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Persons in the population (rich path).",
)
@click.option(
    "--steps",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="evolve() steps to apply before writing.",
)
@click.option(
    "--resources",
    type=click.IntRange(min=0),
    default=None,
    help="Scale path instead: stream exactly this many resources.",
)
@click.option("--files-per-type", type=click.IntRange(min=1), default=1, show_default=True)
@click.option(
    "--per-org/--flat",
    default=True,
    show_default=True,
    help="Scale path: one folder per organization.",
)
def generate(
    out_dir: Path,
    seed: int,
    persons: int,
    steps: int,
    resources: int | None,
    files_per_type: int,
    per_org: bool,
) -> None:
    """Write synthetic FHIR NDJSON per org and type, with identity and fact ground truth."""
    if resources is not None:
        stats = stream_bulk_ndjson(
            out_dir,
            resources=resources,
            seed=seed,
            files_per_type=files_per_type,
            per_org=per_org,
            truth=True,
        )
        rate = stats["resources"] / stats["seconds"] if stats["seconds"] else 0.0
        click.echo(
            f"wrote {stats['resources']:,} resources ({stats['bytes'] / 1e6:,.1f} MB) "
            f"for {stats['patients']:,} family copies to {out_dir} in "
            f"{stats['seconds']:.1f} s ({rate:,.0f} resources/s)"
        )
        return
    pop = generate_population(PopulationSpec(seed=seed, persons=persons))
    for step in range(1, steps + 1):
        evolve(pop, step)
    result = write_ndjson(pop, out_dir)
    click.echo(
        f"wrote {result['resources']:,} resources for {len(pop.persons)} persons at "
        f"{len(pop.organizations)} organizations to {out_dir} (truth in {out_dir}/truth)"
    )
    for org, counts in result["counts"].items():
        click.echo(f"  {org:<20} " + ", ".join(f"{t} {n}" for t, n in counts.items()))
