"""CLI of the backend pattern: ``medblocks sync backend`` and ``medblocks keys ...``.

``sync backend`` runs the same Dagster jobs as the UI (kick-off, then download/land) in-process,
and waits for the export in between in this process with a progress display: fine for a CLI,
whereas in Dagster the sensor does the waiting outside any run.
"""

import concurrent.futures as cf
import json
import threading
from typing import Any

import click
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from medblocks_pipelines.lib.fhir.bulk import ExportExpired
from medblocks_pipelines.lib.fhir.bulk_sync import wait_for_export
from medblocks_pipelines.lib.partitions import partition_key
from medblocks_pipelines.lib.registry import ControlPlane
from medblocks_pipelines.lib.settings import Settings

console = Console()

#: Floor on the server's ``Retry-After`` between status polls: the server's ask is obeyed as
#: given (``Retry-After: 0`` means now), only a tight loop on ``0`` is avoided. Without a
#: ``Retry-After`` the client backs off exponentially from 2 s (``BulkClient.next_wait``).
POLL_FLOOR = 0.05


def run_backend_sync(
    cp: ControlPlane,
    settings: Settings,
    tenant: str,
    org_id: str,
    *,
    full: bool = False,
    timeout: float = 3600.0,
    min_wait: float = POLL_FLOOR,
    instance: Any = None,
    show_progress: bool = False,
    since: str | None = None,
    patients: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Kick off, wait for, download and land one organization's export through the Dagster jobs.

    Returns the land step's metadata (counts by type, deleted, quarantined, watermark, missing
    types...). The demo calls this for each organization; a second call is incremental
    (``_since``). ``since`` sets the starting ``_since`` first; ``patients`` makes a patient-list
    export. An export that expired on the server before it landed is abandoned by the land step
    and kicked off once more, from the same watermark.
    """
    from medblocks_pipelines.cli.core import owned_by
    from medblocks_pipelines.lib.errors import MedblocksError

    # Another tenant's organization is refused before any Dagster run starts.
    owned_by(tenant, "organization", org_id, cp.get_organization, listing="orgs list")
    kick_config: dict[str, Any] = {"full": full, "patients": list(patients)}
    if since:
        kick_config["since"] = since
    try:
        return _run_once(
            cp, tenant, org_id, kick_config, timeout, min_wait, instance, show_progress
        )
    except (MedblocksError, ExportExpired):
        rows = cp.list_bulk_exports(tenant_id=tenant, organization_id=org_id)
        if not rows or rows[-1].status != "expired":
            raise
    console.print("[yellow]the export expired on the server; kicking off a new one[/yellow]")
    kick_config = {"full": False, "patients": list(patients)}
    return _run_once(cp, tenant, org_id, kick_config, timeout, min_wait, instance, show_progress)


def _run_once(
    cp: ControlPlane,
    tenant: str,
    org_id: str,
    kick_config: dict[str, Any],
    timeout: float,
    min_wait: float,
    instance: Any,
    show_progress: bool,
) -> dict[str, Any]:
    key = partition_key(tenant, org_id)
    org = cp.get_organization(org_id)
    tags = {"medblocks/tenant": tenant, "medblocks/source": org.source_id}
    # The kick-off request goes out before Dagster is imported and loaded (~2 s), and the export
    # is polled on a thread while it loads, so start-up overlaps the server preparing the export.
    from medblocks_pipelines.lib.fhir.bulk_sync import make_http

    # One HTTP client (keep-alive) and one token for the kick-off and the polls.
    http = make_http()
    try:
        return _kick_off_wait_and_land(
            cp,
            http,
            key,
            tags,
            tenant,
            org_id,
            kick_config,
            timeout,
            min_wait,
            instance,
            show_progress,
        )
    finally:
        http.close()


def _kick_off_wait_and_land(
    cp: ControlPlane,
    http: Any,
    key: str,
    tags: dict[str, str],
    tenant: str,
    org_id: str,
    kick_config: dict[str, Any],
    timeout: float,
    min_wait: float,
    instance: Any,
    show_progress: bool,
) -> dict[str, Any]:
    kick_config = _kick_off_early(cp, tenant, org_id, kick_config, http)
    early_id = str(kick_config.get("export_id") or "")
    waiter = (
        _Waiter(cp, early_id, http=http, timeout=timeout, min_wait=min_wait) if early_id else None
    )

    from medblocks_pipelines.cli.runtime import get_instance, load_definitions, run_job

    # One instance and one load of the definitions for every run (each costs ~0.5 s).
    instance = instance or get_instance()
    definitions = load_definitions()
    kick_run_config = {"ops": {"backend__bulk_export": {"config": kick_config}}}
    if waiter is not None:
        try:
            waiter.join(show_progress)
        except BaseException:
            # The export stays on record (kicked off, then failed or expired) as before.
            run_job(
                "backend_kickoff_job",
                partition_key=key,
                run_config=kick_run_config,
                tags=tags,
                instance=instance,
                definitions=definitions,
            )
            raise
        # Ready: one run records the kick-off and lands it (one run's overhead, not two). The
        # landing begins as soon as the run is admitted, while Dagster starts the run; the run's
        # land step takes it over (bulk_land.start_early_landing).
        from medblocks_pipelines.lib.fhir.bulk_land import start_early_landing
        from medblocks_pipelines.lib.settings import get_settings

        settings = get_settings()  # what the run's PlatformResource reads: the same lake

        landing: list[cf.Future[Any]] = []
        run_over = threading.Event()

        def land_now(run_id: str, recorded: threading.Event) -> None:
            def when_recorded() -> None:  # crash recovery finds dead runs (and pulls) in storage
                while not recorded.wait(0.02):
                    if run_over.is_set():
                        raise RuntimeError(f"run {run_id[:8]} ended before it was recorded")

            landing.append(
                start_early_landing(cp, settings, early_id, run_id=run_id, when=when_recorded)
            )

        land_config = {"config": {"export_id": early_id}}
        try:
            sync = run_job(
                "backend_sync_job",
                partition_key=key,
                run_config={
                    "ops": {**kick_run_config["ops"], "backend__bulk_resources": land_config}
                },
                tags={**tags, "medblocks/export": early_id},
                instance=instance,
                definitions=definitions,
                on_admitted=land_now,
            )
        finally:
            # Never exit with a landing half done (its thread is a daemon): a run that failed
            # before its land step leaves the landing to finish and record itself.
            run_over.set()
            cf.wait(landing)
        mat = sync.asset_materializations_for_node("backend__bulk_resources")[0]
        return {k: v.value for k, v in mat.metadata.items()}
    kick = run_job(
        "backend_kickoff_job",
        partition_key=key,
        run_config=kick_run_config,
        tags=tags,
        instance=instance,
        definitions=definitions,
    )
    md = kick.asset_materializations_for_node("backend__bulk_export")[0].metadata
    export_id = str(md["export_id"].value)
    _Waiter(cp, export_id, http=http, timeout=timeout, min_wait=min_wait).join(show_progress)
    land = run_job(
        "backend_land_job",
        partition_key=key,
        run_config={"ops": {"backend__bulk_resources": {"config": {"export_id": export_id}}}},
        tags={**tags, "medblocks/export": export_id},
        instance=instance,
        definitions=definitions,
    )
    mat = land.asset_materializations_for_node("backend__bulk_resources")[0]
    return {k: v.value for k, v in mat.metadata.items()}


class _Waiter:
    """Polls an export until it is ready on a thread (``wait_for_export``: each answer is
    recorded, the server's ``Retry-After`` is obeyed), so the caller can load Dagster meanwhile;
    :meth:`join` waits for it (with a progress display) and raises what the wait raised."""

    def __init__(
        self,
        cp: ControlPlane,
        export_id: str,
        *,
        timeout: float,
        min_wait: float,
        http: Any = None,
    ) -> None:
        self.export_id = export_id
        self.status = "waiting"
        self.error: BaseException | None = None
        self.done = threading.Event()

        def on_status(st: Any) -> None:
            self.status = st.progress or st.state

        def run() -> None:
            try:
                wait_for_export(
                    cp,
                    export_id,
                    http=http,
                    timeout=timeout,
                    min_wait=min_wait,
                    on_status=on_status,
                )
            except BaseException as exc:  # re-raised by join() on the caller's thread
                self.error = exc
            finally:
                self.done.set()

        self.thread = threading.Thread(target=run, name="bulk-wait", daemon=True)
        self.thread.start()

    def join(self, show_progress: bool) -> None:
        if show_progress and not self.done.is_set():
            with Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                TimeElapsedColumn(),
                console=console,
                transient=True,
            ) as bar:
                task = bar.add_task(f"export {self.export_id}: waiting", total=None)
                while not self.done.wait(0.1):
                    bar.update(task, description=f"export {self.export_id}: {self.status}")
        self.thread.join()
        if self.error is not None:
            raise self.error


def _kick_off_early(
    cp: ControlPlane, tenant: str, org_id: str, kick_config: dict[str, Any], http: Any = None
) -> dict[str, Any]:
    """Kick off now, outside Dagster; returns the kick-off run's config recording the export.

    Any failure leaves the kick-off to the Dagster run (its retries on 429/5xx, its failure
    record): the original ``kick_config`` is returned.
    """
    from medblocks_pipelines.lib.errors import MedblocksError
    from medblocks_pipelines.lib.fhir.bulk_sync import kickoff_export, set_since

    try:
        if kick_config.get("since"):
            set_since(cp, tenant, org_id, kick_config["since"])
        result = kickoff_export(
            cp,
            tenant,
            org_id,
            full=bool(kick_config.get("full")),
            patients=tuple(kick_config.get("patients") or ()),
            http=http,
        )
    except MedblocksError:
        return kick_config
    return {
        "full": bool(kick_config.get("full")),
        "patients": list(kick_config.get("patients") or ()),
        "export_id": result.export_id,
        "reused": result.reused,
        "warnings": list(result.warnings),
    }


@click.command("backend")
@click.option("--tenant", required=True)
@click.option("--org", "org_id", required=True, help="Organization that authorized the sync.")
@click.option("--full", is_flag=True, help="Clear the watermark: export everything again.")
@click.option(
    "--since",
    default=None,
    help="Start from this _since (FHIR instant, e.g. 2026-01-01T00:00:00Z) instead of the "
    "watermark; later syncs go on from this export's transactionTime.",
)
@click.option(
    "--patient",
    "patients",
    multiple=True,
    help="Export only this patient (repeatable): a patient-list export (POST with patient).",
)
@click.option(
    "--timeout",
    default=3600.0,
    show_default=True,
    type=float,
    help="Seconds to wait for the export to complete.",
)
def sync_backend(
    tenant: str,
    org_id: str,
    full: bool,
    since: str | None,
    patients: tuple[str, ...],
    timeout: float,
) -> None:
    """Bulk-export an organization's cohort (incremental by _since) and land it."""
    from medblocks_pipelines.cli.core import control_plane, print_table
    from medblocks_pipelines.lib.settings import get_settings

    md = run_backend_sync(
        control_plane(),
        get_settings(),
        tenant,
        org_id,
        full=full,
        timeout=timeout,
        show_progress=True,
        since=since,
        patients=patients,
    )
    rows = [
        [t, f"{n:,}", f"{md['expected_by_type'].get(t, '-')}"]
        for t, n in sorted(md["by_type"].items())
    ]
    print_table(f"landed from {org_id}", ["type", "landed", "manifest"], rows)
    click.echo(
        f"{md['landed']:,} resources, {md['deleted']} deleted, {md['quarantined']} quarantined, "
        f"{md['files']} files / {md['bytes']:,} bytes in {md['duration_s']} s; "
        f"status {md['status']}; next _since {md['watermark']}"
    )
    if md["count_mismatches"]:
        click.secho(
            f"counts differ from the manifest: {json.dumps(md['count_mismatches'])}", fg="yellow"
        )
    if md["error_entries"]:
        click.secho(f"error-file issues: {json.dumps(md['error_entries'])}", fg="yellow")
    if md.get("missing_types"):
        held = (
            "the watermark is held back"
            if md.get("watermark_held_back")
            else "held back; the next sync asks for them again"
        )
        click.secho(
            f"missing types (the server reported them failed): "
            f"{', '.join(md['missing_types'])} ({held})",
            fg="yellow",
        )
    if md.get("attachments"):
        click.echo(
            f"attachments: {md['attachments']} fetched ({md.get('attachments_inlined', 0)} inline), "
            "linked to their DocumentReferences"
        )


# -- keys ------------------------------------------------------------------------------------
@click.group("keys")
def keys() -> None:
    """Our SMART Backend Services signing keys (private halves stay in the vault)."""


def _store() -> Any:
    from medblocks_pipelines.cli.core import control_plane
    from medblocks_pipelines.lib.smart.keys import KeyStore

    return KeyStore(control_plane().vault)


@keys.command("generate")
@click.option("--alg", type=click.Choice(["RS384", "ES384"]), default="RS384", show_default=True)
def keys_generate(alg: str) -> None:
    """Generate a key: active if it is the first, else published as the next key."""
    stored = _store().generate(alg)
    click.echo(f"key {stored.kid} ({alg}) saved as {stored.state}")


@keys.command("jwks")
def keys_jwks() -> None:
    """Print the public JWKS (for servers that take an uploaded key set)."""
    click.echo(json.dumps(_store().jwks(), indent=2))


@keys.command("list")
def keys_list() -> None:
    """List keys and their states (never key material)."""
    from datetime import UTC, datetime

    from medblocks_pipelines.cli.core import print_table

    rows = [
        [
            s.kid,
            s.key.alg,
            s.state,
            datetime.fromtimestamp(s.published_at, UTC).isoformat(timespec="seconds"),
        ]
        for s in _store().all()
    ]
    print_table("signing keys", ["kid", "alg", "state", "published"], rows)


@keys.command("rotate")
@click.option("--alg", type=click.Choice(["RS384", "ES384"]), default=None)
@click.option(
    "--publish-wait",
    default=300.0,
    show_default=True,
    type=float,
    help="Seconds a new key must be published before it signs (JWKS max-age).",
)
def keys_rotate(alg: str | None, publish_wait: float) -> None:
    """One rotation step: publish a new key, or (once published long enough) switch to it."""
    stored = _store().rotate(alg=alg, publish_wait=publish_wait)
    if stored.state == "next":
        click.echo(
            f"key {stored.kid} published; run `keys rotate` again after "
            f"{int(publish_wait)} s to sign with it"
        )
    else:
        click.echo(
            f"key {stored.kid} is now active; the old key is retiring "
            "(remove it with `keys retire KID` once no server needs it)"
        )


@keys.command("retire")
@click.argument("kid")
def keys_retire(kid: str) -> None:
    """Remove a non-active key from the JWKS and the vault."""
    _store().retire(kid)
    click.echo(f"key {kid} retired")
