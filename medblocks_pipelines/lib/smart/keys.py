"""Our signing keys for SMART Backend Services: kept in the vault, published as a JWKS, rotated.

Each key is one vault secret ``smart/keys/<kid>`` holding the private key and its lifecycle state:

* ``next``: published in the JWKS, not yet used to sign (servers get time to fetch it);
* ``active``: published and used to sign client assertions (exactly one at a time);
* ``retiring``: the previous active key, still published so servers that cached it keep working.

Rotation follows SPECS §2 ("publish the new ``kid`` before you use it"): ``rotate`` first adds a
``next`` key; once that key has been published for at least ``publish_wait`` seconds (the JWKS
``Cache-Control`` max-age), the next ``rotate`` makes it active and the old one ``retiring``;
``retire(kid)`` then drops a key from the JWKS. The active key can never be retired.
"""

import json
import time
from dataclasses import dataclass
from typing import Any

from medblocks_pipelines.lib.errors import ConfigError, NotFound
from medblocks_pipelines.lib.registry.vault import Vault
from medblocks_pipelines.lib.smart.assertion import SigningKey, generate_signing_key

PREFIX = "smart/keys/"
STATES = ("next", "active", "retiring")
#: JWKS ``Cache-Control: max-age`` we serve; a new key waits this long before it signs.
JWKS_MAX_AGE = 300


@dataclass(frozen=True)
class StoredKey:
    """A key with its lifecycle state and when it was first published (epoch seconds)."""

    key: SigningKey
    state: str
    published_at: float

    @property
    def kid(self) -> str:
        return self.key.kid


class KeyStore:
    """The platform's backend signing keys in the vault (private halves never leave it)."""

    def __init__(self, vault: Vault, *, clock: Any = time.time) -> None:
        self.vault = vault
        self.clock = clock

    # -- reading -------------------------------------------------------------------------------
    def all(self) -> list[StoredKey]:
        """Every stored key, oldest first."""
        out = []
        for name in self.vault.names(PREFIX):
            secret = self.vault.get(name)
            if secret is None:
                continue
            data = json.loads(secret.reveal())
            out.append(
                StoredKey(
                    SigningKey.from_json(json.dumps(data["key"])),
                    data["state"],
                    float(data["published_at"]),
                )
            )
        return sorted(out, key=lambda k: (k.published_at, k.kid))

    def active(self) -> SigningKey:
        """The key that signs client assertions now."""
        for stored in self.all():
            if stored.state == "active":
                return stored.key
        raise ConfigError(
            "no active backend signing key",
            hint="run `medblocks keys generate --alg RS384` (or ES384) first",
        )

    def jwks(self) -> dict[str, Any]:
        """The public JWK Set: every published key (next, active, retiring)."""
        return {"keys": [s.key.public_jwk() for s in self.all()]}

    # -- changing ------------------------------------------------------------------------------
    def _save(self, stored: StoredKey) -> None:
        value = json.dumps(
            {
                "key": json.loads(stored.key.to_json()),
                "state": stored.state,
                "published_at": stored.published_at,
            }
        )
        self.vault.put(PREFIX + stored.kid, value)

    def generate(self, alg: str = "RS384") -> StoredKey:
        """Add a key: ``active`` when there is none yet, else ``next`` (published, not signing)."""
        has_active = any(s.state == "active" for s in self.all())
        stored = StoredKey(
            generate_signing_key(alg), "next" if has_active else "active", float(self.clock())
        )
        self._save(stored)
        return stored

    def rotate(self, *, alg: str | None = None, publish_wait: float = JWKS_MAX_AGE) -> StoredKey:
        """One rotation step; returns the key it added or promoted.

        Without a ``next`` key: generate one (same alg as the active key unless ``alg``). With a
        ``next`` key published for ``publish_wait`` seconds: promote it, demote the active key to
        ``retiring``. A ``next`` key published too recently raises ``ConfigError`` with a hint.
        """
        keys = self.all()
        pending = [s for s in keys if s.state == "next"]
        current = [s for s in keys if s.state == "active"]
        if not pending:
            use_alg = alg or (current[0].key.alg if current else "RS384")
            return self.generate(use_alg)
        new = pending[-1]
        waited = self.clock() - new.published_at
        if waited < publish_wait:
            raise ConfigError(
                f"key {new.kid} was published {int(waited)} s ago; servers may not have it yet",
                hint=f"run rotate again after {int(publish_wait - waited) + 1} s",
            )
        for old in current:
            self._save(StoredKey(old.key, "retiring", old.published_at))
        promoted = StoredKey(new.key, "active", new.published_at)
        self._save(promoted)
        return promoted

    def retire(self, kid: str) -> None:
        """Remove a key from the JWKS and the vault; the active key cannot be retired."""
        for stored in self.all():
            if stored.kid == kid:
                if stored.state == "active":
                    raise ConfigError(
                        f"key {kid} is the active signing key",
                        hint="rotate first, then retire the old key",
                    )
                self.vault.delete(PREFIX + kid)
                return
        raise NotFound(f"no signing key {kid}")
