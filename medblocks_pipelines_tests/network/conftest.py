"""Fixtures for the network tests: a tiny population, a signing identity, a live gateway server."""

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
import uvicorn

from medblocks_pipelines.lib.network.certs import generate_signing_identity
from medblocks_pipelines_tests.network.fixtures import patient_bundle
from medblocks_sandbox.gateway import Behaviour, create_gateway_app


@dataclass(frozen=True)
class FakeOrg:
    id: str
    name: str
    kind: str
    oid: str
    home_community_id: str | None


class FakePopulation:
    """Two network communities; the same person is registered at both (different local ids)."""

    def __init__(self) -> None:
        self.organizations = [
            FakeOrg("mercy-general", "Mercy General", "ehr", "2.16.840.1.113883.3.9999.1", None),
            FakeOrg(
                "riverside-health",
                "Riverside Health System",
                "network",
                "2.16.840.1.113883.3.9999.4",
                "urn:oid:2.16.840.1.113883.3.9999.4",
            ),
            FakeOrg(
                "valley-medical",
                "Valley Medical Group",
                "network",
                "2.16.840.1.113883.3.9999.5",
                "urn:oid:2.16.840.1.113883.3.9999.5",
            ),
        ]
        self._res: dict[str, list[dict[str, Any]]] = {}
        for org, pid in (("riverside-health", "rv-1"), ("valley-medical", "vm-7")):
            patient, resources = patient_bundle(pid)
            other, other_res = patient_bundle(f"{pid}-other")
            other["name"] = [{"family": "Nguyen", "given": ["Bao"]}]
            other["birthDate"] = "1955-01-01"
            self._res[org] = [patient, *resources, other, *other_res]

    def resources_for(self, org_id: str) -> list[dict[str, Any]]:
        return list(self._res.get(org_id, []))


@pytest.fixture(scope="session")
def population() -> FakePopulation:
    return FakePopulation()


@pytest.fixture(scope="session")
def signing_identity() -> tuple[bytes, bytes]:
    return generate_signing_identity("medblocks-test-initiator")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LiveServer:
    """A uvicorn server on 127.0.0.1 in a background thread."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.port = _free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(
                app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off"
            )
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("gateway server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def gateway_server(
    population: FakePopulation, signing_identity: tuple[bytes, bytes]
) -> Iterator[Any]:
    """Factory: start a gateway with given behaviours; all servers stop at teardown."""
    started: list[LiveServer] = []

    def start(
        behaviours: dict[str, Behaviour] | None = None, *, verify: bool = True
    ) -> SimpleNamespace:
        app = create_gateway_app(
            population, behaviours=behaviours, trusted_cert=signing_identity[1] if verify else None
        )
        srv = LiveServer(app).__enter__()
        started.append(srv)
        return SimpleNamespace(url=srv.url, app=app, seen=app.state.seen)

    yield start
    for srv in started:
        srv.__exit__()
