"""CDS Hooks through a TLS-terminating reverse proxy: ``medblocks serve`` (a real subprocess)
knows its public ``https://127.0.0.1:<port>/medblocks`` address only from
``MEDBLOCKS_PUBLIC_BASE_URL``.

Covers: a hook call addressed to the public URL is accepted (its ``aud`` is that URL) and its
card links point at the public URL, whether the proxy passes the path prefix through or strips it;
our JWKS answers at the public URL; discovery and feedback check their public URLs; tokens minted for the internal address or another public path are
refused; and without the setting (``serve`` building ``http://host:port``) the public call is
refused as ``wrong_audience``, which is what deployments saw before.
"""

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from medblocks_pipelines.lib.registry import open_control_plane
from medblocks_pipelines.lib.settings import Settings
from medblocks_pipelines_tests.clinician_workflow.conftest import (
    ISS,
    ORG,
    SOURCE,
    TENANT,
    CdsEnv,
    StubEhr,
    patient_view,
    stub_ehr_app,
)
from medblocks_pipelines_tests.tls_proxy import PublicServe, medblocks_behind_tls_proxy
from medblocks_sandbox.run import serve

SERVICE = "/cds-services/medblocks-patient-view"


@pytest.fixture
def registry(settings: Settings, ehr_keys: list) -> Iterator[tuple[Settings, StubEhr]]:
    """The tenant, the EHR's organization (its iss and JWKS URL) and a published warehouse."""
    holder: dict[str, StubEhr] = {}
    cp = open_control_plane(settings)
    with serve(lambda base: stub_ehr_app(holder)) as stub_base:
        stub = holder["stub"] = StubEhr(base=stub_base, keys=list(ehr_keys))
        cp.add_tenant(TENANT, "Acme Health")
        cp.add_source(SOURCE, "Mercy EHR", "sandbox", "ehr", stub.fhir_base, ["clinician_workflow"])
        cp.add_source(
            "ehr-b", "Riverside Clinic", "sandbox", "ehr", "http://b.example/fhir", ["backend"]
        )
        cp.add_source(
            "payer-x", "Blue Payer", "sandbox", "payer", "http://x.example/fhir", ["patient_access"]
        )
        cp.add_organization(
            ORG,
            TENANT,
            SOURCE,
            "Mercy Hospital",
            config={"cds": {"iss": ISS, "jwks_url": stub.jwks_url}},
        )
        CdsEnv(settings=settings, cp=cp, web="", stub=stub, http=httpx.Client()).publish()
        yield settings, stub
    cp.engine.dispose()


def env_for(registry: tuple[Settings, StubEhr], served: PublicServe, http: httpx.Client) -> CdsEnv:
    settings, stub = registry
    return CdsEnv(settings=settings, cp=None, web=served.public, stub=stub, http=http)  # type: ignore[arg-type]


@pytest.mark.parametrize("strip_prefix", [False, True], ids=["prefix-passed", "prefix-stripped"])
def test_hook_addressed_to_the_public_url_is_accepted(
    registry: tuple[Settings, StubEhr], tmp_path: Path, strip_prefix: bool
) -> None:
    with medblocks_behind_tls_proxy(tmp_path, strip_prefix=strip_prefix) as served:
        assert served.public.startswith("https://127.0.0.1:") and served.public.endswith(
            "/medblocks"
        )
        with httpx.Client(verify=served.ssl_context(), timeout=30.0) as http:
            env = env_for(registry, served, http)
            resp = env.hook("medblocks-patient-view", patient_view(prefetch={"patient": None}))
            assert resp.status_code == 200, resp.text
            cards = resp.json()["cards"]
            links = [link["url"] for c in cards for link in c.get("links", [])]
            # Card links send the clinician to the public launch URL, not the internal address.
            assert links and set(links) == {f"{served.public}/ehr/launch"}
            # Our JWKS is served at the URL we register (<public>/.well-known/jwks.json).
            resp = http.get(f"{served.public}/.well-known/jwks.json")
            assert resp.status_code == 200 and isinstance(resp.json()["keys"], list)
            # Discovery and feedback check their own public URLs too.
            url = env.url("/cds-services")
            resp = http.get(url, headers={"Authorization": f"Bearer {env.sign(url)}"})
            assert resp.status_code == 200 and resp.json()["services"]
            fb = env.url(SERVICE + "/feedback")
            outcome = {"card": cards[0]["uuid"], "outcome": "overridden"}
            outcome["outcomeTimestamp"] = "2026-06-01T10:00:00Z"
            resp = http.post(
                fb,
                json={"feedback": [outcome]},
                headers={"Authorization": f"Bearer {env.sign(fb)}"},
            )
            assert resp.status_code == 200 and resp.json()["stored"] == 1, resp.text
            # Wrong audiences: the internal address, the public host without the prefix, http.
            for aud in (
                served.internal + SERVICE,
                served.public.removesuffix("/medblocks") + SERVICE,
                served.public.replace("https://", "http://") + SERVICE,
            ):
                resp = env.hook(
                    "medblocks-patient-view",
                    patient_view(prefetch={"patient": None}),
                    token=env.sign(aud),
                )
                assert resp.status_code == 401 and resp.json()["error"] == "wrong_audience"
        assert served.proxy.forwarded >= 7  # every call above went through the proxy


def test_without_the_public_base_url_the_public_call_is_refused(
    registry: tuple[Settings, StubEhr], tmp_path: Path
) -> None:
    # What deployments saw: serve answers as http://127.0.0.1:<port>, so the EHR's aud (the
    # public URL it calls) never matches.
    with (
        medblocks_behind_tls_proxy(tmp_path, strip_prefix=True, public_base_url="") as served,
        httpx.Client(verify=served.ssl_context(), timeout=30.0) as http,
    ):
        env = env_for(registry, served, http)
        resp = env.hook("medblocks-patient-view", patient_view(prefetch={"patient": None}))
        assert resp.status_code == 401 and resp.json()["error"] == "wrong_audience"
