"""Answering a CDS call on the event loop, and the guard that sends it to a thread when it must wait.

A worker thread per call cost about a quarter of a ``patient-view`` call's server CPU (issue 17:
the hand-off to the thread pool and the GIL passing back and forth around the signature check).
Most calls wait on nothing but the jti store (awaited on the loop, :meth:`RedisJtiStore.remember_async`):
the registry, the keys and the warehouse index are cached. So the web layer runs them inline, in
:func:`inline_mode`, and every place that may block (a registry read, a JWKS fetch, a synchronous
index load, a FHIR prefetch fetch, a refusal's audit row) first calls :func:`may_block`, which in
inline mode raises :class:`MustOffload` *before* doing anything. The caller then answers the same
call in a thread, from the last step that had no side effect (the jti is never remembered twice).
"""

import contextlib
import contextvars
from collections.abc import Iterator

_INLINE: contextvars.ContextVar[bool] = contextvars.ContextVar("cds_inline", default=False)


class MustOffload(Exception):  # noqa: N818 - a signal, not an error
    """Raised in inline mode where the work would block: answer this call in a thread instead."""


def may_block(what: str) -> None:
    """Mark a point that may wait on I/O: refused (:class:`MustOffload`) on the event loop."""
    if _INLINE.get():
        raise MustOffload(what)


@contextlib.contextmanager
def inline_mode() -> Iterator[None]:
    """Run the body as on the event loop: :func:`may_block` raises instead of blocking."""
    token = _INLINE.set(True)
    try:
        yield
    finally:
        _INLINE.reset(token)
