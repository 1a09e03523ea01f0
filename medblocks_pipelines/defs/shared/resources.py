"""Resources every pattern shares: the control plane and the settings (lake, warehouse paths)."""

from functools import cached_property

import dagster as dg

from medblocks_pipelines.lib.registry import ControlPlane, open_control_plane
from medblocks_pipelines.lib.settings import Settings, get_settings


class PlatformResource(dg.ConfigurableResource):
    """The platform's settings and control plane; empty fields fall back to MEDBLOCKS_* env vars."""

    data_dir: str | None = None

    @cached_property
    def settings(self) -> Settings:
        settings = get_settings(self.data_dir)
        settings.ensure_dirs()
        return settings

    @cached_property
    def control_plane(self) -> ControlPlane:
        return open_control_plane(self.settings)
