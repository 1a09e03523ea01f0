"""The ``medblocks-sandbox`` command (also ``python -m medblocks_sandbox``): the dev tools.

    medblocks-sandbox serve [--port 8800] [--persons 100] [--profile ORG=PROFILE]   simulators
    medblocks-sandbox generate --persons 500 --out data/sandbox                  synthetic data
    medblocks-sandbox cds fire --hook patient-view --org ORG --patient P ...     a CDS Hooks call
    medblocks-sandbox consent connect URL --username U --password P            a patient consents
    medblocks-sandbox consent revoke --admin-url URL --client-id C --patient P  ... and revokes
    medblocks-sandbox demo                                          every pattern end to end

Not part of the product wheel: installed from ``medblocks_sandbox/pyproject.toml`` by the dev
setup (``make setup``). Errors print one line plus a hint and exit non-zero.
"""

import json
import os
import sys
from typing import Any

import click
import httpx
from rich.console import Console
from rich.table import Table

from medblocks_sandbox.cds_ehr.orders import demo_orders
from medblocks_sandbox.errors import SandboxConfigError, SandboxError
from medblocks_sandbox.generator.cli import generate

console = Console()


class SandboxGroup(click.Group):
    """A group that turns the sandbox's own errors into one line + hint instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as exc:
            # Ours, or the product's own errors from the demo (they carry a `hint` too).
            if not isinstance(exc, SandboxError) and not hasattr(exc, "hint"):
                raise
            click.secho(f"error: {exc}", fg="red", err=True)
            hint = getattr(exc, "hint", None)
            if hint:
                click.echo(f"hint: {hint}", err=True)
            sys.exit(1)


@click.group(cls=SandboxGroup)
def main() -> None:
    """medblocks_sandbox: the spec-faithful simulators, the generator and the demo (dev tools)."""


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option(
    "--port",
    "base_port",
    default=8800,
    show_default=True,
    type=int,
    help="First port; each sandbox server takes the next one.",
)
@click.option(
    "--persons", default=100, show_default=True, type=int, help="Size of the synthetic population."
)
@click.option("--seed", default=42, show_default=True, type=int)
@click.option(
    "--profile",
    "profiles",
    multiple=True,
    metavar="ORG=PROFILE",
    help="Vendor profile of an org: strict (default), epic or oracle. Repeatable.",
)
def serve(host: str, base_port: int, persons: int, seed: int, profiles: tuple[str, ...]) -> None:
    """Start the spec-faithful sandbox (EHRs, payer, gateway, CDS-calling EHR) on loopback."""
    import signal
    import time

    from medblocks_sandbox.run import start_sandbox

    chosen: dict[str, str] = {}
    for item in profiles:
        org, sep, name = item.partition("=")
        if not sep:
            raise SandboxConfigError("--profile takes ORG=PROFILE, e.g. lakeside-clinic=oracle")
        chosen[org] = name
    handle = start_sandbox(
        host=host, base_port=base_port, persons=persons, seed=seed, profiles=chosen
    )
    table = Table(title=f"sandbox: {persons} persons, started in {handle.started_in:.1f}s")
    for col in ("role", "org", "kind", "url"):
        table.add_column(col, overflow="fold")
    for row in handle.describe():
        table.add_row(row["role"], row["org"] or "-", row["kind"] or "-", row["url"])
    console.print(table)
    click.echo(
        "Admin API: header X-Admin-Secret on {org}/_admin/*; choose the secret by setting "
        "MEDBLOCKS_SANDBOX_ADMIN_SECRET before starting."
    )
    click.echo("Ctrl-C to stop.")

    def _terminate(_signum: int, _frame: object) -> None:
        # A service manager's SIGTERM stops the servers as cleanly as Ctrl-C does.
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        handle.stop()


@main.command()
@click.option("--persons", default=60, show_default=True, type=int)
@click.option("--seed", default=42, show_default=True, type=int)
@click.option(
    "--fresh/--keep", default=True, show_default=True, help="Start from an empty data folder."
)
def demo(persons: int, seed: int, fresh: bool) -> None:
    """Run every pattern of the product end to end against the sandbox and print what landed."""
    # The one command that drives the product: imported here so the rest works without it.
    from medblocks_sandbox.drivers.demo import run_demo

    run_demo(persons=persons, seed=seed, fresh=fresh, console=console)


@click.group("cds")
def cds() -> None:
    """CDS Hooks: drive the sandbox EHR's CDS client against a CDS service."""


@cds.command("fire")
@click.option(
    "--hook",
    type=click.Choice(["patient-view", "order-select", "order-sign"]),
    default="patient-view",
    show_default=True,
)
@click.option("--org", "org_id", required=True, help="Sandbox EHR organization calling.")
@click.option("--patient", required=True, help="Patient id at that organization.")
@click.option(
    "--service-base",
    default="http://127.0.0.1:8000",
    show_default=True,
    help="Base URL of the CDS service (the product's `medblocks serve`).",
)
@click.option(
    "--sandbox-url",
    envvar="MEDBLOCKS_CDS_EHR_URL",
    required=True,
    help="Base URL of the sandbox cds_ehr role.",
)
@click.option(
    "--prefetch",
    "prefetch_mode",
    default="fill",
    show_default=True,
    type=click.Choice(["fill", "omit", "null", "outcome"]),
)
@click.option(
    "--orders",
    "orders_file",
    type=click.Path(exists=True, dir_okay=False),
    help="JSON list of draft orders (default: the demo's HbA1c, lipid panel, amoxicillin).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the raw response.")
def cds_fire(
    hook: str,
    org_id: str,
    patient: str,
    service_base: str,
    sandbox_url: str,
    prefetch_mode: str,
    orders_file: str | None,
    as_json: bool,
) -> None:
    """Fire one hook from the sandbox EHR and print the cards."""
    secret = os.environ.get("MEDBLOCKS_SANDBOX_ADMIN_SECRET")
    if not secret:
        raise SandboxConfigError(
            "MEDBLOCKS_SANDBOX_ADMIN_SECRET is not set",
            hint="use the admin secret the sandbox was started with",
        )
    orders: list[Any] = []
    if hook != "patient-view":
        if orders_file:
            with open(orders_file, encoding="utf-8") as fh:
                orders = json.load(fh)
        else:
            orders = demo_orders(patient)
    body = {
        "org": org_id,
        "service_base": service_base,
        "hook": hook,
        "patient": patient,
        "orders": orders,
        "prefetch_mode": prefetch_mode,
    }
    resp = httpx.post(
        f"{sandbox_url.rstrip('/')}/_admin/fire",
        json=body,
        timeout=60.0,
        headers={"X-Admin-Secret": secret},
    )
    if resp.status_code != 200:
        raise click.ClickException(f"sandbox answered {resp.status_code}: {resp.text[:200]}")
    answer = resp.json()
    if as_json:
        click.echo(json.dumps(answer["body"], indent=2))
        return
    click.echo(f"{hook}: HTTP {answer['status']}")
    body_out = answer["body"]
    if answer["status"] != 200:
        click.echo(f"  refused: {body_out.get('error')}: {body_out.get('detail')}")
        return
    for card in body_out.get("cards", []):
        click.secho(f"[{card['indicator']}] {card['summary']}", bold=True)
        for line in str(card.get("detail", "")).splitlines():
            if line.strip():
                click.echo(f"    {line}")
        for s in card.get("suggestions", []):
            click.echo(f"    suggestion: {s['label']}")
    if not body_out.get("cards"):
        click.echo("  no cards")


@click.group("consent")
def consent() -> None:
    """Play the patient: go through a source's consent pages, or revoke the app in its portal."""


@consent.command("connect")
@click.argument("connect_url")
@click.option("--username", required=True, help="A portal login of the sandbox population.")
@click.option("--password", required=True)
@click.option("--deny", is_flag=True, help="Press Deny on the consent page.")
@click.option("--uncheck", "uncheck", multiple=True, help="Take a scope off before approving.")
@click.option("--stop-at", help="The tenant's return URL prefix (the browser stops there).")
def consent_connect(
    connect_url: str,
    username: str,
    password: str,
    deny: bool,
    uncheck: tuple[str, ...],
    stop_at: str | None,
) -> None:
    """Open a connect link (`medblocks connections link`) and log in and consent like a patient."""
    from medblocks_sandbox.consent_browser import connect_via_consent_page

    outcome = connect_via_consent_page(
        connect_url,
        username=username,
        password=password,
        approve=not deny,
        uncheck_scopes=uncheck,
        stop_at=stop_at,
    )
    click.echo(
        f"status {outcome.status} connection {outcome.connection_id or '-'} "
        f"reason {outcome.reason or '-'} after {outcome.pages} pages"
    )
    if (outcome.status == "active") == deny:  # approved but not active, or denied yet active
        sys.exit(1)


@consent.command("revoke")
@click.option("--admin-url", required=True, help="The organization's admin API ({org}/_admin).")
@click.option("--client-id", required=True, help="The app the patient revokes.")
@click.option("--patient", required=True, help="The patient id at that organization.")
def consent_revoke(admin_url: str, client_id: str, patient: str) -> None:
    """Revoke the app's grant in the sandbox portal (its next token refresh gets invalid_grant)."""
    from medblocks_sandbox.ehr_common import ADMIN_HEADER

    secret = os.environ.get("MEDBLOCKS_SANDBOX_ADMIN_SECRET")
    if not secret:
        raise SandboxConfigError(
            "MEDBLOCKS_SANDBOX_ADMIN_SECRET is not set",
            hint="use the admin secret the sandbox was started with",
        )
    resp = httpx.post(
        f"{admin_url.rstrip('/')}/revoke-grant",
        json={"client_id": client_id, "patient": patient},
        headers={ADMIN_HEADER: secret},
        timeout=20.0,
    )
    if resp.status_code != 200:
        raise click.ClickException(f"sandbox answered {resp.status_code}: {resp.text[:200]}")
    revoked = int(resp.json().get("revoked", 0))
    if not revoked:
        raise SandboxError(
            "no grant of that client for that patient", hint="check --client-id and --patient"
        )
    click.echo(f"revoked {revoked} grant(s)")


main.add_command(generate, "generate")
main.add_command(cds, "cds")
main.add_command(consent, "consent")
