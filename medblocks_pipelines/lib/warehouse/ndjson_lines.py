"""Reading an NDJSON file line by line without trusting it: bounded lines, truncated gzip.

The line-by-line landing path (``LakeWriter._add_lines_slow``) reads through this, so one hostile
line or a cut-off download never costs the rest of the file: a line longer than the limit is
reported (its head kept for diagnosis) and skipped to its end, and a gzip stream that ends early
yields what was readable followed by one ``truncated_gzip`` event for the tail.
"""

import gzip
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from medblocks_pipelines.lib.settings import Tuning

# Lines longer than this are quarantined (a FHIR resource this large is an attack or a bug).
MAX_LINE_BYTES = Tuning.from_env().max_line_bytes  # MEDBLOCKS_MAX_LINE_BYTES

_CHUNK = 1 << 20


@dataclass(frozen=True)
class Line:
    """One line of the file, or what is left of it: ``problem`` says why it cannot land whole."""

    lineno: int
    data: bytes
    problem: str | None = None


def read_lines(
    path: Path, *, max_line: int = MAX_LINE_BYTES, keep: int = 1_000_000
) -> Iterator[Line]:
    """The non-blank lines of ``path`` (gzip when it ends in ``.gz``), each at most ``max_line``.

    An oversized line comes as ``Line(n, head, "line_too_long: ...")`` with its first ``keep``
    bytes; a gzip stream that ends early (or is corrupt) ends with ``Line(n, tail,
    "truncated_gzip: ...")`` holding the partial last line (possibly empty).
    """
    opener = gzip.open if path.name.endswith(".gz") else open
    buf = bytearray()
    lineno = 1
    skipping = 0  # bytes of an oversized line seen so far (0: not in one)
    head = b""
    with opener(path, "rb") as fh:
        while True:
            try:
                # read1: one raw read, so a stream that fails later still gives what it had.
                chunk = fh.read1(_CHUNK)
            except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
                yield Line(lineno, head or bytes(buf[:keep]), _truncated(exc, lineno))
                return
            if not chunk:
                break
            buf += chunk
            while True:
                nl = buf.find(b"\n")
                if nl < 0:
                    break
                if skipping:
                    yield _too_long(lineno, head, skipping + nl, max_line)
                    skipping, head = 0, b""
                else:
                    line = bytes(buf[:nl])
                    if len(line) > max_line:
                        yield _too_long(lineno, line[:keep], len(line), max_line)
                    elif line.strip():
                        yield Line(lineno, line)
                del buf[: nl + 1]
                lineno += 1
            if len(buf) > max_line:
                if not skipping:
                    head = bytes(buf[:keep])
                skipping += len(buf)
                buf.clear()
    if skipping:
        yield _too_long(lineno, head, skipping + len(buf), max_line)
    elif buf.strip():
        yield Line(lineno, bytes(buf))


def _too_long(lineno: int, head: bytes, size: int, max_line: int) -> Line:
    return Line(lineno, head, f"line_too_long: line {lineno} has {size} bytes (limit {max_line})")


def _truncated(exc: BaseException, lineno: int) -> str:
    kind = "ends early" if isinstance(exc, EOFError) else f"is corrupt ({type(exc).__name__})"
    return f"truncated_gzip: the gzip stream {kind} in line {lineno}"
