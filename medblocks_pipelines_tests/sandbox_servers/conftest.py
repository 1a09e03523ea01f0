"""Fixtures: the sandbox EHR and payer served by uvicorn on ephemeral loopback ports."""

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from medblocks_pipelines_tests.sandbox_servers.fixture_data import ehr_resources, payer_resources
from medblocks_pipelines_tests.sandbox_servers.helpers import Server
from medblocks_sandbox.auth_model import AuthConfig, Login
from medblocks_sandbox.ehr import create_ehr_app
from medblocks_sandbox.ehr_common import OrgConfig
from medblocks_sandbox.fhir_store import FhirStore
from medblocks_sandbox.payer import create_payer_app, load_payer_store
from medblocks_sandbox.run import serve

ADMIN_SECRET = "test-admin-secret"


@pytest.fixture
def ehr() -> Iterator[Server]:
    """A fresh EHR org `mercy` with the fixture data (fresh per test: tokens and jtis are state)."""
    store = FhirStore(ehr_resources())
    holder: dict[str, Any] = {}

    def factory(base: str) -> Any:
        org = OrgConfig(
            "mercy",
            "Mercy Clinic",
            "ehr",
            logins=(Login("alice", "alice-pw-123", "p1"), Login("bob", "bob-pw-456", "p2")),
        )
        app = create_ehr_app(
            org,
            store,
            base_url=f"{base}/mercy",
            admin_secret=ADMIN_SECRET,
            auth_config=AuthConfig(),
        )
        holder["app"] = app
        from starlette.applications import Starlette
        from starlette.routing import Mount

        return Starlette(routes=[Mount("/mercy", app=app)])

    with serve(factory) as base, httpx.Client(timeout=10) as http:
        yield Server(f"{base}/mercy", ADMIN_SECRET, holder["app"], http)


@pytest.fixture
def payer() -> Iterator[Server]:
    """A fresh payer org `acme-health` with the fixture data."""
    store = load_payer_store(payer_resources())
    holder: dict[str, Any] = {}

    def factory(base: str) -> Any:
        org = OrgConfig(
            "acme-health", "Acme Health", "payer", logins=(Login("alice", "alice-payer-pw", "m1"),)
        )
        app = create_payer_app(org, store, base_url=base, admin_secret=ADMIN_SECRET)
        holder["app"] = app
        return app

    with serve(factory) as base, httpx.Client(timeout=10) as http:
        yield Server(base, ADMIN_SECRET, holder["app"], http)
