"""UDAP authorization_code + PKCE (TEFCA IAS Mode 1) over loopback against the sandbox node:
registration with redirect_uris/logo_uri, the authorize redirect with state, the code exchange
with ``udap=1`` and an extension-free assertion, a patient-bound token, and the refusals."""

import contextlib
import urllib.parse
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from medblocks_pipelines.lib.errors import AuthError
from medblocks_pipelines.lib.network.udap.authcode import authorization_request, exchange_code
from medblocks_pipelines.lib.network.udap.certs import CrlChecker, VaultSigner, load_pem_chain
from medblocks_pipelines.lib.network.udap.discovery import discover
from medblocks_pipelines.lib.network.udap.registration import ClientProfile, register
from medblocks_pipelines.lib.network.udap.token import Requestor, request_token
from medblocks_pipelines_tests.network.udap_support import UdapEnv, node_resources
from medblocks_sandbox.udap import NodeSpec

NODE = "riverside-health"
CALLBACK = "https://acme.test/udap/callback"


@pytest.fixture
def flow(tmp_path: Any) -> Iterator[Any]:
    with contextlib.ExitStack() as stack:
        env = UdapEnv(tmp_path, stack)
        spec = NodeSpec(
            NODE,
            "Riverside",
            node_resources("rv-1"),
            grant_types=("client_credentials", "authorization_code"),
        )
        sb = env.start([spec])
        http = stack.enter_context(httpx.Client())
        anchors = load_pem_chain(sb.ca.anchor_pem())
        meta = discover(http, sb.nodes[NODE].base, anchors, crl=CrlChecker(http))
        assert meta is not None and meta.authorization_endpoint
        signer = VaultSigner(env.cp.vault, "acme")
        profile = ClientProfile(
            "Acme",
            ("mailto:ops@acme.test",),
            scope="patient/*.rs",
            grant_type="authorization_code",
            redirect_uris=(CALLBACK,),
            logo_uri="https://acme.test/logo.png",
        )
        reg = register(http, meta, signer, profile, network="n", node=NODE, purpose="T-IAS")
        yield http, meta, signer, reg, sb.nodes[NODE]


def _login(http: httpx.Client, url: str) -> str:
    resp = http.get(url, follow_redirects=False)
    assert resp.status_code == 302, resp.text
    return str(resp.headers["location"])


def test_code_flow_gives_a_patient_bound_token(flow: Any) -> None:
    http, meta, signer, reg, node = flow
    req = authorization_request(meta, reg, redirect_uri=CALLBACK, scope="patient/*.rs")
    callback = _login(http, req.url + "&login_hint=rv-1")
    token, patient = exchange_code(http, meta, signer, reg, req, callback)
    assert patient == "rv-1"
    auth = {"Authorization": f"Bearer {token.access_token}"}
    own = http.get(f"{node.base}/Condition", params={"patient": "rv-1"}, headers=auth)
    assert own.status_code == 200 and own.json()["total"] >= 1
    other = http.get(f"{node.base}/Condition", params={"patient": "rv-1-other"}, headers=auth)
    assert other.status_code == 403
    # The code was single use.
    with pytest.raises(AuthError, match="invalid_grant"):
        exchange_code(http, meta, signer, reg, req, callback)


def test_code_flow_refusals(flow: Any) -> None:
    http, meta, signer, reg, node = flow
    req = authorization_request(meta, reg, redirect_uri=CALLBACK, scope="patient/*.rs")
    # A callback whose state is not ours is refused before any request.
    forged = CALLBACK + "?" + urllib.parse.urlencode({"code": "x", "state": "forged"})
    with pytest.raises(AuthError, match="state"):
        exchange_code(http, meta, signer, reg, req, forged)
    # A redirect_uri that was not registered: no redirect at all.
    bad = req.url.replace(urllib.parse.quote(CALLBACK, safe=""), "https%3A%2F%2Fevil.test%2Fcb")
    assert http.get(bad, follow_redirects=False).status_code == 400
    # A wrong PKCE verifier.
    callback = _login(http, req.url)
    wrong = type(req)(req.url, req.state, "not-the-verifier", req.redirect_uri)
    with pytest.raises(AuthError, match="invalid_grant"):
        exchange_code(http, meta, signer, reg, wrong, callback)
    assert node.auth.state.counts["why:PKCE verification failed"] == 1
    # This client is not registered for client_credentials.
    with pytest.raises(AuthError, match="unauthorized_client"):
        request_token(
            http, meta.token_endpoint, signer, reg, Requestor("Acme", "urn:oid:1.2"), "T-IAS"
        )
