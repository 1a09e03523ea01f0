"""Network-pattern exceptions.

They subclass the project hierarchy in :mod:`medblocks_pipelines.lib.errors` (``PolicyRefused`` lives
there already). Messages never carry patient data: gateway ids, codes and counts only.
"""

from medblocks_pipelines.lib.errors import PolicyRefused, ProtocolError, TransientError

__all__ = ["GatewayTimeout", "PolicyRefused", "SoapFault", "UnsafeXMLError"]


class UnsafeXMLError(ProtocolError):
    """Raised when untrusted XML is refused: DOCTYPE/entities, over the size limit, or malformed."""


class SoapFault(ProtocolError):
    """Raised when a gateway answers with a SOAP 1.2 Fault (code, subcode and reason kept)."""

    def __init__(
        self, message: str, *, code: str | None = None, subcode: str | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.subcode = subcode


class GatewayTimeout(TransientError):
    """Raised when a responding gateway does not answer within its per-gateway timeout."""
