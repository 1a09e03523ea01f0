"""The `medblocks-sandbox` command (`python -m medblocks_sandbox`), and the product without it."""

import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from medblocks_sandbox.cli import main


def test_sandbox_command_lists_the_dev_tools() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0, result.output
    for command in ("serve", "generate", "cds", "consent", "demo"):
        assert f"  {command} " in result.output


def test_sandbox_errors_are_one_line_with_hint() -> None:
    result = CliRunner().invoke(main, ["serve", "--profile", "no-equals-sign"])
    assert result.exit_code == 1
    assert "error: --profile takes ORG=PROFILE" in result.output
    assert "Traceback" not in result.output


def test_product_imports_nothing_of_the_sandbox() -> None:
    """The product CLI (every plugin) and the web app load without the simulator."""
    code = (
        "import sys, medblocks_pipelines.cli, medblocks_pipelines.web.app;"
        "print(sorted(m for m in sys.modules if m.startswith('medblocks_sandbox')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]", out.stdout
    from medblocks_pipelines.cli import main as product

    for gone in ("sandbox", "demo", "generate", "cds"):
        assert gone not in product.commands


def test_sandbox_command_starts_every_role_and_answers(tmp_path: Path) -> None:
    """`medblocks-sandbox serve --port 0` prints a URL table; the printed EHR base answers FHIR."""
    import re
    import subprocess
    import sys
    import time

    import httpx

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "medblocks_sandbox",
            "serve",
            "--port",
            "0",
            "--persons",
            "20",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**__import__("os").environ, "COLUMNS": "200"},
    )
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if "Ctrl-C to stop" in line or not line:
                break
        out = "".join(lines)
        for role in ("ehr", "payer", "gateway"):
            assert f" {role} " in out, out
        base = re.search(r"(http://127\.0\.0\.1:\d+/mercy-general/fhir)", out)
        assert base, out
        meta = httpx.get(base.group(1) + "/metadata", timeout=10)
        assert meta.status_code == 200 and meta.json()["resourceType"] == "CapabilityStatement"
    finally:
        proc.terminate()  # SIGTERM stops the servers cleanly, as Ctrl-C does
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0
