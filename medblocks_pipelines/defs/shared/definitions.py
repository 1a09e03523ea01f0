"""Resources bound for every pattern's assets, sensors and schedules."""

import dagster as dg

from medblocks_pipelines.defs.shared.resources import PlatformResource


@dg.definitions
def shared_resources() -> dg.Definitions:
    """The ``platform`` resource (settings + control plane) for the whole code location, its
    fields bound to the ``MEDBLOCKS_*`` variables that are set (``dg.EnvVar``)."""
    return dg.Definitions(resources={"platform": PlatformResource.from_env()})
