"""One rate limit per source across processes and machines: a send schedule kept in Redis.

Each source has one Redis hash (``medblocks:ratelimit:<source>``) holding the next free send slot,
the pause a 429 imposed and the current spacing. :meth:`SharedRateLimiter.acquire` runs one Lua
script (atomic in Redis, on Redis's own clock so machines need not agree on the time) that
reserves the next slot, at least ``interval`` after the previous one and not before the pause,
and returns how long to wait for it. This is GCRA with no burst allowance: requests of all
processes together leave evenly spaced, ``per / limit * (1 + margin)`` apart.

A caller that wakes up later than ``late_tolerance`` after its slot (a busy machine oversleeps)
gives the slot up and reserves another, so a late request never bunches up with the next one:
any ``limit + 1`` consecutive sends then span at least ``per * (1 + margin) - late_tolerance``,
which leaves ``margin * per / 2`` for jitter between our send and the server's clock.

A 429 (:meth:`backoff`) stores the pause-until in the hash, so every process of the source waits
out the ``Retry-After``, and widens the shared spacing by 3 % (up to ``max_widen``); ``recover_after``
sends without a 429 give half of the widening back, as the in-process
:class:`~medblocks_pipelines.lib.fhir.client.RateLimiter` does (the fallback without Redis).

Redis down: a pull must not fail because its pacer's store is unreachable, and must not exceed the
source's limit either. On a connection error or timeout the limiter degrades to an in-process
:class:`~medblocks_pipelines.lib.fhir.client.RateLimiter` at ``limit // fallback_share`` (the
share defaults to 2, the instance's run limit per source in ``dagster.yaml``, so the processes
allowed to pull one source together still stay under its limit), logs one warning with the source
key, counts ``degraded`` and asks Redis again after ``retry_after`` seconds.

Why not the ``limits`` library: its Redis strategies (fixed, moving, sliding window) answer "may I
now?" and let a window's worth go out in a burst; they keep no shared pause and no widening. A
source counting on a sliding window, as real ones and our sandbox do, needs even spacing.
"""

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from medblocks_pipelines.lib.fhir.client import RateLimiter

#: Errors that mean "the shared store is unreachable" (not a bug in our script).
UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError)

log = logging.getLogger(__name__)

KEY_PREFIX = "medblocks:ratelimit:"

# KEYS[1] the source's hash; ARGV: base interval, max interval (µs), recover_after, key ttl (ms).
# Returns the µs to wait for the reserved slot. Times are integers formatted with %.0f (Lua 5.1
# numbers are doubles; tostring would round epoch microseconds to 14 digits).
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local base = tonumber(ARGV[1])
local maxi = tonumber(ARGV[2])
local recover = tonumber(ARGV[3])
local h = redis.call('HMGET', KEYS[1], 'next', 'pause', 'interval', 'calm')
local nxt = tonumber(h[1]) or 0
local pause = tonumber(h[2]) or 0
local interval = tonumber(h[3]) or base
local calm = (tonumber(h[4]) or 0) + 1
if interval < base then interval = base end
if interval > maxi then interval = maxi end
if calm >= recover and interval > base then
  interval = base + (interval - base) / 2
  calm = 0
end
local slot = math.max(now, nxt, pause)
redis.call('HSET', KEYS[1], 'next', string.format('%.0f', slot + interval),
           'interval', string.format('%.0f', interval), 'calm', calm)
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[4]))
return slot - now
"""

# ARGV: pause (µs from now), base interval, max interval (µs), key ttl (ms).
_BACKOFF = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local base = tonumber(ARGV[2])
local maxi = tonumber(ARGV[3])
local h = redis.call('HMGET', KEYS[1], 'pause', 'interval')
local pause = math.max(tonumber(h[1]) or 0, now + tonumber(ARGV[1]))
local interval = math.min(math.max(tonumber(h[2]) or base, base) * 1.03, maxi)
redis.call('HSET', KEYS[1], 'pause', string.format('%.0f', pause),
           'interval', string.format('%.0f', interval), 'calm', 0)
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[4]) + math.ceil(tonumber(ARGV[1]) / 1000))
return interval
"""


class SharedRateLimiter:
    """At most ``limit`` requests per ``per`` seconds for one source, over every process."""

    def __init__(
        self,
        redis_client: Any,
        key: str,
        limit: int,
        per: float = 1.0,
        *,
        margin: float = 0.05,
        max_widen: float = 0.15,
        recover_after: int = 300,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        fallback_share: int = 2,
        retry_after: float = 30.0,
    ) -> None:
        if limit < 1 or per <= 0 or fallback_share < 1:
            raise ValueError("a rate limit needs limit >= 1, per > 0 and fallback_share >= 1")
        self.redis = redis_client
        self.key = f"{KEY_PREFIX}{key}"
        self.limit = limit
        self.per = per
        self.margin = margin
        self._base_us = int(per / limit * (1 + margin) * 1e6)
        self._max_us = int(self._base_us * (1 + max_widen))
        self.late_tolerance = margin * per / 2
        self.recover_after = recover_after
        self._ttl_ms = int(max(per, 1.0) * 1000 * 60)
        self._acquire = redis_client.register_script(_ACQUIRE)
        self._backoff = redis_client.register_script(_BACKOFF)
        self._sleep = sleep
        self._clock = clock
        self._lock = threading.Lock()
        self.sent = 0
        self.waited = 0.0
        self.backoffs = 0
        self.late = 0
        self.fallback = RateLimiter(max(1, limit // fallback_share), per, clock=clock, sleep=sleep)
        self.retry_after = retry_after
        self._degraded_until = float("-inf")
        #: How many times Redis was unreachable and the local fallback took over.
        self.degraded = 0

    def __repr__(self) -> str:
        return f"SharedRateLimiter({self.key!r}, limit={self.limit}, per={self.per})"

    @classmethod
    def from_url(cls, url: str, key: str, limit: int, per: float = 1.0) -> "SharedRateLimiter":
        import redis

        client = redis.Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=5.0)
        return cls(client, key, limit, per)

    @property
    def effective_rate(self) -> float:
        """Requests per second all processes together send at most (no widening)."""
        return 1e6 / self._base_us

    def acquire(self) -> None:
        """Block until this caller's reserved slot; then it must send at once."""
        if self._clock() < self._degraded_until:
            self._acquire_locally()
            return
        try:
            self._acquire_shared()
        except UNREACHABLE as exc:
            self._degrade(exc)
            self._acquire_locally()

    def _degrade(self, exc: BaseException) -> None:
        with self._lock:
            self.degraded += 1
            self._degraded_until = self._clock() + self.retry_after
        log.warning(
            "shared rate limit %s: Redis unreachable (%s); pacing this process alone at %d per %gs "
            "for %gs",
            self.key,
            type(exc).__name__,
            self.fallback.limit,
            self.per,
            self.retry_after,
        )

    def _acquire_locally(self) -> None:
        self.fallback.acquire()
        with self._lock:
            self.sent += 1

    def _acquire_shared(self) -> None:
        while True:
            wait = int(self._acquire(keys=[self.key], args=self._args())) / 1e6
            due = self._clock() + wait
            if wait > 0:
                self._sleep(wait)
            late = self._clock() - due
            with self._lock:
                self.waited += max(wait, 0.0)
                if late <= self.late_tolerance:
                    self.sent += 1
                    return
                # Overslept: sending now could bunch with the next slot's owner. Take a new one.
                self.late += 1

    def _args(self) -> list[int]:
        return [self._base_us, self._max_us, self.recover_after, self._ttl_ms]

    def backoff(self, seconds: float) -> None:
        """A 429: every process of this source pauses ``seconds``; the spacing widens 3 %."""
        with self._lock:
            self.backoffs += 1
        self.fallback.backoff(seconds)
        if self._clock() < self._degraded_until:
            return
        try:
            self._backoff(
                keys=[self.key],
                args=[int(seconds * 1e6), self._base_us, self._max_us, self._ttl_ms],
            )
        except UNREACHABLE as exc:
            self._degrade(exc)
