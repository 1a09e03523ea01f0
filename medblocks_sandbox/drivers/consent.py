"""Consent drivers of the demo: connect patients through the real consent pages, and have one
revoke the app in the sandbox portal (dev tools; they create connect links and refresh tokens
with the product's own code).
"""

import contextlib
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import httpx

from medblocks_sandbox.consent_browser import ConsentOutcome, connect_via_consent_page

if TYPE_CHECKING:
    from medblocks_pipelines.lib.registry import ControlPlane


def connect_patients(
    cp: "ControlPlane",
    *,
    tenant_id: str,
    source_id: str,
    logins: Iterable[Any],
    public_base_url: str,
    return_url: str = "https://app.example/connected",
    http: httpx.Client | None = None,
) -> list[ConsentOutcome]:
    """Connect several patients through the real consent page (demo helper).

    ``logins`` are the sandbox's portal logins (``pop.logins`` filtered to the source's org: objects
    with ``username``, ``password`` and ``patient_id``). Our web app must be serving at
    ``public_base_url`` (its ``/connect/callback`` is the redirect URI registered at the source).
    """
    from medblocks_pipelines.lib.smart.launch import create_connect_link

    out = []
    for login in logins:
        link = create_connect_link(
            cp,
            tenant_id=tenant_id,
            source_id=source_id,
            patient_ref=f"ref-{login.patient_id}",
            public_base_url=public_base_url,
            return_url=return_url,
        )
        out.append(
            connect_via_consent_page(
                link.url,
                username=login.username,
                password=login.password,
                stop_at=return_url,
                http=http,
            )
        )
    return out


def simulate_portal_revocation(sandbox: Any, cp: "ControlPlane", connection_id: str) -> str:
    """Demo helper: the patient revokes our app in the sandbox portal; we find out on refresh.

    Revokes the connection's grant at the sandbox (admin API, as the portal would), then asks for a
    token refresh as the next pull would: the source answers ``invalid_grant`` and the connection
    becomes ``refresh_failed`` (with an event and a ``connection.refresh_failed`` outbox row).
    Returns the connection's new state.
    """
    from medblocks_pipelines.lib.errors import AuthError
    from medblocks_pipelines.lib.smart.tokens import TokenManager

    conn = cp.get_connection(connection_id)
    source = cp.get_source(conn.source_id)
    base = (source.fhir_base_url or "").rstrip("/")
    org = next(o for o in sandbox.orgs if o.fhir_base == base)
    sandbox.admin(
        org.org_id,
        "revoke-grant",
        {"client_id": source.config["client_id"], "patient": conn.source_patient_id},
    )
    with httpx.Client(timeout=20.0) as http:
        manager = TokenManager(cp, connection_id, http=http)
        # Expected to raise: the refresh is refused and the connection moves to refresh_failed.
        with contextlib.suppress(AuthError):
            manager.force_refresh()
    return str(cp.get_connection(connection_id).state)
