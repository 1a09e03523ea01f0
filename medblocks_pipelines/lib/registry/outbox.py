"""Reading the control plane's outbox (``events``) from a sensor without missing a late commit.

A cursor that is just "the last id seen" loses events on PostgreSQL: ids come from a sequence when
a row is inserted, not when its transaction commits, so a transaction holding id 5 can commit after
one holding id 6 has been read, and a cursor already at 6 never sees 5. The cursor here is a
low-water mark plus the ids handled above it: the mark only moves past events older than
``SETTLE`` (no transaction stays open that long), and anything above it that was already handled
is remembered and skipped. The webhook dispatcher solves the same problem the same way with a
table (``lib/ops/webhooks.py``); sensors keep the state in their own cursor.
"""

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from medblocks_pipelines.lib.registry.rows import Event

if TYPE_CHECKING:
    from medblocks_pipelines.lib.registry import ControlPlane

#: How long a transaction may stay open between taking an event id and committing.
SETTLE = timedelta(seconds=60)
#: Events read per page, and at most this many pages per tick.
PAGE = 5000
MAX_PAGES = 4


@dataclass
class OutboxCursor:
    """Low-water mark (every event at or below it was handled) and handled ids above it."""

    low: int = 0
    seen: set[int] = field(default_factory=set)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, raw: str | None, *, key: str = "low") -> "OutboxCursor":
        """Read a cursor; also accepts the earlier forms (a bare id, or ``{"last": id, ...}``)."""
        if not raw:
            return cls()
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            return cls()
        if isinstance(value, int):
            return cls(low=value)
        if not isinstance(value, dict):
            return cls()
        low = int(value.pop(key, value.pop("last", 0)) or 0)
        seen = {int(i) for i in value.pop("seen", [])}
        return cls(low=low, seen=seen, extra=value)

    def dump(self) -> str:
        return json.dumps({**self.extra, "low": self.low, "seen": sorted(self.seen)})


def _aware(value: Any) -> datetime | None:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return None


def read_new_events(
    cp: "ControlPlane",
    cursor: OutboxCursor,
    *,
    now: datetime | None = None,
    settle: timedelta = SETTLE,
) -> tuple[list[Event], OutboxCursor]:
    """Events not handled yet (in id order) and the cursor to save once they are acted on."""
    now = now or datetime.now(UTC)
    rows: list[Event] = []
    after = cursor.low
    for _ in range(MAX_PAGES):
        page = cp.list_events(after_id=after, limit=PAGE)
        rows.extend(page)
        if len(page) < PAGE:
            break
        after = page[-1].id
    new = [r for r in rows if r.id not in cursor.seen]
    handled = cursor.seen | {int(r.id) for r in rows}
    low = cursor.low
    for row in rows:  # id order: the mark moves over the settled prefix only
        created = _aware(row.created_at)
        if created is None or created > now - settle:
            break
        low = int(row.id)
    return new, OutboxCursor(low=low, seen={i for i in handled if i > low}, extra=cursor.extra)
