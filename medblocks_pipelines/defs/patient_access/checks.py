"""Checks of the patient-access pattern: connections whose refresh failed need the patient again."""

import dagster as dg

from medblocks_pipelines.lib.fhir.pull import refresh_failed_connections
from medblocks_pipelines.lib.registry import ControlPlane

RECORDS_KEY = dg.AssetKey(["patient_access", "records"])

no_refresh_failed_spec = dg.AssetCheckSpec(
    name="no_refresh_failed_connections",
    asset=RECORDS_KEY,
    description="Warns when connections of this tenant and source are refresh_failed: their "
    "refresh token was refused, pulls have stopped and the patient must connect again.",
)


def refresh_failed_check(
    cp: ControlPlane, *, tenant_id: str, source_id: str
) -> dg.AssetCheckResult:
    """The check result for one tenant.source (counts and our connection ids only, no PHI)."""
    failed = refresh_failed_connections(cp, tenant_id=tenant_id, source_id=source_id)
    return dg.AssetCheckResult(
        check_name=no_refresh_failed_spec.name,
        asset_key=RECORDS_KEY,
        passed=not failed,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "refresh_failed_connections": len(failed),
            "connection_ids": dg.MetadataValue.json(failed[:50]),
        },
    )
