"""Patient-access commands, and a consent-page driver for the demo and the tests.

    medblocks connections link --tenant T --patient-ref P --source S [--return-url URL]
    medblocks connections revoke ID --tenant T [--delete-data/--keep-data]
    medblocks connections refresh ID --tenant T
    medblocks sync patient-access --tenant T --source S [--all] [--in-process]

:func:`connect_via_consent_page` plays the patient's browser: it opens a connect link, follows the
redirects to the source's real login and consent pages, fills and submits their HTML forms, and
follows the redirect back to our callback. Nothing goes around the authorization server.
"""

import contextlib
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import click
import httpx
import lxml.html

from medblocks_pipelines.lib.errors import MedblocksError, ProtocolError, PullsFailed
from medblocks_pipelines.lib.partitions import partition_key

DEFAULT_PUBLIC_BASE = "http://127.0.0.1:8000"


# ---------------------------------------------------------------------------------------------
# the consent-page driver
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ConsentOutcome:
    """Where the browser ended: our callback's verdict and the tenant return URL it sent us to."""

    connection_id: str | None
    status: str  # active | failed | refused (our callback refused the response) | error
    reason: str | None
    final_url: str
    pages: int


def _forms(page: httpx.Response) -> list[Any]:
    doc = lxml.html.document_fromstring(page.text)
    return list(doc.forms)


def _submit(
    client: httpx.Client,
    page: httpx.Response,
    *,
    button: str | None,
    values: dict[str, str],
    uncheck: Iterable[str] = (),
) -> httpx.Response:
    forms = _forms(page)
    if not forms:
        raise ProtocolError(f"expected an HTML form at {urllib.parse.urlsplit(str(page.url)).path}")
    form = forms[0]
    fields: list[tuple[str, str]] = []
    drop = set(uncheck)
    for el in form.inputs:
        name = el.get("name")
        if not name:
            continue
        kind = (el.get("type") or "text").lower()
        if kind in ("submit", "button"):
            continue
        if kind == "checkbox":
            if el.checked and el.get("value") not in drop:
                fields.append((name, el.get("value") or "on"))
            continue
        if name in values:
            fields.append((name, values[name]))
        elif kind == "hidden":
            fields.append((name, el.get("value") or ""))
    if button is not None:
        fields.append(("decision", button))
    action = urllib.parse.urljoin(str(page.url), form.get("action") or str(page.url))
    method = (form.get("method") or "get").upper()
    if method == "POST":
        return client.post(
            action,
            content=fields_to_body(fields),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
    return client.get(action, params=urllib.parse.urlencode(fields))


def fields_to_body(fields: list[tuple[str, str]]) -> bytes:
    """Form-encode repeated fields (checkbox lists) in order."""
    return urllib.parse.urlencode(fields).encode()


def connect_via_consent_page(
    connect_url: str,
    *,
    username: str,
    password: str,
    approve: bool = True,
    uncheck_scopes: Sequence[str] = (),
    http: httpx.Client | None = None,
    stop_at: str | None = None,
    tamper: Any = None,
    max_steps: int = 20,
) -> ConsentOutcome:
    """Open ``connect_url`` and go through the source's real login and consent pages.

    ``approve=False`` presses Deny on the consent page. ``uncheck_scopes`` takes scopes off before
    approving (the granted set then differs from the request). ``stop_at`` is the tenant's return
    URL prefix: the driver stops there instead of fetching it (default: stop at the first redirect
    that leaves our callback). ``tamper(url) -> url`` may rewrite the redirect to our callback (tests
    of state mismatch and replays).
    """
    own = http is None
    client = http or httpx.Client(timeout=30.0)
    pages = 0
    try:
        resp = client.get(connect_url)
        callback_seen = False
        for _ in range(max_steps):
            pages += 1
            if resp.is_redirect:
                location = urllib.parse.urljoin(str(resp.url), resp.headers["location"])
                if callback_seen or (stop_at and location.startswith(stop_at)):
                    return _outcome(location, pages, "active")
                if "/connect/callback" in urllib.parse.urlsplit(location).path:
                    callback_seen = True
                    if tamper is not None:
                        location = tamper(location)
                resp = client.get(location)
                continue
            if callback_seen:
                # Our callback answered with a page (no return URL, or a refusal).
                status = (
                    "active"
                    if resp.status_code == 200
                    else ("refused" if "not valid" in resp.text else "failed")
                )
                return ConsentOutcome(
                    None, status, None if status == "active" else "page", str(resp.url), pages
                )
            forms = _forms(resp) if "html" in resp.headers.get("content-type", "") else []
            if not forms:
                return ConsentOutcome(
                    None, "error", f"http_{resp.status_code}", str(resp.url), pages
                )
            names = {el.get("name") for el in forms[0].inputs}
            if "password" in names:
                resp = _submit(
                    client,
                    resp,
                    button="login",
                    values={"username": username, "password": password},
                )
            elif "consent_token" in names:
                resp = _submit(
                    client,
                    resp,
                    button="approve" if approve else "deny",
                    values={},
                    uncheck=uncheck_scopes,
                )
            else:
                # Our auto-submitting POST authorization form (long scope lists).
                resp = _submit(client, resp, button=None, values={})
        raise ProtocolError("consent flow did not finish")
    finally:
        if own:
            client.close()


def _outcome(url: str, pages: int, default: str) -> ConsentOutcome:
    query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
    return ConsentOutcome(
        query.get("connection_id"), query.get("status", default), query.get("reason"), url, pages
    )


def connect_patients(
    cp: Any,
    *,
    tenant_id: str,
    source_id: str,
    logins: Iterable[Any],
    public_base_url: str,
    return_url: str = "https://app.example/connected",
    http: httpx.Client | None = None,
) -> list[ConsentOutcome]:
    """Connect several patients through the real consent page (demo helper).

    ``logins`` are the sandbox's portal logins (``pop.logins`` filtered to the source's org: objects
    with ``username``, ``password`` and ``patient_id``). Our web app must be serving at
    ``public_base_url`` (its ``/connect/callback`` is the redirect URI registered at the source).
    """
    from medblocks_pipelines.lib.smart.launch import create_connect_link

    out = []
    for login in logins:
        link = create_connect_link(
            cp,
            tenant_id=tenant_id,
            source_id=source_id,
            patient_ref=f"ref-{login.patient_id}",
            public_base_url=public_base_url,
            return_url=return_url,
        )
        out.append(
            connect_via_consent_page(
                link.url,
                username=login.username,
                password=login.password,
                stop_at=return_url,
                http=http,
            )
        )
    return out


def simulate_portal_revocation(sandbox: Any, cp: Any, connection_id: str) -> str:
    """Demo helper: the patient revokes our app in the sandbox portal; we find out on refresh.

    Revokes the connection's grant at the sandbox (admin API, as the portal would), then asks for a
    token refresh as the next pull would: the source answers ``invalid_grant`` and the connection
    becomes ``refresh_failed`` (with an event and a ``connection.refresh_failed`` outbox row).
    Returns the connection's new state.
    """
    from medblocks_pipelines.lib.errors import AuthError
    from medblocks_pipelines.lib.smart.tokens import TokenManager

    conn = cp.get_connection(connection_id)
    source = cp.get_source(conn["source_id"])
    org = next(o for o in sandbox.orgs if o.fhir_base == source["fhir_base_url"].rstrip("/"))
    sandbox.admin(
        org.org_id,
        "revoke-grant",
        {"client_id": source["config"]["client_id"], "patient": conn["source_patient_id"]},
    )
    with httpx.Client(timeout=20.0) as http:
        manager = TokenManager(cp, connection_id, http=http)
        # Expected to raise: the refresh is refused and the connection moves to refresh_failed.
        with contextlib.suppress(AuthError):
            manager.force_refresh()
    return str(cp.get_connection(connection_id)["state"])


# ---------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------
@click.command()
@click.option("--tenant", required=True)
@click.option("--patient-ref", required=True, help="The tenant's own id for the patient.")
@click.option("--source", required=True)
@click.option("--return-url", help="Where the patient's browser goes after the consent.")
@click.option(
    "--public-base-url",
    envvar="MEDBLOCKS_PUBLIC_BASE_URL",
    default=DEFAULT_PUBLIC_BASE,
    show_default=True,
    help="How browsers reach `medblocks serve`.",
)
def connections_link(
    tenant: str, patient_ref: str, source: str, return_url: str | None, public_base_url: str
) -> None:
    """Create a pending connection and print the link the patient opens to connect."""
    from medblocks_pipelines.cli.core import control_plane
    from medblocks_pipelines.lib.smart.launch import create_connect_link

    link = create_connect_link(
        control_plane(),
        tenant_id=tenant,
        source_id=source,
        patient_ref=patient_ref,
        public_base_url=public_base_url,
        return_url=return_url,
    )
    click.echo(
        f"connection {link.connection_id} (pending, link valid until "
        f"{link.expires_at:%Y-%m-%d %H:%M} UTC)"
    )
    click.echo(link.url)


@click.command()
@click.argument("connection_id")
@click.option("--tenant", required=True, help="The tenant the connection belongs to.")
@click.option(
    "--delete-data/--keep-data",
    default=None,
    help="Delete the connection's data from the lake and warehouse (default: the "
    "tenant's delete_on_revoke setting).",
)
def connections_revoke(connection_id: str, tenant: str, delete_data: bool | None) -> None:
    """Revoke a connection: pulls stop, tokens are revoked and destroyed, data optionally deleted."""
    from medblocks_pipelines.cli.core import control_plane, owned_by
    from medblocks_pipelines.lib.fhir.pull import revoke_connection
    from medblocks_pipelines.lib.settings import get_settings

    cp = control_plane()
    owned_by(tenant, "connection", connection_id, cp.get_connection)
    settings = get_settings()
    result = revoke_connection(cp, connection_id, lake_root=settings.lake, delete_data=delete_data)
    click.echo(
        f"connection {connection_id} revoked"
        + (" (also at the source)" if result.revoked_at_source else "")
    )
    if result.delete_data:
        click.echo(f"{result.rows_deleted} landed rows deleted")
        if result.rows_deleted:
            from medblocks_pipelines.lib.warehouse.build import build_warehouse

            build = build_warehouse(tenant, settings=settings, control_plane=cp)
            click.echo(
                f"warehouse of {tenant} rebuilt: {build.table_counts.get('resources', 0)} resources"
            )


@click.command()
@click.argument("connection_id")
@click.option("--tenant", required=True, help="The tenant the connection belongs to.")
def connections_refresh(connection_id: str, tenant: str) -> None:
    """Refresh a connection's access token now (rotation stored atomically)."""
    from medblocks_pipelines.cli.core import control_plane, owned_by
    from medblocks_pipelines.lib.smart.tokens import TokenManager

    cp = control_plane()
    owned_by(tenant, "connection", connection_id, cp.get_connection)
    with httpx.Client(timeout=20.0) as http:
        manager = TokenManager(cp, connection_id, http=http)
        # Even if the token is far from expiry (event reason: forced).
        manager.force_refresh()
    conn = cp.get_connection(connection_id)
    click.echo(f"connection {connection_id} refreshed; token expires {conn['token_expires_at']}")


@click.command()
@click.option("--tenant", required=True)
@click.option("--source", required=True)
@click.option(
    "--all", "all_active", is_flag=True, help="Pull every active connection, not only those due."
)
@click.option("--full", is_flag=True, help="Ignore the incremental watermark.")
@click.option(
    "--in-process/--dagster",
    default=False,
    show_default=True,
    help="Run the pull directly instead of as a Dagster run.",
)
def sync_patient_access(
    tenant: str, source: str, all_active: bool, full: bool, in_process: bool
) -> None:
    """Pull the tenant's patient-access connections at one source into the lake."""
    from medblocks_pipelines.cli.core import control_plane

    cp = control_plane()
    key = partition_key(tenant, source)
    if not in_process:
        from datetime import UTC, datetime

        from medblocks_pipelines.cli.runtime import run_job

        started = datetime.now(UTC)
        tags = {"medblocks/tenant": tenant, "medblocks/source": source}
        try:
            result = run_job(
                "patient_access_pull_job",
                partition_key=key,
                run_config={
                    "ops": {
                        "patient_access__records": {
                            "config": {"all_active": all_active, "full": full}
                        }
                    }
                },
                tags=tags,
            )
        except MedblocksError:
            # The run failed: still show what each pull did before the error line.
            _echo_run_pulls(cp, tenant, _run_since(cp, tenant, source, started))
            raise
        rows = _echo_run_pulls(cp, tenant, result.run_id)
        click.echo(f"run {result.run_id[:8]} succeeded ({_summary(rows)})")
        return
    import uuid

    from medblocks_pipelines.lib.fhir.pull import due_connections, pull_batch
    from medblocks_pipelines.lib.fhir.pull_report import render_table, row_from_result
    from medblocks_pipelines.lib.settings import get_settings

    if all_active:
        ids = [
            c["id"]
            for c in cp.list_connections(
                tenant_id=tenant, pattern="patient_access", state="active", source_id=source
            )
        ]
    else:
        ids = due_connections(cp, tenant_id=tenant, source_id=source)
    if not ids:
        click.echo("no connections due")
        return
    batch = pull_batch(
        cp,
        ids,
        lake_root=get_settings().lake,
        run_id=f"cli-{uuid.uuid4().hex[:12]}",
        full=full,
    )
    meta = batch.as_metadata()
    click.echo(
        f"{meta['connections_pulled']} connections: {meta['by_status']}, "
        f"{meta['resources']} resources, {meta['quarantined']} quarantined"
    )
    rows = [row_from_result(r) for r in batch.results]
    click.echo(render_table(rows))
    if meta["failures_by_reason"]:
        click.echo(f"failures: {meta['failures_by_reason']}")
    if meta["anomalies"]:
        click.echo(f"anomalies: {meta['anomalies']}")
    for res in batch.results:
        for note in res.anomaly_notes[:5]:
            click.echo(f"  {res.connection_id}: {note}")
    if batch.all_failed:
        raise PullsFailed(f"every pull failed: {_summary(rows)}")


def _summary(rows: Sequence[Any]) -> str:
    from medblocks_pipelines.lib.fhir.pull_report import summary_line

    return summary_line(rows)


def _run_since(cp: Any, tenant: str, source: str, started: Any) -> str | None:
    """The run id of this command's failed run: its pulls of ``source`` started after us."""
    for pull in cp.list_pulls(tenant_id=tenant, limit=50):
        began = pull.get("started_at")
        if began is not None and began.tzinfo is None:
            began = began.replace(tzinfo=started.tzinfo)
        if pull["source_id"] == source and began is not None and began >= started:
            return str(pull["run_id"])
    return None


def _echo_run_pulls(cp: Any, tenant: str, run_id: str | None) -> list[Any]:
    """Print the per-connection table of one run's pulls (from pull history); returns the rows."""
    from medblocks_pipelines.lib.fhir.pull_report import anomaly_totals, render_table, run_rows

    rows = run_rows(cp, tenant_id=tenant, run_id=run_id) if run_id else []
    if rows:
        click.echo(render_table(rows))
        anomalies = anomaly_totals(rows)
        if anomalies:
            click.echo(f"anomalies: {anomalies}")
        for row in rows:
            if row.error and " | " in row.error:
                click.echo(f"  {row.connection_id}: {row.error.split(' | ', 1)[1]}")
    return rows


__all__ = [
    "ConsentOutcome",
    "connect_patients",
    "connect_via_consent_page",
    "connections_link",
    "connections_refresh",
    "connections_revoke",
    "simulate_portal_revocation",
    "sync_patient_access",
]
