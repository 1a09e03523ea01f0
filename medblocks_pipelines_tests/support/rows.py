"""Registry rows built in memory, for tests that hand a row to a function without a database.

Only the columns a test cares about are passed; the rest get neutral defaults (empty JSON,
``None``, one fixed time), so a test still reads like the dict literal it replaced.
"""

from datetime import UTC, datetime
from typing import Any

from medblocks_pipelines.lib.registry.rows import Connection, Event, Source

AT = datetime(2026, 1, 1, tzinfo=UTC)


def source_row(**fields: Any) -> Source:
    """A ``sources`` row (``id`` defaults to ``src``)."""
    base: dict[str, Any] = {
        "id": "src",
        "name": "Source",
        "vendor": "generic",
        "kind": "ehr",
        "fhir_base_url": None,
        "patterns": [],
        "config": {},
        "smart_config": None,
        "capability_statement": None,
        "discovered_at": None,
        "created_at": AT,
    }
    return Source(**{**base, **fields})


def connection_row(**fields: Any) -> Connection:
    """A ``connections`` row (``id`` and ``tenant_id`` default to ``conn`` and ``acme``)."""
    base: dict[str, Any] = {
        "id": "conn",
        "tenant_id": "acme",
        "pattern": "patient_access",
        "source_id": "src",
        "organization_id": None,
        "patient_ref": None,
        "source_patient_id": None,
        "state": "active",
        "state_reason": None,
        "scopes_requested": None,
        "scopes_granted": None,
        "token_expires_at": None,
        "has_refresh_token": False,
        "context": {},
        "last_pull_at": None,
        "next_pull_due": None,
        "created_at": AT,
        "updated_at": AT,
    }
    return Connection(**{**base, **fields})


def event_row(**fields: Any) -> Event:
    """An outbox ``events`` row (``id`` 1 of tenant ``acme``)."""
    base: dict[str, Any] = {
        "id": 1,
        "tenant_id": "acme",
        "type": "",
        "payload": {},
        "created_at": AT,
    }
    return Event(**{**base, **fields})
