"""Bulk Data STU3 kick-off parameters of the sandbox ``$export`` server, and the shapes they give.

* ``organizeOutputBy=Patient``: output files of per-patient blocks, each opened by a header line
  ``{"resourceType":"Parameters","parameter":[{"name":"header","valueReference":
  {"reference":"Patient/x"}}]}``; manifest items have no ``type`` and carry ``continuesInFile``
  when a block goes on in the next file (SPECS §3.1). Only ``Patient`` is supported, and only for
  Patient and Group exports (a system export has no patient to organise by): anything else is
  refused (``400``), or ignored with a warning under ``Prefer: handling=lenient``. Types outside
  the patient compartment (Practitioner, Organization...) still come in ordinary typed files.
* ``includeAssociatedData``: ``LatestProvenanceResources`` (the newest Provenance per exported
  resource) and ``RelevantProvenanceResources`` (every Provenance targeting one); other values,
  ``_``-prefixed custom ones included, are not supported (``400`` / lenient warning).
* ``allowPartialManifests``: ``true``/``false``; with it (and the ``paged_manifest`` fault) the
  manifest is served in pages linked by ``link`` relation ``next``.
"""

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from medblocks_sandbox.errors import FhirHttpError
from medblocks_sandbox.faults import operation_outcome
from medblocks_sandbox.fhir_match import reference_key

ASSOCIATED = frozenset({"LatestProvenanceResources", "RelevantProvenanceResources"})


@dataclass(frozen=True)
class Stu3Options:
    """The STU3 parameters of one kick-off, validated."""

    organize_by: str | None = None
    associated: frozenset[str] = frozenset()
    partial_manifests: bool = False


def _refuse_or_warn(lenient: bool, issues: list[dict[str, Any]], code: str, text: str) -> None:
    if not lenient:
        raise FhirHttpError(400, code, text)
    issues.append(operation_outcome(code, f"{text}; ignored", severity="warning"))


def parse_options(
    grouped: dict[str, list[str]], level: str, lenient: bool, issues: list[dict[str, Any]]
) -> Stu3Options:
    """Validate ``organizeOutputBy``, ``includeAssociatedData`` and ``allowPartialManifests``."""
    organize: str | None = None
    values = grouped.get("organizeOutputBy", [])
    if len(values) > 1:
        raise FhirHttpError(400, "invalid", "organizeOutputBy given more than once")
    if values:
        if values[0] != "Patient":
            _refuse_or_warn(lenient, issues, "not-supported", "organizeOutputBy must be Patient")
        elif level == "system":
            _refuse_or_warn(
                lenient, issues, "not-supported", "organizeOutputBy needs a Patient or Group export"
            )
        else:
            organize = "Patient"
    associated: set[str] = set()
    for value in grouped.get("includeAssociatedData", []):
        for item in value.split(","):
            item = item.strip()
            if item in ASSOCIATED:
                associated.add(item)
            else:
                _refuse_or_warn(
                    lenient, issues, "not-supported", "includeAssociatedData value not supported"
                )
    partial = grouped.get("allowPartialManifests", [])
    if len(partial) > 1 or any(v not in ("true", "false") for v in partial):
        raise FhirHttpError(400, "invalid", "allowPartialManifests must be true or false, once")
    return Stu3Options(organize, frozenset(associated), partial == ["true"])


class BlockWriter:
    """Writes per-patient blocks into files of at most ``max_lines`` lines (headers included).

    ``open_file(serial)`` returns ``(name, handle, record)`` where ``record(count, continues)``
    registers the finished file with its line count and the name of the file its last block goes
    on in (or ``None``).
    """

    def __init__(
        self,
        open_file: Callable[[int], tuple[str, Any, Callable[[int, str | None], None]]],
        max_lines: int,
    ) -> None:
        self.open_file, self.max_lines = open_file, max(2, max_lines)
        self.serial = 0
        self.current: tuple[str, Any, Callable[[int, str | None], None]] | None = None
        self.lines = 0

    def _roll(self, continues: bool) -> None:
        self.serial += 1
        nxt = self.open_file(self.serial)
        if self.current is not None:
            _, fh, record = self.current
            fh.close()
            record(self.lines, nxt[0] if continues else None)
        self.current, self.lines = nxt, 0

    def _line(self, text: str, *, in_block: bool) -> None:
        if self.current is None or self.lines >= self.max_lines:
            self._roll(continues=in_block and self.current is not None)
        assert self.current is not None
        self.current[1].write(text + "\n")
        self.lines += 1

    def block(self, patient_id: str, lines: Iterable[str]) -> None:
        """One patient's block: a header line, then the resources."""
        if self.current is not None and self.lines >= self.max_lines - 1:
            self._roll(continues=False)  # a header never ends a file
        self._line(json.dumps(header(patient_id), separators=(",", ":")), in_block=False)
        for text in lines:
            self._line(text, in_block=True)

    def close(self) -> None:
        if self.current is not None:
            _, fh, record = self.current
            fh.close()
            record(self.lines, None)
            self.current = None


def header(patient_id: str) -> dict[str, Any]:
    """The block header line of ``organizeOutputBy=Patient``."""
    return {
        "resourceType": "Parameters",
        "parameter": [{"name": "header", "valueReference": {"reference": f"Patient/{patient_id}"}}],
    }


def associated_provenance(
    provenances: Iterator[dict[str, Any]], exported: set[tuple[str, str]], latest: bool
) -> list[dict[str, Any]]:
    """Provenance resources targeting an exported resource (the newest per target if
    ``latest``), each once."""
    chosen: dict[str, dict[str, Any]] = {}
    newest: dict[tuple[str, str], dict[str, Any]] = {}
    for prov in provenances:
        targets = [
            key
            for t in prov.get("target") or []
            if isinstance(t, dict)
            and isinstance(t.get("reference"), str)
            and (key := reference_key(t["reference"])) is not None
            and key in exported
        ]
        if not targets:
            continue
        if not latest:
            chosen[str(prov.get("id"))] = prov
            continue
        for key in targets:
            held = newest.get(key)
            if held is None or str(prov.get("recorded", "")) > str(held.get("recorded", "")):
                newest[key] = prov
    if latest:
        for prov in newest.values():
            chosen[str(prov.get("id"))] = prov
    return list(chosen.values())


def manifest_page(
    manifest: dict[str, Any], page: int, page_size: int, status_url: str
) -> dict[str, Any]:
    """Page ``page`` (1-based) of a manifest whose ``output``/``deleted``/``error`` files are
    served ``page_size`` at a time, with ``link`` relation ``next`` to the following page."""
    items = [(k, f) for k in ("output", "deleted", "error") for f in manifest.get(k) or []]
    size = max(1, page_size)
    chunk = items[(page - 1) * size : page * size]
    out = {k: v for k, v in manifest.items() if k not in ("output", "deleted", "error")}
    for key in ("output", "deleted", "error"):
        out[key] = [f for k, f in chunk if k == key]
    if page * size < len(items):
        out["link"] = [{"relation": "next", "url": f"{status_url}?page={page + 1}"}]
    return out
