"""Fixtures of the operations tests: a control plane, a real webhook receiver on loopback.

The receiver is a Starlette app in a uvicorn thread that verifies every request with the
``standardwebhooks`` library (the receiver's side of the spec) and answers with a scripted status.
"""

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from medblocks_pipelines.lib.registry import ControlPlane, open_control_plane
from medblocks_pipelines.lib.settings import Settings
from medblocks_sandbox.run import ServerThread, bind_socket


@pytest.fixture(autouse=True)
def _loopback_receivers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Receivers here live on 127.0.0.1, which production refuses (SSRF guard)."""
    monkeypatch.setenv("MEDBLOCKS_WEBHOOK_ALLOW_PRIVATE", "1")


@pytest.fixture
def cp(settings: Settings) -> ControlPlane:
    """A fresh SQLite control plane with one tenant (acme) and one source."""
    plane = open_control_plane(settings)
    plane.add_tenant("acme", "Acme Health Apps")
    plane.add_tenant("other", "Other Co")
    plane.add_source("mercy", "Mercy EHR", "epic", "ehr", "http://127.0.0.1:1/fhir", ["backend"])
    plane.add_organization("mercy-general", "acme", "mercy", "Mercy General")
    return plane


@dataclass
class Received:
    """One request the receiver got."""

    path: str
    headers: dict[str, str]
    body: bytes
    verified: bool
    payload: Any = None


@dataclass
class Receiver:
    """A webhook receiver: per-path secrets, scripted answers, everything it got."""

    url: str
    secrets: dict[str, str] = field(default_factory=dict)
    # Status codes to answer per path, consumed in order; 204 when the script is empty.
    script: dict[str, list[int]] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)
    # Seconds to wait before answering, per path (a slow receiver).
    delays: dict[str, float] = field(default_factory=dict)

    def on(self, path: str) -> list[Received]:
        return [r for r in self.received if r.path == path]


def _receiver_app(state: Receiver) -> Starlette:
    async def hook(request: Request) -> Response:
        name = request.path_params["name"]
        body = await request.body()
        headers = dict(request.headers)
        verified, payload = False, None
        secret = state.secrets.get(name)
        if secret:
            try:
                payload = Webhook(secret).verify(body, headers)
                verified = True
            except WebhookVerificationError:
                verified = False
        state.received.append(Received(name, headers, body, verified, payload))
        if state.delays.get(name):
            await asyncio.sleep(state.delays[name])
        if not verified:
            return Response(status_code=401)
        script = state.script.get(name) or []
        code = script.pop(0) if script else 204
        return Response(status_code=code)

    return Starlette(routes=[Route("/hook/{name}", hook, methods=["POST"])])


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A live receiver on 127.0.0.1 with an ephemeral port."""
    sock = bind_socket()
    host, port = sock.getsockname()[:2]
    state = Receiver(url=f"http://{host}:{port}")
    server = ServerThread(sock, _receiver_app(state), name="webhook-receiver").start()
    try:
        yield state
    finally:
        server.stop()
