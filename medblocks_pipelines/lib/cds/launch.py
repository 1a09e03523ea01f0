"""SMART EHR launch for the clinician workflow (SPECS §1.2-1.6), on top of ``lib.smart.launch``.

* :func:`organization_for_iss`: the ``iss`` allowlist: an organization whose source (pattern
  ``clinician_workflow``) has that FHIR base, or lists it in ``config["ehr_launch"]["iss"]``;
* :func:`start_ehr_launch`: a pending ``clinician_workflow`` connection, then discovery on ``iss``,
  ``launch`` scope + parameter, PKCE and state (``begin_authorization``);
* :func:`finish_ehr_launch`: the callback (``complete_authorization``: state, code, tokens in the
  vault, the connection active with its launch context), then the launch is recorded as
  treatment-relationship evidence (network pattern) and as a ``clinician.launch`` outbox event the
  sensor turns into a targeted sync.
"""

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx

from medblocks_pipelines.lib.errors import LaunchError
from medblocks_pipelines.lib.registry import ControlPlane
from medblocks_pipelines.lib.registry.rows import Organization
from medblocks_pipelines.lib.smart.launch import (
    AuthorizationRequest,
    begin_authorization,
    complete_authorization,
)

PATTERN = "clinician_workflow"
LAUNCH_EVENT = "clinician.launch"


def organization_for_iss(cp: ControlPlane, iss: str) -> Organization:
    """The one organization that allow-lists ``iss`` for EHR launch (LaunchError otherwise)."""
    wanted = iss.rstrip("/")
    sources = {s.id: s for s in cp.list_sources()}
    found = []
    for org in cp.list_organizations():
        src = sources.get(org.source_id)
        if src is None or PATTERN not in (src.patterns or []):
            continue
        allowed = {str(src.fhir_base_url or "").rstrip("/")}
        extra = ((org.config or {}).get("ehr_launch") or {}).get("iss") or []
        allowed.update(str(x).rstrip("/") for x in extra)
        if wanted in allowed:
            found.append(org)
    if len(found) != 1:
        # Unknown (or ambiguous) iss: never redirect the clinician or a token there (SPECS §1.2).
        raise LaunchError("iss is not an allow-listed EHR", reason="unknown_iss")
    return found[0]


def start_ehr_launch(
    cp: ControlPlane,
    *,
    iss: str,
    launch: str,
    redirect_uri: str,
    http: httpx.Client,
    session_binding: str,
) -> AuthorizationRequest:
    """Create the pending connection and the authorization request of one EHR launch."""
    if not launch or len(launch) > 2048:
        raise LaunchError("launch is required", reason="invalid_request")
    org = organization_for_iss(cp, iss)
    source = cp.get_source(org.source_id)
    conn_id = cp.create_connection(
        tenant_id=org.tenant_id,
        pattern=PATTERN,
        source_id=org.source_id,
        organization_id=org.id,
        context={
            "launch_kind": "ehr",
            "app_session_sha256": hashlib.sha256(session_binding.encode()).hexdigest(),
        },
    )
    cp.record_event(conn_id, "ehr.launch_received", {"organization_id": org.id})
    scopes = ((org.config or {}).get("ehr_launch") or {}).get("scopes")
    # begin_authorization checks iss against the source's FHIR base too, and adds `launch`.
    return begin_authorization(
        cp,
        conn_id,
        redirect_uri=redirect_uri,
        http=http,
        launch=launch,
        iss=str(source.fhir_base_url),
        scopes=scopes,
        session_binding=session_binding,
    )


@dataclass(frozen=True)
class EhrLaunchResult:
    """A finished launch: the connection, and whether (and why not) it is usable."""

    connection_id: str
    ok: bool
    reason: str | None = None
    patient: str | None = None


def finish_ehr_launch(
    cp: ControlPlane,
    *,
    params: Mapping[str, str],
    http: httpx.Client,
    session_binding: str | None,
    person_of: Any = None,
) -> EhrLaunchResult:
    """Complete the callback; record the launch event and the treatment relationship.

    ``person_of(tenant, source, patient_id) -> person_id | None`` resolves the person through the
    warehouse identity tables (the relationship is recorded on the source patient key otherwise).
    """
    outcome = complete_authorization(cp, params=params, http=http, session_binding=session_binding)
    if outcome.connection_id is None:
        raise LaunchError("the callback matches no launch", reason="state_mismatch")
    conn_id: str = outcome.connection_id
    conn = cp.get_connection(conn_id)
    if conn.pattern != PATTERN:
        raise LaunchError("this callback is not an EHR launch", reason="state_mismatch")
    if not outcome.ok:
        return EhrLaunchResult(conn_id, False, outcome.reason)
    patient = outcome.patient
    context = dict(outcome.context or {})
    launch_context = {
        k: context[k]
        for k in ("encounter", "fhirUser", "fhirContext", "need_patient_banner", "intent", "tenant")
        if k in context
    }
    now = datetime.now(UTC)
    cp.record_event(
        conn_id,
        "ehr.launched",
        {
            "has_patient": bool(patient),
            "has_encounter": "encounter" in context,
            "fhir_context_items": len(context.get("fhirContext") or []),
        },
    )
    cp.emit_event(
        conn.tenant_id,
        LAUNCH_EVENT,
        {
            "connection_id": conn_id,
            "pattern": PATTERN,
            "source_id": conn.source_id,
            "organization_id": conn.organization_id,
            "at": now.isoformat(),
        },
    )
    if patient:
        from medblocks_pipelines.lib.network.evidence import record_relationship_event

        person = person_of(conn.tenant_id, conn.source_id, patient) if person_of else None
        record_relationship_event(
            cp,
            tenant=conn.tenant_id,
            person=person or f"{conn.source_id}/Patient/{patient}",
            kind="ehr_launch",
            ref=f"ehr_launch:{conn_id}",
            organization=conn.organization_id,
            at=now,
            detail={
                "connection_id": conn_id,
                "person_resolved": person is not None,
                "has_encounter": "encounter" in launch_context,
            },
        )
    return EhrLaunchResult(conn_id, True, None, patient)
