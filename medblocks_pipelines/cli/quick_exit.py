"""Ending the ``medblocks`` process without the interpreter's teardown.

Once a command has loaded Dagster's definitions, a normal interpreter exit spends about half a
second (measured: 0.55-0.59 s on the CI machine kind) freeing every module's objects one by one
before the process ends, after the command's work and output are done: a `sync backend` the user
waits on, a scheduled command a cron job waits on. :func:`exit_now` does what a normal exit does
that matters, in the same order, then ends the process at once:

1. waits for the threads that are not daemons (``threading`` does this first at exit);
2. runs the ``atexit`` handlers: ``logging.shutdown`` (flushes and closes log handlers),
   ``weakref.finalize`` callbacks (temporary folders, e.g. a lake writer's scratch), library
   clean-ups;
3. flushes stdout and stderr, and ``os._exit``\\ s with the command's status.

What it skips is the freeing of objects still referenced at exit. Files this project writes are
closed where they are written, and the DuckDB files it writes are checkpointed and closed
(``build_warehouse``); a write left to a destructor at exit would be a bug either way.
``MEDBLOCKS_CLI_FULL_EXIT=1`` restores the normal exit (to compare, or to debug a clean-up).
"""

import atexit
import contextlib
import os
import sys
import threading
from typing import NoReturn


def exit_now(code: object) -> NoReturn:
    """End the process with ``code`` (a ``SystemExit`` code: None, an int or a message)."""
    from medblocks_pipelines.lib.settings import Tuning

    try:
        full = Tuning.from_env().cli_full_exit
    except Exception:  # noqa: BLE001 - another variable is malformed: exit the usual way
        full = True
    run_exitfuncs = getattr(atexit, "_run_exitfuncs", None)
    if full or run_exitfuncs is None:
        raise SystemExit(code)
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # sys.exit("message"): printed to stderr, status 1 (as the interpreter does)
        print(code, file=sys.stderr)
        status = 1
    main = threading.main_thread()
    for thread in threading.enumerate():
        if thread is not main and not thread.daemon:
            thread.join()
    try:
        run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            # A closed pipe: nothing more can be said.
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(status)
