"""The warehouse build steps that run after the base tables, in order.

Each step is ``(con, ctx) -> dict[str, int]`` (see :mod:`medblocks_pipelines.lib.warehouse.build`): the
ViewDefinition tables, then identity (persons, patient links), then the unified record.
"""

from medblocks_pipelines.lib.warehouse.build import BuildStep

STEPS: list[BuildStep] = []
