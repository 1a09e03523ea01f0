"""Dynamic partitions, one namespaced definition per grain (ARCHITECTURE constraint 2).

Keys are built only with :func:`medblocks_pipelines.lib.partitions.partition_key` and kept in step with the
registry by ``registry_partitions_sensor``. Patients are never partitions.
"""

from collections.abc import Iterable

import dagster as dg

from medblocks_pipelines.lib.partitions import partition_key
from medblocks_pipelines.lib.registry import ControlPlane

tenant_partitions = dg.DynamicPartitionsDefinition(name="tenants")
# tenant.organization for organizations that authorized backend sync
backend_org_partitions = dg.DynamicPartitionsDefinition(name="backend_orgs")
# tenant.source for sources patients connect to (EHR portals, payers)
patient_access_partitions = dg.DynamicPartitionsDefinition(name="patient_access_sources")
# tenant.organization for organizations that put us in their EHR
clinician_org_partitions = dg.DynamicPartitionsDefinition(name="clinician_orgs")
# tenant.network for exchange networks a tenant participates in
network_partitions = dg.DynamicPartitionsDefinition(name="network_scopes")

ALL_DYNAMIC = (
    tenant_partitions,
    backend_org_partitions,
    patient_access_partitions,
    clinician_org_partitions,
    network_partitions,
)


def desired_partition_keys(cp: ControlPlane) -> dict[str, set[str]]:
    """Every partition key the registry implies, by partitions-definition name."""
    sources = {s.id: s for s in cp.list_sources()}
    out: dict[str, set[str]] = {d.name: set() for d in ALL_DYNAMIC if d.name}
    tenants = cp.list_tenants()
    for tenant in tenants:
        out["tenants"].add(partition_key(tenant.id))
        pa_sources: Iterable[str] = tenant.settings.get("patient_access_sources") or [
            s.id for s in sources.values() if "patient_access" in s.patterns
        ]
        for sid in pa_sources:
            if sid in sources:
                out["patient_access_sources"].add(partition_key(tenant.id, sid))
        net_sources: Iterable[str] = tenant.settings.get("networks") or [
            s.id for s in sources.values() if s.kind == "network"
        ]
        for sid in net_sources:
            if sid in sources:
                out["network_scopes"].add(partition_key(tenant.id, sid))
    for org in cp.list_organizations():
        patterns = sources[org.source_id].patterns if org.source_id in sources else []
        if "backend" in patterns:
            out["backend_orgs"].add(partition_key(org.tenant_id, org.id))
        if "clinician_workflow" in patterns:
            out["clinician_orgs"].add(partition_key(org.tenant_id, org.id))
    return out
