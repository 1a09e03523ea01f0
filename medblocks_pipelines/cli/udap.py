"""``medblocks network udap ...``: our UDAP client certificate and registrations.

Issuance and renewal (see docs/OPERATIONS.md): ``keygen`` makes the key inside the vault, ``csr``
writes a CSR for it (SAN URIs: one per exchange purpose, ``https://.../udap/acme#T-TREAT``), the
QHIN/RCE CA signs it out of band, ``install`` stores the issued chain (checked against the key),
``status`` shows expiry, chain validation to a trust anchor and revocation. ``registrations``
lists the clients registered at responding nodes (stored per node, community and purpose).
"""

import json
from datetime import UTC, datetime
from pathlib import Path

import click
import httpx

from medblocks_pipelines.lib.errors import AuthError, ConfigError


@click.group("network")
def network() -> None:
    """Exchange-network administration (UDAP certificates and registrations)."""


@network.group("udap")
def udap() -> None:
    """UDAP client certificate (TEFCA Facilitated FHIR) and registrations."""


@udap.command("keygen")
@click.option("--identity", required=True, help="Name of our UDAP identity (e.g. the tenant).")
@click.option("--kind", type=click.Choice(["rsa", "ec", "ec384"]), default="rsa", show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing key (a new certificate follows).")
def keygen(identity: str, kind: str, force: bool) -> None:
    """Make a new private key inside the vault (it is never printed or written to a file)."""
    from medblocks_pipelines.cli.core import control_plane
    from medblocks_pipelines.lib.network.udap.certs import generate_key, key_secret, store_key

    cp = control_plane()
    if cp.vault.get(key_secret(identity)) is not None and not force:
        raise ConfigError(
            f"identity {identity!r} already has a key", hint="pass --force to replace"
        )
    store_key(cp.vault, identity, generate_key(kind))
    click.echo(f"key for UDAP identity {identity!r} stored in the vault ({kind})")


@udap.command("csr")
@click.option("--identity", required=True)
@click.option(
    "--san", "sans", multiple=True, help="SAN URI (repeatable); default: the current cert's."
)
@click.option("--cn", default=None, help="Subject common name (default: the identity).")
@click.option(
    "--out", type=click.Path(dir_okay=False), default=None, help="Write here, else stdout."
)
def csr(identity: str, sans: tuple[str, ...], cn: str | None, out: str | None) -> None:
    """Write a CSR for the key in the vault (issuance, or renewal keeping the key)."""
    from medblocks_pipelines.cli.core import control_plane
    from medblocks_pipelines.lib.network.udap.certs import VaultSigner, csr_for

    cp = control_plane()
    uris = list(sans) or VaultSigner(cp.vault, identity).san_uris()
    pem = csr_for(cp.vault, identity, uris, cn or identity)
    if out:
        Path(out).write_bytes(pem)
        click.echo(f"CSR written to {out} ({len(uris)} SAN URIs)")
    else:
        click.echo(pem.decode(), nl=False)


@udap.command("install")
@click.option("--identity", required=True)
@click.option("--chain", "chain_file", required=True, type=click.Path(exists=True, dir_okay=False))
def install(identity: str, chain_file: str) -> None:
    """Store the issued certificate chain (PEM, leaf first) for the key in the vault."""
    from medblocks_pipelines.cli.core import control_plane
    from medblocks_pipelines.lib.network.udap.certs import store_chain

    store_chain(control_plane().vault, identity, Path(chain_file).read_bytes())
    click.echo(f"certificate chain installed for UDAP identity {identity!r}")


@udap.command("status")
@click.option("--identity", required=True)
@click.option(
    "--anchor",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Trust anchor PEM to validate the chain against (and check CRLs).",
)
@click.option("--warn-days", default=30, show_default=True, type=int)
@click.option("--json", "as_json", is_flag=True)
def status(identity: str, anchor: str | None, warn_days: int, as_json: bool) -> None:
    """Subject, SAN URIs, expiry and (with --anchor) chain validation and revocation."""
    from medblocks_pipelines.cli.core import control_plane
    from medblocks_pipelines.lib.network.udap.certs import (
        CrlChecker,
        VaultSigner,
        load_pem_chain,
        verify_chain,
    )

    signer = VaultSigner(control_plane().vault, identity)
    chain = signer.chain()
    leaf = chain[0]
    days = (leaf.not_valid_after_utc - datetime.now(UTC)).days
    out: dict[str, object] = {
        "identity": identity,
        "subject": leaf.subject.rfc4514_string(),
        "san_uris": signer.san_uris(),
        "not_after": leaf.not_valid_after_utc.isoformat(),
        "days_left": days,
        "renew": signer.expires_within(warn_days),
    }
    if anchor:
        with httpx.Client() as http:
            try:
                verify_chain(chain, load_pem_chain(Path(anchor).read_bytes()), crl=CrlChecker(http))
                out["chain"] = "valid"
            except AuthError as exc:
                out["chain"] = str(exc)
    if as_json:
        click.echo(json.dumps(out))
        return
    for k, v in out.items():
        click.echo(f"{k}: {v}")


@udap.command("registrations")
@click.option("--network", "network_id", required=True, help="Network source id.")
def registrations(network_id: str) -> None:
    """Clients registered at responding nodes (node, community, purpose, client_id)."""
    from medblocks_pipelines.cli.core import control_plane, print_table
    from medblocks_pipelines.lib.network.udap.registration import RegistrationStore

    regs = RegistrationStore(control_plane().vault).list(network_id)
    rows = [[r.node, r.community, r.purpose, r.client_id] for r in regs]
    print_table(
        f"UDAP registrations of {network_id}", ["node", "community", "purpose", "client_id"], rows
    )
