"""`python -m medblocks_pipelines.cli` is the `medblocks` command."""

from medblocks_pipelines.cli import run

run()
