"""FHIR server destinations: changed rows as ``PUT`` and deletions as ``DELETE`` entries in
transaction bundles (idempotent, so a retried run duplicates nothing)."""

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING

import duckdb
import httpx

from medblocks_pipelines.lib.errors import ExportError, MedblocksError
from medblocks_pipelines.lib.ops.export_delta import changed_types, record_batches
from medblocks_pipelines.lib.ops.rows import ExportDestination
from medblocks_pipelines.lib.registry import ControlPlane

if TYPE_CHECKING:  # exports.py imports this module
    from medblocks_pipelines.lib.ops.exports import ExportResult


# -- FHIR ------------------------------------------------------------------------------------
def send_fhir(
    con: duckdb.DuckDBPyConnection,
    dest: ExportDestination,
    creds: Mapping[str, str],
    result: "ExportResult",
    http: httpx.Client | None,
    *,
    cp: ControlPlane | None = None,
) -> None:
    """Send ``changed`` as PUT and ``deleted`` as DELETE entries, ``bundle_size`` per bundle."""
    size = int(dest.config.get("bundle_size", 200))
    headers = {
        "content-type": "application/fhir+json",
        "accept": "application/fhir+json",
    }
    if creds.get("bearer_token"):
        headers["authorization"] = f"Bearer {creds['bearer_token']}"
    client = http or httpx.Client(timeout=60.0)
    bearer = (
        _BackendBearer(cp, dest, client) if dest.config.get("auth") == "smart-backend" else None
    )

    def post(entries: list[bytes]) -> None:
        _post_bundle(client, dest, headers, entries, result, bearer=bearer)

    try:
        for rtype in changed_types(con):
            entries: list[bytes] = []
            count = 0
            for batch in record_batches(
                con,
                "SELECT resource_id, resource FROM changed WHERE resource_type = ? "
                "ORDER BY source, resource_id",
                [rtype],
            ):
                for rid, text in zip(
                    batch.column("resource_id").to_pylist(),
                    batch.column("resource").to_pylist(),
                    strict=True,
                ):
                    # The landed JSON goes in verbatim (decimals keep their precision).
                    entries.append(
                        b'{"fullUrl":"'
                        + f"{dest.url.rstrip('/')}/{rtype}/{rid}".encode()
                        + b'","resource":'
                        + text.encode()
                        + b',"request":{"method":"PUT","url":"'
                        + f"{rtype}/{rid}".encode()
                        + b'"}}'
                    )
                    count += 1
                    if len(entries) >= size:
                        post(entries)
                        entries = []
            if entries:
                post(entries)
            result.counts_by_type[rtype] = count
        rows = con.execute(
            "SELECT resource_type, resource_id FROM deleted ORDER BY resource_type, resource_id"
        ).fetchall()
        for i in range(0, len(rows), size):
            entries = [
                json.dumps({"request": {"method": "DELETE", "url": f"{t}/{rid}"}}).encode()
                for t, rid in rows[i : i + size]
            ]
            post(entries)
        result.deleted = len(rows)
    finally:
        if http is None:
            client.close()


class _BackendBearer:
    """``Authorization`` for a destination that takes SMART Backend Services tokens."""

    def __init__(
        self, cp: ControlPlane | None, dest: ExportDestination, http: httpx.Client
    ) -> None:
        from medblocks_pipelines.lib.smart.backend import BackendAuth
        from medblocks_pipelines.lib.smart.keys import KeyStore

        if cp is None:
            raise ExportError("smart-backend auth needs the control plane (our signing key)")
        cfg = dest.config
        self.auth = BackendAuth(
            client_id=str(cfg["client_id"]),
            scope=str(cfg.get("scope") or "system/*.cud"),
            key=KeyStore(cp.vault).active,
            http=http,
            token_endpoint=cfg.get("token_endpoint"),
            fhir_base_url=dest.url,
            jku=cfg.get("jku"),
        )

    def value(self) -> str:
        try:
            return f"Bearer {self.auth.token()}"
        except MedblocksError as exc:
            raise ExportError(f"no token for the FHIR destination: {exc}", hint=exc.hint) from exc

    def expired(self, header: str) -> None:
        self.auth.invalidate(header.removeprefix("Bearer "))


def _post_bundle(
    client: httpx.Client,
    dest: ExportDestination,
    headers: dict[str, str],
    entries: list[bytes],
    result: "ExportResult",
    *,
    bearer: "_BackendBearer | None" = None,
) -> None:
    body = b'{"resourceType":"Bundle","type":"transaction","entry":[' + b",".join(entries) + b"]}"
    for attempt in (1, 2):
        sent = dict(headers)
        if bearer is not None:
            sent["authorization"] = bearer.value()
        try:
            resp = client.post(dest.url.rstrip("/") + "/", content=body, headers=sent)
        except httpx.HTTPError as exc:
            raise ExportError(
                f"FHIR destination {dest.id} unreachable: {type(exc).__name__}"
            ) from exc
        if resp.status_code == 401 and bearer is not None and attempt == 1:
            bearer.expired(sent["authorization"])  # revoked or expired early: one fresh token
            continue
        break
    if resp.status_code != 200:
        raise ExportError(
            f"FHIR destination {dest.id} refused a transaction: HTTP {resp.status_code}",
            hint="the destination's OperationOutcome is in its own logs; fix and re-run",
        )
    try:
        reply = resp.json()
    except ValueError as exc:
        raise ExportError(f"FHIR destination {dest.id} answered with non-JSON") from exc
    if reply.get("resourceType") != "Bundle" or reply.get("type") != "transaction-response":
        raise ExportError(f"FHIR destination {dest.id} did not answer a transaction-response")
    statuses = [str((e.get("response") or {}).get("status", "")) for e in reply.get("entry", [])]
    if len(statuses) != len(entries) or not all(s[:1] == "2" for s in statuses):
        raise ExportError(f"FHIR destination {dest.id} did not accept every entry of a transaction")
    result.bundles += 1
    result.bytes += len(body)
