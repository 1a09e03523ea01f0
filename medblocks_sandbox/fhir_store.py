"""In-memory, thread-safe, versioned FHIR R4 resource store with search, for the sandbox servers.

One `FhirStore` per sandbox organization. It keeps every version of every resource (deletions are
versions too), stamps `meta.versionId` / `meta.lastUpdated`, indexes the Patient compartment
(FHIR R4 CompartmentDefinition/patient) and evaluates the FHIR search parameters the sandbox
servers advertise (token, reference, date with prefixes, string, `_id`, `_lastUpdated`).

The seams other sandbox modules use (the Bulk Data helper in particular):

- `get(type, id)`, `state(type, id)`, `vread`, `history`: reads with version history;
- `iter_type(type)`, `compartment(patient_id, types)`: current resources (snapshots under the lock);
- `changes_since(since, types=..., until=...)`: changed resources and deletions, for `_since`;
- `search(type, params)`: evaluated search, raising `FhirHttpError(400)` on unknown parameters;
- `now()`: the store clock, monotonic per store, used for `meta.lastUpdated` and `transactionTime`.

Stored resources are shared, not copied: callers must not mutate what they get back.
"""

import json
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal

from medblocks_sandbox.fhir_match import (
    _references,
    compile_filters,
    element_values,
    matches,
    parse_date_range,
    reference_key,
)
from medblocks_sandbox.fhir_params import PATIENT_COMPARTMENT, Resource


# ---------------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Version:
    """One version of a resource; `resource is None` marks a deletion."""

    version_id: int
    last_updated: datetime
    resource: Resource | None


@dataclass
class _Entry:
    versions: list[Version] = field(default_factory=list)

    @property
    def current(self) -> Version:
        return self.versions[-1]


def format_instant(value: datetime) -> str:
    """A FHIR instant in UTC with millisecond precision (`2024-01-02T03:04:05.678Z`)."""
    value = value.astimezone(UTC)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


class FhirStore:
    """A versioned in-memory FHIR store for one sandbox organization (thread-safe)."""

    def __init__(self, resources: Iterable[Resource] = ()) -> None:
        self._lock = threading.RLock()
        self._data: dict[str, dict[str, _Entry]] = {}
        self._by_patient: dict[str, set[tuple[str, str]]] = {}
        self._members: dict[tuple[str, str], frozenset[str]] = {}
        # Binary id -> {DocumentReference key: its patients}, and the reverse.
        self._binary_docs: dict[str, dict[tuple[str, str], frozenset[str]]] = {}
        self._doc_binaries: dict[tuple[str, str], set[str]] = {}
        self._last_now = datetime(1970, 1, 1, tzinfo=UTC)
        self.put_many(resources)

    # -- clock ---------------------------------------------------------------------------------
    def now(self) -> datetime:
        """The store clock: wall-clock UTC, strictly increasing, millisecond precision."""
        with self._lock:
            wall = datetime.now(UTC)
            now = wall.replace(microsecond=wall.microsecond // 1000 * 1000)
            if now <= self._last_now:
                now = self._last_now + timedelta(milliseconds=1)
            self._last_now = now
            return now

    # -- writes --------------------------------------------------------------------------------
    @contextmanager
    def atomic(self) -> Iterator[None]:
        """Hold the store lock for a block: its writes look like one change to other threads.

        Readers and writers of other threads wait until the block ends (the lock is re-entrant,
        so the store's own methods work inside it). Nothing is rolled back if the block raises.
        """
        with self._lock:
            yield

    def put(
        self, resource: Resource, *, keep_last_updated: bool = False, copy: bool = True
    ) -> Resource:
        """Create or update a resource (new version); returns the stored copy with `meta` set.

        `keep_last_updated` keeps a `meta.lastUpdated` the resource already carries if it is in
        the past (used when loading generated data); otherwise the store clock stamps it.
        `copy=False` stores a shallow copy only (new `meta`, shared nested values): for callers
        that never mutate what they pass, such as the copy-on-write generator (fast loads).
        """
        rtype, rid = resource.get("resourceType"), resource.get("id")
        if not isinstance(rtype, str) or not isinstance(rid, str) or not rid:
            raise ValueError("a stored resource needs resourceType and id")
        # A JSON round trip is a deep copy several times faster than copy.deepcopy for JSON data.
        stored = json.loads(json.dumps(resource)) if copy else dict(resource)
        meta = dict(stored.get("meta") or {})
        with self._lock:
            now = self.now()
            stamp = now
            if keep_last_updated and isinstance(meta.get("lastUpdated"), str):
                try:
                    given = parse_date_range(meta["lastUpdated"])[0]
                    if given <= now:
                        stamp = given
                except ValueError:
                    pass
            entry = self._data.setdefault(rtype, {}).setdefault(rid, _Entry())
            version_id = len(entry.versions) + 1
            meta["versionId"] = str(version_id)
            meta["lastUpdated"] = format_instant(stamp)
            stored["meta"] = meta
            entry.versions.append(Version(version_id, stamp, stored))
            self._index(rtype, rid, stored)
        return stored

    def put_many(
        self, resources: Iterable[Resource], *, keep_last_updated: bool = True, copy: bool = True
    ) -> int:
        """Store many resources (generator load); returns how many were stored."""
        n = 0
        with self._lock:
            for resource in resources:
                self.put(resource, keep_last_updated=keep_last_updated, copy=copy)
                n += 1
        return n

    def delete(self, resource_type: str, resource_id: str) -> bool:
        """Delete a resource (a tombstone version); False if it was absent or already deleted."""
        with self._lock:
            entry = self._data.get(resource_type, {}).get(resource_id)
            if entry is None or entry.current.resource is None:
                return False
            now = self.now()
            entry.versions.append(Version(len(entry.versions) + 1, now, None))
            self._index(resource_type, resource_id, None)
            return True

    def _index(self, rtype: str, rid: str, resource: Resource | None) -> None:
        key = (rtype, rid)
        self._set_members(
            key, None if resource is None else self._compartment_patients(rtype, rid, resource)
        )
        if rtype != "DocumentReference":
            return
        # A Binary behind a document belongs to the document's patients (second fetch, same
        # token: SPECS §1.11), whichever of the two was stored first.
        touched = self._doc_binaries.pop(key, set())
        for bid in touched:
            self._binary_docs.get(bid, {}).pop(key, None)
        if resource is not None:
            members = self._members.get(key, frozenset())
            bids = {
                bkey[1]
                for value in element_values(resource, "content.attachment.url")
                if isinstance(value, str)
                and (bkey := reference_key(value)) is not None
                and bkey[0] == "Binary"
            }
            for bid in bids:
                self._binary_docs.setdefault(bid, {})[key] = members
            self._doc_binaries[key] = bids
            touched |= bids
        for bid in touched:
            binary = self.get("Binary", bid)
            if binary is not None:
                self._set_members(
                    ("Binary", bid), self._compartment_patients("Binary", bid, binary)
                )

    def _set_members(self, key: tuple[str, str], members: frozenset[str] | None) -> None:
        for pid in self._members.pop(key, frozenset()):
            self._by_patient.get(pid, set()).discard(key)
        if members is None:
            return
        self._members[key] = members
        for pid in members:
            self._by_patient.setdefault(pid, set()).add(key)

    def _compartment_patients(self, rtype: str, rid: str, resource: Resource) -> frozenset[str]:
        if rtype == "Patient":
            return frozenset({rid})
        if rtype == "Binary":
            found: set[str] = set()
            for members in self._binary_docs.get(rid, {}).values():
                found |= members
            ctx = resource.get("securityContext")
            key = (
                reference_key(ctx["reference"])
                if isinstance(ctx, dict) and isinstance(ctx.get("reference"), str)
                else None
            )
            if key:
                found |= self._members.get(key, frozenset()) if key[0] != "Patient" else {key[1]}
            return frozenset(found)
        paths = PATIENT_COMPARTMENT.get(rtype, ("subject", "patient", "beneficiary"))
        return frozenset(
            ref_id
            for path in paths
            for ref_type, ref_id in _references(resource, path)
            if ref_type == "Patient"
        )

    # -- reads ---------------------------------------------------------------------------------
    def state(
        self, resource_type: str, resource_id: str
    ) -> Literal["present", "deleted", "absent"]:
        """Whether a resource exists now, was deleted, or never existed."""
        with self._lock:
            entry = self._data.get(resource_type, {}).get(resource_id)
            if entry is None:
                return "absent"
            return "deleted" if entry.current.resource is None else "present"

    def get(self, resource_type: str, resource_id: str) -> Resource | None:
        """The current version, or None if absent or deleted."""
        with self._lock:
            entry = self._data.get(resource_type, {}).get(resource_id)
            return None if entry is None else entry.current.resource

    def vread(self, resource_type: str, resource_id: str, version_id: str) -> Version | None:
        """One version (its `resource` is None for a deletion), or None if it does not exist."""
        with self._lock:
            entry = self._data.get(resource_type, {}).get(resource_id)
            if entry is None or not version_id.isdigit():
                return None
            n = int(version_id)
            return entry.versions[n - 1] if 1 <= n <= len(entry.versions) else None

    def history(self, resource_type: str, resource_id: str) -> list[Version]:
        """Every version of a resource, oldest first (empty if it never existed)."""
        with self._lock:
            entry = self._data.get(resource_type, {}).get(resource_id)
            return list(entry.versions) if entry else []

    def resource_types(self) -> list[str]:
        """Types with at least one current resource, sorted."""
        with self._lock:
            return sorted(
                t
                for t, entries in self._data.items()
                if any(e.current.resource is not None for e in entries.values())
            )

    def iter_type(self, resource_type: str) -> Iterator[Resource]:
        """Current resources of one type (a snapshot taken under the lock), in insertion order."""
        with self._lock:
            snapshot = [
                e.current.resource
                for e in self._data.get(resource_type, {}).values()
                if e.current.resource is not None
            ]
        return iter(snapshot)

    def count(self, resource_type: str | None = None) -> int:
        """How many current resources (of one type, or all)."""
        with self._lock:
            types = [resource_type] if resource_type else list(self._data)
            return sum(
                1
                for t in types
                for e in self._data.get(t, {}).values()
                if e.current.resource is not None
            )

    def patient_ids(self) -> list[str]:
        """Ids of current Patient resources."""
        return [r["id"] for r in self.iter_type("Patient")]

    def compartment_of(self, resource_type: str, resource_id: str) -> frozenset[str]:
        """Ids of the patients whose compartment holds this resource (empty if none)."""
        with self._lock:
            return self._members.get((resource_type, resource_id), frozenset())

    def patients_in(self, resource: Resource) -> frozenset[str]:
        """Patients whose compartment a resource's content puts it in (any version, deleted too)."""
        with self._lock:
            return self._compartment_patients(resource["resourceType"], resource["id"], resource)

    def compartment(self, patient_id: str, types: Iterable[str] | None = None) -> list[Resource]:
        """Current resources in one patient's compartment (Patient first), optionally by type."""
        wanted = set(types) if types is not None else None
        with self._lock:
            keys = sorted(
                self._by_patient.get(patient_id, set()),
                key=lambda k: (k[0] != "Patient", k[0], k[1]),
            )
            out = []
            for rtype, rid in keys:
                if wanted is not None and rtype not in wanted:
                    continue
                resource = self.get(rtype, rid)
                if resource is not None:
                    out.append(resource)
            return out

    def changes_since(
        self,
        since: datetime | None,
        *,
        types: Iterable[str] | None = None,
        until: datetime | None = None,
    ) -> tuple[list[Resource], list[tuple[str, str, datetime]]]:
        """Resources whose current version changed in `(since, until]`, and deletions there.

        Returns `(resources, deletions)` where deletions are `(type, id, deleted_at)`; a resource
        created and deleted inside the window appears only as a deletion. `since=None` means
        everything current (and no deletions), as a first full export.
        """
        wanted = set(types) if types is not None else None
        with self._lock:
            resources: list[Resource] = []
            deletions: list[tuple[str, str, datetime]] = []
            for rtype, entries in self._data.items():
                if wanted is not None and rtype not in wanted:
                    continue
                for rid, entry in entries.items():
                    cur = entry.current
                    if until is not None and cur.last_updated > until:
                        # The current version is newer than the window: use the one in it.
                        older = [v for v in entry.versions if v.last_updated <= until]
                        if not older:
                            continue
                        cur = older[-1]
                    if since is not None and cur.last_updated <= since:
                        continue
                    if cur.resource is None:
                        if since is not None:
                            deletions.append((rtype, rid, cur.last_updated))
                    else:
                        resources.append(cur.resource)
            return resources, deletions

    # -- search --------------------------------------------------------------------------------
    def search(
        self,
        resource_type: str,
        params: Sequence[tuple[str, str]],
        *,
        within: Iterable[tuple[str, str]] | None = None,
    ) -> list[Resource]:
        """Current resources of a type matching the search parameters (control params ignored).

        `within` restricts the candidates to given `(type, id)` keys (a patient compartment).
        Raises FhirHttpError(400) for unknown parameters, modifiers or malformed values.
        """
        filters = compile_filters(resource_type, params)
        if within is not None:
            keys = {k for k in within if k[0] == resource_type}
            candidates = [r for r in (self.get(t, i) for t, i in sorted(keys)) if r is not None]
            # Keep the store's insertion order so paging is stable.
            order = {rid: n for n, rid in enumerate(e for e in self._data.get(resource_type, {}))}
            candidates.sort(key=lambda r: order.get(r["id"], 0))
        else:
            candidates = list(self.iter_type(resource_type))
        return [r for r in candidates if matches(r, filters)]

    def compartment_keys(self, patient_id: str) -> set[tuple[str, str]]:
        """`(type, id)` keys in one patient's compartment (a copy)."""
        with self._lock:
            return set(self._by_patient.get(patient_id, set()))
