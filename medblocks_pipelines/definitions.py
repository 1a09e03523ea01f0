"""The Dagster entry point: every definition under ``defs/`` (one folder per pattern)."""

from pathlib import Path

import dagster as dg


@dg.definitions
def defs() -> dg.Definitions:
    """Load the project's defs folder."""
    return dg.load_from_defs_folder(path_within_project=Path(__file__).parent)
