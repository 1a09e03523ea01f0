"""Runtime settings of the platform, read from the environment.

The embedded default keeps everything under ``./data``; production points ``MEDBLOCKS_DATABASE_URL`` at
PostgreSQL and ``MEDBLOCKS_DATA_DIR`` at shared storage.
"""

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    """Where the control plane, the lake and the warehouses live."""

    data_dir: Path
    database_url: str
    lake_root: Path
    warehouse_dir: Path

    def ensure_dirs(self) -> None:
        """Create the data folders (idempotent)."""
        for path in (self.data_dir, self.lake_root, self.warehouse_dir):
            path.mkdir(parents=True, exist_ok=True)


def get_settings(data_dir: str | os.PathLike[str] | None = None) -> Settings:
    """Build settings from the environment; ``data_dir`` overrides ``MEDBLOCKS_DATA_DIR``."""
    root = Path(data_dir or os.environ.get("MEDBLOCKS_DATA_DIR") or "data").resolve()
    url = os.environ.get("MEDBLOCKS_DATABASE_URL") or f"sqlite:///{root / 'control.db'}"
    lake = Path(os.environ.get("MEDBLOCKS_LAKE_ROOT") or root / "lake")
    warehouse = Path(os.environ.get("MEDBLOCKS_WAREHOUSE_DIR") or root / "warehouse")
    return Settings(data_dir=root, database_url=url, lake_root=lake, warehouse_dir=warehouse)
