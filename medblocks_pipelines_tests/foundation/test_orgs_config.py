"""`medblocks orgs show` (config with secrets redacted) and `medblocks orgs set-config` (merges
key by key, `--unset`), both scoped to the organization's tenant."""

import pytest
from click.testing import CliRunner

from medblocks_pipelines.cli import main
from medblocks_pipelines.cli.core import control_plane
from medblocks_pipelines.lib.registry import ControlPlane
from medblocks_pipelines.lib.settings import Settings


@pytest.fixture
def cp(settings: Settings) -> ControlPlane:
    cp = control_plane()
    cp.add_tenant("acme", "Acme", {})
    cp.add_tenant("other", "Other", {})
    cp.add_source(
        "mercy-ehr", "Mercy", "epic", "ehr", None, ["backend"], {"backend_client_id": "ours"}
    )
    cp.add_organization(
        "mercy",
        "acme",
        "mercy-ehr",
        "Mercy General",
        {
            "group_id": "g1",
            "cds": {"iss": "https://ehr.example", "jwks": {"kty": "EC", "d": "PRIVATE", "x": "X"}},
            "password": "hunter2",
        },
    )
    return cp


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def test_show_redacts_secrets(cp: ControlPlane) -> None:
    code, out = _run("orgs", "show", "--tenant", "acme", "mercy")
    assert code == 0, out
    assert "group_id: g1" in out and "iss: https://ehr.example" in out
    assert "backend_client_id: ours" in out  # what it inherits from its source
    assert "x: X" in out  # a public JWK member stays
    assert "PRIVATE" not in out and "hunter2" not in out
    assert out.count("'***'") == 2


def test_set_config_merges_and_unsets(cp: ControlPlane) -> None:
    code, out = _run(
        "orgs",
        "set-config",
        "--tenant",
        "acme",
        "mercy",
        "attachments=true",
        "types=[Patient, Observation]",
        "cds.tenant=t1",
        "--unset",
        "group_id",
    )
    assert code == 0, out
    config = cp.get_organization("mercy").config
    assert config["attachments"] is True
    assert config["types"] == ["Patient", "Observation"]
    assert config["cds"]["iss"] == "https://ehr.example" and config["cds"]["tenant"] == "t1"
    assert "group_id" not in config
    assert config["password"] == "hunter2"  # untouched keys are kept
    assert "hunter2" not in out


def test_set_config_warns_on_unknown_and_refuses_secrets(cp: ControlPlane) -> None:
    result = CliRunner().invoke(
        main, ["orgs", "set-config", "--tenant", "acme", "mercy", "atachments=true"]
    )
    assert result.exit_code == 0
    assert "warning: 'atachments' is not an organization config key" in result.output
    code, out = _run("orgs", "set-config", "--tenant", "acme", "mercy", "client_secret=s3cr3t")
    assert code == 1 and out.startswith("error: client_secret looks like a secret")
    assert "s3cr3t" not in str(cp.get_organization("mercy").config)


def test_another_tenants_org_is_not_found(cp: ControlPlane) -> None:
    for args in (("show",), ("set-config", "level=system")):
        code, out = _run("orgs", args[0], "--tenant", "other", "mercy", *args[1:])
        assert code == 1
        assert out.splitlines() == [
            "error: organization mercy not found for tenant other",
            "hint: list them: medblocks orgs list --tenant other",
        ]
    assert cp.get_organization("mercy").config.get("level") is None
