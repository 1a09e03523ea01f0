"""The public base URL: validation (settings and the web app), routing under a path prefix, cookie
paths, and the one warning when requests arrive through a proxy the setting does not describe.

The end-to-end checks through a real TLS proxy are in clinician_workflow/, patient_access/ and
browser/ ``test_public_base_url.py``.
"""

import logging

import httpx
import pytest

from medblocks_pipelines.lib.errors import ConfigError
from medblocks_pipelines.lib.settings import Settings, get_settings, normalize_public_base_url
from medblocks_pipelines.web.app import create_app
from medblocks_sandbox.run import serve


@pytest.mark.parametrize(
    ("given", "normal"),
    [
        ("https://example.org", "https://example.org"),
        (
            "https://Example.ORG:8443/medblocks/",
            "https://example.org:8443/medblocks",
        ),  # case, slash
        ("http://127.0.0.1:8000", "http://127.0.0.1:8000"),
        (" https://h.example/a/b ", "https://h.example/a/b"),  # pasted with spaces
    ],
)
def test_normalised(given: str, normal: str) -> None:
    assert normalize_public_base_url(given) == normal


@pytest.mark.parametrize(
    "bad",
    [
        "example.org",  # no scheme
        "ftp://example.org",  # not http(s)
        "https://",  # no host
        "https://example.org/?x=1",  # query
        "https://example.org/#top",  # fragment
        "https://user:pw@example.org",  # credentials
    ],
)
def test_refused(bad: str) -> None:
    with pytest.raises(ConfigError):
        normalize_public_base_url(bad)


def test_settings_read_the_environment(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    assert settings.public_base_url is None
    monkeypatch.setenv("MEDBLOCKS_PUBLIC_BASE_URL", "https://ehr-apps.example/medblocks/")
    assert get_settings().public_base_url == "https://ehr-apps.example/medblocks"
    monkeypatch.setenv("MEDBLOCKS_PUBLIC_BASE_URL", "ehr-apps.example")
    with pytest.raises(ConfigError):
        get_settings()


def test_prefix_routes_both_ways(settings: Settings) -> None:
    app = create_app(public_base_url="https://h.example/medblocks", settings=settings)
    with serve(lambda _base: app) as web, httpx.Client(base_url=web) as client:
        # A proxy that passes the prefix through, and one that strips it.
        assert client.get("/medblocks/healthz").json() == {"status": "ok"}
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/medblockshealthz").status_code == 404  # not a prefix match
        # A surface answers under the prefix too (a launch without iss/launch is refused).
        assert client.get("/medblocks/ehr/launch").status_code == 400
    ctx = app.state.ctx
    assert ctx.public_path == "/medblocks" and ctx.secure


def test_a_proxy_the_setting_does_not_describe_is_warned_once(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(public_base_url="http://127.0.0.1:8000", settings=settings)
    forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "apps.example"}
    with (
        caplog.at_level(logging.WARNING, logger="medblocks_pipelines.web.app"),
        serve(lambda _base: app) as web,
        httpx.Client(base_url=web) as client,
    ):
        for _ in range(3):
            assert client.get("/healthz", headers=forwarded).status_code == 200
    warnings = [r for r in caplog.records if "MEDBLOCKS_PUBLIC_BASE_URL" in r.getMessage()]
    assert len(warnings) == 1 and "https://apps.example" in warnings[0].getMessage()


def test_a_matching_proxy_is_not_warned(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(public_base_url="https://apps.example/medblocks", settings=settings)
    forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "apps.example"}
    with (
        caplog.at_level(logging.WARNING, logger="medblocks_pipelines.web.app"),
        serve(lambda _base: app) as web,
        httpx.Client(base_url=web) as client,
    ):
        assert client.get("/medblocks/healthz", headers=forwarded).status_code == 200
    assert not [r for r in caplog.records if "MEDBLOCKS_PUBLIC_BASE_URL" in r.getMessage()]
