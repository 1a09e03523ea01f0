"""The sandbox EHR that launches SMART apps and calls CDS Hooks services (role ``cds_ehr``)."""

from medblocks_sandbox.cds_ehr.app import (
    CdsEhr,
    cds_ehr_role,
    register,
)

__all__ = ["CdsEhr", "cds_ehr_role", "register"]
