"""SMART scopes (SPECS §1.5): v1 and v2 syntax parsed into `ResourceScope`, narrowing a request
to a client's ceiling, and the `AccessGrant` one scope gives a token on one resource type.
"""

import re
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, Literal

# Scopes that are not resource scopes but that the server understands (SPECS §1.5).
CONTEXT_SCOPES = frozenset(
    {
        "launch",
        "launch/patient",
        "launch/encounter",
        "openid",
        "fhirUser",
        "profile",
        "offline_access",
        "online_access",
    }
)

# ---------------------------------------------------------------------------------------------
# Scopes
# ---------------------------------------------------------------------------------------------
_SCOPE_RE = re.compile(
    r"^(?P<ctx>patient|user|system)/(?P<type>\*|[A-Z][A-Za-z]+)\."
    r"(?P<perm>read|write|\*|c?r?u?d?s?)(?:\?(?P<query>.+))?$"
)
_V1 = {"read": "rs", "write": "cud", "*": "cruds"}
_ORDER = "cruds"


@dataclass(frozen=True)
class ResourceScope:
    """A parsed SMART resource scope (v1 `.read` and v2 `.rs` normalised to permission letters)."""

    context: Literal["patient", "user", "system"]
    resource_type: str  # a type or "*"
    perms: frozenset[str]
    query: tuple[tuple[str, str], ...] = ()
    v1: bool = False

    def covers(self, other: "ResourceScope") -> bool:
        """Whether this scope grants everything `other` asks for."""
        return (
            self.context == other.context
            and self.resource_type in ("*", other.resource_type)
            and self.perms >= other.perms
            and (not self.query or self.query == other.query)
        )

    def render(self) -> str:
        """The scope string, v1 form if it came as v1 and still fits, else v2 letters in order."""
        letters = "".join(c for c in _ORDER if c in self.perms)
        perm = next((k for k, v in _V1.items() if v == letters), None) if self.v1 else None
        text = f"{self.context}/{self.resource_type}.{perm or letters}"
        if self.query:
            text += "?" + urllib.parse.urlencode(self.query, safe="|:/")
        return text


def parse_scope(text: str) -> ResourceScope | None:
    """Parse a SMART resource scope; None if it is not one (or its letters are out of order)."""
    match = _SCOPE_RE.match(text)
    if not match or match["perm"] == "":
        return None
    perm = match["perm"]
    v1 = perm in _V1
    letters = _V1.get(perm, perm)
    query = (
        tuple(urllib.parse.parse_qsl(match["query"], keep_blank_values=False))
        if match["query"]
        else ()
    )
    ctx: Any = match["ctx"]
    return ResourceScope(ctx, match["type"], frozenset(letters), query, v1)


_PLAIN_SCOPES = {
    "launch": "Open in the context of your current EHR session",
    "launch/patient": "Know which patient record is open",
    "launch/encounter": "Know which visit is open",
    "openid": "Know who you are",
    "fhirUser": "Know who you are",
    "profile": "Know who you are",
    "offline_access": "Keep access after you sign out, until you revoke it",
    "online_access": "Keep access while you stay signed in",
}
_VERBS = {"c": "create", "r": "read", "u": "update", "d": "delete", "s": "search"}


def describe_scope(text: str) -> str:
    """A plain-language description of a scope for the consent page."""
    if text in _PLAIN_SCOPES:
        return _PLAIN_SCOPES[text]
    scope = parse_scope(text)
    if scope is None:
        return "Other access"
    verbs = ", ".join(_VERBS[c] for c in _ORDER if c in scope.perms)
    what = "all record types" if scope.resource_type == "*" else f"{scope.resource_type} records"
    whose = {"patient": "of this patient", "user": "you can see", "system": "of everyone"}[
        scope.context
    ]
    filtered = " (only some)" if scope.query else ""
    return f"{verbs.capitalize()} {what} {whose}{filtered}"


def narrow_scopes(
    requested: Iterable[str], ceiling: Iterable[str], *, contexts: Iterable[str]
) -> list[str]:
    """The requested scopes the ceiling allows, each cut down to allowed permissions.

    Context scopes pass if the ceiling lists them; resource scopes pass (narrowed) if a ceiling
    scope of an allowed context covers their type. Unknown or malformed scopes are dropped: the
    granted set may be narrower than the request (SPECS §1.4).
    """
    allowed_ctx = set(contexts)
    ceiling = list(ceiling)
    ceiling_plain = set(ceiling)
    ceiling_res = [s for s in (parse_scope(c) for c in ceiling) if s is not None]
    out: list[str] = []
    for text in requested:
        if text in out:
            continue
        if text in CONTEXT_SCOPES:
            if text in ceiling_plain:
                out.append(text)
            continue
        scope = parse_scope(text)
        if scope is None or scope.context not in allowed_ctx:
            continue
        perms: set[str] = set()
        for c in ceiling_res:
            if (
                c.context == scope.context
                and c.resource_type in ("*", scope.resource_type)
                and (not c.query or c.query == scope.query)
            ):
                perms |= c.perms
        perms &= scope.perms
        if perms:
            out.append(replace(scope, perms=frozenset(perms)).render())
    return out


@dataclass(frozen=True)
class AccessGrant:
    """What one granted scope lets a token do with one resource type."""

    patient: str | None  # restrict to this patient's compartment (None: no compartment limit)
    filters: tuple[tuple[str, str], ...]  # v2 scope query: search params a resource must match
