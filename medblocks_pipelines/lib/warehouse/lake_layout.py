"""What the landing lake holds and where: the Parquet schemas of its resource and quarantine
rows, the provenance every row carries, a writer's counts, and each tenant's folders.

Split out of ``lake.py`` (the writer) so readers of the lake (the warehouse build, compaction, the
network query) need not import the writer; ``lake.py`` re-exports every name.
"""

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from medblocks_pipelines.lib.partitions import normalise_id
from medblocks_pipelines.lib.storage import MirrorStats, join, mirror

RESOURCE_SCHEMA = pa.schema(
    [
        ("resource", pa.string()),
        ("resource_type", pa.string()),
        ("resource_id", pa.string()),
        ("version_id", pa.string()),
        ("last_updated", pa.string()),
        ("content_hash", pa.string()),
        ("deleted", pa.bool_()),
        ("tenant", pa.string()),
        ("pattern", pa.string()),
        ("source", pa.string()),
        ("organization", pa.string()),
        ("connection", pa.string()),
        ("fetched_at", pa.timestamp("us", tz="UTC")),
        ("run_id", pa.string()),
        ("origin", pa.string()),
        # network rows only (null for the other patterns): why and by which query we got them
        ("permitted_purpose", pa.string()),
        ("network_query_id", pa.string()),
    ]
)

#: Provenance columns added after the first lake files were written: a reader of older files
#: (build, compaction) adds them as nulls.
LATE_PROVENANCE_COLUMNS = ("permitted_purpose", "network_query_id")

QUARANTINE_SCHEMA = pa.schema(
    [
        ("raw", pa.string()),
        ("reason", pa.string()),
        ("resource_type", pa.string()),
        ("origin", pa.string()),
        ("raw_hash", pa.string()),
        ("tenant", pa.string()),
        ("pattern", pa.string()),
        ("source", pa.string()),
        ("organization", pa.string()),
        ("connection", pa.string()),
        ("fetched_at", pa.timestamp("us", tz="UTC")),
        ("run_id", pa.string()),
        ("permitted_purpose", pa.string()),
        ("network_query_id", pa.string()),
    ]
)

# Quarantined raw payloads are capped: enough to diagnose, not a way to fill the disk.
MAX_RAW_CHARS = 1_000_000


@dataclass(frozen=True)
class Provenance:
    """Who fetched a row, from where, under which relationship, in which run.

    ``permitted_purpose`` (a TEFCA Exchange Purpose code such as ``T-TREAT``) and
    ``network_query_id`` (our id of the audited network query) say why a network row was allowed
    in; the other patterns leave them ``None`` (their relationship is ``pattern`` itself).
    """

    tenant: str
    pattern: str
    source: str
    organization: str | None
    connection: str | None
    run_id: str
    permitted_purpose: str | None = None
    network_query_id: str | None = None


@dataclass
class LandingStats:
    """What a writer landed: counts only, safe for logs and Dagster metadata."""

    counts_by_type: Counter[str] = field(default_factory=Counter)
    quarantined: int = 0
    quarantine_reasons: Counter[str] = field(default_factory=Counter)
    tombstones: int = 0
    files: int = 0
    bytes: int = 0

    @property
    def landed(self) -> int:
        return sum(self.counts_by_type.values())

    def as_metadata(self) -> dict[str, Any]:
        """A flat, PHI-free dict for Dagster metadata and pull history."""
        return {
            "landed": self.landed,
            "by_type": dict(sorted(self.counts_by_type.items())),
            "quarantined": self.quarantined,
            "quarantine_reasons": dict(self.quarantine_reasons),
            "tombstones": self.tombstones,
            "files": self.files,
            "bytes": self.bytes,
        }


def content_hash(text: str) -> str:
    """Hash of the stored JSON text (dedup key for re-fetched identical versions)."""
    return hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()


def resources_glob(lake_root: Path, tenant: str) -> str:
    """The Parquet glob of one tenant's landed resources."""
    return str(lake_root / "resources" / f"tenant={normalise_id(tenant)}" / "**" / "*.parquet")


def quarantine_glob(lake_root: Path, tenant: str) -> str:
    """The Parquet glob of one tenant's quarantined rows."""
    return str(lake_root / "quarantine" / f"tenant={normalise_id(tenant)}" / "**" / "*.parquet")


def mirror_tenant(lake_url: str, lake_root: Path, tenant: str) -> MirrorStats:
    """Bring this machine's mirror of one tenant's lake (resources and quarantine) up to date."""
    total = MirrorStats()
    for area in ("resources", "quarantine"):
        part = f"tenant={normalise_id(tenant)}"
        total.add(mirror(join(lake_url, area, part), lake_root / area / part))
    return total
