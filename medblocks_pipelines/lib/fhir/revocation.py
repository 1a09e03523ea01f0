"""Revoking a patient-access connection: state, tokens at the source and in the vault, and data.

Moved out of ``pull.py`` (which re-exports it) to keep that module to the pull itself.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from medblocks_pipelines.lib.errors import MedblocksError
from medblocks_pipelines.lib.fhir.client import loads_exact
from medblocks_pipelines.lib.registry import ControlPlane
from medblocks_pipelines.lib.registry.rows import Connection
from medblocks_pipelines.lib.smart.tokens import ClientAuth, tokens_secret_name
from medblocks_pipelines.lib.warehouse.lake import delete_connection_data

PATTERN = "patient_access"


def _watermark_key(connection_id: str) -> str:
    # The same key as ``pull.watermark_key`` (pull imports this module, so not from there).
    return f"{PATTERN}/{connection_id}/since"


@dataclass(frozen=True)
class RevokeResult:
    """What revoking a connection did."""

    connection_id: str
    revoked_at_source: bool
    rows_deleted: int
    delete_data: bool


def revoke_connection(
    cp: ControlPlane,
    connection_id: str,
    *,
    lake_root: str | Path,
    delete_data: bool | None = None,
    reason: str = "revoked by the tenant",
    http: httpx.Client | None = None,
) -> RevokeResult:
    """Revoke a connection: state ``revoked`` (pulls stop), tokens revoked at the source when it
    offers RFC 7009 and removed from the vault, and, when asked or when the tenant's
    ``delete_on_revoke`` setting says so, the connection's rows deleted from the lake.

    The caller rebuilds the tenant's warehouse when ``rows_deleted`` is non-zero.
    """
    conn = cp.get_connection(connection_id)
    # A failed launch never became a grant: clean up without a (forbidden) state change.
    if conn.state not in ("revoked", "failed"):
        cp.transition(connection_id, "revoked", reason=reason)
    revoked_remote = False
    secret = cp.vault.get(tokens_secret_name(connection_id))
    if secret is not None:
        revoked_remote = _revoke_at_source(cp, conn, loads_exact(secret.reveal()), http=http)
    cp.vault.delete_prefix(f"conn/{connection_id}/")
    cp.record_event(connection_id, "tokens.revoked", {"at_source": revoked_remote})
    if delete_data is None:
        delete_data = bool((cp.get_tenant(conn.tenant_id).settings or {}).get("delete_on_revoke"))
    removed = 0
    if delete_data:
        removed = delete_connection_data(lake_root, conn.tenant_id, connection_id)
        cp.set_watermark(_watermark_key(connection_id), None)
        for key in cp.list_watermarks(_watermark_key(connection_id) + "/"):
            cp.set_watermark(key, None)
        cp.record_event(connection_id, "data.deleted", {"rows": removed})
    return RevokeResult(connection_id, revoked_remote, removed, delete_data)


def _revoke_at_source(
    cp: ControlPlane, conn: Connection, blob: Mapping[str, Any], *, http: httpx.Client | None
) -> bool:
    source = cp.get_source(conn.source_id)
    endpoint = (source.smart_config or {}).get("revocation_endpoint")
    token = blob.get("refresh_token") or blob.get("access_token")
    if not endpoint or not token:
        return False
    own = http is None
    client = http or httpx.Client(timeout=10.0)
    try:
        auth = ClientAuth.from_source(source, cp, pattern=conn.pattern)
        form = {
            "token": str(token),
            "token_type_hint": "refresh_token" if blob.get("refresh_token") else "access_token",
        }
        headers = auth.apply(form, token_endpoint=str(endpoint))
        resp = client.post(str(endpoint), data=form, headers=headers)
        return resp.status_code == 200
    except (httpx.HTTPError, MedblocksError):
        # Best effort: our side is revoked and the tokens are gone either way.
        return False
    finally:
        if own:
            client.close()


def refresh_failed_connections(
    cp: ControlPlane, *, tenant_id: str | None = None, source_id: str | None = None
) -> list[str]:
    """Patient-access connections whose refresh failed (the patient must connect again)."""
    return [
        r.id
        for r in cp.list_connections(
            tenant_id=tenant_id, pattern=PATTERN, state="refresh_failed", source_id=source_id
        )
    ]
