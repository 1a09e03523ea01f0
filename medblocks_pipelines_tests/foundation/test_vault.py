"""The vault: encryption at rest, no secret in repr, key rotation without downtime, the key file,
compare-and-swap and the per-grant lock used for refresh-token rotation."""

import os
import stat
import threading

import pytest
import sqlalchemy as sa
from cryptography.fernet import Fernet

from medblocks_pipelines.lib.errors import VaultError
from medblocks_pipelines.lib.registry import Secret, Vault, open_control_plane
from medblocks_pipelines.lib.registry.vault import load_keys
from medblocks_pipelines.lib.settings import Settings

TOKEN = "eyJhbGciOi.refresh-token-value.xyz"


def test_secret_is_encrypted_at_rest_and_hidden(settings: Settings) -> None:
    cp = open_control_plane(settings)
    cp.vault.put("conn/c1/refresh_token", TOKEN, tenant_id="acme")
    with cp.engine.connect() as conn:
        raw = conn.execute(sa.text("SELECT ciphertext FROM secrets")).scalar_one()
    assert TOKEN.encode() not in raw
    secret = cp.vault.get("conn/c1/refresh_token")
    assert isinstance(secret, Secret)
    assert secret.reveal() == TOKEN
    for shown in (repr(secret), str(secret), f"{secret}", repr(cp.vault), repr([secret])):
        assert TOKEN not in shown
    assert cp.vault.get("missing") is None
    assert cp.vault.names("conn/") == ["conn/c1/refresh_token"]


def test_rotation_re_encrypts_and_old_key_can_retire(settings: Settings, monkeypatch) -> None:
    old = os.environ["MEDBLOCKS_SECRET_KEY"]
    cp = open_control_plane(settings)
    for i in range(5):
        cp.vault.put(f"s{i}", f"value-{i}")
    new = Fernet.generate_key().decode()
    # During rotation both keys are configured, newest first: reads keep working throughout.
    rotating = Vault(cp.engine, [new.encode(), old.encode()])
    assert rotating.get("s3").reveal() == "value-3"
    assert rotating.rotate() == 5
    only_new = Vault(cp.engine, [new.encode()])
    assert [only_new.get(f"s{i}").reveal() for i in range(5)] == [f"value-{i}" for i in range(5)]
    only_old = Vault(cp.engine, [old.encode()])
    with pytest.raises(VaultError) as err:
        only_old.get("s0")
    assert "value-0" not in str(err.value)


def test_key_file_created_once_with_0600(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("MEDBLOCKS_SECRET_KEY", raising=False)
    keys = load_keys(tmp_path)
    path = tmp_path / "secret.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_keys(tmp_path) == keys  # the second process reads the same key


def test_compare_and_swap(settings: Settings) -> None:
    vault = open_control_plane(settings).vault
    vault.put("rt", "one")
    _, version = vault.get_versioned("rt")
    assert vault.compare_and_swap("rt", expected_version=version, value="two")
    # A second writer holding the stale version loses: a refresh token is never stored twice.
    assert not vault.compare_and_swap("rt", expected_version=version, value="three")
    assert vault.get("rt").reveal() == "two"


def test_update_with_lock_serializes_refreshers(settings: Settings) -> None:
    vault = open_control_plane(settings).vault
    vault.put("rt", "0")
    seen: list[str] = []

    def refresh() -> None:
        def fn(current: Secret | None) -> str:
            assert current is not None
            seen.append(current.reveal())
            return str(int(current.reveal()) + 1)

        vault.update_with_lock("rt", fn)

    threads = [threading.Thread(target=refresh) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Each refresher saw the value the previous one stored: no token used twice.
    assert sorted(seen, key=int) == [str(i) for i in range(8)]
    assert vault.get("rt").reveal() == "8"


def test_bad_key_is_a_config_error() -> None:
    from medblocks_pipelines.lib.errors import ConfigError

    with pytest.raises(ConfigError):
        Vault(sa.create_engine("sqlite://"), [b"not-a-key"])
