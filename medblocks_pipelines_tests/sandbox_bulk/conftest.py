"""Fixtures for the bulk server tests: a small FHIR population and live servers on loopback.

Every server runs under uvicorn in a background thread on an ephemeral 127.0.0.1 port; the tests
talk to it with plain httpx, as a client would.
"""

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from medblocks_sandbox.bulk import BulkServer, create_bulk_app
from medblocks_sandbox.bulk_auth import StaticTokens
from medblocks_sandbox.bulk_jobs import BulkConfig
from medblocks_sandbox.faults import FaultInjector
from medblocks_sandbox.fhir_store import FhirStore

KICKOFF_HEADERS = {"Accept": "application/fhir+json", "Prefer": "respond-async"}
OLD = "2024-01-01T00:00:00.000Z"


def bound_socket() -> socket.socket:
    """A socket bound to an ephemeral 127.0.0.1 port (its URL is known before the app exists)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextmanager
def serve(app: Any, sock: socket.socket | None = None) -> Iterator[str]:
    """Run ``app`` on 127.0.0.1 (an ephemeral port unless ``sock`` is given); yield its URL."""
    sock = sock or bound_socket()
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="critical", lifespan="off", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def _obs(oid: str, pid: str, code: str, category: str, status: str = "final") -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": oid,
        "meta": {"lastUpdated": OLD},
        "status": status,
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": category,
                    }
                ]
            }
        ],
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": "2023-05-01",
        "valueQuantity": {"value": 7.1, "unit": "%"},
    }


def population() -> list[dict[str, Any]]:
    """Three patients, a Group of two, labs and vitals, conditions, medications, a practitioner."""
    out: list[dict[str, Any]] = []
    for pid in ("p1", "p2", "p3"):
        out.append(
            {
                "resourceType": "Patient",
                "id": pid,
                "meta": {"lastUpdated": OLD},
                "gender": "female",
                "birthDate": "1970-01-01",
                "name": [{"family": f"Fam{pid}", "given": ["Ann"]}],
            }
        )
        out.append(_obs(f"{pid}-hba1c", pid, "4548-4", "laboratory"))
        out.append(_obs(f"{pid}-bp", pid, "85354-9", "vital-signs"))
        out.append(
            {
                "resourceType": "Condition",
                "id": f"{pid}-dm",
                "meta": {"lastUpdated": OLD},
                "subject": {"reference": f"Patient/{pid}"},
                "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006"}]},
            }
        )
        for n, status in enumerate(("active", "stopped")):
            out.append(
                {
                    "resourceType": "MedicationRequest",
                    "id": f"{pid}-mr{n}",
                    "meta": {"lastUpdated": OLD},
                    "status": status,
                    "intent": "order",
                    "subject": {"reference": f"Patient/{pid}"},
                    "medicationCodeableConcept": {
                        "coding": [
                            {
                                "system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                                "code": "860975",
                            }
                        ]
                    },
                }
            )
    out.append(
        {
            "resourceType": "Practitioner",
            "id": "dr1",
            "meta": {"lastUpdated": OLD},
            "name": [{"family": "Who"}],
        }
    )
    out.append(
        {
            "resourceType": "Group",
            "id": "g1",
            "meta": {"lastUpdated": OLD},
            "type": "person",
            "actual": True,
            "member": [
                {"entity": {"reference": "Patient/p1"}},
                {"entity": {"reference": "Patient/p2"}},
            ],
        }
    )
    return out


@dataclass
class BulkEnv:
    """A running bulk server and what a test needs to drive it."""

    base: str
    server: BulkServer
    store: FhirStore
    tokens: StaticTokens
    faults: FaultInjector
    storage: str | None

    def token(self, client_id: str = "client-a", scopes: str = "system/*.read") -> str:
        """A fresh bearer token for ``client_id``."""
        return self.tokens.issue(client_id, scopes.split())

    def auth(self, client_id: str = "client-a", scopes: str = "system/*.read") -> dict[str, str]:
        """Authorization header with a fresh token."""
        return {"Authorization": f"Bearer {self.token(client_id, scopes)}"}

    def kickoff(
        self,
        path: str = "/$export",
        *,
        client_id: str = "client-a",
        params: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        """GET kick-off with the required headers."""
        headers = {**KICKOFF_HEADERS, **self.auth(client_id), **kwargs.pop("headers", {})}
        return httpx.get(self.base + path, params=params, headers=headers, **kwargs)

    def wait(
        self, status_url: str, *, client_id: str = "client-a", timeout: float = 15
    ) -> httpx.Response:
        """Poll until the export is no longer 202; return the final response."""
        headers = {"Accept": "application/json", **self.auth(client_id)}
        deadline = time.monotonic() + timeout
        while True:
            response = httpx.get(status_url, headers=headers)
            if response.status_code != 202:
                return response
            if time.monotonic() > deadline:
                raise AssertionError("export did not finish")
            time.sleep(0.05)

    def export(self, path: str = "/$export", **kwargs: Any) -> dict[str, Any]:
        """Kick off, wait, and return the manifest."""
        client_id = kwargs.get("client_id", "client-a")
        response = self.kickoff(path, **kwargs)
        assert response.status_code == 202, response.text
        final = self.wait(response.headers["content-location"], client_id=client_id)
        assert final.status_code == 200, final.text
        return final.json()

    def lines(self, url: str, *, client_id: str = "client-a") -> list[dict[str, Any]]:
        """Download one file and parse its NDJSON lines."""
        response = httpx.get(
            url,
            headers={"Accept": "application/fhir+ndjson", **self.auth(client_id)},
            follow_redirects=False,
        )
        assert response.status_code == 200, response.text
        return [__import__("json").loads(x) for x in response.text.splitlines() if x.strip()]

    def all_of(
        self, manifest: dict[str, Any], key: str = "output", client_id: str = "client-a"
    ) -> dict[str, list[dict[str, Any]]]:
        """Every resource in the manifest's ``key`` files, by type."""
        out: dict[str, list[dict[str, Any]]] = {}
        for item in manifest[key]:
            out.setdefault(item["type"], []).extend(self.lines(item["url"], client_id=client_id))
        return out


@pytest.fixture
def make_env(tmp_path: Path) -> Iterator[Callable[..., BulkEnv]]:
    """Factory: start a bulk server with a profile and config; stopped after the test."""
    stack: list[Any] = []

    def factory(
        profile: str = "strict",
        *,
        store: FhirStore | None = None,
        source: Any = None,
        **config: Any,
    ) -> BulkEnv:
        store = store if store is not None else FhirStore(population())
        tokens = StaticTokens()
        faults = FaultInjector()
        cfg = BulkConfig(**{"export_seconds": 0.05, "retry_after": 1, **config})
        server = BulkServer(
            source if source is not None else store,
            authenticator=tokens,
            profile=profile,
            faults=faults,
            config=cfg,
            work_dir=tmp_path / f"work{len(stack)}",
        )
        app = create_bulk_app(server)
        cm = serve(app)
        base = cm.__enter__()
        stack.append(cm)
        storage = None
        if server.profile.presigned_redirects:
            scm = serve(server.storage_app())
            storage = scm.__enter__()
            stack.append(scm)
            server.storage_base_url = storage
        stack.append(server)
        return BulkEnv(base, server, store, tokens, faults, storage)

    yield factory
    for item in reversed(stack):
        if isinstance(item, BulkServer):
            item.close()
        else:
            item.__exit__(None, None, None)


@pytest.fixture
def env(make_env: Callable[..., BulkEnv]) -> BulkEnv:
    """A strict-profile server over the default population."""
    return make_env()
