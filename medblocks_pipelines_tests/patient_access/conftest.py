"""Fixtures for the patient-access tests: the real sandbox (EHR + payer) and our web app, both on
loopback sockets, and a control plane in a temporary folder.

The sandbox is shared per module (starting it costs a population); every test registers its own
client id at the sandbox, so grants, tokens and fault rules never leak between tests.
"""

import contextlib
import json
import re
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from medblocks_pipelines.lib.registry import ControlPlane, open_control_plane
from medblocks_pipelines.lib.settings import Settings
from medblocks_pipelines.lib.smart.launch import create_connect_link
from medblocks_pipelines.web.app import create_app
from medblocks_sandbox.consent_browser import ConsentOutcome, connect_via_consent_page
from medblocks_sandbox.run import OrgEndpoint, SandboxHandle, serve, start_sandbox

RETURN_URL = "https://tenant-app.example/connected"


@pytest.fixture(scope="module")
def sandbox() -> Iterator[SandboxHandle]:
    """EHR and payer orgs of a small seeded population, on ephemeral loopback ports."""
    handle = start_sandbox(base_port=0, persons=12, seed=7, roles=["ehr", "payer"])
    try:
        yield handle
    finally:
        handle.stop()


@dataclass
class PatientAccessEnv:
    """One test's world: control plane, our web app URL, the sandbox, and a client per org."""

    settings: Settings
    cp: ControlPlane
    web_base: str
    sandbox: SandboxHandle
    http: httpx.Client
    tenant: str = "acme"
    clients: dict[str, str] = field(default_factory=dict)

    @property
    def callback(self) -> str:
        return f"{self.web_base}/connect/callback"

    def org(self, kind: str = "ehr", index: int = 0) -> OrgEndpoint:
        return self.sandbox.orgs_of(kind)[index]

    def add_source(
        self,
        org: OrgEndpoint,
        *,
        source_id: str | None = None,
        config: dict[str, Any] | None = None,
        register: dict[str, Any] | None = None,
    ) -> str:
        """Register a fresh client at ``org`` and add it to the registry as a source."""
        client_id = f"pa-{secrets.token_hex(4)}"
        body = {
            "client_id": client_id,
            "token_endpoint_auth_method": "none",
            "redirect_uris": [self.callback],
            "name": "Acme Health App",
            **(register or {}),
        }
        answer = self.sandbox.admin(org.org_id, "clients", body)
        sid = source_id or org.org_id
        cfg = {"client_id": client_id, **(config or {})}
        self.cp.add_source(
            sid, org.name, "sandbox", org.kind, org.fhir_base, ["patient_access"], config=cfg
        )
        self.clients[sid] = client_id
        if answer.get("client_secret"):
            self.cp.vault.put(f"source/{sid}/client_secret", answer["client_secret"])
        return sid

    def logins(self, org: OrgEndpoint) -> list[Any]:
        return [lg for lg in self.sandbox.population.logins if lg.org_id == org.org_id]

    def faults(self, org: OrgEndpoint) -> Any:
        return self.sandbox.org_handles(org.org_id)["faults"]

    def auth(self, org: OrgEndpoint) -> Any:
        return self.sandbox.org_handles(org.org_id)["auth"]

    def connect(self, source_id: str, login: Any, **kwargs: Any) -> tuple[str, ConsentOutcome]:
        """Create a link and go through the sandbox's login and consent pages."""
        link = create_connect_link(
            self.cp,
            tenant_id=self.tenant,
            source_id=source_id,
            patient_ref=f"ref-{login.patient_id[:6]}",
            public_base_url=self.web_base,
            return_url=RETURN_URL,
        )
        outcome = connect_via_consent_page(
            link.url,
            username=login.username,
            password=login.password,
            stop_at=RETURN_URL,
            http=self.http,
            **kwargs,
        )
        return link.connection_id, outcome


@pytest.fixture
def pa_env(settings: Settings, sandbox: SandboxHandle) -> Iterator[PatientAccessEnv]:
    """Our web app (connect routes) on a loopback socket, with a fresh control plane."""
    cp = open_control_plane(settings)
    cp.add_tenant("acme", "Acme Health", {"delete_on_revoke": True})
    with (
        httpx.Client(timeout=30.0) as http,
        serve(lambda base: create_app(public_base_url=base, settings=settings)) as web_base,
    ):
        yield PatientAccessEnv(
            settings=settings, cp=cp, web_base=web_base, sandbox=sandbox, http=http
        )
    cp.engine.dispose()


# ---------------------------------------------------------------------------------------------
# A separately served sandbox EHR org (a type subset, or responses rewritten to inject faults the
# sandbox's fault injector does not offer: OperationOutcome entries, paging loops, bad resources)
# ---------------------------------------------------------------------------------------------
Rewrite = Callable[[str, dict[str, Any]], dict[str, Any] | None]


class RewriteResponses:
    """ASGI middleware: for GET requests whose path matches ``pattern``, parse the JSON answer,
    pass ``(path_and_query, body)`` to ``rewrite`` and send what it returns (None: unchanged)."""

    def __init__(self, app: Any, pattern: str, rewrite: Rewrite) -> None:
        self.app = app
        self.pattern = re.compile(pattern)
        self.rewrite = rewrite

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not self.pattern.search(scope["path"]):
            await self.app(scope, receive, send)
            return
        start: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def capture(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, capture)
        body = b"".join(chunks)
        if start.get("status") == 200:
            where = scope["path"] + "?" + scope.get("query_string", b"").decode()
            new = self.rewrite(where, json.loads(body))
            if new is not None:
                body = json.dumps(new).encode()
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await send(
            {"type": "http.response.start", "status": start.get("status", 500), "headers": headers}
        )
        await send({"type": "http.response.body", "body": body})


@contextlib.contextmanager
def custom_ehr(
    env: PatientAccessEnv,
    *,
    org_id: str = "custom-ehr",
    resource_types: Sequence[str] | None = None,
    rewrite: tuple[str, Rewrite] | None = None,
) -> Iterator[tuple[str, OrgEndpoint]]:
    """Serve the first sandbox EHR org's data from a new app; yield (source id, endpoint)."""
    from medblocks_sandbox.auth_model import Login
    from medblocks_sandbox.ehr import create_ehr_app
    from medblocks_sandbox.ehr_common import EHR_TYPES, OrgConfig
    from medblocks_sandbox.fhir_store import FhirStore

    src = env.org("ehr")
    pop = env.sandbox.population
    store = FhirStore()
    store.put_many(pop.resources_for(src.org_id))
    logins = tuple(
        Login(username=lg.username, password=lg.password, patient_id=lg.patient_id)
        for lg in pop.logins
        if lg.org_id == src.org_id
    )
    secret = "custom-admin-secret"

    def factory(base: str) -> Any:
        app = create_ehr_app(
            OrgConfig(org_id=org_id, name="Custom EHR", logins=logins),
            store,
            base_url=base,
            admin_secret=secret,
            resource_types=tuple(resource_types or EHR_TYPES),
        )
        return RewriteResponses(app, rewrite[0], rewrite[1]) if rewrite else app

    with serve(factory) as base:
        endpoint = OrgEndpoint(org_id, "Custom EHR", "ehr", "ehr", base)
        client_id = f"pa-{secrets.token_hex(4)}"
        resp = httpx.post(
            f"{base}/_admin/clients",
            headers={"X-Admin-Secret": secret},
            json={
                "client_id": client_id,
                "token_endpoint_auth_method": "none",
                "redirect_uris": [env.callback],
                "name": "Acme",
            },
        )
        resp.raise_for_status()
        env.cp.add_source(
            org_id,
            "Custom EHR",
            "sandbox",
            "ehr",
            endpoint.fhir_base,
            ["patient_access"],
            config={"client_id": client_id},
        )
        env.clients[org_id] = client_id
        yield org_id, endpoint
