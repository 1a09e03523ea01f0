"""What a killed run leaves behind, found and removed without a human.

- ``pull_history`` rows still ``running`` whose run has ended (or died): closed as ``failed`` with
  the reason (which also emits the ``sync.failed`` outbox event).
- bulk exports left ``downloading`` by a run that is over: back to ``ready`` with the reason, as
  ``bulk_sync`` does when a land run fails, so the next land run (the export sensor's or
  ``medblocks sync backend``) takes them again.
- ``<data_dir>/bulk_work/<export>/<run id[:12]>``: NDJSON a backend land run was downloading.
  ``bulk_sync`` removes its folder when it ends; one left behind belongs to a dead run.
- ``<warehouse_dir>/.<tenant>.<token>.building.duckdb`` (and ``.wal``): a build that never reached
  ``os.replace``. Removed only while the tenant's build lock is free (no build on this host).
"""

import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from medblocks_pipelines.lib.registry.rows import BulkExport, Pull
from medblocks_pipelines.lib.runs.locks import try_file_lock
from medblocks_pipelines.lib.settings import Settings

if TYPE_CHECKING:
    from medblocks_pipelines.lib.registry import ControlPlane

BUILDING_SUFFIXES = (".building.duckdb", ".building.duckdb.wal")


@dataclass(frozen=True)
class StalePull:
    """A ``running`` pull (or a ``downloading`` export) whose run is over, and why it failed."""

    pull_id: int
    tenant_id: str
    run_id: str
    reason: str
    export_id: str = ""


def stale_pulls(pulls: Iterable[Pull], run_outcome: Callable[[str], str | None]) -> list[StalePull]:
    """The running pulls whose run is over. ``run_outcome(run_id)`` says why a run is over
    (``None`` while it runs or when the id is no run we know)."""
    out = []
    for row in pulls:
        run_id = row.run_id
        reason = run_outcome(run_id) if run_id else None
        if reason is not None:
            out.append(StalePull(row.id, row.tenant_id, str(run_id), reason))
    return out


def fail_pulls(control_plane: "ControlPlane", pulls: Iterable[StalePull]) -> int:
    """Close each stale pull as ``failed`` with its reason; returns how many."""
    n = 0
    for pull in pulls:
        control_plane.finish_pull(pull.pull_id, status="failed", counts={}, error=pull.reason)
        n += 1
    return n


def stale_downloads(
    exports: Iterable[BulkExport], run_outcome: Callable[[str], str | None]
) -> list[StalePull]:
    """Exports ``downloading`` for a run that is over (as :class:`StalePull`: id, run, reason)."""
    out = []
    for row in exports:
        run_id = row.run_id
        reason = run_outcome(run_id) if run_id else None
        if reason is not None:
            out.append(StalePull(0, row.tenant_id, str(run_id), reason, row.id))
    return out


def release_downloads(control_plane: "ControlPlane", exports: Iterable[StalePull]) -> int:
    """Put each stale export back to ``ready`` with the reason; returns how many."""
    n = 0
    for export in exports:
        control_plane.update_bulk_export(export.export_id, status="ready", error=export.reason)
        n += 1
    return n


def orphan_bulk_work(settings: Settings, live_run_ids: Iterable[str]) -> list[Path]:
    """Download folders under ``bulk_work/`` that belong to no live run."""
    root = settings.data_dir / "bulk_work"
    if not root.is_dir():
        return []
    live = {run_id[:12] for run_id in live_run_ids}
    return sorted(
        folder
        for export in root.iterdir()
        if export.is_dir()
        for folder in export.iterdir()
        if folder.is_dir() and folder.name not in live
    )


def _tenant_of_building_file(path: Path) -> str | None:
    name = path.name
    for suffix in BUILDING_SUFFIXES:
        if name.startswith(".") and name.endswith(suffix):
            stem = name[1 : -len(suffix)]  # "<tenant>.<token>"
            return stem.rsplit(".", 1)[0] if "." in stem else None
    return None


def half_built_warehouses(settings: Settings) -> dict[str, list[Path]]:
    """Half-built warehouse files by tenant (normalised id)."""
    out: dict[str, list[Path]] = {}
    folder = settings.warehouse_dir
    if not folder.is_dir():
        return out
    for path in sorted(folder.glob(".*.building.duckdb*")):
        tenant = _tenant_of_building_file(path)
        if tenant is not None:
            out.setdefault(tenant, []).append(path)
    return out


def remove_orphans(
    settings: Settings, live_run_ids: Iterable[str], *, dry_run: bool = False
) -> list[Path]:
    """Remove orphaned download folders and half-built warehouse files; returns them (with
    ``dry_run``, only lists them). A tenant whose build lock is held (a build runs on this host)
    keeps its files."""
    found = []
    for folder in orphan_bulk_work(settings, live_run_ids):
        found.append(folder)
        if not dry_run:
            shutil.rmtree(folder, ignore_errors=True)
            if folder.parent.is_dir() and not any(folder.parent.iterdir()):
                folder.parent.rmdir()
    for tenant, paths in half_built_warehouses(settings).items():
        lock = try_file_lock(settings.warehouse_dir / f".{tenant}.lock")
        if lock is None:
            continue
        try:
            for path in paths:
                found.append(path)
                if not dry_run:
                    path.unlink(missing_ok=True)
        finally:
            lock.close()
    return found
