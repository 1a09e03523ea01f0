"""Regenerate docs/DATA_DICTIONARY.md from a tiny synthetic warehouse (a dev tool)::

    .venv/bin/python -m medblocks_sandbox.drivers.data_dictionary > docs/DATA_DICTIONARY.md

The product's ``lib/warehouse/dictionary.py`` renders the markdown from any warehouse; this driver
builds one from the sandbox's generator so the product never imports the simulator.
"""

import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import duckdb

from medblocks_pipelines.lib.warehouse.dictionary import data_dictionary_markdown


def sample_warehouse(root: Path) -> Path:
    """Build a tiny synthetic warehouse (for column types) under ``root``."""
    from medblocks_pipelines.lib.settings import get_settings
    from medblocks_pipelines.lib.warehouse.build import build_warehouse
    from medblocks_pipelines.lib.warehouse.lake import LakeWriter, Provenance
    from medblocks_sandbox.generator import PopulationSpec, generate_population

    # A throwaway local lake and warehouse, whatever the environment points the real ones at.
    settings = dataclasses.replace(get_settings(root), lake_url=None, warehouse_url=None)
    settings.ensure_dirs()
    pop = generate_population(PopulationSpec(seed=1, persons=5))
    for org in pop.organizations:
        with LakeWriter(
            settings.lake_root, Provenance("sample", "backend", org.id, org.id, None, "sample")
        ) as w:
            for r in pop.resources_for(org.id):
                w.add(json.dumps(r))
    return build_warehouse("sample", settings=settings).path


def main() -> None:
    """Print the data dictionary (built from a tiny sample warehouse)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = sample_warehouse(Path(tmp))
        with duckdb.connect(str(path), read_only=True) as con:
            sys.stdout.write(data_dictionary_markdown(con))


if __name__ == "__main__":
    main()
