"""The clinician-workflow demo: an EHR launch through the sandbox EHR and two CDS Hooks calls.

:func:`setup_clinician_org` registers our app at a sandbox EHR organization (a public SMART client
with our callback) and, in our registry, the clinician-workflow source and organization with the
sandbox CDS client's issuer and JWKS allow-listed. :func:`run_clinician_demo` serves our web app on
a loopback port, launches it from the sandbox EHR (a browser following redirects), then fires
``patient-view`` and ``order-select`` with a signed JWT and prefetch, and returns the cards.
"""

from collections.abc import Mapping
from typing import Any

import httpx

from medblocks_pipelines.lib.errors import NotFound
from medblocks_pipelines.lib.registry import ControlPlane
from medblocks_sandbox.cds_ehr.orders import demo_orders


def setup_clinician_org(
    sandbox: Any, cp: ControlPlane, *, tenant: str, org: str, web_base: str
) -> dict[str, str]:
    """Register our app at sandbox org ``org`` and the source/organization in our registry.

    Reuses a registry source of that FHIR base that already has the ``clinician_workflow``
    pattern; otherwise adds ``{org}-cw`` (a bulk-sync source of the same EHR keeps its own client).
    Returns ``{"source_id", "organization_id", "client_id"}``.
    """
    endpoint = sandbox.org(org)
    cds_client = sandbox.roles["cds_ehr"].extra["client"]
    client_id = f"medblocks-clinician-{tenant}"
    sandbox.admin(
        org,
        "clients",
        {
            "client_id": client_id,
            "token_endpoint_auth_method": "none",
            "redirect_uris": [f"{web_base}/ehr/callback"],
            "name": "Medblocks clinician app",
        },
    )
    source_id = None
    for s in cp.list_sources():
        if str(s.fhir_base_url or "").rstrip(
            "/"
        ) == endpoint.fhir_base and "clinician_workflow" in (s.patterns or []):
            source_id = s.id
    if source_id is None:
        source_id = f"{org}-cw"
        cp.add_source(
            source_id,
            f"{endpoint.name} (EHR launch)",
            "sandbox",
            "ehr",
            endpoint.fhir_base,
            ["clinician_workflow"],
            config={"client_id": client_id},
        )
    else:
        # A source shared with other patterns keeps their registrations; this app has its own.
        src = cp.get_source(source_id)
        cp.update_source(
            source_id,
            config={**(src.config or {}), "clinician_workflow_client_id": client_id},
        )
    cds_cfg = {"iss": cds_client.iss, "jwks_url": cds_client.jwks_url}
    org_id = next(
        (o.id for o in cp.list_organizations(tenant_id=tenant) if o.source_id == source_id),
        None,
    )
    if org_id is None:
        org_id = source_id if source_id != org else org
        try:
            cp.get_organization(org_id)
            org_id = f"{org_id}-cw"
        except NotFound:
            pass
        cp.add_organization(org_id, tenant, source_id, endpoint.name, config={"cds": cds_cfg})
    else:
        existing = cp.get_organization(org_id)
        cp.update_organization(org_id, config={**(existing.config or {}), "cds": cds_cfg})
    return {"source_id": source_id, "organization_id": org_id, "client_id": client_id}


def launch_in_browser(
    sandbox: Any, *, org: str, patient: str, web_base: str, encounter: str | None = None
) -> httpx.Response:
    """The EHR opens our launch URL; a browser follows every redirect to our app page."""
    launcher = sandbox.role_urls["cds_ehr"]
    with httpx.Client(timeout=30.0, follow_redirects=True) as browser:
        params = {"org": org, "patient": patient, "app": f"{web_base}/ehr/launch"}
        if encounter:
            params["encounter"] = encounter
        resp = browser.get(f"{launcher}/launch", params=params)
        resp.read()
        return resp


def first_patient(sandbox: Any, org: str) -> str:
    """A patient of the sandbox org (the demo's default)."""
    store = sandbox.org_handles(org)["store"]
    return next(iter(store.iter_type("Patient")))["id"]


def run_clinician_demo(
    sandbox: Any,
    cp: ControlPlane,
    settings: Any,
    *,
    tenant: str,
    org: str,
    patient: str | None = None,
    orders: list[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """EHR launch + patient-view + order-select against our app on a loopback port.

    ``sandbox`` is a running ``SandboxHandle`` with the ``ehr`` and ``cds_ehr`` roles; ``org`` a
    sandbox EHR organization id. Returns the connection, the app page status and the cards.
    """
    from medblocks_pipelines.web.app import create_app
    from medblocks_sandbox.run import serve

    patient = patient or first_patient(sandbox, org)
    cds_client = sandbox.roles["cds_ehr"].extra["client"]
    with serve(lambda base: create_app(public_base_url=base, settings=settings)) as web:
        ids = setup_clinician_org(sandbox, cp, tenant=tenant, org=org, web_base=web)
        page = launch_in_browser(sandbox, org=org, patient=patient, web_base=web)
        conn_id = page.url.path.rsplit("/", 1)[-1] if "/ehr/app/" in page.url.path else None
        view = cds_client.fire(org=org, service_base=web, hook="patient-view", patient=patient)
        drafts = list(orders) if orders is not None else demo_orders(patient)
        select = cds_client.fire(
            org=org, service_base=web, hook="order-select", patient=patient, orders=drafts
        )
    return {
        **ids,
        "patient": patient,
        "connection_id": conn_id,
        "app_status": page.status_code,
        "app_has_record": 'id="record"' in page.text,
        "patient_view": {"status": view["status"], "cards": view["body"].get("cards", [])},
        "order_select": {"status": select["status"], "cards": select["body"].get("cards", [])},
    }
