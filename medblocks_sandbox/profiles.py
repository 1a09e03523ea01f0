"""Vendor profiles for the sandbox servers (SPECS.md 3.6).

A profile is a frozen bundle of switches that turns the strict Bulk Data 2.0 server into something
that behaves like a given vendor's server. The default, ``strict``, follows the spec and nothing
else; the others add the quirks real clients have to survive:

* ``epic``: Group export only, nothing available until the whole export is done (an opaque
  ``X-Progress`` and long ``Retry-After``), and backend clients must register a JWKS URL (SPECS 2).
* ``oracle``: Group export only, one export in progress per client (else 429 ``throttled``), a
  repeated ``_type`` rejected, ``_type`` limited to the USCDI v1 list with reference types needing a
  clinical type alongside, a restricted ``_typeFilter``, ``_elements`` and ``patient`` refused, file
  URLs answered by a 307 to a presigned URL on another origin that refuses an ``Authorization``
  header, and ``requiresAccessToken`` sent as the string ``"true"``.

The EHR's authorization server reads :attr:`VendorProfile.require_jwks_url` when it registers a
backend client (see :func:`check_client_registration`).
"""

from dataclasses import dataclass, field

#: Export levels named as in the Bulk Data IG.
SYSTEM = "system"
PATIENT = "patient"
GROUP = "group"

#: USCDI v1 resource types Oracle Health's bulk export accepts in ``_type`` [impl: fhir.cerner.com].
ORACLE_USCDI_V1_TYPES = frozenset(
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
)

#: Types that Oracle only exports when at least one clinical type is asked for alongside.
ORACLE_REFERENCE_TYPES = frozenset({"Location", "Organization", "Practitioner", "Provenance"})

#: Types for which Oracle has no ``_typeFilter`` support.
ORACLE_UNFILTERABLE_TYPES = frozenset(
    {"Location", "Organization", "Patient", "Practitioner", "Provenance"}
)

#: Search parameters Oracle blocks inside ``_typeFilter``.
ORACLE_BLOCKED_FILTER_PARAMS = frozenset(
    {"_id", "_lastUpdated", "patient", "subject", "encounter", "identifier"}
)


@dataclass(frozen=True)
class VendorProfile:
    """Switches that shape a sandbox server like one vendor's. Defaults are the strict spec."""

    name: str
    #: Export levels offered; others answer 404 ``not-supported``.
    levels: frozenset[str] = frozenset({SYSTEM, PATIENT, GROUP})
    #: Backend client registration must give a JWKS URL (an inline JWKS is refused).
    require_jwks_url: bool = False
    #: At most one in-progress export per client; another kick-off gets 429 ``throttled``.
    one_export_per_client: bool = False
    #: A repeated ``_type`` parameter is refused (400) instead of being comma-joined.
    reject_repeated_type: bool = False
    #: When set, ``_type`` values must be in this set (else 400).
    allowed_types: frozenset[str] | None = None
    #: Types that need a non-reference type alongside in ``_type``.
    reference_types_need_clinical: frozenset[str] = frozenset()
    #: ``_typeFilter`` is refused unless ``_type`` is given.
    type_filter_requires_type: bool = False
    #: At most one ``_typeFilter`` query per resource type.
    type_filter_one_per_type: bool = False
    #: Types that cannot be filtered with ``_typeFilter``.
    unfilterable_types: frozenset[str] = frozenset()
    #: Search parameters refused inside ``_typeFilter``.
    blocked_filter_params: frozenset[str] = frozenset()
    #: Kick-off parameters this vendor refuses (400) even though the spec defines them.
    unsupported_params: frozenset[str] = frozenset()
    #: Manifest ``requiresAccessToken`` as the JSON string ``"true"`` (a quirk seen at Oracle).
    requires_access_token_as_string: bool = False
    #: File URLs answer ``307`` to a presigned URL on the storage origin.
    presigned_redirects: bool = False
    #: ``X-Progress`` text: ``percent`` ("40% complete") or ``opaque`` ("in-progress").
    progress_style: str = "percent"
    #: Extra seconds an export takes beyond the server's configured duration.
    extra_export_seconds: float = 0.0
    #: ``Retry-After`` seconds on a 202 status; ``None`` keeps the server's configured value.
    retry_after_seconds: int | None = None
    #: Status, file and delete calls only by the client that started the export.
    owner_only: bool = True
    notes: tuple[str, ...] = field(default_factory=tuple)


STRICT = VendorProfile(name="strict", notes=("Bulk Data Access 2.0 (STU2), nothing more",))

EPIC = VendorProfile(
    name="epic",
    levels=frozenset({GROUP}),
    require_jwks_url=True,
    progress_style="opaque",
    retry_after_seconds=2,
    notes=(
        "Group export only",
        "not incremental: nothing is available until the whole export is done",
        "backend clients must host a JWKS URL",
    ),
)

ORACLE = VendorProfile(
    name="oracle",
    levels=frozenset({GROUP}),
    one_export_per_client=True,
    reject_repeated_type=True,
    allowed_types=ORACLE_USCDI_V1_TYPES,
    reference_types_need_clinical=ORACLE_REFERENCE_TYPES,
    type_filter_requires_type=True,
    type_filter_one_per_type=True,
    unfilterable_types=ORACLE_UNFILTERABLE_TYPES,
    blocked_filter_params=ORACLE_BLOCKED_FILTER_PARAMS,
    unsupported_params=frozenset({"_elements", "patient", "includeAssociatedData"}),
    requires_access_token_as_string=True,
    presigned_redirects=True,
    notes=(
        "Group export only, one in-progress export per client",
        "_type given once only, USCDI v1 types",
        "file URLs 307 to a presigned URL that refuses an Authorization header",
        'requiresAccessToken is the string "true"',
    ),
)

PROFILES: dict[str, VendorProfile] = {p.name: p for p in (STRICT, EPIC, ORACLE)}


def get_profile(name: str | VendorProfile | None) -> VendorProfile:
    """Return the named profile (``strict``, ``epic``, ``oracle``); a profile passes through."""
    if name is None:
        return STRICT
    if isinstance(name, VendorProfile):
        return name
    try:
        return PROFILES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown vendor profile {name!r}; known: {sorted(PROFILES)}") from None


def check_client_registration(
    profile: VendorProfile, *, jwks_url: str | None, jwks: dict | None
) -> None:
    """Raise ``ValueError`` if a backend client registration is not allowed under ``profile``.

    SPECS 2: servers must accept a JWKS URL or an inline JWKS; Epic accepts only a JWKS URL.
    """
    if not jwks_url and not jwks:
        raise ValueError("a backend client needs a JWKS URL or an inline JWKS")
    if profile.require_jwks_url and not jwks_url:
        raise ValueError(f"the {profile.name} profile requires a JWKS URL for backend clients")
