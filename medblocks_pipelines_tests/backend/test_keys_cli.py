"""Our keys: vault storage, JWKS served over a socket with Cache-Control, rotation order (a new key
is published before it signs; the active key cannot be retired), and the CLI commands, including
`medblocks sync backend` end to end against the sandbox.
"""

import json

import httpx
import pytest
from click.testing import CliRunner

from medblocks_pipelines.lib.errors import ConfigError, NotFound
from medblocks_pipelines.lib.smart.keys import KeyStore

from .conftest import TENANT, Env


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_rotation_publishes_before_signing(env: Env) -> None:
    clock = Clock()
    store = KeyStore(env.cp.vault, clock=clock)
    first = store.active()
    nxt = store.rotate(alg="RS384", publish_wait=300)
    assert nxt.state == "next"
    # published at once, but not yet signing
    assert {k["kid"] for k in store.jwks()["keys"]} == {first.kid, nxt.kid}
    assert store.active() == first
    with pytest.raises(ConfigError):
        store.rotate(publish_wait=300)
    clock.now += 301
    promoted = store.rotate(publish_wait=300)
    assert promoted.kid == nxt.kid and store.active().kid == nxt.kid
    states = {s.kid: s.state for s in store.all()}
    assert states == {first.kid: "retiring", nxt.kid: "active"}
    with pytest.raises(ConfigError):
        store.retire(nxt.kid)
    store.retire(first.kid)
    assert [k["kid"] for k in store.jwks()["keys"]] == [nxt.kid]
    with pytest.raises(NotFound):
        store.retire("nope")
    # Private material stays in the vault: the stored value is ciphertext.
    with env.cp.engine.connect() as conn:
        raw = conn.exec_driver_sql("SELECT ciphertext FROM secrets").fetchall()
    assert raw and all(b"PRIVATE KEY" not in bytes(r[0]) for r in raw)


def test_jwks_served_without_auth_with_cache_control(env: Env) -> None:
    resp = httpx.get(env.jwks_url)
    assert resp.status_code == 200
    assert resp.headers["cache-control"] == "public, max-age=300"
    keys = resp.json()["keys"]
    assert len(keys) == 1 and keys[0]["kty"] == "EC" and "d" not in keys[0]


def test_keys_cli(env: Env) -> None:
    from medblocks_pipelines.cli import main

    runner = CliRunner()
    out = runner.invoke(main, ["keys", "generate", "--alg", "RS384"])
    assert out.exit_code == 0, out.output
    assert "saved as next" in out.output
    out = runner.invoke(main, ["keys", "jwks"])
    assert out.exit_code == 0 and len(json.loads(out.output)["keys"]) == 2
    assert "PRIVATE" not in out.output
    out = runner.invoke(main, ["keys", "rotate", "--publish-wait", "0"])
    assert out.exit_code == 0 and "now active" in out.output, out.output
    active = KeyStore(env.cp.vault).active()
    assert active.alg == "RS384"
    out = runner.invoke(main, ["keys", "retire", active.kid])
    assert out.exit_code == 1 and "active signing key" in out.output


def test_sync_backend_cli_full_then_incremental(env: Env, live_defs_state: object) -> None:
    from medblocks_pipelines.cli import main

    ehr = env.add_org("mercy-general")
    env.add_org("lakeside-clinic")
    runner = CliRunner()
    out = runner.invoke(main, ["sync", "backend", "--tenant", TENANT, "--org", "mercy-general"])
    assert out.exit_code == 0, out.output
    assert "status success" in out.output
    out = runner.invoke(main, ["sync", "backend", "--tenant", TENANT, "--org", "lakeside-clinic"])
    assert out.exit_code == 0, out.output
    pat = next(ehr.store.iter_type("Patient"))
    ehr.store.delete("Patient", pat["id"])
    out = runner.invoke(main, ["sync", "backend", "--tenant", TENANT, "--org", "mercy-general"])
    assert out.exit_code == 0, out.output
    assert "0 resources, 1 deleted" in out.output
    pulls = env.cp.list_pulls(tenant_id=TENANT)
    assert [p.status for p in pulls] == ["success"] * 3
