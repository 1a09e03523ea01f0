"""Resources every pattern shares: the control plane and the settings (lake, warehouse paths)."""

from functools import cached_property

import dagster as dg

from medblocks_pipelines.lib.registry import ControlPlane, open_control_plane
from medblocks_pipelines.lib.settings import Settings, env_is_set, get_settings, with_overrides

#: The resource's fields and the ``MEDBLOCKS_*`` variables behind them (lib/settings.py).
ENV_FIELDS: dict[str, str] = {
    "data_dir": "MEDBLOCKS_DATA_DIR",
    "database_url": "MEDBLOCKS_DATABASE_URL",
    "lake_root": "MEDBLOCKS_LAKE_ROOT",
    "warehouse_dir": "MEDBLOCKS_WAREHOUSE_DIR",
    "public_base_url": "MEDBLOCKS_PUBLIC_BASE_URL",
    "redis_url": "MEDBLOCKS_REDIS_URL",
    "secret_key": "MEDBLOCKS_SECRET_KEY",
}


class PlatformResource(dg.ConfigurableResource):
    """The platform's settings and control plane.

    The code location binds each field to its variable with ``dg.EnvVar`` (:meth:`from_env`), so
    the UI shows the configuration as env-backed (never the secret's value). An empty field falls
    back to the environment, and the rest of :class:`Settings` (tuning, CDS, storage options) is
    read from it as ``Settings.from_env`` does. Opening the control plane checks the schema is at
    head; it never migrates (``medblocks db upgrade`` does, once per deployment).
    """

    data_dir: str | None = None
    database_url: str | None = None
    lake_root: str | None = None
    warehouse_dir: str | None = None
    public_base_url: str | None = None
    redis_url: str | None = None
    secret_key: str | None = None

    @classmethod
    def from_env(cls) -> "PlatformResource":
        """Each field bound to ``dg.EnvVar`` of its variable when that is set; an unset one stays
        empty (Dagster refuses to start a run whose ``EnvVar`` is unset, and the embedded default
        sets none)."""
        return cls(**{f: dg.EnvVar(name) for f, name in ENV_FIELDS.items() if env_is_set(name)})

    @cached_property
    def settings(self) -> Settings:
        given = {name: getattr(self, f) for f, name in ENV_FIELDS.items() if f != "data_dir"}
        settings = get_settings(self.data_dir, env=with_overrides(given))
        settings.ensure_dirs()
        return settings

    @cached_property
    def control_plane(self) -> ControlPlane:
        return open_control_plane(self.settings)
