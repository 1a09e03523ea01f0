"""The bulk server's data seam: `BulkSource` (what an export reads; the FHIR store is one),
`NdjsonDirSource` (pre-generated NDJSON served unchanged), and resource helpers (compartment
membership, `meta.lastUpdated`).
"""

import contextlib
import functools
import gzip
import json
import re
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from fhir.resources.R4B import get_fhir_model_class

from medblocks_sandbox.errors import FhirHttpError
from medblocks_sandbox.fhir_match import element_values, reference_key
from medblocks_sandbox.fhir_params import PATIENT_COMPARTMENT

_INSTANT_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})$")


# ---------------------------------------------------------------------------------------------
# Data seam
# ---------------------------------------------------------------------------------------------
@runtime_checkable
class BulkSource(Protocol):
    """What the export reads. ``sandbox.fhir_store.FhirStore`` satisfies it as it is."""

    def now(self) -> datetime:
        """The clock that stamps ``meta.lastUpdated`` (used for ``transactionTime``)."""
        ...

    def resource_types(self) -> list[str]:
        """Types that have at least one current resource."""
        ...

    def iter_type(self, resource_type: str) -> Iterator[dict[str, Any]]:
        """Current resources of one type, streamed."""
        ...

    def get(self, resource_type: str, resource_id: str) -> dict[str, Any] | None:
        """One current resource (used for Group)."""
        ...

    def changes_since(
        self,
        since: datetime | None,
        *,
        types: Iterable[str] | None = None,
        until: datetime | None = None,
    ) -> tuple[list[dict[str, Any]], list[tuple[str, str, datetime]]]:
        """Changed resources and ``(type, id, deleted_at)`` deletions after ``since``."""
        ...


class NdjsonDirSource:
    """Pre-generated NDJSON files (``Type.ndjson`` / ``Type.000.ndjson[.gz]``) as a bulk source.

    Resources are streamed from disk on every pass; no index is kept. Files whose name does not
    start with the type of their first line are treated as mixed and filtered line by line. No
    deletions are known.
    """

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        self._by_type: dict[str, list[Path]] = {}
        self._mixed: list[Path] = []
        for path in sorted(self.directory.iterdir()):
            if not path.is_file() or not (
                path.name.endswith(".ndjson") or path.name.endswith(".ndjson.gz")
            ):
                continue
            first = _first_type(path)
            if first is None:
                continue
            if re.split(r"[._-]", path.name, maxsplit=1)[0] == first:
                self._by_type.setdefault(first, []).append(path)
            else:
                self._mixed.append(path)
        self._mixed_types = {t for p in self._mixed for t in _types_in(p)} if self._mixed else set()

    def now(self) -> datetime:
        """Wall-clock UTC."""
        return datetime.now(UTC)

    def resource_types(self) -> list[str]:
        """Types found on disk."""
        return sorted(set(self._by_type) | self._mixed_types)

    def raw_files(self, resource_type: str) -> list[Path] | None:
        """The files holding exactly this type, if no mixed file might also hold it."""
        if resource_type in self._mixed_types:
            return None
        return list(self._by_type.get(resource_type, []))

    def iter_type(self, resource_type: str) -> Iterator[dict[str, Any]]:
        """Stream resources of one type from disk."""
        for _, resource in self.iter_type_raw(resource_type):
            yield resource

    def iter_type_raw(self, resource_type: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """Stream ``(line, resource)`` pairs, so an unchanged resource is written back as it
        was read instead of being serialised again."""
        for path in self._by_type.get(resource_type, []):
            for line in _open_lines(path):
                line = line.strip()
                if line:
                    yield line, json.loads(line)
        for path in self._mixed:
            for line in _open_lines(path):
                line = line.strip()
                if line:
                    resource = json.loads(line)
                    if resource.get("resourceType") == resource_type:
                        yield line, resource

    def get(self, resource_type: str, resource_id: str) -> dict[str, Any] | None:
        """Linear scan (only used for Group lookups)."""
        for resource in self.iter_type(resource_type):
            if resource.get("id") == resource_id:
                return resource
        return None

    def changes_since(
        self,
        since: datetime | None,
        *,
        types: Iterable[str] | None = None,
        until: datetime | None = None,
    ) -> tuple[list[dict[str, Any]], list[tuple[str, str, datetime]]]:
        """No tracked deletions; changed resources are not listed here (the export filters)."""
        return [], []


def _open_lines(path: Path) -> Iterator[str]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:  # type: ignore[operator]
        yield from fh


def _first_type(path: Path) -> str | None:
    for line in _open_lines(path):
        if line.strip():
            try:
                value = json.loads(line).get("resourceType")
            except (ValueError, AttributeError):
                return None
            return value if isinstance(value, str) else None
    return None


def _types_in(path: Path) -> set[str]:
    found = set()
    for line in _open_lines(path):
        if line.strip():
            with contextlib.suppress(ValueError, AttributeError):
                found.add(json.loads(line).get("resourceType"))
    return {t for t in found if isinstance(t, str)}


def patients_of(resource: dict[str, Any]) -> frozenset[str]:
    """Patient ids whose compartment holds ``resource`` (FHIR R4 CompartmentDefinition/patient)."""
    rtype = resource.get("resourceType")
    if rtype == "Patient":
        return frozenset({resource.get("id", "")})
    paths = PATIENT_COMPARTMENT.get(str(rtype), ("subject", "patient", "beneficiary"))
    out = set()
    for path in paths:
        for value in element_values(resource, path):
            if isinstance(value, dict) and isinstance(value.get("reference"), str):
                key = reference_key(value["reference"])
                if key and key[0] == "Patient":
                    out.add(key[1])
    return frozenset(out)


@functools.lru_cache(maxsize=512)
def _is_resource_type(name: str) -> bool:
    if not re.fullmatch(r"[A-Z][A-Za-z]+", name):
        return False
    try:
        get_fhir_model_class(name)
    except (KeyError, ValueError, AttributeError):
        return False
    return True


def _parse_instant(text: str) -> datetime:
    if not _INSTANT_RE.match(text):
        hint = " (was a '+' in the zone left unencoded?)" if " " in text else ""
        raise FhirHttpError(400, "invalid", f"_since must be a FHIR instant with a zone{hint}")
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _last_updated(resource: dict[str, Any]) -> datetime | None:
    value = (resource.get("meta") or {}).get("lastUpdated")
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
