"""Fixtures for the backend pattern: a sandbox EHR organization (SMART AS + Bulk Data + faults) and
our own web app serving the JWKS, each under uvicorn on an ephemeral 127.0.0.1 port, plus a fresh
control plane with a tenant, a source, an organization and our signing key.

Tests talk to the servers only over sockets, as production does.
"""

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from medblocks_pipelines.lib.registry import ControlPlane, open_control_plane
from medblocks_pipelines.lib.settings import Settings, get_settings
from medblocks_pipelines.lib.smart.keys import KeyStore
from medblocks_pipelines.web.jwks import jwks_url
from medblocks_sandbox.ehr_common import ADMIN_HEADER, OrgConfig
from medblocks_sandbox.fhir_store import FhirStore
from medblocks_sandbox.run import build_org_app, serve

ADMIN_SECRET = "test-admin-secret"
TENANT = "acme"
CLIENT_ID = "medblocks-backend"
_POPULATION: Any = None


def population() -> Any:
    """A small seeded population, generated once per test session."""
    global _POPULATION
    if _POPULATION is None:
        from medblocks_sandbox.generator import PopulationSpec, generate_population

        _POPULATION = generate_population(PopulationSpec(seed=3, persons=8, years=1))
    return _POPULATION


def org_store(org_id: str) -> FhirStore:
    """The org's resources plus a Group of all its patients (cohort for Group export)."""
    store = FhirStore()
    store.put_many(population().resources_for(org_id))
    members = [{"entity": {"reference": f"Patient/{p['id']}"}} for p in store.iter_type("Patient")]
    store.put(
        {
            "resourceType": "Group",
            "id": "cohort",
            "type": "person",
            "actual": True,
            "member": members,
        }
    )
    return store


@dataclass
class Ehr:
    """One running sandbox organization and its in-process handles."""

    org_id: str
    base_url: str
    handles: dict[str, Any]
    storage_url: str | None = None

    @property
    def fhir_base(self) -> str:
        return f"{self.base_url}/fhir"

    @property
    def store(self) -> FhirStore:
        return self.handles["store"]

    @property
    def faults(self) -> Any:
        return self.handles["faults"]

    @property
    def bulk(self) -> Any:
        return self.handles["bulk"]

    @property
    def auth(self) -> Any:
        return self.handles["auth"]

    def admin(self, path: str, body: dict[str, Any]) -> httpx.Response:
        return httpx.post(
            f"{self.base_url}/_admin/{path}",
            json=body,
            headers={ADMIN_HEADER: ADMIN_SECRET},
            timeout=10,
        )


@dataclass
class Env:
    """What a backend test needs: settings, control plane, our JWKS URL, running EHRs."""

    settings: Settings
    cp: ControlPlane
    jwks_url: str
    ehrs: dict[str, Ehr] = field(default_factory=dict)
    start_ehr: Callable[..., Ehr] | None = None

    def add_org(
        self,
        org_id: str = "mercy-general",
        *,
        profile: str = "strict",
        source_config: dict[str, Any] | None = None,
        org_config: dict[str, Any] | None = None,
        register: str = "jwks_uri",
        tenant: str = TENANT,
    ) -> Ehr:
        """Start an EHR for ``org_id``, register our client there, add it to the registry."""
        assert self.start_ehr is not None
        ehr = self.start_ehr(org_id, profile)
        body: dict[str, Any] = {
            "client_id": CLIENT_ID,
            "token_endpoint_auth_method": "private_key_jwt",
            "scopes": ["system/*.rs"],
        }
        if register == "jwks_uri":
            body["jwks_uri"] = self.jwks_url
        else:
            body["jwks"] = KeyStore(self.cp.vault).jwks()
        resp = ehr.admin("clients", body)
        assert resp.status_code == 201, resp.text
        if not any(t.id == tenant for t in self.cp.list_tenants()):
            self.cp.add_tenant(tenant, tenant.title())
        self.cp.add_source(
            f"src-{org_id}",
            f"EHR of {org_id}",
            profile if profile != "strict" else "generic",
            "ehr",
            ehr.fhir_base,
            ["backend"],
            {
                "client_id": CLIENT_ID,
                "jwks_url": self.jwks_url,
                "max_parallel_downloads": 3,
                **(source_config or {}),
            },
        )
        self.cp.add_organization(
            org_id,
            tenant,
            f"src-{org_id}",
            org_id.title(),
            {"group_id": "cohort", **(org_config or {})},
        )
        return ehr


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    """A control plane with our signing key, our web app serving the JWKS, EHRs on demand."""
    monkeypatch.setenv("MEDBLOCKS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("MEDBLOCKS_DATABASE_URL", raising=False)
    monkeypatch.delenv("MEDBLOCKS_SECRET_KEY", raising=False)
    # CLI runs record into a throwaway Dagster instance (restored after the test).
    (tmp_path / "dagster_home").mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    settings = get_settings(tmp_path / "data")
    settings.ensure_dirs()
    cp = open_control_plane(settings)
    KeyStore(cp.vault).generate("ES384")
    stack = contextlib.ExitStack()

    from medblocks_pipelines.web.app import create_app

    def web_app(base: str) -> Any:
        return create_app(public_base_url=base, settings=settings)

    web_base = stack.enter_context(serve(web_app))
    env = Env(settings=settings, cp=cp, jwks_url=jwks_url(web_base))

    def start_ehr(org_id: str, profile: str) -> Ehr:
        holder: dict[str, Any] = {}

        def factory(base: str) -> Any:
            app, handles = build_org_app(
                OrgConfig(org_id=org_id, name=org_id.title()),
                org_store(org_id),
                base_url=base,
                admin_secret=ADMIN_SECRET,
                profile=profile,
            )
            holder.update(handles)
            holder["base"] = base
            return app

        stack.enter_context(serve(factory))
        bulk = holder["bulk"]
        stack.callback(bulk.close)
        # Fast exports for tests; the client still honours what the server says.
        bulk.config.export_seconds = 0.2
        bulk.config.retry_after = 0
        bulk.config.max_lines_per_file = 200
        ehr = Ehr(org_id, holder["base"], holder)
        if bulk.profile.presigned_redirects:
            ehr.storage_url = stack.enter_context(serve(lambda _b: bulk.storage_app()))
            bulk.storage_base_url = ehr.storage_url
        env.ehrs[org_id] = ehr
        return ehr

    env.start_ehr = start_ehr
    try:
        yield env
    finally:
        stack.close()
        cp.engine.dispose()


@pytest.fixture
def live_defs_state() -> Iterator[Any]:
    """A throwaway Dagster instance for runs launched through `cli.runtime.run_job` (which loads
    the code location in a fresh context, whatever Dagster's context variables hold)."""
    import dagster as dg

    with dg.instance_for_test() as inst:
        yield inst
