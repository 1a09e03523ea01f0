"""The repo-root dagster.yaml is the embedded default: `dagster definitions validate` / `dagster dev`
work in a fresh clone with no environment, on the instance the CLI uses; production's PostgreSQL
config lives in deploy/dagster.yaml (its run is tested in test_dagster.py)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from medblocks_pipelines.cli.runtime import EMBEDDED_DAGSTER_YAML

ROOT = Path(__file__).parents[2]
# Where the root file puts the instance: the CLI's default, data/dagster_home.
STORAGE_KEYS = {"storage", "local_artifact_storage", "compute_logs"}


def test_root_dagster_yaml_is_the_embedded_instance() -> None:
    root = yaml.safe_load((ROOT / "dagster.yaml").read_text())
    assert {k: v for k, v in root.items() if k not in STORAGE_KEYS} == yaml.safe_load(
        EMBEDDED_DAGSTER_YAML
    ), "dagster.yaml and cli/runtime.py EMBEDDED_DAGSTER_YAML differ: keep them equal"
    assert root["storage"] == {"sqlite": {"base_dir": "data/dagster_home"}}
    assert root["local_artifact_storage"]["config"]["base_dir"] == "data/dagster_home"
    assert root["compute_logs"]["config"]["base_dir"] == "data/dagster_home/storage"


def test_production_dagster_yaml_is_postgres() -> None:
    prod = yaml.safe_load((ROOT / "deploy" / "dagster.yaml").read_text())
    assert set(prod["storage"]) == {"postgres"}


def test_definitions_validate_with_no_environment(tmp_path: Path) -> None:
    """What a newcomer types first, with no DAGSTER_HOME and no DAGSTER_PG_*; run in a copy of the
    root's instance and project files so the instance lands under tmp_path."""
    for name in ("dagster.yaml", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "PYTHONPATH": str(ROOT),
    }
    dagster = Path(sys.executable).parent / "dagster"
    proc = subprocess.run(
        [str(dagster), "definitions", "validate"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "All code locations passed validation" in out
    # the location's name agrees everywhere (no warning repeated on every load)
    assert "does not match the name" not in out
    assert (tmp_path / "data" / "dagster_home" / "history" / "runs.db").exists()
