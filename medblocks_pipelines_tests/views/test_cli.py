"""``medblocks views`` through click's CliRunner: test/report, list, show, compile, dictionary."""

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from medblocks_pipelines.cli.views import views
from medblocks_pipelines.lib.warehouse.views.runner import default_suite_dir


def test_views_test_writes_the_report_and_passes(tmp_path: Path) -> None:
    suite = default_suite_dir()
    assert suite is not None
    small = tmp_path / "suite"
    small.mkdir()
    for name in ("basic.json", "fn_boundary.json", "validate.json"):
        shutil.copy(suite / name, small / name)
    report = tmp_path / "out" / "report.json"
    result = CliRunner().invoke(views, ["test", str(small), "--report", str(report)])
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert set(data) == {"basic.json", "fn_boundary.json", "validate.json"}
    assert "passed 24, failed 0, total 24" in result.output


def test_views_test_exits_non_zero_on_failure(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text(
        json.dumps(
            {
                "title": "bad",
                "resources": [{"resourceType": "Patient", "id": "p"}],
                "tests": [
                    {
                        "title": "wrong",
                        "view": {
                            "resource": "Patient",
                            "select": [{"column": [{"name": "id", "path": "id"}]}],
                        },
                        "expect": [{"id": "q"}],
                    }
                ],
            }
        )
    )
    report = tmp_path / "r.json"
    result = CliRunner().invoke(views, ["test", str(tmp_path), "--report", str(report)])
    assert result.exit_code == 1
    assert "failed 1" in result.output and "wrong" in result.output
    assert json.loads(report.read_text())["bad.json"]["tests"][0]["result"]["passed"] is False


def test_list_show_compile_dictionary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEDBLOCKS_VIEWS_DIR", raising=False)
    runner = CliRunner()
    listed = runner.invoke(views, ["list"])
    assert listed.exit_code == 0 and "explanation_of_benefit_line" in listed.output
    shown = runner.invoke(views, ["show", "patient"])
    assert shown.exit_code == 0 and json.loads(shown.output)["resource"] == "Patient"
    missing = runner.invoke(views, ["show", "nope"])
    assert missing.exit_code != 0 and "no view named" in missing.output
    compiled = runner.invoke(views, ["compile", "observation"])
    assert compiled.exit_code == 0 and "from_json" in compiled.output
    assert '"tenant"' in compiled.output
    f = tmp_path / "v.json"
    f.write_text(
        json.dumps(
            {"resource": "Patient", "select": [{"column": [{"name": "g", "path": "gender"}]}]}
        )
    )
    bare = runner.invoke(views, ["compile", str(f), "--no-provenance", "--table", "t"])
    assert (
        bare.exit_code == 0
        and "FROM t AS __mb_t WHERE" in bare.output
        and '"tenant"' not in bare.output
    )
    dictionary = runner.invoke(views, ["dictionary"])
    assert dictionary.exit_code == 0 and "## `coverage`" in dictionary.output


def test_compile_of_an_invalid_file_is_a_clear_error(tmp_path: Path) -> None:
    f = tmp_path / "v.json"
    f.write_text(
        json.dumps(
            {
                "resource": "Patient",
                "select": [{"column": [{"name": "g", "path": "gender.nosuch()"}]}],
            }
        )
    )
    result = CliRunner().invoke(views, ["compile", str(f)])
    assert result.exit_code != 0
    assert "unknown or unsupported FHIRPath function nosuch()" in str(result.exception)
