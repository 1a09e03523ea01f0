"""What one connection's pull fetches: every planned search's pages, the references they make
(same server only) and the Binary content of documents, each resource landed once (dedupe on
type, id and content) through the connection's patient-scoped writer."""

import base64
import hashlib
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from medblocks_pipelines.lib.fhir.client import (
    FhirClient,
    FhirRequestError,
    dumps_exact,
    loads_exact,
    outcome_issues,
)
from medblocks_pipelines.lib.fhir.search_plan import Query
from medblocks_pipelines.lib.warehouse.lake import LakeWriter

if TYPE_CHECKING:  # pull.py imports this module
    from medblocks_pipelines.lib.fhir.pull import PullResult


#: Types whose references we follow (SPECS §1.11: "plus the referenced Practitioner, Organization
#: and Location"; Medication because MedicationRequest.medication can be a reference).
FOLLOW_TYPES = frozenset(
    {"Practitioner", "PractitionerRole", "Organization", "Location", "Medication"}
)


class Puller:
    """One connection's pull; state for dedupe and reference following."""

    def __init__(self, client: FhirClient, writer: LakeWriter, result: "PullResult") -> None:
        self.client = client
        self.w = writer
        self.r = result
        self.seen: set[tuple[str, str, str]] = set()
        self.have: set[tuple[str, str]] = set()
        self.refs: dict[tuple[str, str], None] = {}
        self.binaries: dict[str, None] = {}

    # -- landing -------------------------------------------------------------------------------
    def land(self, resource: Any, *, origin: str, follow: bool = True) -> None:
        if not isinstance(resource, dict):
            self.w.quarantine(dumps_exact(resource), "not a JSON object", origin=origin)
            self.r.quarantined += 1
            return
        text = dumps_exact(resource)
        rtype, rid = resource.get("resourceType"), resource.get("id")
        if isinstance(rtype, str) and isinstance(rid, str) and rid:
            key = (rtype, rid, hashlib.md5(text.encode(), usedforsecurity=False).hexdigest())
            if key in self.seen:
                self.r.duplicates += 1
                return
            self.seen.add(key)
        if not self.w.add(text, origin=origin):
            self.r.quarantined += 1
            return
        self.r.counts[str(rtype)] += 1
        self.have.add((str(rtype), str(rid)))
        if follow:
            self._collect(resource)

    def _collect(self, resource: dict[str, Any]) -> None:
        for ref in _references(resource):
            key = self._local_key(ref)
            if key and key[0] in FOLLOW_TYPES:
                self.refs.setdefault(key, None)
        if resource.get("resourceType") == "DocumentReference":
            for content in resource.get("content") or []:
                att = content.get("attachment") if isinstance(content, dict) else None
                if isinstance(att, dict) and isinstance(att.get("url"), str) and "data" not in att:
                    self.binaries.setdefault(att["url"], None)

    def _local_key(self, ref: str) -> tuple[str, str] | None:
        if ref.startswith("#") or ref.startswith("urn:"):
            return None
        if ref.startswith(("http://", "https://")):
            if not self.client.same_origin(ref) or not ref.startswith(self.client.base_url + "/"):
                # Another server: our token must not go there (SPECS §1.11).
                self.r.counts["_foreign_references_skipped"] += 1
                return None
            ref = ref[len(self.client.base_url) + 1 :]
        parts = ref.split("/")
        if len(parts) == 2 and all(parts):
            return parts[0], parts[1]
        if len(parts) == 4 and parts[2] == "_history":
            return parts[0], parts[1]
        return None

    # -- steps ---------------------------------------------------------------------------------
    def search(self, query: Query) -> None:
        total: int | None = None
        matches = 0
        pages = self.client.search(
            query.resource_type, list(query.params), on_anomaly=self.r.anomaly
        )
        for page in pages:
            if page.number == 1 and isinstance(page.bundle.get("total"), int):
                total = int(page.bundle["total"])
            for entry in page.bundle.get("entry") or []:
                if not isinstance(entry, dict):
                    self.w.quarantine(
                        dumps_exact(entry), "bundle entry is not an object", origin=query.label
                    )
                    self.r.quarantined += 1
                    continue
                resource = entry.get("resource")
                mode = (entry.get("search") or {}).get("mode")
                if mode == "outcome" or (
                    isinstance(resource, dict)
                    and resource.get("resourceType") == "OperationOutcome"
                ):
                    issues = outcome_issues(resource)
                    for severity, code in issues or [("error", "unknown")]:
                        self.r.outcome_issues[f"{severity}:{code}"] += 1
                    if any(s in ("error", "fatal") for s, _c in issues):
                        self.r.failures["outcome_in_searchset"] += 1
                    continue
                if resource is None:
                    self.w.quarantine(
                        dumps_exact(entry), "bundle entry without a resource", origin=query.label
                    )
                    self.r.quarantined += 1
                    continue
                if mode == "match" or (
                    mode is None
                    and isinstance(resource, dict)
                    and resource.get("resourceType") == query.resource_type
                ):
                    matches += 1
                if query.keep_categories and not _has_category(resource, query.keep_categories):
                    self.r.filtered_locally += 1
                    continue
                self.land(resource, origin=query.label)
        if total is not None and total != matches:
            self.r.anomaly(
                "total_mismatch", f"{query.label}: Bundle.total {total}, {matches} matches received"
            )

    def follow_references(self, *, depth: int = 2) -> None:
        for _ in range(depth):
            todo = [k for k in self.refs if k not in self.have]
            self.refs.clear()
            if not todo:
                return
            for rtype, rid in todo:
                self.have.add((rtype, rid))
                try:
                    self.land(self.client.read(rtype, rid), origin=f"ref:{rtype}")
                except FhirRequestError as exc:
                    # A dangling or hidden reference is the source's data, not a failed pull.
                    self.r.counts[f"_reference_http_{exc.status}"] += 1

    def fetch_binaries(self) -> None:
        for url in list(self.binaries):
            absolute = urllib.parse.urljoin(self.client.base_url + "/", url)
            if not self.client.same_origin(absolute):
                self.r.counts["_binary_foreign_skipped"] += 1
                continue
            try:
                resp = self.client.request(
                    "GET", absolute, accept="application/fhir+json", expect_json=False
                )
            except FhirRequestError as exc:
                self.r.counts[f"_binary_http_{exc.status}"] += 1
                continue
            ctype = resp.headers.get("content-type", "").split(";")[0].strip()
            if "json" in ctype:
                try:
                    self.land(loads_exact(resp.content), origin="binary")
                except ValueError:
                    self.w.quarantine(resp.content, "Binary body is not JSON", origin="binary")
                    self.r.quarantined += 1
                continue
            # Raw content (the server ignored our Accept): keep it as a Binary resource.
            rid = urllib.parse.urlsplit(absolute).path.rstrip("/").split("/")[-1]
            self.land(
                {
                    "resourceType": "Binary",
                    "id": rid,
                    "contentType": ctype or "application/octet-stream",
                    "data": base64.b64encode(resp.content).decode(),
                },
                origin="binary",
            )


def last_updated(resource: Mapping[str, Any]) -> str | None:
    """``meta.lastUpdated`` as a UTC instant in the watermark's format; None if absent or bad."""
    meta = resource.get("meta")
    value = meta.get("lastUpdated") if isinstance(meta, dict) else None
    if not isinstance(value, str):
        return None
    # Compare as UTC instants in our watermark's format.
    try:
        instant = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return instant.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _has_category(resource: Any, codes: Sequence[str]) -> bool:
    if not isinstance(resource, dict):
        return True  # not ours to judge: landing quarantines it
    cats = resource.get("category")
    for cat in cats if isinstance(cats, list) else [cats]:
        for coding in (cat or {}).get("coding") or [] if isinstance(cat, dict) else []:
            if isinstance(coding, dict) and coding.get("code") in codes:
                return True
    return False


def _references(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for k, v in value.items():
            if k == "reference" and isinstance(v, str):
                yield v
            elif isinstance(v, dict | list):
                yield from _references(v)
    elif isinstance(value, list):
        for v in value:
            yield from _references(v)
