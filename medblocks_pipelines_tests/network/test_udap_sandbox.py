"""UDAP over loopback against the strict sandbox: discovery, registration, tokens, refusals.

Each refusal the sandbox must make (UDAP Security 2.0 + TEFCA Facilitated FHIR) has a case here
that drives it with a real HTTP request; the client's own checks (signed_metadata, trust anchor,
CRL) are tested against the same servers.
"""

import contextlib
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from medblocks_pipelines.lib.errors import AuthError, ConfigError, ConsentRequired, ProtocolError
from medblocks_pipelines.lib.network.udap.certs import (
    CrlChecker,
    VaultSigner,
    chain_pem,
    load_pem_chain,
    store_identity,
)
from medblocks_pipelines.lib.network.udap.discovery import TEFCA_COMMUNITY, discover
from medblocks_pipelines.lib.network.udap.registration import (
    ClientProfile,
    RegistrationStore,
    cancel,
    register,
)
from medblocks_pipelines.lib.network.udap.token import (
    JWT_BEARER,
    Requestor,
    TokenCache,
    b2b_extension,
    client_assertion,
    request_token,
    tefca_ias_extension,
)
from medblocks_pipelines_tests.network.udap_support import SAN, UdapEnv, node_resources
from medblocks_sandbox.udap import NodeSpec
from medblocks_sandbox.udap.ca import untrusted_issue

NODE = "riverside-health"
REQ = Requestor("Acme Clinic", "urn:oid:2.16.840.1.113883.3.9999.77", "dr-house")
PROFILE = ClientProfile("Acme", ("mailto:ops@acme.test",))


class Udap:
    """A started sandbox with one node (T-TREAT, T-TRTMNT, T-IAS) and our identity."""

    def __init__(self, tmp_path: Any, stack: contextlib.ExitStack) -> None:
        self.env = UdapEnv(tmp_path, stack)
        self.sb = self.env.start([NodeSpec(NODE, "Riverside", node_resources("rv-1"))])
        self.node = self.sb.nodes[NODE]
        self.http = stack.enter_context(httpx.Client())
        self.anchors = load_pem_chain(self.sb.ca.anchor_pem())
        self.vault = self.env.cp.vault
        self.signer = VaultSigner(self.vault, "acme")

    def meta(self) -> Any:
        return discover(self.http, self.node.base, self.anchors, crl=CrlChecker(self.http))

    def register(self, purpose: str = "T-TREAT", signer: VaultSigner | None = None) -> Any:
        return register(
            self.http,
            self.meta(),
            signer or self.signer,
            PROFILE,
            network="n",
            node=NODE,
            purpose=purpose,
        )

    def identity(self, name: str, key: bytes | None, chain: list[Any]) -> VaultSigner:
        assert key is not None
        store_identity(self.vault, name, key, chain_pem(chain))
        return VaultSigner(self.vault, name)

    def post_token(self, assertion: str, **form: str) -> httpx.Response:
        data = {
            "grant_type": "client_credentials",
            "udap": "1",
            "client_assertion_type": JWT_BEARER,
            "client_assertion": assertion,
            **form,
        }
        return self.http.post(self.node.auth.token_url, data=data)

    def raw_assertion(self, client_id: str, **override: Any) -> str:
        iat = int(time.time())
        claims = {
            "iss": client_id,
            "sub": client_id,
            "aud": self.node.auth.token_url,
            "iat": iat,
            "exp": iat + 300,
            "jti": uuid.uuid4().hex,
            "extensions": {"hl7-b2b": b2b_extension(REQ, "T-TREAT")},
        }
        claims.update(override)
        return self.signer.sign({k: v for k, v in claims.items() if v is not None})


@pytest.fixture
def udap(tmp_path: Any) -> Iterator[Udap]:
    with contextlib.ExitStack() as stack:
        yield Udap(tmp_path, stack)


def _error(resp: httpx.Response) -> str:
    return str(resp.json().get("error"))


# -- discovery -------------------------------------------------------------------------------------
def test_discovery_verifies_signed_metadata_and_signed_values_win(udap: Udap) -> None:
    meta = udap.meta()
    assert meta.token_endpoint == udap.node.auth.token_url
    assert "hl7-b2b" in meta.extensions_required
    # A proxy rewrote the plain JSON: the signed endpoint values override it.
    real = udap.http.get(f"{udap.node.base}/.well-known/udap").json()
    tampered = {**real, "token_endpoint": "https://evil.example/token"}
    fake = httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(200, json=tampered)))
    found = discover(fake, udap.node.base, udap.anchors)
    assert found is not None and found.token_endpoint == udap.node.auth.token_url


def test_discovery_refuses_another_anchor_and_other_base(udap: Udap) -> None:
    _key, chain = untrusted_issue(["https://other.example"])
    with pytest.raises(AuthError, match="untrusted"):
        discover(udap.http, udap.node.base, [chain[-1]])
    real = udap.http.get(f"{udap.node.base}/.well-known/udap").json()
    moved = httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(200, json=real)))
    with pytest.raises(AuthError, match="base URL"):
        discover(moved, "http://127.0.0.1:1/nodes/other/fhir", udap.anchors)


def test_discovery_404_for_another_community_means_no_udap(udap: Udap) -> None:
    assert discover(udap.http, udap.node.base, udap.anchors, community="urn:oid:1.2.3") is None
    assert discover(udap.http, udap.node.base, udap.anchors, community=TEFCA_COMMUNITY)


def test_client_refuses_revoked_server_certificate_via_crl(udap: Udap) -> None:
    udap.sb.ca.revoke(udap.node.auth.server_chain[0])
    with pytest.raises(AuthError, match="revoked"):
        udap.meta()


# -- registration ------------------------------------------------------------------------------
def test_register_update_cancel_and_store(udap: Udap) -> None:
    reg = udap.register()
    assert reg.san_uri == f"{SAN}#T-TREAT" and udap.node.auth.state.counts["registered"] == 1
    again = udap.register()
    assert again.client_id == reg.client_id and udap.node.auth.state.counts["updated"] == 1
    store = RegistrationStore(udap.vault)
    store.put(reg)
    assert store.get("n", NODE, TEFCA_COMMUNITY, "T-TREAT") == reg
    cancel(udap.http, udap.meta(), udap.signer, reg)
    resp = udap.post_token(udap.raw_assertion(reg.client_id))
    assert resp.status_code == 400 and _error(resp) == "invalid_client"


@pytest.mark.parametrize(
    "make, why",
    [
        # an expired client certificate
        (lambda ca: ca.issue([f"{SAN}#T-TREAT"], days=-1), "certificate expired"),
        # a certificate from a CA the community does not trust
        (lambda ca: untrusted_issue([f"{SAN}#T-TREAT"]), "certificate not trusted"),
    ],
)
def test_registration_refuses_bad_certificates(udap: Udap, make: Any, why: str) -> None:
    key, chain = make(udap.sb.ca)
    signer = udap.identity("bad", key, chain)
    with pytest.raises(AuthError, match="unapproved_software_statement"):
        udap.register(signer=signer)
    assert udap.node.auth.state.counts[f"why:{why}"] == 1


def test_registration_refuses_revoked_certificate(udap: Udap) -> None:
    key, chain = udap.sb.ca.issue([f"{SAN}#T-TREAT"])
    signer = udap.identity("revoked", key, chain)
    udap.sb.ca.revoke(chain[0])
    with pytest.raises(AuthError):
        udap.register(signer=signer)
    assert udap.node.auth.state.counts["why:certificate revoked"] == 1


def test_registration_refuses_wrong_aud_and_missing_certification(udap: Udap) -> None:
    iat = int(time.time())
    base = {
        "iss": f"{SAN}#T-TREAT",
        "sub": f"{SAN}#T-TREAT",
        "iat": iat,
        "exp": iat + 300,
        "client_name": "Acme",
        "contacts": ["mailto:ops@acme.test"],
        "grant_types": ["client_credentials"],
        "token_endpoint_auth_method": "private_key_jwt",
        "scope": "system/*.rs",
    }
    url = udap.node.auth.register_url
    wrong = udap.signer.sign({**base, "aud": "https://elsewhere/register", "jti": "a"})
    resp = udap.http.post(url, json={"software_statement": wrong, "udap": "1"})
    assert resp.status_code == 400 and udap.node.auth.state.counts["why:wrong aud"] == 1
    right = udap.signer.sign({**base, "aud": url, "jti": "b"})
    resp = udap.http.post(url, json={"software_statement": right, "udap": "1"})
    assert resp.status_code == 400 and _error(resp) == "unapproved_software_statement"
    both = udap.signer.sign(
        {
            **base,
            "aud": url,
            "jti": "c",
            "grant_types": ["client_credentials", "authorization_code"],
        }
    )
    resp = udap.http.post(url, json={"software_statement": both, "udap": "1"})
    assert _error(resp) == "invalid_client_metadata"
    no_contacts = udap.signer.sign({**base, "aud": url, "jti": "d", "contacts": []})
    resp = udap.http.post(url, json={"software_statement": no_contacts, "udap": "1"})
    assert resp.json()["error_description"] == "contacts needs a mailto: URI"


def test_authorization_code_registration(udap: Udap) -> None:
    profile = ClientProfile("Acme", ("mailto:ops@acme.test",), grant_type="authorization_code")
    # This node offers client_credentials only: the client does not try.
    with pytest.raises(ProtocolError, match="authorization_code"):
        register(
            udap.http, udap.meta(), udap.signer, profile, network="n", node=NODE, purpose="T-IAS"
        )
    udap.node.auth.grant_types = ("client_credentials", "authorization_code")
    meta = udap.meta()
    # Our client refuses to build the statement without redirect_uris and logo_uri...
    with pytest.raises(ConfigError):
        register(udap.http, meta, udap.signer, profile, network="n", node=NODE, purpose="T-IAS")
    # ...and the server refuses one without them.
    iat = int(time.time())
    bare = udap.signer.sign(
        {
            "iss": f"{SAN}#T-IAS",
            "sub": f"{SAN}#T-IAS",
            "aud": udap.node.auth.register_url,
            "iat": iat,
            "exp": iat + 300,
            "jti": uuid.uuid4().hex,
            "client_name": "Acme",
            "grant_types": ["authorization_code"],
            "contacts": ["mailto:ops@acme.test"],
            "token_endpoint_auth_method": "private_key_jwt",
        }
    )
    resp = udap.http.post(
        udap.node.auth.register_url, json={"software_statement": bare, "udap": "1"}
    )
    assert resp.status_code == 400
    assert resp.json()["error_description"] == "redirect_uris and logo_uri required"
    full = ClientProfile(
        "Acme",
        ("mailto:ops@acme.test",),
        grant_type="authorization_code",
        redirect_uris=("https://acme.test/callback",),
        logo_uri="https://acme.test/logo.png",
    )
    reg = register(udap.http, meta, udap.signer, full, network="n", node=NODE, purpose="T-IAS")
    assert reg.grant_types == ("authorization_code",)


# -- tokens ----------------------------------------------------------------------------------------
def test_token_b2b_and_cache_bound_to_requestor_and_purpose(udap: Udap) -> None:
    meta = udap.meta()
    reg = udap.register()
    cache = TokenCache()

    def fetch() -> Any:
        return request_token(udap.http, meta.token_endpoint, udap.signer, reg, REQ, "T-TREAT")

    first = cache.get(reg, REQ, "T-TREAT", fetch)
    assert cache.get(reg, REQ, "T-TREAT", fetch) is first and cache.issued == 1
    other = Requestor("Acme Clinic", REQ.organization_id, "dr-wilson")
    assert cache.get(reg, other, "T-TREAT", fetch).access_token != first.access_token
    info = udap.node.auth.token_info(first.access_token)
    assert info is not None and info.purpose == "T-TREAT"


@pytest.mark.parametrize("alg_kind", ["ec", "ec384"])
def test_token_with_ec_keys(udap: Udap, alg_kind: str) -> None:
    key, chain = udap.sb.ca.issue([f"{SAN}#T-TREAT"], key_kind=alg_kind)
    signer = udap.identity(f"ec-{alg_kind}", key, chain)
    reg = udap.register(signer=signer)
    tok = request_token(udap.http, udap.meta().token_endpoint, signer, reg, REQ, "T-TREAT")
    assert tok.access_token


def test_token_refusals(udap: Udap) -> None:
    reg = udap.register()
    cid = reg.client_id
    cases = {
        # wrong aud
        "wrong aud": udap.raw_assertion(cid, aud="https://elsewhere/token"),
        # exp - iat > 300 s
        "exp - iat exceeds 300 s": udap.raw_assertion(cid, exp=int(time.time()) + 900),
        # no hl7-b2b extension
        "hl7-b2b extension required": udap.raw_assertion(cid, extensions=None),
        # two purposes
        "exactly one purpose_of_use required": udap.raw_assertion(
            cid,
            extensions={
                "hl7-b2b": {
                    **b2b_extension(REQ, "T-TREAT"),
                    "purpose_of_use": [
                        "urn:oid:2.16.840.1.113883.3.7204.1.5.2.1#T-TREAT",
                        "urn:oid:2.16.840.1.113883.3.7204.1.5.2.1#T-TRTMNT",
                    ],
                }
            },
        ),
        # no purpose at all
        "exactly one purpose_of_use required ": udap.raw_assertion(
            cid, extensions={"hl7-b2b": {**b2b_extension(REQ, "T-TREAT"), "purpose_of_use": []}}
        ),
        # a purpose other than the certificate SAN's XP
        "purpose_of_use differs from the certificate XP": udap.raw_assertion(
            cid, extensions={"hl7-b2b": b2b_extension(REQ, "T-TRTMNT")}
        ),
    }
    for why, assertion in cases.items():
        resp = udap.post_token(assertion)
        assert resp.status_code == 400, why
        assert resp.json()["error_description"] == why.strip(), why
    replay = udap.raw_assertion(cid)
    assert udap.post_token(replay).status_code == 200
    resp = udap.post_token(replay)
    assert resp.status_code == 400 and resp.json()["error_description"] == "jti replayed"
    assert udap.post_token(udap.raw_assertion(cid), udap="0").status_code == 400


def test_token_refuses_purpose_not_allowed_at_node(udap: Udap) -> None:
    reg = udap.register("T-PYMNT")  # registration is fine; the node does not answer T-PYMNT
    with pytest.raises(AuthError, match="invalid_grant"):
        request_token(udap.http, udap.meta().token_endpoint, udap.signer, reg, REQ, "T-PYMNT")
    assert udap.node.auth.state.counts["why:purpose_of_use not allowed here"] == 1


def test_ias_needs_id_token_in_tefca_ias(udap: Udap) -> None:
    reg = udap.register("T-IAS")
    meta = udap.meta()
    with pytest.raises(AuthError, match="invalid_grant"):
        request_token(udap.http, meta.token_endpoint, udap.signer, reg, REQ, "T-IAS")
    ias = tefca_ias_extension(id_token="eyJ.ial2.token", patient={"resourceType": "Patient"})
    tok = request_token(udap.http, meta.token_endpoint, udap.signer, reg, REQ, "T-IAS", ias=ias)
    assert tok.purpose == "T-IAS"
    with pytest.raises(ConfigError):
        tefca_ias_extension(id_token="", patient={})


def test_token_used_for_another_purpose_is_refused(udap: Udap) -> None:
    reg = udap.register()
    tok = request_token(udap.http, udap.meta().token_endpoint, udap.signer, reg, REQ, "T-TREAT")
    url = f"{udap.node.base}/Condition"
    auth = {"Authorization": f"Bearer {tok.access_token}"}
    ok = udap.http.get(
        url, params={"patient": "rv-1"}, headers={**auth, "X-Purpose-Of-Use": "T-TREAT"}
    )
    assert ok.status_code == 200 and ok.json()["total"] >= 1
    bad = udap.http.get(
        url, params={"patient": "rv-1"}, headers={**auth, "X-Purpose-Of-Use": "T-PYMNT"}
    )
    assert bad.status_code == 403
    assert udap.http.get(url, params={"patient": "rv-1"}).status_code == 401


def test_client_never_asserts_purpose_outside_its_certificate(udap: Udap) -> None:
    reg = udap.register()
    with pytest.raises(ConfigError):
        request_token(udap.http, udap.meta().token_endpoint, udap.signer, reg, REQ, "T-TRTMNT")
    assertion = client_assertion(
        udap.signer, client_id=reg.client_id, token_url=udap.node.auth.token_url, extensions=None
    )
    assert udap.post_token(assertion).status_code == 400


def test_consent_required_is_reported_and_asserted_policy_accepted(udap: Udap) -> None:
    policy = "urn:oid:2.16.840.1.113883.3.7204.1.1.1.1.1"
    udap.node.auth.consent_policy = policy
    reg = udap.register()
    meta = udap.meta()
    with pytest.raises(ConsentRequired) as info:
        request_token(udap.http, meta.token_endpoint, udap.signer, reg, REQ, "T-TREAT")
    assert info.value.policies == [policy]
    with_policy = Requestor(REQ.organization_name, REQ.organization_id, consent_policy=(policy,))
    tok = request_token(udap.http, meta.token_endpoint, udap.signer, reg, with_policy, "T-TREAT")
    assert tok.access_token
