"""The UDAP / TEFCA Facilitated FHIR sandbox: a CA with CRLs, strict UDAP authorization servers,
FHIR responding nodes and a directory. Its own code: nothing of the client's is imported.
"""

from medblocks_sandbox.udap.app import (
    UdapSandbox,
    create_udap_app,
    facilitated_source_config,
    udap_role,
)
from medblocks_sandbox.udap.ca import SandboxCA
from medblocks_sandbox.udap.nodes import FAULT_PROFILES, NodeSpec

__all__ = [
    "FAULT_PROFILES",
    "NodeSpec",
    "SandboxCA",
    "UdapSandbox",
    "create_udap_app",
    "facilitated_source_config",
    "udap_role",
]
