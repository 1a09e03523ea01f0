"""SMART scopes: building requests and normalising grants, v1 and v2 syntax (SPECS §1.5).

v2 resource scopes are ``(patient|user|system)/(Type|*).[c][r][u][d][s]`` with the letters in that order
and an optional ``?param=value`` filter; v1 spells ``.read`` (= ``.rs``), ``.write`` (= ``.cud``) and ``.*``
(= ``.cruds``). Servers grant either form, and may grant less (or differently) than was asked, so every
decision about what to pull is made from the *granted* set, normalised to v2 letters.

    scopes = build_scopes(["Patient", "Observation"], v2=True)
    granted = ScopeSet.parse("launch/patient patient/Observation.read offline_access")
    granted.allows("Observation")            # True (v1 .read normalised to .rs)
"""

import re
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

_RESOURCE = re.compile(
    r"^(?P<ctx>patient|user|system)/(?P<type>\*|[A-Z][A-Za-z]+)\.(?P<perm>[a-z*]+)"
    r"(?:\?(?P<query>.+))?$"
)
_V1 = {"read": "rs", "write": "cud", "*": "cruds"}
_ORDER = "cruds"

#: The context, identity and refresh scopes a patient standalone launch asks for (SPECS §1.5).
PATIENT_STANDALONE_EXTRAS: tuple[str, ...] = (
    "launch/patient",
    "openid",
    "fhirUser",
    "offline_access",
)
#: Scopes that are neither resource scopes nor unknown: kept verbatim in a normalised set.
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


@dataclass(frozen=True)
class ResourceScope:
    """One resource scope with its permissions as v2 letters (``frozenset("rs")``)."""

    context: str
    resource_type: str
    perms: frozenset[str]
    query: tuple[tuple[str, str], ...] = ()

    def render(self) -> str:
        """The canonical v2 text of this scope (letters in ``cruds`` order)."""
        letters = "".join(c for c in _ORDER if c in self.perms)
        text = f"{self.context}/{self.resource_type}.{letters}"
        if self.query:
            text += "?" + urllib.parse.urlencode(self.query, safe="|:/,")
        return text

    def render_v1(self) -> str:
        """The v1 text (``.read``/``.write``/``.*``) when the letters have a v1 spelling."""
        letters = "".join(c for c in _ORDER if c in self.perms)
        perm = next((k for k, v in _V1.items() if v == letters), None)
        if perm is None or self.query:
            return self.render()
        return f"{self.context}/{self.resource_type}.{perm}"


def parse_resource_scope(text: str) -> ResourceScope | None:
    """Parse a v1 or v2 resource scope; ``None`` when ``text`` is not one (or is malformed).

    v2 letters out of ``cruds`` order are refused here (the spec lets servers ignore them), so a
    malformed grant never silently turns into access we rely on.
    """
    match = _RESOURCE.match(text.strip())
    if not match:
        return None
    perm = match["perm"]
    if perm in _V1:
        letters = _V1[perm]
    else:
        if not perm or any(c not in _ORDER for c in perm):
            return None
        positions = [_ORDER.index(c) for c in perm]
        if positions != sorted(set(positions)):
            return None
        letters = perm
    query: tuple[tuple[str, str], ...] = ()
    if match["query"]:
        query = tuple(urllib.parse.parse_qsl(match["query"], keep_blank_values=False))
    return ResourceScope(match["ctx"], match["type"], frozenset(letters), query)


def split_scopes(value: str | Iterable[str] | None) -> list[str]:
    """Split a space-separated scope string (or pass a list through), dropping blanks and repeats."""
    if value is None:
        return []
    items = value.split() if isinstance(value, str) else [s for v in value for s in v.split()]
    out: list[str] = []
    for item in items:
        if item not in out:
            out.append(item)
    return out


@dataclass(frozen=True)
class ScopeSet:
    """A granted (or requested) scope set, normalised: resource scopes parsed, the rest kept as is."""

    resource: tuple[ResourceScope, ...]
    other: frozenset[str]

    @classmethod
    def parse(cls, value: str | Iterable[str] | None) -> "ScopeSet":
        """Parse a scope string or list (v1 and v2 mixed)."""
        resource: list[ResourceScope] = []
        other: set[str] = set()
        for item in split_scopes(value):
            parsed = parse_resource_scope(item)
            if parsed is not None:
                resource.append(parsed)
            else:
                other.add(item)
        return cls(tuple(resource), frozenset(other))

    def normalised(self) -> list[str]:
        """Canonical v2 strings: context scopes first (sorted), then resource scopes (sorted)."""
        merged: dict[tuple[str, str, tuple[tuple[str, str], ...]], set[str]] = {}
        for s in self.resource:
            merged.setdefault((s.context, s.resource_type, s.query), set()).update(s.perms)
        res = sorted(
            ResourceScope(c, t, frozenset(p), q).render() for (c, t, q), p in merged.items()
        )
        return sorted(self.other) + res

    def __str__(self) -> str:
        return " ".join(self.normalised())

    def allows(
        self, resource_type: str, interaction: str = "r", *, contexts: Sequence[str] = ("patient",)
    ) -> bool:
        """Whether some scope of a given context grants ``interaction`` on ``resource_type``.

        A scope with a ``?filter`` counts as allowing the type (the server applies the filter).
        """
        return any(
            s.context in contexts
            and s.resource_type in ("*", resource_type)
            and interaction in s.perms
            for s in self.resource
        )

    def can_search(self, resource_type: str, *, contexts: Sequence[str] = ("patient",)) -> bool:
        """Read *and* search (``rs``, or v1 ``read``) on ``resource_type``."""
        return self.allows(resource_type, "r", contexts=contexts) and self.allows(
            resource_type, "s", contexts=contexts
        )

    def filters_for(
        self, resource_type: str, *, contexts: Sequence[str] = ("patient",)
    ) -> list[tuple[tuple[str, str], ...]]:
        """The ``?query`` filters of the scopes that grant search on ``resource_type``.

        An empty tuple in the list means an unfiltered grant.
        """
        return [
            s.query
            for s in self.resource
            if s.context in contexts and s.resource_type in ("*", resource_type) and "s" in s.perms
        ]

    @property
    def has_offline_access(self) -> bool:
        return "offline_access" in self.other

    def __contains__(self, item: object) -> bool:
        return item in self.other


def build_scopes(
    resource_types: Iterable[str],
    *,
    v2: bool,
    context: str = "patient",
    extras: Sequence[str] = PATIENT_STANDALONE_EXTRAS,
    template: Sequence[str] | None = None,
) -> list[str]:
    """The scope list of an authorization request.

    ``template`` (a per-vendor list from the source config) wins outright: some EHRs reject v2 scopes
    or want exactly their own set (SPECS §1.12). Otherwise: the extras, then one read+search scope per
    resource type in v2 (``.rs``) or v1 (``.read``) syntax.
    """
    if template:
        return split_scopes(template)
    out = list(extras)
    for rtype in resource_types:
        text = f"{context}/{rtype}." + ("rs" if v2 else "read")
        if text not in out:
            out.append(text)
    return out


def choose_v2(smart_config: dict[str, Any], preference: str | None = None) -> bool:
    """Use v2 syntax when the server offers ``permission-v2`` (or the source config forces a side).

    ``preference`` is the source's ``scope_syntax``: ``"v1"``, ``"v2"`` or ``None``/``"auto"``.
    """
    if preference == "v1":
        return False
    if preference == "v2":
        return True
    caps = set(smart_config.get("capabilities") or [])
    if "permission-v2" in caps:
        return True
    if "permission-v1" in caps:
        return False
    # No statement either way: v1 is what older servers understand, and v2 servers accept it too.
    return False
