"""The `generate` command writes the rich population or the streamed scale data set."""

from pathlib import Path

from click.testing import CliRunner

from medblocks_sandbox.generator.cli import generate


def test_generate_population_with_steps(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        generate, ["--out", str(tmp_path), "--persons", "8", "--seed", "2", "--steps", "1"]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "mercy-general" / "Patient.ndjson").exists()
    assert (tmp_path / "truth" / "identity.csv").exists()
    assert "summit-health-plan" in result.output


def test_generate_scale_path(tmp_path: Path) -> None:
    result = CliRunner().invoke(generate, ["--out", str(tmp_path), "--resources", "500"])
    assert result.exit_code == 0, result.output
    assert "wrote 500 resources" in result.output
    assert (tmp_path / "truth" / "facts.csv").exists()
    lines = sum(len(p.read_text().splitlines()) for p in tmp_path.glob("*/*.ndjson"))
    assert lines == 500


def test_generate_rejects_bad_sizes(tmp_path: Path) -> None:
    result = CliRunner().invoke(generate, ["--out", str(tmp_path), "--persons", "0"])
    assert result.exit_code != 0
