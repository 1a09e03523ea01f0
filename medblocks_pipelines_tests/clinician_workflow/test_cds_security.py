"""Every JWT rule of CDS Hooks security (SPECS §4.6), one by one, over a real socket."""

import base64
import hashlib
import hmac
import json
import time
import uuid

import jwt
import pytest
import sqlalchemy as sa

from medblocks_pipelines.lib.registry.schema import audit_log
from medblocks_pipelines.lib.smart.assertion import generate_signing_key
from medblocks_pipelines_tests.clinician_workflow.conftest import ISS, CdsEnv, patient_view

SERVICE = "/cds-services/medblocks-patient-view"


def _call(env: CdsEnv, token: str, path: str = SERVICE):
    return env.http.post(
        env.url(path),
        json=patient_view(prefetch={"patient": None}),
        headers={"Authorization": f"Bearer {token}"},
    )


def _refused(env: CdsEnv, token: str, reason: str, path: str = SERVICE) -> None:
    resp = _call(env, token, path)
    assert resp.status_code == 401, resp.text
    assert resp.json()["error"] == reason
    assert resp.headers["www-authenticate"].startswith("Bearer")
    assert "cards" not in resp.text


def _b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def test_valid_es384_and_rs384_are_accepted(cds_env: CdsEnv) -> None:
    for key in cds_env.stub.keys:
        resp = _call(cds_env, cds_env.sign(cds_env.url(SERVICE), key=key))
        assert resp.status_code == 200, resp.text
        assert len(resp.json()["cards"]) == 2


def test_aud_as_array_containing_the_url_is_accepted(cds_env: CdsEnv) -> None:
    token = cds_env.sign([cds_env.url(SERVICE), "https://other.example"])  # type: ignore[arg-type]
    assert _call(cds_env, token).status_code == 200


def test_missing_or_non_bearer_token(cds_env: CdsEnv) -> None:
    resp = cds_env.http.post(cds_env.url(SERVICE), json=patient_view())
    assert resp.status_code == 401 and resp.json()["error"] == "missing_token"
    resp = cds_env.http.post(
        cds_env.url(SERVICE), json=patient_view(), headers={"Authorization": "Basic dXNlcjpwYXNz"}
    )
    assert resp.status_code == 401
    _refused(cds_env, "not.a.jwt", "malformed_token")


def test_alg_none_is_refused(cds_env: CdsEnv) -> None:
    now = int(time.time())
    claims = {
        "iss": ISS,
        "aud": cds_env.url(SERVICE),
        "iat": now,
        "exp": now + 60,
        "jti": str(uuid.uuid4()),
    }
    token = _b64({"alg": "none", "typ": "JWT", "kid": "ehr-es384"}) + "." + _b64(claims) + "."
    _refused(cds_env, token, "alg_not_allowed")


def test_hmac_with_the_public_key_as_secret_is_refused(cds_env: CdsEnv) -> None:
    # The classic key-confusion forgery: HS256 keyed with the published public key.
    public = json.dumps(cds_env.stub.keys[1].public_jwk()).encode()
    now = int(time.time())
    signing_input = (
        _b64({"alg": "HS256", "typ": "JWT", "kid": "ehr-rs384"})
        + "."
        + _b64(
            {
                "iss": ISS,
                "aud": cds_env.url(SERVICE),
                "iat": now,
                "exp": now + 60,
                "jti": str(uuid.uuid4()),
            }
        )
    )
    mac = hmac.new(public, signing_input.encode(), hashlib.sha256).digest()
    token = signing_input + "." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
    _refused(cds_env, token, "alg_not_allowed")


def test_forged_signature_with_a_known_kid_is_refused(cds_env: CdsEnv) -> None:
    attacker = generate_signing_key("ES384", kid="ehr-es384")  # same kid, other key
    _refused(cds_env, cds_env.sign(cds_env.url(SERVICE), key=attacker), "bad_signature")


def test_tampered_payload_is_refused(cds_env: CdsEnv) -> None:
    token = cds_env.sign(cds_env.url(SERVICE))
    head, _payload, sig = token.split(".")
    now = int(time.time())
    other = _b64(
        {
            "iss": ISS,
            "aud": cds_env.url(SERVICE),
            "iat": now,
            "exp": now + 60,
            "jti": str(uuid.uuid4()),
            "tenant": "someone-else",
        }
    )
    _refused(cds_env, f"{head}.{other}.{sig}", "bad_signature")


def test_expired_token_is_refused(cds_env: CdsEnv) -> None:
    now = int(time.time())
    token = cds_env.sign(cds_env.url(SERVICE), iat=now - 600, exp=now - 120)
    _refused(cds_env, token, "expired")


def test_small_clock_skew_is_tolerated(cds_env: CdsEnv) -> None:
    now = int(time.time())
    token = cds_env.sign(cds_env.url(SERVICE), iat=now + 20, exp=now - 20 + 300)
    assert _call(cds_env, token).status_code == 200


def test_iat_in_the_future_is_refused(cds_env: CdsEnv) -> None:
    now = int(time.time())
    _refused(
        cds_env, cds_env.sign(cds_env.url(SERVICE), iat=now + 600, exp=now + 900), "iat_in_future"
    )


def test_overlong_lifetime_is_refused(cds_env: CdsEnv) -> None:
    now = int(time.time())
    _refused(
        cds_env, cds_env.sign(cds_env.url(SERVICE), iat=now, exp=now + 86400), "lifetime_too_long"
    )


def test_replayed_jti_is_refused(cds_env: CdsEnv) -> None:
    token = cds_env.sign(cds_env.url(SERVICE))
    assert _call(cds_env, token).status_code == 200
    _refused(cds_env, token, "replayed_jti")
    # Same jti in a fresh token: still a replay.
    jti = jwt.decode(token, options={"verify_signature": False})["jti"]
    _refused(cds_env, cds_env.sign(cds_env.url(SERVICE), jti=jti), "replayed_jti")


@pytest.mark.parametrize("claim", ["jti", "exp", "iat", "aud"])
def test_missing_required_claims_are_refused(cds_env: CdsEnv, claim: str) -> None:
    token = (
        cds_env.sign(None)
        if claim == "aud"  # type: ignore[arg-type]
        else cds_env.sign(cds_env.url(SERVICE), **{claim: None})
    )
    _refused(cds_env, token, "missing_claim")


def test_header_rules_typ_and_kid(cds_env: CdsEnv) -> None:
    _refused(cds_env, cds_env.sign(cds_env.url(SERVICE), headers={"typ": "at+jwt"}), "bad_typ")
    key = cds_env.stub.keys[0]
    now = int(time.time())
    no_kid = jwt.encode(
        {
            "iss": ISS,
            "aud": cds_env.url(SERVICE),
            "iat": now,
            "exp": now + 60,
            "jti": str(uuid.uuid4()),
        },
        key.private_pem,
        algorithm="ES384",
        headers={"typ": "JWT"},
    )
    _refused(cds_env, no_kid, "missing_kid")
    unknown = generate_signing_key("ES384", kid="not-published")
    _refused(cds_env, cds_env.sign(cds_env.url(SERVICE), key=unknown), "unknown_kid")


def test_wrongly_addressed_tokens_are_refused(cds_env: CdsEnv) -> None:
    # Minted for another service, for discovery, for another host, with a trailing slash.
    for aud in (
        cds_env.url("/cds-services/medblocks-order-select"),
        cds_env.url("/cds-services"),
        "https://elsewhere.example" + SERVICE,
        cds_env.url(SERVICE) + "/",
    ):
        _refused(cds_env, cds_env.sign(aud), "wrong_audience")
    # A discovery call needs aud = the discovery URL.
    url = cds_env.url("/cds-services")
    resp = cds_env.http.get(url, headers={"Authorization": f"Bearer {cds_env.sign(url + '/x')}"})
    assert resp.status_code == 401 and resp.json()["error"] == "wrong_audience"
    # Feedback is its own URL.
    fb = cds_env.url(SERVICE + "/feedback")
    resp = cds_env.http.post(
        fb,
        json={"feedback": []},
        headers={"Authorization": f"Bearer {cds_env.sign(cds_env.url(SERVICE))}"},
    )
    assert resp.status_code == 401 and resp.json()["error"] == "wrong_audience"


def test_unknown_issuer_never_reaches_tenant_data(cds_env: CdsEnv) -> None:
    with cds_env.cp.engine.connect() as conn:
        before = conn.execute(sa.select(sa.func.count()).select_from(audit_log)).scalar_one()
    hits = len(cds_env.stub.hits)
    # Signed with a published key, but by an issuer no organization allow-lists.
    _refused(
        cds_env, cds_env.sign(cds_env.url(SERVICE), iss="https://evil.example"), "unknown_issuer"
    )
    url = cds_env.url("/cds-services")
    resp = cds_env.http.get(
        url, headers={"Authorization": f"Bearer {cds_env.sign(url, iss='https://evil.example')}"}
    )
    assert resp.status_code == 401 and resp.json()["error"] == "unknown_issuer"
    with cds_env.cp.engine.connect() as conn:
        after = conn.execute(sa.select(sa.func.count()).select_from(audit_log)).scalar_one()
    assert after == before  # nothing was looked up for anyone
    assert len(cds_env.stub.hits) == hits  # and no key was fetched for it


def test_jku_must_be_allow_listed_before_any_fetch(cds_env: CdsEnv) -> None:
    evil = f"{cds_env.stub.base}/evil/jwks.json"
    _refused(cds_env, cds_env.sign(cds_env.url(SERVICE), headers={"jku": evil}), "jku_not_allowed")
    assert "/evil/jwks.json" not in cds_env.stub.hits
    # The organization's own JWKS URL as jku is fine.
    token = cds_env.sign(cds_env.url(SERVICE), headers={"jku": cds_env.stub.jwks_url})
    assert _call(cds_env, token).status_code == 200


def test_inline_jwks_and_key_rotation(cds_env: CdsEnv) -> None:
    # Rotation: a new kid published at the JWKS URL is picked up by one refetch.
    new = generate_signing_key("ES384", kid="ehr-rotated")
    cds_env.stub.keys.append(new)
    assert _call(cds_env, cds_env.sign(cds_env.url(SERVICE), key=new)).status_code == 200
    # Out-of-band keys: an organization configured with an inline JWKS and no URL.
    other = generate_signing_key("RS384", kid="oob")
    cds_env.cp.add_source(
        "ehr-c", "Hill EHR", "sandbox", "ehr", "http://c.example/fhir", ["clinician_workflow"]
    )
    cds_env.cp.add_organization(
        "hill",
        "acme",
        "ehr-c",
        "Hill Hospital",
        config={"cds": {"iss": "https://hill.example", "jwks": {"keys": [other.public_jwk()]}}},
    )
    time.sleep(1.1)  # an unknown issuer rereads the registry at most once a second
    token = cds_env.sign(cds_env.url(SERVICE), key=other, iss="https://hill.example")
    resp = _call(cds_env, token)
    assert resp.status_code == 200
    assert resp.json() == {"cards": []}  # ehr-c's Patient/a1 is not P1


def test_shared_issuer_needs_the_tenant_claim(cds_env: CdsEnv) -> None:
    from medblocks_pipelines.lib.cds.security import CdsAuthenticator

    cds_env.cp.add_source(
        "ehr-d", "Vendor Cloud", "sandbox", "ehr", "http://d.example/fhir", ["clinician_workflow"]
    )
    cds_env.cp.add_organization(
        "dup",
        "acme",
        "ehr-d",
        "Dup",
        config={"cds": {"iss": ISS, "jwks_url": cds_env.stub.jwks_url, "tenant": "dup-tenant"}},
    )
    auth = CdsAuthenticator(cds_env.cp)
    url = cds_env.url(SERVICE)
    with pytest.raises(Exception) as err:
        auth.verify(f"Bearer {cds_env.sign(url)}", url=url)
    assert getattr(err.value, "reason", None) == "unknown_issuer"
    client = auth.verify(f"Bearer {cds_env.sign(url, tenant='dup-tenant')}", url=url)
    assert client.organization_id == "dup" and client.source_id == "ehr-d"


def test_unreachable_jwks_is_a_refusal_not_a_crash(cds_env: CdsEnv) -> None:
    cds_env.cp.add_source(
        "ehr-e", "Down EHR", "sandbox", "ehr", "http://e.example/fhir", ["clinician_workflow"]
    )
    cds_env.cp.add_organization(
        "down",
        "acme",
        "ehr-e",
        "Down",
        config={"cds": {"iss": "https://down.example", "jwks_url": "http://127.0.0.1:9/jwks.json"}},
    )
    time.sleep(1.1)
    token = cds_env.sign(cds_env.url(SERVICE), iss="https://down.example")
    _refused(cds_env, token, "jwks_unavailable")


def test_refusals_of_a_known_issuer_are_audited(cds_env: CdsEnv) -> None:
    token = cds_env.sign(cds_env.url(SERVICE))
    assert _call(cds_env, token).status_code == 200
    _refused(cds_env, token, "replayed_jti")
    with cds_env.cp.engine.connect() as conn:
        rows = (
            conn.execute(sa.select(audit_log).where(audit_log.c.decision == "refused"))
            .mappings()
            .all()
        )
    assert [(r["tenant_id"], r["actor"], r["reason"]) for r in rows] == [
        ("acme", "cds:mercy", "replayed_jti")
    ]


def test_expired_jtis_are_purged(cds_env: CdsEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    import time
    import types
    from datetime import UTC, datetime, timedelta

    from medblocks_pipelines.lib.cds import security
    from medblocks_pipelines.lib.cds.security import CdsAuthenticator
    from medblocks_pipelines.lib.cds.tables import cds_jti

    # A machine booted five seconds ago (CI): the monotonic clock is below the purge interval,
    # and the first call must purge all the same.
    monkeypatch.setattr(
        security, "time", types.SimpleNamespace(monotonic=lambda: 5.0, time=time.time)
    )

    auth = CdsAuthenticator(cds_env.cp)
    with cds_env.cp.engine.begin() as conn:
        conn.execute(
            cds_jti.insert().values(
                iss=ISS, jti="old", expires_at=datetime.now(UTC) - timedelta(minutes=5)
            )
        )
    url = cds_env.url(SERVICE)
    auth.verify(f"Bearer {cds_env.sign(url)}", url=url)  # the first call purges
    with cds_env.cp.engine.connect() as conn:
        jtis = [r.jti for r in conn.execute(sa.select(cds_jti.c.jti))]
    assert "old" not in jtis and len(jtis) == 1
