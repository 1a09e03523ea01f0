"""Control plane: tenants, sources, organizations, connections, vault, pull history, audit log."""

from medblocks_pipelines.lib.registry.store import (
    PATTERNS,
    TRANSITIONS,
    ControlPlane,
    open_control_plane,
    utcnow,
)
from medblocks_pipelines.lib.registry.vault import Secret, Vault

__all__ = [
    "PATTERNS",
    "TRANSITIONS",
    "ControlPlane",
    "Secret",
    "Vault",
    "open_control_plane",
    "utcnow",
]
