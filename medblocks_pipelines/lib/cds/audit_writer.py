"""Audit rows of answered CDS Hooks calls, written off the request path in batches.

One ``INSERT`` transaction per call was the largest single cost of a hook call after the JWT
signature. :class:`AuditWriter` queues each row (timestamped when the call is answered) and a
background thread inserts whatever has queued, in one transaction, every ``interval`` seconds
or as soon as ``max_batch`` rows wait. :meth:`close` (the web app's shutdown, and ``atexit``)
drains the queue: after a clean shutdown every answered call has its row. A failed insert is
retried on the next round, never dropped; only a hard kill can lose the last ``interval``.

Only ``allowed`` rows come here: refusals stay synchronous through ``ControlPlane.audit`` (they
also emit an outbox event, and a flood of them must not be cheaper to send than to record).
"""

import atexit
import logging
import queue
import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from medblocks_pipelines.lib.registry.schema import audit_log
from medblocks_pipelines.lib.settings import Tuning

log = logging.getLogger(__name__)

#: Seconds between batch inserts (``MEDBLOCKS_CDS_AUDIT_FLUSH_SECONDS``; tests set it long to see
#: that shutdown alone writes every row).
FLUSH_INTERVAL = Tuning.from_env().cds_audit_flush_seconds  # MEDBLOCKS_CDS_AUDIT_FLUSH_SECONDS
MAX_BATCH = 500
RETRY_PAUSE = 1.0


class AuditWriter:
    """A queue of ``audit_log`` rows and the thread that inserts them in batches."""

    def __init__(
        self,
        engine: sa.engine.Engine,
        *,
        interval: float | None = None,
        max_batch: int = MAX_BATCH,
    ) -> None:
        self.engine = engine
        self.interval = FLUSH_INTERVAL if interval is None else interval
        self.max_batch = max_batch
        self._queue: queue.Queue[dict[str, Any]] = queue.Queue()
        self._pending: list[dict[str, Any]] = []
        self._closed = threading.Event()
        self._flush_lock = threading.Lock()
        self.written = 0
        self.failures = 0
        self._thread = threading.Thread(target=self._run, name="cds-audit-writer", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def submit(
        self,
        *,
        tenant_id: str,
        actor: str,
        action: str,
        person_id: str | None = None,
        purpose: str | None = None,
        evidence: Mapping[str, Any] | None = None,
    ) -> None:
        """Queue one ``allowed`` audit row (returns at once)."""
        if self._closed.is_set():
            raise RuntimeError("the audit writer is closed")
        self._queue.put(
            {
                "at": datetime.now(UTC),
                "tenant_id": tenant_id,
                "actor": actor,
                "action": action,
                "person_id": person_id,
                "purpose": purpose,
                "decision": "allowed",
                "reason": None,
                "evidence": dict(evidence or {}),
                "gateways": [],
                "responders": [],
                "documents": [],
            }
        )

    def _drain(self, first: dict[str, Any] | None) -> None:
        if first is not None:
            self._pending.append(first)
        while True:
            try:
                self._pending.append(self._queue.get_nowait())
            except queue.Empty:
                return

    def flush(self) -> int:
        """Insert everything queued so far (in batches of ``max_batch``); returns rows written."""
        with self._flush_lock:
            self._drain(None)
            done = 0
            while self._pending:
                batch = self._pending[: self.max_batch]
                with self.engine.begin() as conn:
                    conn.execute(audit_log.insert(), batch)
                del self._pending[: len(batch)]
                done += len(batch)
            self.written += done
            return done

    def _run(self) -> None:
        while not self._closed.is_set():
            try:
                first = self._queue.get(timeout=self.interval)
            except queue.Empty:
                continue
            # Let a few more arrive: one transaction for a handful of calls, not one each.
            self._closed.wait(self.interval)
            with self._flush_lock:
                self._drain(first)
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - kept in _pending and retried, never dropped
                self.failures += 1
                log.warning("cds audit rows could not be written yet; retrying")
                self._closed.wait(RETRY_PAUSE)

    def close(self) -> None:
        """Stop the thread and write every queued row (idempotent)."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._thread.join(timeout=30)
        self.flush()
        atexit.unregister(self.close)
