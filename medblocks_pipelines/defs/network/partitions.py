"""The network pattern's partitions: one per (tenant, network), kept in step by the registry sensor."""

from medblocks_pipelines.defs.shared.partitions import network_partitions

__all__ = ["network_partitions"]
