"""`medblocks warehouse identity ...`: evaluate against a ground truth file, stats, explain."""

import csv
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from medblocks_pipelines.cli import main
from medblocks_pipelines.lib.settings import get_settings
from medblocks_pipelines.lib.warehouse.build import build_warehouse
from medblocks_pipelines_tests.warehouse.conftest import TENANT, land_population
from medblocks_sandbox.generator import PopulationSpec, generate_population


@pytest.fixture(scope="module")
def tenant_built(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Path, list[tuple[str, str, str]]]]:
    """One warehouse for the module; the CLI finds it through MEDBLOCKS_DATA_DIR."""
    tmp = tmp_path_factory.mktemp("cli")
    with pytest.MonkeyPatch.context() as mp:
        for var in ("MEDBLOCKS_DATABASE_URL", "MEDBLOCKS_LAKE_ROOT", "MEDBLOCKS_WAREHOUSE_DIR"):
            mp.delenv(var, raising=False)
        mp.setenv("MEDBLOCKS_DATA_DIR", str(tmp / "data"))
        settings = get_settings()
        settings.ensure_dirs()
        pop = generate_population(PopulationSpec(seed=4, persons=30))
        land_population(settings, pop)
        build_warehouse(TENANT, settings=settings)
        truth = tmp / "truth.csv"
        with open(truth, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["source", "patient_id", "person_id"])
            w.writerows(pop.truth)
        yield truth, pop.truth


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def test_evaluate_reports_pairwise_metrics(tenant_built: tuple[Path, list]) -> None:
    truth, rows = tenant_built
    code, out = _run(
        "warehouse",
        "identity",
        "evaluate",
        "--tenant",
        TENANT,
        "--truth",
        str(truth),
        "--json",
        "--min-precision",
        "0.99",
        "--min-recall",
        "0.95",
    )
    assert code == 0, out
    metrics = json.loads(out)
    assert metrics["records"] == len(rows) and metrics["unmatched_truth_records"] == 0
    assert metrics["precision"] >= 0.99 and metrics["recall"] >= 0.95


def test_evaluate_fails_below_the_minimum(tenant_built: tuple[Path, list], tmp_path: Path) -> None:
    _, rows = tenant_built
    # a truth in which every source patient is its own person: every predicted pair is wrong
    lonely = tmp_path / "lonely.csv"
    with open(lonely, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["patient_key", "person_id"])
        for i, (org, pid, _) in enumerate(rows):
            w.writerow([f"{org}/Patient/{pid}", f"solo-{i}"])
    code, out = _run(
        "warehouse",
        "identity",
        "evaluate",
        "--tenant",
        TENANT,
        "--truth",
        str(lonely),
        "--min-precision",
        "0.5",
    )
    assert code == 1 and "below the required minimum" in out


def test_evaluate_rejects_a_truth_file_without_keys(
    tenant_built: tuple[Path, list], tmp_path: Path
) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("name,person_id\nx,1\n")
    code, out = _run("warehouse", "identity", "evaluate", "--tenant", TENANT, "--truth", str(bad))
    assert code == 1 and "expected columns" in out


def test_stats_and_explain_show_ids_and_levels_only(tenant_built: tuple[Path, list]) -> None:
    _, rows = tenant_built
    code, out = _run("warehouse", "identity", "stats", "--tenant", TENANT)
    assert code == 0 and "probabilistic" in out
    org, pid, _ = rows[0]
    code, out = _run("warehouse", "identity", "explain", "--tenant", TENANT, f"{org}/Patient/{pid}")
    assert code == 0 and "-> person-" in out
    code, out = _run("warehouse", "identity", "explain", "--tenant", TENANT, "nope/Patient/1")
    assert code == 1 and "no source patient" in out


def test_persons_across_patterns(tenant_built: tuple[Path, list]) -> None:
    code, out = _run("warehouse", "identity", "persons", "--tenant", TENANT, "--min-patterns", "4")
    assert code == 0 and "seen through >= 4 patterns" in out
    found = re.search(r"(\d+) persons of acme", out)
    assert found and int(found.group(1)) > 0 and "person-" in out
