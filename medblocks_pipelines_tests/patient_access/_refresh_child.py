"""The child process of test_refresh_processes.py (a small module: spawn imports it quickly)."""

from typing import Any

import httpx

from medblocks_pipelines.lib.registry import open_control_plane
from medblocks_pipelines.lib.settings import Settings
from medblocks_pipelines.lib.smart.tokens import TokenManager


def refresh_in_child(settings: Settings, conn_id: str, stale: str, barrier: Any, out: Any) -> None:
    """Wait for the others, then refresh the grant; report the token and whether we refreshed."""
    cp = open_control_plane(settings, check_schema=False)
    with httpx.Client(timeout=30.0) as http:
        manager = TokenManager(cp, conn_id, http=http)
        barrier.wait()
        token = manager.refresh(stale=stale)
    out.put((token, manager.refreshes))
    cp.engine.dispose()
