"""Sensors and schedules skip sources of a stopped demo sandbox (``lib/registry/sandbox_sources``).

Every run request of a pull carries the ``medblocks/source`` tag; one filter over the requests
covers every pattern's sensor and schedule.
"""

from collections.abc import Sequence
from typing import TYPE_CHECKING

import dagster as dg

from medblocks_pipelines.lib.registry.sandbox_sources import is_stopped_sandbox

if TYPE_CHECKING:
    from medblocks_pipelines.lib.registry import ControlPlane

SOURCE_TAG = "medblocks/source"


def stopped_sandbox_sources(cp: "ControlPlane", source_ids: set[str]) -> set[str]:
    """Which of ``source_ids`` are sources of a stopped demo sandbox."""
    if not source_ids:
        return set()
    return {s.id for s in cp.list_sources() if s.id in source_ids and is_stopped_sandbox(s)}


def without_stopped_sandboxes(
    context: dg.SensorEvaluationContext | dg.ScheduleEvaluationContext,
    cp: "ControlPlane",
    requests: Sequence[dg.RunRequest],
) -> list[dg.RunRequest]:
    """``requests`` minus those whose source is a stopped sandbox; logs what it skipped."""
    stopped = stopped_sandbox_sources(
        cp, {str(r.tags[SOURCE_TAG]) for r in requests if r.tags.get(SOURCE_TAG)}
    )
    if not stopped:
        return list(requests)
    kept = [r for r in requests if r.tags.get(SOURCE_TAG) not in stopped]
    context.log.info(
        f"skipped {len(requests) - len(kept)} run request(s) for sandbox source(s) "
        f"{sorted(stopped)} whose sandbox is not running (registered by `medblocks-sandbox demo`)"
    )
    return kept
