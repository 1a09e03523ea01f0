"""Organization backend settings, merged from source and organization config, and the
clients (HTTP, bulk, backend token) a backend sync uses; see :mod:`bulk_sync` for the keys."""

import functools
import ssl
from dataclasses import dataclass
from typing import Any

import httpx

from medblocks_pipelines.lib.errors import (
    ConfigError,
    NotFound,
)
from medblocks_pipelines.lib.fhir.bulk import (
    GROUP,
    SYSTEM,
    BulkClient,
    ExportRequest,
    client_profile,
)
from medblocks_pipelines.lib.registry import ControlPlane
from medblocks_pipelines.lib.registry.rows import BulkExport
from medblocks_pipelines.lib.registry.schema import BULK_IN_FLIGHT
from medblocks_pipelines.lib.settings import Settings
from medblocks_pipelines.lib.smart.backend import BackendAuth
from medblocks_pipelines.lib.smart.keys import KeyStore

IN_FLIGHT = BULK_IN_FLIGHT
DEFAULT_SCOPE = "system/*.rs"
PATTERN = "backend"


@dataclass(frozen=True)
class OrgConfig:
    """Everything a backend sync of one organization needs, merged from source and org config."""

    tenant: str
    org_id: str
    source_id: str
    vendor: str
    fhir_base_url: str
    client_id: str
    scope: str
    jku: str | None
    request: ExportRequest
    max_parallel: int
    land_workers: int
    attachments: bool
    accept_gzip: bool
    cadence: str | None


def export_org(row: BulkExport) -> str:
    """The organization a backend export belongs to (the column is nullable for other patterns)."""
    if row.organization_id is None:
        raise ConfigError(f"export {row.id} has no organization; it is not a backend export")
    return row.organization_id


def org_config(
    cp: ControlPlane, tenant: str, org_id: str, *, public_jwks_url: str | None = None
) -> OrgConfig:
    """Read and check an organization's backend settings from the registry."""
    org = cp.get_organization(org_id)
    if org.tenant_id != tenant:
        raise NotFound(f"organization {org_id} does not belong to tenant {tenant}")
    src = cp.get_source(org.source_id)
    if "backend" not in (src.patterns or []):
        raise ConfigError(f"source {src.id} is not enabled for the backend pattern")
    scfg: dict[str, Any] = dict(src.config or {})
    ocfg: dict[str, Any] = dict(org.config or {})
    base = src.fhir_base_url
    if not base:
        raise ConfigError(f"source {src.id} has no FHIR base URL")
    # backend_* keys win: a source shared with patient access has its own client_id there.
    client_id = ocfg.get("client_id") or scfg.get("backend_client_id") or scfg.get("client_id")
    if not client_id:
        raise ConfigError(
            f"no backend client_id for organization {org_id}",
            hint="set client_id in the source or organization config",
        )
    profile = client_profile(src.vendor)
    jku: str | None = None
    want_jku = scfg.get("jku", profile.needs_jwks_url)
    if isinstance(want_jku, str) and want_jku.startswith("http"):
        jku = want_jku
    elif want_jku:
        public = Settings.from_env().public_base_url
        jku = (
            scfg.get("jwks_url")
            or public_jwks_url
            or (public.rstrip("/") + "/.well-known/jwks.json" if public else None)
        )
        if not jku:
            raise ConfigError(
                f"source {src.id} needs our JWKS URL (jku)",
                hint="set jwks_url in the source config",
            )
    group_id = ocfg.get("group_id")
    level = ocfg.get("level") or (GROUP if group_id else SYSTEM)
    req = ExportRequest(
        level=level,
        group_id=group_id,
        types=tuple(ocfg.get("types") or scfg.get("types") or ()),
        type_filters=tuple(ocfg.get("type_filters") or ()),
        elements=tuple(ocfg.get("elements") or ()),
        output_format=ocfg.get("output_format"),
        method=str(ocfg.get("method") or "GET").upper(),
        patients=tuple(str(p) for p in ocfg.get("patients") or ()),
        organize_output_by=ocfg.get("organize_output_by"),
        include_associated_data=tuple(ocfg.get("include_associated_data") or ()),
        allow_partial_manifests=bool(ocfg.get("allow_partial_manifests", False)),
        lenient=bool(ocfg.get("lenient", scfg.get("lenient", False))),
    )
    return OrgConfig(
        tenant=tenant,
        org_id=org_id,
        source_id=src.id,
        vendor=str(src.vendor or "generic"),
        fhir_base_url=base,
        client_id=str(client_id),
        scope=str(
            ocfg.get("scope") or scfg.get("backend_scope") or scfg.get("scope") or DEFAULT_SCOPE
        ),
        jku=jku,
        request=req,
        max_parallel=max(1, int(scfg.get("max_parallel_downloads", 4))),
        land_workers=max(1, int(scfg.get("land_workers", 2))),
        attachments=bool(scfg.get("attachments", False) or ocfg.get("attachments", False)),
        accept_gzip=bool(scfg.get("accept_gzip", True)),
        cadence=ocfg.get("cadence") or scfg.get("cadence"),
    )


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """httpx's default TLS context (certifi, or ``SSL_CERT_FILE``/``SSL_CERT_DIR``), built once
    per process: loading the CA bundle costs ~50 ms per client, and a sync makes several."""
    return httpx.create_ssl_context()


def make_http(timeout: float = 60.0) -> httpx.Client:
    """The HTTP client of a sync: explicit timeouts, no automatic redirects (we follow them),
    keep-alive connections (downloads of one export reuse them)."""
    return httpx.Client(
        timeout=httpx.Timeout(timeout, connect=10.0),
        follow_redirects=False,
        limits=httpx.Limits(max_connections=32, max_keepalive_connections=16),
        verify=_tls_context(),
    )


def make_client(
    cp: ControlPlane, cfg: OrgConfig, http: httpx.Client, **client_kwargs: Any
) -> BulkClient:
    """A bulk client with a backend token source signing with our active key."""
    keys = KeyStore(cp.vault)
    auth = BackendAuth(
        client_id=cfg.client_id,
        scope=cfg.scope,
        key=keys.active,
        http=http,
        fhir_base_url=cfg.fhir_base_url,
        jku=cfg.jku,
        shared=True,  # one token across kick-off, polls and downloads (issue 12)
    )
    return BulkClient(
        cfg.fhir_base_url,
        http=http,
        auth=auth,
        profile=client_profile(cfg.vendor),
        accept_gzip=cfg.accept_gzip,
        **client_kwargs,
    )


def backend_connection(cp: ControlPlane, cfg: OrgConfig) -> str:
    """The organization's backend connection (its client registration), created on first use."""
    for conn in cp.list_connections(
        tenant_id=cfg.tenant, pattern=PATTERN, organization_id=cfg.org_id
    ):
        if conn.state in ("pending", "active"):
            return str(conn.id)
    return cp.create_connection(
        tenant_id=cfg.tenant,
        pattern=PATTERN,
        source_id=cfg.source_id,
        organization_id=cfg.org_id,
        context={"client_id": cfg.client_id},
    )


def activate_connection(cp: ControlPlane, connection_id: str) -> None:
    """Mark the backend connection active once a token was issued for it."""
    if cp.get_connection(connection_id).state == "pending":
        cp.transition(connection_id, "active", reason="backend token issued")
