"""Backend demo wiring: register the product's backend client at sandbox EHR organizations.

A dev tool (the demo, tests): it plays the sandbox administrator and the operator at once.
"""

from typing import Any

from medblocks_pipelines.lib.registry import ControlPlane


def setup_sandbox_backend(
    cp: ControlPlane,
    handle: Any,
    tenant: str,
    org_ids: list[str],
    *,
    client_id: str = "medblocks-backend",
    jwks_url: str | None = None,
    cadence: str | None = None,
) -> dict[str, str]:
    """Demo wiring: register our backend client at sandbox EHR orgs and record them for backend.

    ``handle`` is a running ``sandbox.run.SandboxHandle``. Registers by ``jwks_url`` when given
    (``medblocks serve`` must be up; Epic-profile orgs require it), else by inline JWKS; adds a
    Group ``backend-cohort`` of every patient (the sandbox population has no Group); creates or
    updates a source per org (pattern ``backend``, ``backend_client_id``) and the organization
    (``group_id``, ``cadence``). Returns org id -> source id.
    """
    from medblocks_pipelines.lib.smart.keys import KeyStore

    keys = KeyStore(cp.vault)
    if not keys.all():
        keys.generate("ES384")
    if not any(t.id == tenant for t in cp.list_tenants()):
        cp.add_tenant(tenant, tenant.title())
    sources = {s.fhir_base_url: s for s in cp.list_sources()}
    out: dict[str, str] = {}
    for org_id in org_ids:
        endpoint = handle.org(org_id)
        body: dict[str, Any] = {
            "client_id": client_id,
            "token_endpoint_auth_method": "private_key_jwt",
            "scopes": ["system/*.rs"],
            "name": "medblocks backend",
        }
        if jwks_url:
            body["jwks_uri"] = jwks_url
        else:
            body["jwks"] = keys.jwks()
        handle.admin(org_id, "clients", body)
        store = handle.org_handles(org_id)["store"]
        members = [
            {"entity": {"reference": f"Patient/{p['id']}"}} for p in store.iter_type("Patient")
        ]
        handle.admin(
            org_id,
            "apply-changes",
            {
                "upserts": [
                    {
                        "resourceType": "Group",
                        "id": "backend-cohort",
                        "type": "person",
                        "actual": True,
                        "name": "Backend sync cohort",
                        "member": members,
                    }
                ]
            },
        )
        profile = handle.org_handles(org_id).get("profile")
        vendor = getattr(profile, "name", "generic")
        vendor = "generic" if vendor == "strict" else vendor
        extra = {"backend_client_id": client_id, **({"jwks_url": jwks_url} if jwks_url else {})}
        src = sources.get(endpoint.fhir_base)
        if src is None:
            source_id = f"{org_id}-ehr"
            cp.add_source(
                source_id,
                f"{endpoint.name} EHR",
                vendor,
                "ehr",
                endpoint.fhir_base,
                ["backend"],
                extra,
            )
        else:
            source_id = src.id
            cp.update_source(
                source_id,
                patterns=sorted({*(src.patterns or []), "backend"}),
                config={**(src.config or {}), **extra},
            )
        org_cfg = {"group_id": "backend-cohort", **({"cadence": cadence} if cadence else {})}
        existing = {o.id: o for o in cp.list_organizations()}
        if org_id in existing:
            cp.update_organization(org_id, config={**(existing[org_id].config or {}), **org_cfg})
        else:
            cp.add_organization(org_id, tenant, source_id, endpoint.name, org_cfg)
        out[org_id] = source_id
    return out
