"""Where accepted CDS Hooks JWT ``jti`` values are remembered (replay refusal, SPECS §4.6).

A replayed ``(iss, jti)`` must be refused whichever process or machine sees it, so the store is
shared: Redis when ``MEDBLOCKS_REDIS_URL`` is set (one ``SET NX EX`` per call: atomic, expires
with the token, well under a millisecond), else the control plane's ``cds_jti`` table (its primary
key decides; expired rows are purged now and then).
"""

import hashlib
import logging
import time
from datetime import UTC, datetime
from typing import Any, Protocol

import sqlalchemy as sa

from medblocks_pipelines.lib.cds.tables import cds_jti

log = logging.getLogger(__name__)

REDIS_URL_ENV = "MEDBLOCKS_REDIS_URL"
KEY_PREFIX = "medblocks:cds:jti:"
PURGE_INTERVAL = 600.0
REDIS_TIMEOUT = 2.0
ASYNC_MAX_CONNECTIONS = 32


class JtiStore(Protocol):
    """Remembers each ``(iss, jti)`` until ``forget_after`` (epoch seconds)."""

    def remember(self, iss: str, jti: str, forget_after: float) -> bool:
        """True when ``(iss, jti)`` is new (now remembered), False when seen before."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


class SqlJtiStore:
    """``cds_jti`` rows in the control plane; the primary key refuses a second insert."""

    def __init__(self, engine: sa.engine.Engine) -> None:
        self.engine = engine
        # Built once: compiling ``insert().values(...)`` per call was a third of its cost.
        self._insert = cds_jti.insert()
        self._last_purge: float | None = None

    def remember(self, iss: str, jti: str, forget_after: float) -> bool:
        row = {
            "iss": iss[:500],
            "jti": jti,
            "expires_at": datetime.fromtimestamp(forget_after, UTC),
        }
        try:
            with self.engine.begin() as conn:
                conn.execute(self._insert, row)
        except sa.exc.IntegrityError:
            return False
        now = time.monotonic()
        if self._last_purge is None or now - self._last_purge > PURGE_INTERVAL:
            self._last_purge = now
            self.purge_expired()  # expired jtis can never verify again: keep the table small
        return True

    def purge_expired(self) -> int:
        """Delete remembered jtis whose token has expired (they cannot verify any more)."""
        with self.engine.begin() as conn:
            res = conn.execute(cds_jti.delete().where(cds_jti.c.expires_at < datetime.now(UTC)))
        return int(res.rowcount or 0)

    def close(self) -> None:
        pass


class RedisJtiStore:
    """One Redis key per ``(iss, jti)``, set with ``NX`` and expiring when the token does.

    :meth:`remember_async` is the same ``SET NX EX`` from an event loop (the web layer's inline
    hook calls), through an asyncio client on the same Redis, made per loop on first use.
    """

    def __init__(self, client: Any, *, prefix: str = KEY_PREFIX, url: str | None = None) -> None:
        self.redis = client
        self.prefix = prefix
        self.url = url
        self._async: tuple[Any, Any] | None = None  # (event loop, redis.asyncio client)

    @classmethod
    def from_url(cls, url: str) -> "RedisJtiStore":
        import redis

        client = redis.Redis.from_url(
            url, socket_timeout=REDIS_TIMEOUT, socket_connect_timeout=REDIS_TIMEOUT
        )
        return cls(client, url=url)

    def key(self, iss: str, jti: str) -> str:
        # Hashed: the issuer URL and jti are caller-chosen strings of any length and alphabet.
        digest = hashlib.sha256(f"{iss}\x00{jti}".encode()).hexdigest()
        return f"{self.prefix}{digest}"

    def remember(self, iss: str, jti: str, forget_after: float) -> bool:
        ttl = max(1, int(forget_after - time.time()) + 1)
        return bool(self.redis.set(self.key(iss, jti), b"1", nx=True, ex=ttl))

    @property
    def has_async(self) -> bool:
        """Whether :meth:`remember_async` can run (the store was opened from a URL)."""
        return self.url is not None

    async def remember_async(self, iss: str, jti: str, forget_after: float) -> bool:
        """:meth:`remember` without blocking the event loop (same key, same atomic ``SET NX``)."""
        ttl = max(1, int(forget_after - time.time()) + 1)
        client = self._async_client()
        return bool(await client.set(self.key(iss, jti), b"1", nx=True, ex=ttl))

    def _async_client(self) -> Any:
        import asyncio

        import redis.asyncio

        loop = asyncio.get_running_loop()
        current = self._async
        if current is None or current[0] is not loop:
            # A connection pool belongs to the loop that made it (a test client may run several).
            assert self.url is not None
            current = (
                loop,
                redis.asyncio.Redis(connection_pool=_blocking_pool(self.url)),
            )
            self._async = current
        return current[1]

    def close(self) -> None:
        self.redis.close()


def _blocking_pool(url: str) -> Any:
    """An asyncio pool that waits for a free connection when ``ASYNC_MAX_CONNECTIONS`` are busy.

    An overloaded worker has hundreds of calls in flight on one loop: the default pool refused
    the 101st, and a 2 s wait still refused calls in a saturated loop (replies wait their turn
    there), a 503 for calls that only had to queue, as they queue for a thread on the threaded
    path. A Redis that is down still fails closed: connect and socket timeouts are 2 s."""
    import redis.asyncio

    return redis.asyncio.BlockingConnectionPool.from_url(
        url,
        max_connections=ASYNC_MAX_CONNECTIONS,
        timeout=None,
        socket_timeout=REDIS_TIMEOUT,
        socket_connect_timeout=REDIS_TIMEOUT,
    )


def redis_url(env: Any = None) -> str | None:
    """``MEDBLOCKS_REDIS_URL`` (``redis://host:port/db``), or None when not configured."""
    from medblocks_pipelines.lib.settings import Settings

    return Settings.from_env(env=env).redis_url


def open_jti_store(engine: sa.engine.Engine, url: str | None = None) -> JtiStore:
    """Redis at ``url`` (default ``MEDBLOCKS_REDIS_URL``) when configured, else the SQL table."""
    url = url if url is not None else redis_url()
    if url:
        return RedisJtiStore.from_url(url)
    return SqlJtiStore(engine)
