"""The Dagster entry point: every definition under ``defs/`` (one folder per pattern)."""

from pathlib import Path

import dagster as dg

from medblocks_pipelines.defs.warehouse.lineage import with_landing_lineage


@dg.definitions
def defs() -> dg.Definitions:
    """Load the project's defs folder; wire every landing asset upstream of the warehouse."""
    return with_landing_lineage(dg.load_from_defs_folder(path_within_project=Path(__file__).parent))
