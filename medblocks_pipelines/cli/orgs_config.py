"""``medblocks orgs show`` and ``medblocks orgs set-config``: an organization's config, shown with
secrets redacted and changed key by key (``orgs add --config`` replaces the whole object).

Keys: docs/CONFIGURATION.md (lib/registry/config_keys.py).
"""

import copy
from typing import Any

import click
import yaml

from medblocks_pipelines.cli.core import control_plane, owned_by
from medblocks_pipelines.lib.errors import ConfigError
from medblocks_pipelines.lib.registry.config_keys import (
    ORGANIZATION_KEYS,
    SOURCE_KEYS,
    is_sensitive,
    redact,
)


def _dump(value: Any) -> str:
    return yaml.safe_dump(redact(value), sort_keys=True, default_flow_style=False).rstrip()


def _echo_config(title: str, config: dict[str, Any]) -> None:
    click.echo(f"{title}:")
    click.echo("  {}" if not config else "\n".join("  " + ln for ln in _dump(config).splitlines()))


@click.command("show")
@click.argument("org_id")
@click.option("--tenant", required=True, help="The tenant the organization belongs to.")
def orgs_show(org_id: str, tenant: str) -> None:
    """Show an organization and its config (secrets redacted)."""
    cp = control_plane()
    org = owned_by(tenant, "organization", org_id, cp.get_organization, listing="orgs list")
    src = cp.get_source(org.source_id)
    for key in ("id", "tenant_id", "source_id", "name"):
        click.echo(f"{key}: {getattr(org, key)}")
    click.echo(f"patterns (of the source): {', '.join(src.patterns or []) or '-'}")
    _echo_config("config", dict(org.config or {}))
    # what the organization inherits (backend keys fall back to the source's)
    inherited = {k: v for k, v in (src.config or {}).items() if k in SOURCE_KEYS}
    _echo_config(f"source {src.id} config", inherited)


def _parse_assignment(item: str) -> tuple[list[str], Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"expected KEY=VALUE, got {key!r}", hint="e.g. attachments=true")
    if any(is_sensitive(part) for part in key.split(".")):
        raise ConfigError(
            f"{key.strip()} looks like a secret: a config is stored unencrypted",
            hint="keep secrets in the vault and name them with a *_secret key "
            "(docs/CONFIGURATION.md)",
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: not a valid value ({exc.__class__.__name__})") from exc
    return key.strip().split("."), value


def merge_config(
    config: dict[str, Any], assignments: list[str], unset: list[str]
) -> dict[str, Any]:
    """``config`` with ``a.b=value`` assignments (values parsed as YAML) set and keys removed."""
    out = copy.deepcopy(config)
    for item in assignments:
        path, value = _parse_assignment(item)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[path[-1]] = value
    for key in unset:
        path = key.split(".")
        node = out
        for part in path[:-1]:
            child = node.get(part)
            node = child if isinstance(child, dict) else {}
        node.pop(path[-1], None)
    return out


@click.command("set-config")
@click.argument("org_id")
@click.argument("assignments", nargs=-1, metavar="KEY=VALUE...")
@click.option("--tenant", required=True, help="The tenant the organization belongs to.")
@click.option("--unset", "unset", multiple=True, metavar="KEY", help="Remove a key. Repeatable.")
def orgs_set_config(
    org_id: str, assignments: tuple[str, ...], tenant: str, unset: tuple[str, ...]
) -> None:
    """Change an organization's config key by key (KEY=VALUE, values as YAML), keeping the rest.

    Example: medblocks orgs set-config --tenant acme mercy attachments=true types=[Patient]
    """
    if not assignments and not unset:
        raise click.UsageError("give KEY=VALUE assignments or --unset KEY")
    cp = control_plane()
    org = owned_by(tenant, "organization", org_id, cp.get_organization, listing="orgs list")
    new = merge_config(dict(org.config or {}), list(assignments), list(unset))
    for top in sorted({a.partition("=")[0].split(".")[0] for a in assignments}):
        if top not in ORGANIZATION_KEYS:
            click.echo(
                f"warning: {top!r} is not an organization config key the code reads "
                "(docs/CONFIGURATION.md); saved anyway",
                err=True,
            )
    cp.update_organization(org_id, config=new)
    _echo_config(f"organization {org_id} config", new)
