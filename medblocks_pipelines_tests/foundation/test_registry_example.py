"""registry.example.yaml applies as it is, and uses only documented config keys."""

from pathlib import Path

import yaml
from click.testing import CliRunner

from medblocks_pipelines.cli import main
from medblocks_pipelines.cli.core import control_plane
from medblocks_pipelines.lib.registry.config_keys import ORGANIZATION_KEYS, SOURCE_KEYS
from medblocks_pipelines.lib.settings import Settings

EXAMPLE = Path(__file__).parents[2] / "registry.example.yaml"


def test_example_registry_applies(settings: Settings) -> None:
    for _ in range(2):  # idempotent
        result = CliRunner().invoke(main, ["registry", "apply", str(EXAMPLE)])
        assert result.exit_code == 0, result.output
        assert result.output == "1 tenants, 3 sources, 2 organizations applied\n"
    cp = control_plane()
    assert cp.get_organization("mercy").config["group_id"] == "acme-cohort"
    assert cp.get_source("qhin").config["gateways"][0]["id"] == "lakeside"
    result = CliRunner().invoke(main, ["orgs", "show", "--tenant", "acme", "mercy"])
    assert result.exit_code == 0 and "backend_client_id: acme-backend" in result.output


def test_example_uses_documented_keys() -> None:
    doc = yaml.safe_load(EXAMPLE.read_text())
    assert {k for s in doc["sources"] for k in s.get("config") or {}} <= set(SOURCE_KEYS)
    assert {k for o in doc["organizations"] for k in o.get("config") or {}} <= set(
        ORGANIZATION_KEYS
    )
