"""The vault: secrets encrypted at rest with authenticated encryption.

Fernet (AES-128-CBC + HMAC-SHA256) through ``MultiFernet`` so a key can rotate without downtime: the newest
key encrypts, every listed key still decrypts, and :meth:`Vault.rotate` re-encrypts old rows in place.
Keys come from ``MEDBLOCKS_SECRET_KEY`` (comma-separated, newest first) or, for the embedded default, from
``<data_dir>/secret.key`` created with mode 0600 on first use.
"""

import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa
from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from medblocks_pipelines.lib.errors import ConfigError, VaultError
from medblocks_pipelines.lib.registry.schema import secrets


class Secret:
    """A decrypted secret whose ``repr``/``str`` never show the value; call :meth:`reveal` to use it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """Return the plain value (for the one place that sends it to its peer)."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def load_keys(data_dir: Path | None, secret_key: str | None = None) -> list[bytes]:
    """Return the Fernet keys, newest first: ``secret_key`` (``Settings.secret_key``, from
    ``MEDBLOCKS_SECRET_KEY``) or the key file."""
    if secret_key:
        return [k.strip().encode() for k in secret_key.split(",") if k.strip()]
    if data_dir is None:
        raise ConfigError(
            "no vault key",
            hint="set MEDBLOCKS_SECRET_KEY (Fernet keys, newest first, comma-separated)",
        )
    path = data_dir / "secret.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # O_EXCL: two processes starting at once must not write two different keys.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "wb") as fh:
                fh.write(Fernet.generate_key() + b"\n")
    return [k.strip() for k in path.read_bytes().splitlines() if k.strip()]


def _now() -> datetime:
    return datetime.now(UTC)


class Vault:
    """Encrypted secret storage in the control plane's ``secrets`` table."""

    def __init__(self, engine: sa.Engine, keys: list[bytes]) -> None:
        if not keys:
            raise ConfigError("the vault needs at least one key")
        try:
            self._fernet = MultiFernet([Fernet(k) for k in keys])
        except ValueError as exc:
            raise ConfigError(
                "a vault key is not a valid Fernet key",
                hint="generate one with `medblocks vault new-key`",
            ) from exc
        self._engine = engine

    def __repr__(self) -> str:
        return "Vault(***)"

    def _encrypt(self, value: str) -> bytes:
        return self._fernet.encrypt(value.encode())

    def _decrypt(self, name: str, token: bytes) -> Secret:
        try:
            return Secret(self._fernet.decrypt(token).decode())
        except InvalidToken as exc:
            raise VaultError(
                f"secret {name!r} cannot be decrypted with the configured keys",
                hint="the key that wrote it may have been removed from MEDBLOCKS_SECRET_KEY",
            ) from exc

    def put(self, name: str, value: str, *, tenant_id: str | None = None) -> int:
        """Store (or replace) ``name``; returns the new version."""
        with self._engine.begin() as conn:
            row = conn.execute(sa.select(secrets.c.version).where(secrets.c.name == name)).first()
            version = (row.version + 1) if row else 1
            values = {
                "ciphertext": self._encrypt(value),
                "version": version,
                "updated_at": _now(),
                "tenant_id": tenant_id,
            }
            if row:
                conn.execute(secrets.update().where(secrets.c.name == name).values(**values))
            else:
                conn.execute(secrets.insert().values(name=name, **values))
        return version

    def get(self, name: str) -> Secret | None:
        """Return the secret called ``name``, or ``None``."""
        row = self.get_versioned(name)
        return row[0] if row else None

    def get_versioned(self, name: str) -> tuple[Secret, int] | None:
        """Return ``(secret, version)`` for compare-and-swap updates."""
        with self._engine.connect() as conn:
            row = conn.execute(
                sa.select(secrets.c.ciphertext, secrets.c.version).where(secrets.c.name == name)
            ).first()
        if row is None:
            return None
        return self._decrypt(name, row.ciphertext), row.version

    def compare_and_swap(
        self, name: str, *, expected_version: int, value: str, tenant_id: str | None = None
    ) -> bool:
        """Replace ``name`` only if nobody changed it since ``expected_version`` (rotating tokens)."""
        with self._engine.begin() as conn:
            res = conn.execute(
                secrets.update()
                .where(secrets.c.name == name, secrets.c.version == expected_version)
                .values(
                    ciphertext=self._encrypt(value),
                    version=expected_version + 1,
                    updated_at=_now(),
                    tenant_id=tenant_id,
                )
            )
            return res.rowcount == 1

    def update_with_lock(
        self, name: str, fn: Callable[[Secret | None], str | None], *, tenant_id: str | None = None
    ) -> Secret | None:
        """Run ``fn(current)`` while holding the row lock and store what it returns.

        On PostgreSQL this is ``SELECT ... FOR UPDATE``; on SQLite the whole transaction is
        ``BEGIN IMMEDIATE``. Used so that only one process refreshes a given grant at a time.
        """
        with self._engine.begin() as conn:
            stmt = sa.select(secrets.c.ciphertext, secrets.c.version).where(secrets.c.name == name)
            if conn.dialect.name == "postgresql":
                stmt = stmt.with_for_update()
            row = conn.execute(stmt).first()
            current = self._decrypt(name, row.ciphertext) if row else None
            new_value = fn(current)
            if new_value is None:
                return current
            values = {
                "ciphertext": self._encrypt(new_value),
                "updated_at": _now(),
                "tenant_id": tenant_id,
            }
            if row:
                conn.execute(
                    secrets.update()
                    .where(secrets.c.name == name)
                    .values(version=row.version + 1, **values)
                )
            else:
                conn.execute(secrets.insert().values(name=name, version=1, **values))
            return Secret(new_value)

    def delete(self, name: str) -> bool:
        """Delete ``name``; returns whether it existed."""
        with self._engine.begin() as conn:
            return conn.execute(secrets.delete().where(secrets.c.name == name)).rowcount > 0

    def delete_prefix(self, prefix: str) -> int:
        """Delete every secret whose name starts with ``prefix``."""
        with self._engine.begin() as conn:
            return conn.execute(
                secrets.delete().where(secrets.c.name.startswith(prefix, autoescape=True))
            ).rowcount

    def names(self, prefix: str = "") -> list[str]:
        """List secret names (never values)."""
        with self._engine.connect() as conn:
            rows = conn.execute(
                sa.select(secrets.c.name)
                .where(secrets.c.name.startswith(prefix, autoescape=True))
                .order_by(secrets.c.name)
            )
            return [r.name for r in rows]

    def rotate(self) -> int:
        """Re-encrypt every secret under the newest key; returns how many rows were rewritten.

        Row by row, each in its own short transaction, so readers keep working during rotation.
        """
        with self._engine.connect() as conn:
            names = [r.name for r in conn.execute(sa.select(secrets.c.name))]
        count = 0
        for name in names:
            with self._engine.begin() as conn:
                row = conn.execute(
                    sa.select(secrets.c.ciphertext).where(secrets.c.name == name)
                ).first()
                if row is None:
                    continue
                try:
                    new = self._fernet.rotate(row.ciphertext)
                except InvalidToken as exc:
                    raise VaultError(f"secret {name!r} cannot be decrypted for rotation") from exc
                conn.execute(secrets.update().where(secrets.c.name == name).values(ciphertext=new))
                count += 1
        return count
