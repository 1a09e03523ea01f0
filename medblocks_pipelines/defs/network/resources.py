"""Network-pattern resources: none of its own; assets use the shared ``platform`` resource.

The gateway transport is not configurable here on purpose: endpoints, timeouts and the signing
identity live in the network source's registry entry and the vault.
"""

from medblocks_pipelines.defs.shared.resources import PlatformResource

__all__ = ["PlatformResource"]
