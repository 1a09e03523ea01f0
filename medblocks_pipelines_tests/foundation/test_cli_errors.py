"""A failed run or an unknown partition is one line naming the root cause, and a hint naming a
real command; the stack is behind --verbose."""

import logging
from pathlib import Path

import dagster as dg
import pytest
from click.testing import CliRunner

from medblocks_pipelines.cli import main, runtime
from medblocks_pipelines.cli.core import control_plane
from medblocks_pipelines.cli.run_errors import unknown_partition
from medblocks_pipelines.lib.errors import AuthError, ConfigError, NotFound, RunFailed
from medblocks_pipelines.lib.settings import Settings

TENANTS = dg.DynamicPartitionsDefinition(name="tenants")


@dg.op
def refused(context: dg.OpExecutionContext) -> None:
    context.log.warning("source answered 400 once")
    try:
        raise KeyError("scope")
    except KeyError as exc:
        raise AuthError("token request refused: HTTP 400 invalid_scope", hint="x") from exc


@dg.job(partitions_def=TENANTS)
def tenant_warehouse_job() -> None:
    refused()


@pytest.fixture
def failing_job(settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`warehouse build` runs a job whose step raises AuthError (under Dagster's wrapper)."""
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dh"))
    (tmp_path / "dh").mkdir()
    (tmp_path / "dh" / "dagster.yaml").write_text(runtime.EMBEDDED_DAGSTER_YAML)
    monkeypatch.setattr(
        runtime, "load_definitions", lambda: dg.Definitions(jobs=[tenant_warehouse_job])
    )
    control_plane().add_tenant("acme", "Acme", {})


def test_step_failure_is_one_line_with_the_root_cause(
    failing_job: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    result = CliRunner().invoke(main, ["warehouse", "build", "--tenant", "acme"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert lines[-2] == "error: AuthError: token request refused: HTTP 400 invalid_scope"
    assert lines[-1].startswith("hint: the run's logs: `make ui`") and "--verbose" in lines[-1]
    # Dagster's wrapper and the stack stay out of the terminal
    for noise in ("DagsterExecutionStepExecutionError", "Traceback", "Stack Trace", "KeyError"):
        assert noise not in result.output
    # the run's own warning is repeated as one line
    assert [r.getMessage() for r in caplog.records if r.name == "medblocks_pipelines.cli"] == [
        "refused: source answered 400 once"
    ]


def test_verbose_raises_the_run_failure(failing_job: None) -> None:
    result = CliRunner().invoke(main, ["--verbose", "warehouse", "build", "--tenant", "acme"])
    assert isinstance(result.exception, RunFailed)
    assert str(result.exception) == "AuthError: token request refused: HTTP 400 invalid_scope"


def test_unknown_tenant_partition_is_one_line(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dh"))
    (tmp_path / "dh").mkdir()
    (tmp_path / "dh" / "dagster.yaml").write_text(runtime.EMBEDDED_DAGSTER_YAML)
    result = CliRunner().invoke(main, ["warehouse", "build", "--tenant", "nope"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "error: tenant nope is not in the registry",
        "hint: list them: medblocks tenants list (add one: medblocks tenants add ID --name N)",
    ]


def test_unknown_partition_names_the_missing_entry(settings: Settings) -> None:
    cp = control_plane()
    cp.add_tenant("acme", "Acme", {})
    cp.add_tenant("other", "Other", {})
    cp.add_source("mercy-ehr", "Mercy", "epic", "ehr", None, ["backend"], {})
    cp.add_organization("mercy", "other", "mercy-ehr", "Mercy", {})
    err = unknown_partition(cp, "backend_orgs", "acme.mercy")  # another tenant's org
    assert isinstance(err, NotFound)
    assert str(err) == "organization mercy not found for tenant acme"
    assert err.hint == "list them: medblocks orgs list --tenant acme"
    err = unknown_partition(cp, "clinician_orgs", "other.mercy")
    assert isinstance(err, ConfigError) and "clinician_workflow" in str(err)
    err = unknown_partition(cp, "patient_access_sources", "acme.nope")
    assert str(err) == "source nope is not in the registry"
    assert err.hint == "list them: medblocks sources list"
    err = unknown_partition(cp, "patient_access_sources", "acme.mercy-ehr")
    assert isinstance(err, ConfigError) and "not a patient-access source" in str(err)


def test_unknown_org_of_an_import_names_the_tenants_listing(
    settings: Settings, tmp_path: Path
) -> None:
    control_plane().add_tenant("acme", "Acme", {})
    result = CliRunner().invoke(
        main,
        ["sync", "import-ndjson", "--tenant", "acme", "--org", "nope", "--path", str(tmp_path)],
    )
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "error: organization nope not found for tenant acme",
        "hint: list them: medblocks orgs list --tenant acme",
    ]
