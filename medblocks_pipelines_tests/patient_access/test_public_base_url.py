"""A patient's standalone connect through a TLS-terminating reverse proxy.

``medblocks serve`` runs as a subprocess knowing its public address
(``https://127.0.0.1:<proxy port>/medblocks``) only from ``MEDBLOCKS_PUBLIC_BASE_URL``. The tenant
asks for a link over the public URL, the patient's browser (httpx, trusting only the proxy's
self-signed certificate) goes through the sandbox EHR's login and consent pages and back to our
public callback: the redirect URI registered at the EHR matches what we send, the browser-session
cookie is scoped to the public path and comes back, and the connection is active.
"""

from pathlib import Path

import httpx

from medblocks_pipelines.lib.registry import open_control_plane
from medblocks_pipelines.lib.settings import Settings
from medblocks_pipelines.web.connect import issue_connect_api_key
from medblocks_pipelines_tests.patient_access.conftest import RETURN_URL, PatientAccessEnv
from medblocks_pipelines_tests.tls_proxy import medblocks_behind_tls_proxy
from medblocks_sandbox.consent_browser import connect_via_consent_page
from medblocks_sandbox.run import SandboxHandle


def test_standalone_connect_completes_through_the_proxy(
    settings: Settings, sandbox: SandboxHandle, tmp_path: Path
) -> None:
    cp = open_control_plane(settings)
    cp.add_tenant("acme", "Acme Health", {"delete_on_revoke": True})
    try:
        with medblocks_behind_tls_proxy(tmp_path) as served:
            http = httpx.Client(verify=served.ssl_context(), timeout=30.0)
            env = PatientAccessEnv(
                settings=settings, cp=cp, web_base=served.public, sandbox=sandbox, http=http
            )
            org = env.org("ehr")
            # Registered at the EHR with the public callback, the only one it will redirect to.
            sid = env.add_source(org)
            key = issue_connect_api_key(cp, "acme")
            resp = http.post(
                f"{served.public}/connect/links",
                json={
                    "tenant": "acme",
                    "source": sid,
                    "patient_ref": "p-1",
                    "return_url": RETURN_URL,
                },
                headers={"Authorization": f"Bearer {key}"},
            )
            assert resp.status_code == 201, resp.text
            link = resp.json()["url"]
            assert link.startswith(f"{served.public}/connect/start/")
            login = env.logins(org)[0]
            outcome = connect_via_consent_page(
                link,
                username=login.username,
                password=login.password,
                stop_at=RETURN_URL,
                http=http,
            )
            http.close()
        assert outcome.status == "active", outcome
        conn = cp.get_connection(str(outcome.connection_id))
        assert conn.state == "active" and conn.source_patient_id == login.patient_id
        assert served.proxy.forwarded >= 3  # link, start and callback all came through the proxy
    finally:
        cp.engine.dispose()
