"""After `medblocks demo` stops its sandbox, sensors and schedules skip the demo's sources.

The demo flags its sources (``config.sandbox``); a flagged source whose loopback endpoint refuses
connections is a stopped sandbox. Real sockets on 127.0.0.1: a listening one, and a port that was
just closed.
"""

import socket
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import dagster as dg
import pytest

from medblocks_pipelines.defs.backend.schedules import backend_cadence_schedule
from medblocks_pipelines.defs.backend.sensors import backend_bulk_export_sensor
from medblocks_pipelines.defs.shared.resources import PlatformResource
from medblocks_pipelines.lib.registry import ControlPlane, open_control_plane
from medblocks_pipelines.lib.registry.sandbox_sources import is_stopped_sandbox
from medblocks_pipelines.lib.settings import Settings
from medblocks_pipelines_tests.support.rows import source_row


@pytest.fixture
def listening() -> Iterator[socket.socket]:
    """A loopback port something listens on (the sandbox, running)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    try:
        yield sock
    finally:
        sock.close()


def _closed_port() -> int:
    """A loopback port nobody listens on (the sandbox, stopped)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _register(settings: Settings, port: int, *, flagged: bool) -> ControlPlane:
    cp = open_control_plane(settings)
    cp.add_tenant("acme", "Acme")
    config = {"sandbox": True} if flagged else {}
    base = f"http://127.0.0.1:{port}/fhir"
    cp.add_source("mercy", "Mercy", "sandbox", "ehr", base, ["backend"], config)
    cp.add_organization("mercy-general", "acme", "mercy", "Mercy", {"cadence": "0 * * * *"})
    return cp


def _tick(settings: Settings) -> list[dg.RunRequest] | dg.SkipReason:
    at = datetime(2026, 11, 28, 10, 0, tzinfo=UTC)  # the hourly cadence fires at 10:00
    with (
        dg.instance_for_test() as instance,
        dg.build_schedule_context(
            instance=instance,
            scheduled_execution_time=at,
            resources={"platform": PlatformResource(data_dir=str(settings.data_dir))},
        ) as ctx,
    ):
        result = backend_cadence_schedule(ctx)
    assert isinstance(result, (list, dg.SkipReason))
    return result


def test_schedule_runs_while_the_sandbox_listens(
    settings: Settings, listening: socket.socket
) -> None:
    _register(settings, listening.getsockname()[1], flagged=True)
    requests = _tick(settings)
    assert isinstance(requests, list) and [r.partition_key for r in requests] == [
        "acme.mercy-general"
    ]


def test_schedule_skips_a_stopped_sandbox(settings: Settings) -> None:
    _register(settings, _closed_port(), flagged=True)
    assert isinstance(_tick(settings), dg.SkipReason)


def test_unflagged_sources_are_never_skipped(settings: Settings) -> None:
    """A production source that is down still gets its runs (and their failures)."""
    _register(settings, _closed_port(), flagged=False)
    requests = _tick(settings)
    assert isinstance(requests, list) and len(requests) == 1


def test_export_sensor_leaves_a_stopped_sandbox_export_alone(settings: Settings) -> None:
    """An export kicked off before the demo ended is not polled (nothing answers) nor failed."""
    port = _closed_port()
    cp = _register(settings, port, flagged=True)
    export_id = cp.save_bulk_export(
        tenant_id="acme",
        source_id="mercy",
        organization_id="mercy-general",
        polling_url=f"http://127.0.0.1:{port}/fhir/$export-poll/1",
        request={},
    )
    platform = PlatformResource(data_dir=str(settings.data_dir))
    with dg.instance_for_test() as instance:
        ctx = dg.build_sensor_context(instance=instance, resources={"platform": platform})
        result = backend_bulk_export_sensor(ctx)
    assert not result.run_requests and "polled 0 export(s)" in str(result.skip_reason)
    assert cp.get_bulk_export(export_id).status == "kicked_off"


@pytest.mark.parametrize(
    ("source", "stopped"),
    [
        # flagged, loopback, nobody listening
        ({"fhir_base_url": "http://127.0.0.1:{closed}/fhir", "config": {"sandbox": True}}, True),
        # flagged, loopback, listening
        ({"fhir_base_url": "http://127.0.0.1:{open}/fhir", "config": {"sandbox": True}}, False),
        # flagged but on a real host: not ours to judge
        ({"fhir_base_url": "https://fhir.example.org/r4", "config": {"sandbox": True}}, False),
        # not flagged
        ({"fhir_base_url": "http://127.0.0.1:{closed}/fhir", "config": {}}, False),
        # a network source: its gateways' endpoints count
        (
            {
                "fhir_base_url": None,
                "config": {
                    "sandbox": True,
                    "gateways": [
                        {
                            "xcpd_url": "http://127.0.0.1:{closed}/a/xcpd",
                            "xca_query_url": "http://127.0.0.1:{closed}/a/xca/query",
                            "xca_retrieve_url": "http://127.0.0.1:{closed}/a/xca/retrieve",
                        }
                    ],
                },
            },
            True,
        ),
    ],
)
def test_stopped_sandbox_detection(source: dict, stopped: bool, listening: socket.socket) -> None:
    ports = {"closed": _closed_port(), "open": listening.getsockname()[1]}

    def fill(value: object) -> object:
        if isinstance(value, str):
            return value.format(**ports)
        if isinstance(value, dict):
            return {k: fill(v) for k, v in value.items()}
        if isinstance(value, list):
            return [fill(v) for v in value]
        return value

    filled: dict[str, Any] = fill(source)  # type: ignore[assignment]
    assert is_stopped_sandbox(source_row(**filled)) is stopped
