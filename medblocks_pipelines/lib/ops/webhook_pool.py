"""Bounded, parallel webhook POSTs: a small thread pool and a hard wait per batch.

:func:`medblocks_pipelines.lib.ops.webhooks.deliver_due` claims and records deliveries on its own
thread (the control plane's connections stay on one thread); only the HTTP calls run here. httpx's
``timeout`` bounds each phase of a request (connect, write, each read), not the request as a
whole, so a receiver that trickles bytes could hold a call far longer: :func:`post_all` waits at
most ``wait_s`` for the batch and reports the calls still running as ``None``. Their deliveries
stay claimed until the lease expires and are then due again (at least once, same ``webhook-id``).
"""

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass

import httpx


@dataclass(frozen=True)
class PostResult:
    """One POST's outcome: ``success``, ``http_error``, ``timeout`` or ``connection_error``."""

    outcome: str
    status_code: int | None
    error: str | None
    duration_ms: int


@dataclass(frozen=True)
class Post:
    """One signed request to send."""

    url: str
    body: bytes
    headers: dict[str, str]


def post_one(http: httpx.Client, post: Post, timeout_s: float) -> PostResult:
    """POST once; any 2xx is success, redirects are not followed and count as failures."""
    started = time.perf_counter()

    def ms() -> int:
        return int((time.perf_counter() - started) * 1000)

    try:
        resp = http.post(post.url, content=post.body, headers=post.headers, timeout=timeout_s)
    except httpx.TimeoutException as exc:
        return PostResult("timeout", None, type(exc).__name__, ms())
    except httpx.HTTPError as exc:
        return PostResult("connection_error", None, type(exc).__name__, ms())
    outcome = "success" if 200 <= resp.status_code < 300 else "http_error"
    return PostResult(outcome, resp.status_code, None, ms())


def post_all(
    http: httpx.Client,
    posts: Sequence[Post],
    *,
    pool: ThreadPoolExecutor | None,
    timeout_s: float,
    wait_s: float,
) -> list[PostResult | None]:
    """Send ``posts`` in parallel on ``pool`` (in order on this thread when None); wait at most
    ``wait_s`` for the batch. A call still running then is ``None`` (left to its lease)."""
    if pool is None:
        return [post_one(http, p, timeout_s) for p in posts]
    futures = [pool.submit(post_one, http, p, timeout_s) for p in posts]
    wait(futures, timeout=wait_s)
    return [f.result() if f.done() else None for f in futures]
