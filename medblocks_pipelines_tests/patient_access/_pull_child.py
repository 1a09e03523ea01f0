"""The child process of test_shared_rate_limit.py (a small module: spawn imports it quickly)."""

import os
from typing import Any

from medblocks_pipelines.lib.fhir.pull_batch import pull_batch, source_limiter
from medblocks_pipelines.lib.registry import open_control_plane
from medblocks_pipelines.lib.settings import Settings


def pull_in_child(
    settings: Settings, ids: list[str], run_id: str, redis_url: str, barrier: Any, out: Any
) -> None:
    """Wait for the other puller, pull ``ids`` (one thread each), report request counts."""
    os.environ["MEDBLOCKS_REDIS_URL"] = redis_url
    cp = open_control_plane(settings, check_schema=False)
    barrier.wait()
    batch = pull_batch(
        cp, ids, lake_root=settings.lake_root, run_id=run_id, concurrency=len(ids), full=True
    )
    limiter = source_limiter(cp.get_source(cp.get_connection(ids[0]).source_id))
    out.put(
        {
            "limiter": type(limiter).__name__,
            "late": getattr(limiter, "late", None),
            "requests": batch.requests,
            "http_429": batch.statuses.get(429, 0),
            "statuses": sorted(r.status for r in batch.results),
        }
    )
    cp.engine.dispose()
