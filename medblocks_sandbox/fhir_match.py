"""Element access and search matching for the sandbox FHIR servers: token, reference, date (with
prefixes) and string parameters, the `:not`, `:exact` and `:contains` modifiers, compiled filters.
"""

import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from medblocks_sandbox.errors import FhirHttpError
from medblocks_sandbox.fhir_params import CONTROL_PARAMS, Resource, SearchParam, params_for


# ---------------------------------------------------------------------------------------------
# Element access and value matching
# ---------------------------------------------------------------------------------------------
def element_values(resource: Any, path: str) -> list[Any]:
    """The values at dotted `path` in `resource`, flattening lists along the way."""
    current: list[Any] = [resource]
    for part in path.split("."):
        nxt: list[Any] = []
        for item in current:
            if isinstance(item, dict) and part in item:
                value = item[part]
                if isinstance(value, list):
                    nxt.extend(value)
                else:
                    nxt.append(value)
        current = nxt
    return current


def reference_key(reference: str) -> tuple[str, str] | None:
    """`(type, id)` of a literal reference, relative (`Patient/1`) or absolute (`http://x/Patient/1`)."""
    parts = reference.split("?")[0].rstrip("/").split("/")
    if len(parts) >= 4 and parts[-2] == "_history":  # Type/id/_history/vid
        parts = parts[:-2]
    if len(parts) < 2 or not parts[-2][:1].isupper():
        return None
    return parts[-2], parts[-1]


def _references(resource: Resource, path: str) -> list[tuple[str, str]]:
    out = []
    for value in element_values(resource, path):
        if isinstance(value, dict) and isinstance(value.get("reference"), str):
            key = reference_key(value["reference"])
            if key:
                out.append(key)
    return out


_DATE_RE = re.compile(
    r"^(?P<y>\d{4})(?:-(?P<m>\d{2})(?:-(?P<d>\d{2})"
    r"(?:T(?P<H>\d{2}):(?P<M>\d{2})(?::(?P<S>\d{2})(?:\.(?P<f>\d+))?)?"
    r"(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?$"
)


def parse_date_range(text: str) -> tuple[datetime, datetime]:
    """The half-open UTC interval `[low, high)` a FHIR date/dateTime/instant value denotes.

    The precision given sets the width (`2024` is the whole year); values without a zone are
    taken as UTC. Raises ValueError on anything that is not a FHIR date.
    """
    match = _DATE_RE.match(text.strip())
    if not match:
        raise ValueError(f"not a FHIR date: {text[:40]!r}")
    g = match.groupdict()
    year = int(g["y"])
    if g["m"] is None:
        low = datetime(year, 1, 1, tzinfo=UTC)
        return low, datetime(year + 1, 1, 1, tzinfo=UTC)
    month = int(g["m"])
    if g["d"] is None:
        low = datetime(year, month, 1, tzinfo=UTC)
        high = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)
        return low, high
    day = int(g["d"])
    if g["H"] is None:
        low = datetime(year, month, day, tzinfo=UTC)
        return low, low + timedelta(days=1)
    tz = UTC
    if g["tz"] and g["tz"] != "Z":
        sign = 1 if g["tz"][0] == "+" else -1
        hours, minutes = int(g["tz"][1:3]), int(g["tz"][4:6])
        tz = timezone(sign * timedelta(hours=hours, minutes=minutes))
    if g["S"] is None:
        low = datetime(year, month, day, int(g["H"]), int(g["M"]), tzinfo=tz)
        return low.astimezone(UTC), (low + timedelta(minutes=1)).astimezone(UTC)
    frac = g["f"] or ""
    micro = int((frac + "000000")[:6]) if frac else 0
    low = datetime(year, month, day, int(g["H"]), int(g["M"]), int(g["S"]), micro, tzinfo=tz)
    width = timedelta(microseconds=10 ** max(0, 6 - len(frac))) if frac else timedelta(seconds=1)
    return low.astimezone(UTC), (low + width).astimezone(UTC)


_FAR_PAST = datetime(1, 1, 1, tzinfo=UTC)
_FAR_FUTURE = datetime(9999, 12, 31, tzinfo=UTC)


def _date_ranges(resource: Resource, path: str) -> list[tuple[datetime, datetime]]:
    out = []
    for value in element_values(resource, path):
        try:
            if isinstance(value, str):
                out.append(parse_date_range(value))
            elif isinstance(value, dict) and ("start" in value or "end" in value):
                low = parse_date_range(value["start"])[0] if value.get("start") else _FAR_PAST
                high = parse_date_range(value["end"])[1] if value.get("end") else _FAR_FUTURE
                out.append((low, high))
        except ValueError:
            continue  # a malformed stored date never matches; it is not the searcher's fault
    return out


_DATE_PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb")


def _date_matches(
    prefix: str, target: tuple[datetime, datetime], value: tuple[datetime, datetime]
) -> bool:
    # FHIR R4 search §3.1.1.4: comparisons between the target's range and the parameter's range.
    t_lo, t_hi = target
    v_lo, v_hi = value
    if prefix == "eq":
        return v_lo <= t_lo and t_hi <= v_hi
    if prefix == "ne":
        return not (v_lo <= t_lo and t_hi <= v_hi)
    if prefix == "gt":
        return t_hi > v_hi
    if prefix == "lt":
        return t_lo < v_lo
    if prefix == "ge":
        return t_hi > v_lo
    if prefix == "le":
        return t_lo < v_hi
    if prefix == "sa":
        return t_lo >= v_hi
    if prefix == "eb":
        return t_hi <= v_lo
    raise AssertionError(prefix)


def _tokens(resource: Resource, path: str) -> list[tuple[str | None, str]]:
    out: list[tuple[str | None, str]] = []
    for value in element_values(resource, path):
        if isinstance(value, str):
            out.append((None, value))
        elif isinstance(value, bool):
            out.append((None, "true" if value else "false"))
        elif isinstance(value, dict):
            if "coding" in value:
                for coding in value.get("coding") or []:
                    if isinstance(coding, dict) and "code" in coding:
                        out.append((coding.get("system"), str(coding["code"])))
            elif "code" in value:  # Coding
                out.append((value.get("system"), str(value["code"])))
            elif "value" in value:  # Identifier
                out.append((value.get("system"), str(value["value"])))
    return out


def _token_matches(query: str, tokens: list[tuple[str | None, str]]) -> bool:
    if "|" in query:
        system, code = query.split("|", 1)
        if system == "":  # |code: the code with no system
            return any(s is None and c == code for s, c in tokens)
        if code == "":  # system|: any code in the system
            return any(s == system for s, _ in tokens)
        return any(s == system and c == code for s, c in tokens)
    return any(c == query for _, c in tokens)


def _strings(resource: Resource, path: str) -> list[str]:
    out: list[str] = []
    for value in element_values(resource, path):
        if isinstance(value, str):
            out.append(value)
        elif isinstance(value, dict):  # HumanName / Address: every string part
            for key in (
                "text",
                "family",
                "given",
                "prefix",
                "suffix",
                "line",
                "city",
                "district",
                "state",
                "postalCode",
                "country",
            ):
                part = value.get(key)
                if isinstance(part, str):
                    out.append(part)
                elif isinstance(part, list):
                    out.extend(x for x in part if isinstance(x, str))
    return out


def _bad(message: str) -> FhirHttpError:
    return FhirHttpError(400, "invalid", message)


def _match_param(resource: Resource, param: SearchParam, modifier: str | None, raw: str) -> bool:
    """Whether `resource` matches one occurrence of a search parameter (comma = OR)."""
    values = _split_or(raw)
    if not values:
        raise _bad(f"search parameter {param.name} has an empty value")
    if param.kind == "token":
        if modifier not in (None, "not"):
            raise _bad(f"modifier :{modifier} is not supported on {param.name}")
        tokens = [t for path in param.paths for t in _tokens(resource, path)]
        hit = any(_token_matches(v, tokens) for v in values)
        return not hit if modifier == "not" else hit
    if param.kind == "reference":
        if (
            modifier is not None
            and modifier not in param.targets
            and not (not param.targets and modifier[:1].isupper())
        ):
            raise _bad(f"modifier :{modifier} is not supported on {param.name}")
        refs = [r for path in param.paths for r in _references(resource, path)]
        for v in values:
            key = reference_key(v) if "/" in v else None
            for rtype, rid in refs:
                if key is not None and (rtype, rid) == key:
                    return True
                if key is None and rid == v:
                    wanted = (modifier,) if modifier else param.targets
                    if not wanted or rtype in wanted:
                        return True
        return False
    if param.kind == "date":
        if modifier is not None:
            raise _bad(f"modifier :{modifier} is not supported on {param.name}")
        ranges = [r for path in param.paths for r in _date_ranges(resource, path)]
        for v in values:
            prefix, text = (v[:2], v[2:]) if v[:2] in _DATE_PREFIXES else ("eq", v)
            try:
                window = parse_date_range(text)
            except ValueError:
                raise _bad(f"search parameter {param.name}: invalid date value") from None
            if any(_date_matches(prefix, r, window) for r in ranges):
                return True
        return False
    # string
    if modifier not in (None, "exact", "contains"):
        raise _bad(f"modifier :{modifier} is not supported on {param.name}")
    strings = [s for path in param.paths for s in _strings(resource, path)]
    for v in values:
        if modifier == "exact" and any(s == v for s in strings):
            return True
        folded = v.casefold()
        if modifier == "contains" and any(folded in s.casefold() for s in strings):
            return True
        if modifier is None and any(s.casefold().startswith(folded) for s in strings):
            return True
    return False


def _split_or(raw: str) -> list[str]:
    # Commas separate OR values; `\,` is an escaped literal comma (FHIR search §3.1.1.3).
    parts, current, i = [], [], 0
    while i < len(raw):
        ch = raw[i]
        if ch == "\\" and i + 1 < len(raw):
            current.append(raw[i + 1])
            i += 2
            continue
        if ch == ",":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    parts.append("".join(current))
    return [p for p in parts if p != ""]


def _validate_date_param_values(name: str, raw: str) -> None:
    for v in _split_or(raw):
        text = v[2:] if v[:2] in _DATE_PREFIXES else v
        if v[:2].isalpha() and v[:2] not in _DATE_PREFIXES:
            raise _bad(f"search parameter {name}: unsupported prefix")
        try:
            parse_date_range(text)
        except ValueError:
            raise _bad(f"search parameter {name}: invalid date value") from None


def compile_filters(
    resource_type: str, params: Sequence[tuple[str, str]]
) -> list[tuple[SearchParam, str | None, str]]:
    """Check the non-control search parameters of a query; raise FhirHttpError(400) if unknown.

    Returns `(param, modifier, value)` triples: repeated parameters are ANDed, commas ORed.
    """
    known = params_for(resource_type)
    out = []
    for name, value in params:
        if name in CONTROL_PARAMS:
            continue
        base, _, modifier = name.partition(":")
        param = known.get(base)
        if param is None:
            raise FhirHttpError(
                400, "not-supported", f"unknown search parameter {base!r} for {resource_type}"
            )
        if param.kind == "date":
            if modifier:
                raise _bad(f"modifier :{modifier} is not supported on {base}")
            _validate_date_param_values(base, value)
        out.append((param, modifier or None, value))
    return out


def matches(resource: Resource, filters: Iterable[tuple[SearchParam, str | None, str]]) -> bool:
    """Whether `resource` satisfies every compiled filter."""
    return all(_match_param(resource, p, m, v) for p, m, v in filters)
