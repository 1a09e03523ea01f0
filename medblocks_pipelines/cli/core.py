"""Core CLI commands: registry, connections, warehouse, sync import, serve."""

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import click
from rich.console import Console
from rich.table import Table

from medblocks_pipelines.cli.lazy import LazyGroup
from medblocks_pipelines.lib.errors import ConfigError, NotFound
from medblocks_pipelines.lib.settings import get_settings

if (
    TYPE_CHECKING
):  # the registry (SQLAlchemy, Alembic) is imported when a command runs, not for help
    from medblocks_pipelines.lib.registry import ControlPlane

console = Console()


def control_plane() -> "ControlPlane":
    """Open the control plane from the environment (``--data-dir`` / ``MEDBLOCKS_*``)."""
    from medblocks_pipelines.lib.registry import open_control_plane

    settings = get_settings()
    settings.ensure_dirs()
    return open_control_plane(settings)


class Owned(Protocol):
    """A row that belongs to one tenant (a connection, an organization, an endpoint...)."""

    @property
    def tenant_id(self) -> str: ...


OwnedRow = TypeVar("OwnedRow", bound=Owned)


def owned_by(
    tenant: str,
    kind: str,
    id: str,
    fetch: Callable[[str], OwnedRow],
    *,
    listing: str = "connections list",
) -> OwnedRow:
    """The row of ``id`` when it belongs to ``tenant``.

    Another tenant's id and an unknown id give the same one line (:class:`NotFound`), so an
    operator scoped to one tenant learns nothing about the others' rows.
    """
    try:
        row: OwnedRow | None = fetch(id)
    except NotFound:
        row = None
    if row is None or row.tenant_id != tenant:
        raise NotFound(
            f"{kind} {id} not found for tenant {tenant}",
            hint=f"list them: medblocks {listing} --tenant {tenant}",
        )
    return row


def print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    """Print rows as a rich table (``-`` for empty cells)."""
    table = Table(title=title, show_lines=False)
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*["-" if v is None or v == "" else str(v) for v in row])
    console.print(table)


def _json_opt(value: str | None) -> dict[str, Any]:
    if not value:
        return {}
    try:
        out = json.loads(value)
    except ValueError as exc:
        raise ConfigError(f"not valid JSON: {exc}") from exc
    if not isinstance(out, dict):
        raise ConfigError("expected a JSON object")
    return out


# -- tenants ---------------------------------------------------------------------------------
@click.group()
def tenants() -> None:
    """Tenants: the app companies whose data never meets another's."""


@tenants.command("add")
@click.argument("tenant_id")
@click.option("--name", required=True)
@click.option("--settings", "settings_json", help="Tenant policies as JSON.")
def tenants_add(tenant_id: str, name: str, settings_json: str | None) -> None:
    """Create or update a tenant."""
    control_plane().add_tenant(tenant_id, name, _json_opt(settings_json))
    click.echo(f"tenant {tenant_id} saved")


@tenants.command("list")
def tenants_list() -> None:
    """List tenants."""
    rows = [[t.id, t.name, json.dumps(t.settings)] for t in control_plane().list_tenants()]
    print_table("tenants", ["id", "name", "settings"], rows)


# -- sources ---------------------------------------------------------------------------------
@click.group()
def sources() -> None:
    """The source catalog: EHRs, payers, exchange networks."""


@sources.command("add")
@click.argument("source_id")
@click.option("--name", required=True)
@click.option("--vendor", default="generic", show_default=True)
@click.option("--kind", type=click.Choice(["ehr", "payer", "network"]), default="ehr")
@click.option("--fhir-base-url")
@click.option("--pattern", "patterns", multiple=True, help="Repeat for each supported pattern.")
@click.option(
    "--config", "config_json", help="Client ids, scopes, cadence... as JSON (no secrets)."
)
def sources_add(
    source_id: str,
    name: str,
    vendor: str,
    kind: str,
    fhir_base_url: str | None,
    patterns: tuple[str, ...],
    config_json: str | None,
) -> None:
    """Create or update a source."""
    control_plane().add_source(
        source_id, name, vendor, kind, fhir_base_url, list(patterns), _json_opt(config_json)
    )
    click.echo(f"source {source_id} saved")


@sources.command("list")
def sources_list() -> None:
    """List sources."""
    rows = [
        [s.id, s.name, s.vendor, s.kind, s.fhir_base_url, ",".join(s.patterns)]
        for s in control_plane().list_sources()
    ]
    print_table("sources", ["id", "name", "vendor", "kind", "fhir base", "patterns"], rows)


@sources.command("discover")
@click.argument("source_id")
def sources_discover(source_id: str) -> None:
    """Fetch the source's SMART configuration and CapabilityStatement into the catalog."""
    from medblocks_pipelines.lib.smart.discovery import discover_source

    cp = control_plane()
    src = cp.get_source(source_id)
    if not src.fhir_base_url:
        raise ConfigError(f"source {source_id} has no FHIR base URL")
    found = discover_source(src.fhir_base_url)
    cp.update_source_discovery(
        source_id, smart_config=found.smart_config, capability_statement=found.capability_statement
    )
    click.echo(
        f"source {source_id}: token endpoint {found.smart_config.get('token_endpoint')}, "
        f"{len(found.resource_types)} resource types"
    )


# -- organizations ---------------------------------------------------------------------------
@click.group(cls=LazyGroup)
def orgs() -> None:
    """Organizations that authorized a tenant (backend, clinician workflow)."""


@orgs.command("add")
@click.argument("org_id")
@click.option("--tenant", required=True)
@click.option("--source", required=True)
@click.option("--name", required=True)
@click.option("--config", "config_json", help="Group id, cadence, client id... as JSON.")
def orgs_add(org_id: str, tenant: str, source: str, name: str, config_json: str | None) -> None:
    """Create or update an organization."""
    control_plane().add_organization(org_id, tenant, source, name, _json_opt(config_json))
    click.echo(f"organization {org_id} saved")


@orgs.command("list")
@click.option("--tenant", required=True)
def orgs_list(tenant: str) -> None:
    """List organizations."""
    rows = [
        [o.id, o.tenant_id, o.source_id, o.name] for o in control_plane().list_organizations(tenant)
    ]
    print_table("organizations", ["id", "tenant", "source", "name"], rows)


@click.group()
def registry() -> None:
    """Registry as code."""


@registry.command("apply")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
def registry_apply(path: str) -> None:
    """Apply a YAML file of tenants, sources and organizations (idempotent)."""
    from medblocks_pipelines.lib.registry.declarative import load_registry_file

    counts = load_registry_file(control_plane(), path)
    click.echo(", ".join(f"{v} {k}" for k, v in counts.items()) + " applied")


# -- connections -----------------------------------------------------------------------------
@click.group(cls=LazyGroup)
def connections() -> None:
    """Connections: consents, launches, registrations, network participation."""


@connections.command("list")
@click.option("--tenant", required=True)
@click.option("--pattern")
@click.option("--state")
def connections_list(tenant: str, pattern: str | None, state: str | None) -> None:
    """List a tenant's connections."""
    rows = [
        [
            c.id,
            c.tenant_id,
            c.pattern,
            c.source_id,
            c.organization_id,
            c.state,
            c.state_reason,
            c.last_pull_at,
        ]
        for c in control_plane().list_connections(tenant_id=tenant, pattern=pattern, state=state)
    ]
    print_table(
        "connections",
        ["id", "tenant", "pattern", "source", "org", "state", "reason", "last pull"],
        rows,
    )


@connections.command("show")
@click.argument("connection_id")
@click.option("--tenant", required=True, help="The tenant the connection belongs to.")
def connections_show(connection_id: str, tenant: str) -> None:
    """Show a connection of the tenant and its full event history."""
    cp = control_plane()
    c = owned_by(tenant, "connection", connection_id, cp.get_connection)
    for key in (
        "id",
        "tenant_id",
        "pattern",
        "source_id",
        "organization_id",
        "patient_ref",
        "source_patient_id",
        "state",
        "state_reason",
        "scopes_granted",
        "token_expires_at",
        "has_refresh_token",
        "last_pull_at",
        "created_at",
    ):
        click.echo(f"{key:>18}: {getattr(c, key)}")
    rows = [
        [
            e.at.isoformat(timespec="seconds"),
            e.event_type,
            e.from_state,
            e.to_state,
            json.dumps(e.detail, default=str),
        ]
        for e in cp.connection_events(connection_id)
    ]
    print_table("history", ["at", "event", "from", "to", "detail"], rows)


# -- sync ------------------------------------------------------------------------------------
@click.group(cls=LazyGroup)
def sync() -> None:
    """Run a sync job (the same Dagster job the UI runs) in-process."""


@sync.command("import-ndjson")
@click.option("--tenant", required=True)
@click.option("--org", "org_id", required=True, help="Organization the files came from.")
@click.option("--path", "folder", required=True, type=click.Path(exists=True))
def sync_import_ndjson(tenant: str, org_id: str, folder: str) -> None:
    """Land a folder of NDJSON files (a Bulk Data export on disk) for an organization."""
    from medblocks_pipelines.cli.runtime import run_job
    from medblocks_pipelines.lib.partitions import partition_key

    cp = control_plane()
    org = owned_by(tenant, "organization", org_id, cp.get_organization, listing="orgs list")
    source_id = str(org.source_id)
    cp.engine.dispose()
    result = run_job(
        "ndjson_import_job",
        partition_key=partition_key(tenant, org_id),
        run_config={
            "ops": {"backend__ndjson_import": {"config": {"path": str(Path(folder).resolve())}}}
        },
        # the source's run limit (dagster.yaml) holds for imports too
        tags={"medblocks/tenant": tenant, "medblocks/source": source_id},
    )
    for mat in result.asset_materializations_for_node("backend__ndjson_import"):
        md = {k: v.value for k, v in mat.metadata.items()}
        click.echo(f"landed {md.get('landed')} resources, quarantined {md.get('quarantined')}")


# -- warehouse -------------------------------------------------------------------------------
@click.group(cls=LazyGroup)
def warehouse() -> None:
    """The per-tenant DuckDB warehouse."""


@warehouse.command("build")
@click.option("--tenant", required=True)
@click.option(
    "--in-process/--dagster", default=False, help="Build directly, without recording a Dagster run."
)
def warehouse_build(tenant: str, in_process: bool) -> None:
    """Rebuild a tenant's warehouse from the lake and publish it."""
    if in_process:
        from medblocks_pipelines.lib.warehouse.build import build_warehouse

        cp = control_plane()
        result = build_warehouse(
            tenant, settings=get_settings(), control_plane=cp, run_id=f"cli-{uuid.uuid4().hex[:8]}"
        )
        counts = result.table_counts
        path = result.path
    else:
        from medblocks_pipelines.cli.runtime import run_job
        from medblocks_pipelines.lib.warehouse.build import (
            open_warehouse,
            table_counts,
            warehouse_path,
        )

        run_job("tenant_warehouse_job", partition_key=tenant, tags={"medblocks/tenant": tenant})
        with open_warehouse(tenant, settings=get_settings()) as con:
            counts = table_counts(con)
        path = warehouse_path(get_settings(), tenant)
    print_table(
        f"warehouse {tenant}", ["table", "rows"], [[k, f"{v:,}"] for k, v in counts.items()]
    )
    click.echo(f"published {path}")


@warehouse.command("path")
@click.option("--tenant", required=True)
def warehouse_path_cmd(tenant: str) -> None:
    """Print the path of a tenant's published warehouse."""
    from medblocks_pipelines.lib.warehouse.build import warehouse_path

    click.echo(str(warehouse_path(get_settings(), tenant)))


class _LazyAudit:
    """The control plane's audit call, the control plane opened on first use."""

    def audit(self, **fields: Any) -> int:
        return control_plane().audit(**fields)


@warehouse.command("query", context_settings={"ignore_unknown_options": True})
@click.option("--tenant", required=True)
@click.option(
    "-f",
    "--file",
    "sql_file",
    type=click.File("r"),
    help="Read the SQL from FILE ('-' for stdin) instead of the argument.",
)
@click.option("--max-rows", default=200, show_default=True, type=int)
@click.argument("sql", required=False)
def warehouse_query(tenant: str, sql_file: Any, max_rows: int, sql: str | None) -> None:
    """Run read-only SQL against a tenant's warehouse, confined to that warehouse.

    Files, URLs, other databases, extensions, settings and writes are refused (one line says
    why); get data out with `medblocks exports`. SQL may start with a `--` comment. Tables are
    seen through the read policy (network rows only for the purposes it lists for analysts).
    """
    from medblocks_pipelines.lib.warehouse.sandboxed import run_confined

    if (sql is None) == (sql_file is None):
        raise click.UsageError("give the SQL as an argument or with -f FILE (one of them)")
    text = sql if sql is not None else sql_file.read()
    # The control plane records the session when it met purpose-restricted network rows (opened
    # only then: a warehouse without network rows needs no control plane to query).
    result = run_confined(
        tenant, text, settings=get_settings(), max_rows=max_rows, control_plane=_LazyAudit()
    )
    if not result.columns:
        return
    print_table("result", result.columns, [list(r) for r in result.rows])
    if result.truncated:
        click.echo(f"(first {max_rows} rows; --max-rows to see more)")


@click.group(cls=LazyGroup)
def audit() -> None:
    """The network audit log."""


@click.group()
def vault() -> None:
    """The encrypted secret vault."""


@vault.command("rotate")
def vault_rotate() -> None:
    """Re-encrypt every secret under the newest key of MEDBLOCKS_SECRET_KEY."""
    n = control_plane().vault.rotate()
    click.echo(f"re-encrypted {n} secrets")


@vault.command("new-key")
def vault_new_key() -> None:
    """Print a new vault key (prepend it to MEDBLOCKS_SECRET_KEY, then run `vault rotate`)."""
    from cryptography.fernet import Fernet

    click.echo(Fernet.generate_key().decode())


# -- servers and demo ------------------------------------------------------------------------
@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option(
    "--public-base-url",
    envvar="MEDBLOCKS_PUBLIC_BASE_URL",
    help="How EHRs and browsers reach us (https://host[/prefix] behind a TLS proxy); "
    "default http://HOST:PORT.",
)
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(1, 64),
    help="Worker processes (uvicorn); each opens its own warehouse index. Set "
    "MEDBLOCKS_REDIS_URL so CDS jti replay checks are shared fast (else the control plane's "
    "cds_jti table is).",
)
def serve(host: str, port: int, public_base_url: str | None, workers: int) -> None:
    """Serve our web surfaces: CDS Hooks, SMART launch/callback, connect links, JWKS.

    Behind TLS or a reverse proxy, set MEDBLOCKS_PUBLIC_BASE_URL: redirect URIs, the JWKS URL,
    the CDS Hooks ``aud`` check, card links and cookie paths are all built from it.
    """
    import uvicorn

    from medblocks_pipelines.web.app import create_app

    public = public_base_url or f"http://{host}:{port}"
    click.echo(f"serving on http://{host}:{port}, public base URL {public}, {workers} worker(s)")
    if workers == 1:
        uvicorn.run(create_app(public_base_url=public), host=host, port=port, log_level="warning")
        return
    # Worker processes build the app themselves from the environment they inherit.
    os.environ["MEDBLOCKS_PUBLIC_BASE_URL"] = public
    uvicorn.run(
        "medblocks_pipelines.web.app:app_from_env",
        factory=True,
        workers=workers,
        host=host,
        port=port,
        log_level="warning",
    )


def register(main: click.Group) -> None:
    """Attach the core commands to ``main``."""
    for cmd in (
        tenants,
        sources,
        orgs,
        registry,
        connections,
        sync,
        warehouse,
        audit,
        vault,
        serve,
    ):
        main.add_command(cmd)
