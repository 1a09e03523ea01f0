"""Bulk Data requests and answers, without I/O: vendor client profiles and request shaping
(SPECS §3.6), status answers, manifests (types coerced, pages merged by the client), and
``Retry-After`` in its forms (seconds, HTTP-date, and the absolute epoch some servers send).

Re-exported by :mod:`medblocks_pipelines.lib.fhir.bulk`, where the client lives.
"""

import email.utils
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

import httpx

from medblocks_pipelines.lib.errors import ConfigError, ProtocolError

SYSTEM, PATIENT, GROUP = "system", "patient", "group"
#: Retry-After is clamped into this range (seconds); Cerner once asked for 5 h, cumulus caps 300 s.
MIN_WAIT, MAX_WAIT = 1.0, 300.0


# ---------------------------------------------------------------------------------------------
# Vendor profile (client side) and requests
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClientProfile:
    """What a vendor's server allows; the client shapes its requests to fit (SPECS §3.6)."""

    name: str
    levels: frozenset[str] = frozenset({SYSTEM, PATIENT, GROUP})
    supports_post: bool = True
    supports_elements: bool = True
    supports_patient_param: bool = True
    type_filter_needs_type: bool = False
    one_export_at_a_time: bool = False
    #: Backend clients must register a JWKS URL and we send ``jku`` (Epic).
    needs_jwks_url: bool = False
    #: When set, ``_type`` values outside this set are dropped (with a warning).
    allowed_types: frozenset[str] | None = None


PROFILES = {
    "generic": ClientProfile("generic"),
    "epic": ClientProfile("epic", levels=frozenset({GROUP}), needs_jwks_url=True),
    "oracle": ClientProfile(
        "oracle",
        levels=frozenset({GROUP}),
        supports_post=False,
        supports_elements=False,
        supports_patient_param=False,
        type_filter_needs_type=True,
        one_export_at_a_time=True,
        allowed_types=frozenset(
            {
                "AllergyIntolerance",
                "CarePlan",
                "CareTeam",
                "Condition",
                "Device",
                "DiagnosticReport",
                "DocumentReference",
                "Encounter",
                "Goal",
                "Immunization",
                "Location",
                "Medication",
                "MedicationRequest",
                "Observation",
                "Organization",
                "Patient",
                "Practitioner",
                "Procedure",
                "Provenance",
            }
        ),
    ),
}
PROFILES["cerner"] = replace(PROFILES["oracle"], name="cerner")


def client_profile(vendor: str | None) -> ClientProfile:
    """The client profile for a source's vendor (unknown vendors get the spec's defaults)."""
    return PROFILES.get((vendor or "generic").lower(), PROFILES["generic"])


@dataclass(frozen=True)
class ExportRequest:
    """One kick-off: level, and the Bulk Data STU2 parameters."""

    level: str = SYSTEM
    group_id: str | None = None
    since: str | None = None
    types: tuple[str, ...] = ()
    type_filters: tuple[str, ...] = ()
    elements: tuple[str, ...] = ()
    patients: tuple[str, ...] = ()
    output_format: str | None = None
    method: str = "GET"
    #: STU3 ``organizeOutputBy`` (e.g. ``Patient``): files of per-patient blocks, no ``type``.
    organize_output_by: str | None = None
    #: ``includeAssociatedData`` values (``LatestProvenanceResources``, ...).
    include_associated_data: tuple[str, ...] = ()
    #: STU3 ``allowPartialManifests``: the manifest may be paged (``link`` relation ``next``).
    allow_partial_manifests: bool = False
    #: ``Prefer: handling=lenient``: the server ignores what it does not support.
    lenient: bool = False

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (stored with the export in the control plane)."""
        return {
            "level": self.level,
            "group_id": self.group_id,
            "since": self.since,
            "types": list(self.types),
            "type_filters": list(self.type_filters),
            "elements": list(self.elements),
            "patients": list(self.patients),
            "output_format": self.output_format,
            "method": self.method,
            "organize_output_by": self.organize_output_by,
            "include_associated_data": list(self.include_associated_data),
            "allow_partial_manifests": self.allow_partial_manifests,
            "lenient": self.lenient,
        }


def adapt_request(req: ExportRequest, profile: ClientProfile) -> tuple[ExportRequest, list[str]]:
    """Shape ``req`` to what ``profile`` allows; returns it and warnings about what changed."""
    warnings: list[str] = []
    if req.level not in profile.levels:
        if GROUP in profile.levels and req.group_id:
            warnings.append(f"{profile.name}: {req.level} export unsupported, using Group")
            req = replace(req, level=GROUP)
        else:
            raise ConfigError(
                f"{profile.name} supports only {sorted(profile.levels)} export",
                hint="set group_id in the organization config",
            )
    if req.patients and not profile.supports_patient_param:
        raise ConfigError(f"{profile.name} does not support the patient parameter")
    if req.patients and req.level == SYSTEM:
        raise ConfigError("the patient parameter does not apply to a system export")
    if req.elements and not profile.supports_elements:
        warnings.append(f"{profile.name}: _elements unsupported, dropped")
        req = replace(req, elements=())
    if profile.allowed_types is not None and req.types:
        kept = tuple(t for t in req.types if t in profile.allowed_types)
        if len(kept) != len(req.types):
            warnings.append(f"{profile.name}: {len(req.types) - len(kept)} _type value(s) dropped")
        req = replace(req, types=kept)
    if req.type_filters and profile.type_filter_needs_type and not req.types:
        types = tuple(dict.fromkeys(f.split("?", 1)[0] for f in req.type_filters))
        warnings.append(f"{profile.name}: _typeFilter needs _type, sending _type for its types")
        req = replace(req, types=types)
    # The patient parameter exists only for POST (SPECS §3.1).
    method = "POST" if req.patients else req.method
    if method == "POST" and not profile.supports_post:
        method = "GET"
    return replace(req, method=method), warnings


# ---------------------------------------------------------------------------------------------
# Status and manifest
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExportStatus:
    """One status answer: ``in_progress`` (wait ``retry_after``), ``complete``, ``failed`` or
    ``expired`` (the status URL answered 404/410: the server no longer knows the export)."""

    state: str
    retry_after: float | None = None
    progress: str | None = None
    manifest: dict[str, Any] | None = None
    http_status: int = 0
    issue_codes: tuple[str, ...] = ()


@dataclass(frozen=True)
class ManifestItem:
    """One file of the manifest."""

    kind: str  # output | deleted | error
    type: str | None
    url: str
    count: int | None
    #: organizeOutputBy: the last block of this file goes on in that file.
    continues_in: str | None = None


@dataclass(frozen=True)
class Manifest:
    """A completion manifest with types coerced (``requiresAccessToken`` may be a string)."""

    transaction_time: str
    requires_access_token: bool
    items: tuple[ManifestItem, ...]
    raw: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)

    @property
    def outputs(self) -> list[ManifestItem]:
        return [i for i in self.items if i.kind == "output"]

    @property
    def expected_counts(self) -> dict[str, int]:
        """Manifest ``count`` per type (types whose files all give a count)."""
        out: Counter[str] = Counter()
        unknown: set[str] = set()
        for item in self.outputs:
            rtype = item.type or "?"
            if item.count is None or item.type is None:
                unknown.add(rtype)
            else:
                out[rtype] += item.count
        return {k: v for k, v in out.items() if k not in unknown}


def coerce_bool(value: Any, *, default: bool) -> bool:
    """JSON booleans, and the strings ``"true"``/``"false"`` some servers send (Oracle Soarian)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return default


def parse_manifest(body: Any) -> Manifest:
    """Validate and coerce a completion manifest (STU2; STU4's ``outcome`` read as ``error``)."""
    if not isinstance(body, dict) or not isinstance(body.get("transactionTime"), str):
        raise ProtocolError("bulk manifest lacks transactionTime")
    items: list[ManifestItem] = []
    for kind, key in (
        ("output", "output"),
        ("deleted", "deleted"),
        ("error", "error"),
        ("error", "outcome"),
    ):
        entries = body.get(key) or []
        if not isinstance(entries, list):
            raise ProtocolError(f"bulk manifest {key} is not an array")
        for entry in entries:
            if not isinstance(entry, dict) or not isinstance(entry.get("url"), str):
                raise ProtocolError(f"bulk manifest {key} entry has no url")
            url = entry["url"]
            if not urlsplit(url).scheme:
                raise ProtocolError(f"bulk manifest {key} url is not absolute")
            count = entry.get("count")
            cont = entry.get("continuesInFile")
            items.append(
                ManifestItem(
                    kind,
                    entry.get("type") if isinstance(entry.get("type"), str) else None,
                    url,
                    int(count)
                    if isinstance(count, int | float) and not isinstance(count, bool)
                    else None,
                    cont if isinstance(cont, str) else None,
                )
            )
    # A missing flag is read as "token required": it is sent only to the FHIR origin anyway.
    requires = coerce_bool(body.get("requiresAccessToken"), default=True)
    return Manifest(body["transactionTime"], requires, tuple(items), body)


#: A "delay" this large is an absolute epoch time (seconds; milliseconds past the second bound):
#: some servers send ``Retry-After: 1767225600`` (seen in the wild, not RFC 9110).
EPOCH_SECONDS, EPOCH_MILLIS = 1_000_000_000, 100_000_000_000


def next_page_url(body: Any) -> str | None:
    """The ``link`` entry with relation ``next`` of a (paged) manifest, if any."""
    links = body.get("link") if isinstance(body, dict) else None
    for link in links if isinstance(links, list) else []:
        if isinstance(link, dict) and link.get("relation") == "next":
            url = link.get("url")
            if isinstance(url, str) and url:
                return url
    return None


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """``Retry-After`` as delay-seconds or an HTTP-date (RFC 9110 §10.2.3), or an absolute epoch
    time (seconds or milliseconds, a vendor quirk); None if absent/bad."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    if text.isdigit():
        number = float(text)
        if number >= EPOCH_SECONDS:
            epoch = number / 1000 if number >= EPOCH_MILLIS else number
            return max(0.0, epoch - (now if now is not None else time.time()))
        return number
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (now if now is not None else time.time()))


def clamp_wait(
    seconds: float | None, fallback: float, *, lo: float = MIN_WAIT, hi: float = MAX_WAIT
) -> float:
    """A wait within ``[lo, hi]``; ``fallback`` when the server gave none."""
    return min(max(seconds if seconds is not None else fallback, lo), hi)


def issue_codes(resp: httpx.Response) -> list[str]:
    """The ``issue.code`` values of an OperationOutcome body (empty when it is not one)."""
    try:
        body = resp.json()
    except ValueError:
        return []
    if not isinstance(body, dict) or body.get("resourceType") != "OperationOutcome":
        return []
    return [str(i.get("code")) for i in body.get("issue") or [] if isinstance(i, dict)]


def origin(url: str) -> tuple[str, str, int | None]:
    """Scheme, host and effective port of a URL (what "same origin" compares)."""
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme.lower(), (parts.hostname or "").lower(), port
