"""Network-pattern exceptions, re-exported from the project's one exception module."""

from medblocks_pipelines.lib.errors import GatewayTimeout, PolicyRefused, SoapFault, UnsafeXMLError

__all__ = ["GatewayTimeout", "PolicyRefused", "SoapFault", "UnsafeXMLError"]
