"""``medblocks warehouse identity ...``: evaluate and inspect identity links of a tenant's warehouse.

Output shows our own ids, rules, scores and comparison levels only, never names or birth dates.
"""

import csv
import json
from pathlib import Path

import click

from medblocks_pipelines.cli.core import print_table
from medblocks_pipelines.lib.errors import ConfigError
from medblocks_pipelines.lib.settings import get_settings
from medblocks_pipelines.lib.warehouse.build import open_warehouse
from medblocks_pipelines.lib.warehouse.identity import evaluate_warehouse


@click.group()
def identity() -> None:
    """Identity links (source patients -> persons) of a tenant's warehouse."""


def read_truth(path: Path) -> dict[str, str]:
    """Ground truth as ``patient_key -> true person``.

    CSV with a header: either ``patient_key,person_id`` or ``source,patient_id,person_id`` (the
    patient key is then ``source/Patient/patient_id``).
    """
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        fields = set(reader.fieldnames or [])
        out: dict[str, str] = {}
        for row in reader:
            if "patient_key" in fields:
                key = row["patient_key"]
            elif {"source", "patient_id"} <= fields:
                key = f"{row['source']}/Patient/{row['patient_id']}"
            else:
                raise ConfigError(
                    f"{path.name}: expected columns patient_key,person_id or "
                    "source,patient_id,person_id",
                )
            if not row.get("person_id"):
                raise ConfigError(f"{path.name}: a row has no person_id")
            out[key] = row["person_id"]
    return out


@identity.command("evaluate")
@click.option("--tenant", required=True)
@click.option(
    "--truth",
    "truth_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="CSV: patient_key,person_id or source,patient_id,person_id.",
)
@click.option("--min-precision", type=float, default=None, help="Exit 1 below this precision.")
@click.option("--min-recall", type=float, default=None, help="Exit 1 below this recall.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
def identity_evaluate(
    tenant: str,
    truth_path: Path,
    min_precision: float | None,
    min_recall: float | None,
    as_json: bool,
) -> None:
    """Pairwise precision and recall of the warehouse's links against a ground truth file."""
    truth = read_truth(truth_path)
    with open_warehouse(tenant, settings=get_settings()) as con:
        metrics = evaluate_warehouse(con, truth)
    if as_json:
        click.echo(json.dumps(metrics, sort_keys=True))
    else:
        print_table(
            f"identity {tenant}",
            ["metric", "value"],
            [[k, f"{v:.4f}" if isinstance(v, float) else f"{v:,}"] for k, v in metrics.items()],
        )
    low = (min_precision is not None and float(metrics["precision"]) < min_precision) or (
        min_recall is not None and float(metrics["recall"]) < min_recall
    )
    if low:
        raise click.ClickException("identity accuracy below the required minimum")


@identity.command("stats")
@click.option("--tenant", required=True)
def identity_stats(tenant: str) -> None:
    """Persons, links by rule, persons by number of patterns, vetoed and conflicted links."""
    with open_warehouse(tenant, settings=get_settings()) as con:
        rows: list[list[str]] = []
        for rule, n in con.execute(
            "SELECT rule, count(*) FROM patient_links GROUP BY 1 ORDER BY 1"
        ).fetchall():
            rows.append([f"links: {rule}", f"{n:,}"])
        for k, n in con.execute(
            "SELECT n_patterns, count(*) FROM persons GROUP BY 1 ORDER BY 1"
        ).fetchall():
            rows.append([f"persons seen through {k} pattern(s)", f"{n:,}"])
        for veto, n in con.execute(
            "SELECT veto, count(*) FROM identity_edges WHERE veto IS NOT NULL GROUP BY 1 ORDER BY 1"
        ).fetchall():
            rows.append([f"vetoed: {veto}", f"{n:,}"])
        one = con.execute(
            "SELECT count(*), count(*) FILTER (WHERE conflicts > 0) FROM persons"
        ).fetchone()
        assert one is not None
        rows.insert(0, ["persons", f"{one[0]:,}"])
        rows.append(["persons to review (conflicts)", f"{one[1]:,}"])
    print_table(f"identity {tenant}", ["", "count"], rows)


@identity.command("explain")
@click.option("--tenant", required=True)
@click.argument("patient_key")
@click.argument("other_key", required=False)
def identity_explain(tenant: str, patient_key: str, other_key: str | None) -> None:
    """Why a source patient belongs to its person (or how two source patients compare)."""
    with open_warehouse(tenant, settings=get_settings()) as con:
        link = con.execute(
            "SELECT person_id, rule, linked_to, score FROM patient_links WHERE patient_key = ?",
            [patient_key],
        ).fetchone()
        if link is None:
            raise ConfigError(f"no source patient {patient_key} in tenant {tenant}")
        click.echo(f"{patient_key} -> {link[0]} (rule {link[1]}, score {link[3]:.4f})")
        params: list[str] = [patient_key, patient_key]
        where = "(key_l = ? OR key_r = ?)"
        if other_key:
            where = "((key_l = ? AND key_r = ?) OR (key_l = ? AND key_r = ?))"
            params = [patient_key, other_key, other_key, patient_key]
        edges = con.execute(
            "SELECT key_l, key_r, rule, match_probability, accepted, veto, evidence "
            f"FROM identity_edges WHERE {where} ORDER BY accepted DESC, match_probability DESC",
            params,
        ).fetchall()
    if not edges:
        click.echo("no candidate links (no blocking rule paired these records)")
    for key_l, key_r, rule, prob, accepted, veto, evidence in edges:
        other = key_r if key_l == patient_key else key_l
        state = "accepted" if accepted else f"vetoed ({veto})"
        click.echo(f"  {other}: {rule}, p={prob:.4f}, {state}")
        if evidence:
            for comp, level in json.loads(evidence).items():
                click.echo(f"      {comp}: {level['level']} ({level['weight']:+.2f})")


@identity.command("persons")
@click.option("--tenant", required=True)
@click.option("--min-patterns", type=int, default=2, show_default=True)
@click.option("--limit", type=int, default=20, show_default=True)
def identity_persons(tenant: str, min_patterns: int, limit: int) -> None:
    """Persons linked across patterns, with their sources and deduplicated fact counts."""
    with open_warehouse(tenant, settings=get_settings()) as con:
        total = con.execute(
            "SELECT count(*) FROM persons WHERE n_patterns >= ?", [min_patterns]
        ).fetchone()
        rows = con.execute(
            """
            SELECT p.person_id, p.n_patterns, array_to_string(p.patterns, ', '), p.n_sources,
                   p.n_source_patients,
                   (SELECT count(*) FROM facts f WHERE f.person_id = p.person_id),
                   (SELECT count(*) FROM facts f WHERE f.person_id = p.person_id
                                                   AND f.n_sources > 1)
            FROM persons p WHERE p.n_patterns >= ?
            ORDER BY p.n_patterns DESC, p.n_sources DESC, p.person_id LIMIT ?
            """,
            [min_patterns, limit],
        ).fetchall()
    print_table(
        f"{total[0] if total else 0:,} persons of {tenant} seen through >= {min_patterns} patterns",
        [
            "person",
            "patterns",
            "which",
            "sources",
            "source patients",
            "facts",
            "multi-source facts",
        ],
        [list(r) for r in rows],
    )
