"""Helpers for tests that run the ``medblocks`` CLI as real subprocesses against one instance."""

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from medblocks_pipelines.cli.runtime import EMBEDDED_DAGSTER_YAML
from medblocks_pipelines.lib.registry import open_control_plane
from medblocks_pipelines.lib.settings import Settings

T = TypeVar("T")
TENANT, SOURCE, ORG = "acme", "mercy-ehr", "mercy"


def dagster_home(tmp_path: Path, *, source_limit: int = 2) -> Path:
    """An embedded-style instance folder whose per-source run limit is ``source_limit``."""
    home = tmp_path / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    yaml = EMBEDDED_DAGSTER_YAML.replace(
        "key: medblocks/source\n        value:\n          applyLimitPerUniqueValue: true\n"
        "        limit: 2",
        "key: medblocks/source\n        value:\n          applyLimitPerUniqueValue: true\n"
        f"        limit: {source_limit}",
    )
    assert f"limit: {source_limit}" in yaml
    (home / "dagster.yaml").write_text(yaml)
    return home


def seed(settings: Settings) -> None:
    cp = open_control_plane(settings)
    cp.add_tenant(TENANT, "Acme")
    cp.add_source(SOURCE, "Mercy", "epic", "ehr", "http://x", ["backend"])
    cp.add_organization(ORG, TENANT, SOURCE, "Mercy General")
    cp.engine.dispose()


def ndjson_folder(root: Path, patients: int, *, start: int = 0) -> Path:
    """A folder with ``patients`` Patient resources (ids p<start>..)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "Patient.ndjson", "w") as fh:
        for i in range(start, start + patients):
            fh.write(json.dumps({"resourceType": "Patient", "id": f"p{i}", "gender": "other"}))
            fh.write("\n")
    return root


def start_cli(*args: str, log: Path) -> subprocess.Popen[bytes]:
    """``python -m medblocks_pipelines.cli ARGS`` with this process's environment (PYTHONPATH,
    MEDBLOCKS_*, DAGSTER_HOME), output to ``log``."""
    out = open(log, "wb")  # noqa: SIM115 - closed by the process's end
    return subprocess.Popen(
        [sys.executable, "-m", "medblocks_pipelines.cli", *args],
        stdout=out,
        stderr=subprocess.STDOUT,
        env={**os.environ, "COLUMNS": "200"},
    )


def wait_for(what: Callable[[], T], *, timeout: float = 240, desc: str = "") -> T:
    """Poll ``what`` until it returns something truthy (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = what()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {desc or what}")
