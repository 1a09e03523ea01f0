"""The ``medblocks`` process ends without the interpreter's teardown (cli/quick_exit.py), and
loses nothing a normal exit keeps: the status, buffered output, atexit handlers, finalizers
(temporary folders) and threads that are not daemons. Behaviour, not timing."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent(
    """
    import atexit, sys, threading, time, weakref
    from pathlib import Path
    from medblocks_pipelines.cli.quick_exit import exit_now

    out = Path(sys.argv[1])

    class Holder:
        pass

    holder = Holder()  # referenced at exit: its finalizer runs as an atexit handler
    weakref.finalize(holder, (out / "finalizer").write_text, "ran")
    atexit.register((out / "atexit").write_text, "ran")

    def late() -> None:
        time.sleep(0.3)
        (out / "thread").write_text("ran")

    threading.Thread(target=late).start()  # not a daemon: waited for
    sys.stdout.write("buffered, no newline")
    code = sys.argv[2]
    exit_now(None if code == "none" else int(code) if code.isdigit() else code)
    """
)


@pytest.mark.parametrize("full_exit", ["", "1"])
@pytest.mark.parametrize(
    ("code", "status", "stderr"),
    [("none", 0, ""), ("3", 3, ""), ("a message", 1, "a message")],
)
def test_exit_keeps_what_a_normal_exit_keeps(
    tmp_path: Path, code: str, status: int, stderr: str, full_exit: str
) -> None:
    import os

    env = {**os.environ, "MEDBLOCKS_CLI_FULL_EXIT": full_exit}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path), code],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == status, proc.stderr
    assert proc.stdout == "buffered, no newline"
    assert proc.stderr.strip() == stderr
    for what in ("finalizer", "atexit", "thread"):
        assert (tmp_path / what).read_text() == "ran", what


def test_the_command_keeps_its_status_and_output() -> None:
    cli = [sys.executable, "-m", "medblocks_pipelines.cli"]
    ok = subprocess.run([*cli, "--help"], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0
    assert "four integration patterns" in ok.stdout
    usage = subprocess.run([*cli, "no-such-command"], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2
    assert "No such command" in usage.stderr
