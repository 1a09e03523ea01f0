"""The `medblocks` CLI: registry commands, import + warehouse through the Dagster job, read-only
queries, and errors as one line plus a hint with a non-zero exit."""

import json
from pathlib import Path

from click.testing import CliRunner

from medblocks_pipelines.cli import main
from medblocks_pipelines.lib.settings import Settings


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def test_registry_import_build_query(settings: Settings, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dh"))
    (tmp_path / "dh").mkdir()
    (tmp_path / "dh" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    reg = tmp_path / "registry.yaml"
    reg.write_text(
        "tenants: [{id: acme, name: Acme}]\n"
        "sources: [{id: mercy-ehr, name: Mercy, vendor: epic, kind: ehr, patterns: [backend]}]\n"
        "organizations: [{id: mercy, tenant: acme, source: mercy-ehr, name: Mercy General}]\n"
    )
    assert _run("registry", "apply", str(reg)) == (
        0,
        "1 tenants, 1 sources, 1 organizations applied\n",
    )
    code, out = _run("tenants", "list")
    assert code == 0 and "acme" in out

    export = tmp_path / "export"
    export.mkdir()
    (export / "Patient.ndjson").write_text(
        "\n".join(json.dumps({"resourceType": "Patient", "id": f"p{i}"}) for i in range(4)) + "\n"
    )
    code, out = _run(
        "sync", "import-ndjson", "--tenant", "acme", "--org", "mercy", "--path", str(export)
    )
    assert code == 0, out
    assert "landed 4 resources, quarantined 0" in out
    code, out = _run("warehouse", "build", "--tenant", "acme")
    assert code == 0, out
    assert "resources" in out and "published" in out
    code, out = _run(
        "warehouse",
        "query",
        "--tenant",
        "acme",
        "SELECT count(*) AS n FROM resources WHERE resource_type = 'Patient'",
    )
    assert code == 0 and " 4 " in out


def test_errors_are_one_line_with_hint(settings: Settings) -> None:
    result = CliRunner().invoke(main, ["warehouse", "query", "--tenant", "nobody", "SELECT 1"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert lines[0] == "error: no warehouse for tenant nobody yet"
    assert lines[1].startswith("hint: build it with")
    result = CliRunner().invoke(main, ["tenants", "add", "Bad Id", "--name", "x"])
    assert result.exit_code == 1 and "not normalised" in result.output
    result = CliRunner().invoke(
        main, ["orgs", "add", "o", "--tenant", "t", "--source", "s", "--name", "n"]
    )
    assert result.exit_code == 1 and "tenant 't' not found" in result.output


def test_verbose_shows_the_stack(settings: Settings) -> None:
    from medblocks_pipelines.lib.errors import WarehouseError

    result = CliRunner().invoke(
        main, ["--verbose", "warehouse", "query", "--tenant", "x", "SELECT 1"]
    )
    assert isinstance(result.exception, WarehouseError)
