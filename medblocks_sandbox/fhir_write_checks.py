"""The checks behind the sandbox's FHIR writes: building and answering entries, the request
(content types, JSON body, `Prefer`, `If-Match`, ids, Bundle shape, `fullUrl`s) and the content
(local `urn:uuid`/`urn:oid` references rewritten, R4B validation, JSON the models let through).
"""

import json
import urllib.parse
from collections.abc import Mapping
from typing import Any

import pydantic
from fhir.resources.R4B import get_fhir_model_class
from starlette.requests import Request

from medblocks_sandbox.fhir_params import Resource
from medblocks_sandbox.fhir_write_ops import (
    _BUNDLE_KEYS,
    _DIV_LINK_RE,
    _ETAG_RE,
    _ID_RE,
    _OID_URN_RE,
    _UUID_URN_RE,
    FHIR_JSON,
    MAX_BODY_BYTES,
    MAX_DEPTH,
    WriteError,
    _Op,
    _Result,
    status_line,
)


def _outside(op: _Op, verb: str) -> WriteError:
    return WriteError(
        403,
        "forbidden",
        f"this token may not {verb} {op.rtype}/{op.rid}: outside its access",
        expression=op.where,
    )


def _write_op(where: str | None, index: int, method: str, rtype: str, rid: str, body: Any) -> _Op:
    """The op of a POST/PUT body: resourceType and id checked, server-owned meta dropped."""
    at = f"{where}.resource" if where else rtype
    if not isinstance(body, dict):
        raise WriteError(400, "structure", "the resource must be a JSON object", expression=where)
    given = body.get("resourceType")
    if given != rtype:
        raise WriteError(
            400,
            "required" if given is None else "invalid",
            f"resourceType must be {rtype}, the type in the URL",
            expression=f"{at}.resourceType" if where else None,
        )
    if method == "PUT":
        if body.get("id") is None:
            raise WriteError(
                400,
                "required",
                "an update needs resource.id, equal to the id in the URL",
                expression=f"{at}.id",
            )
        if body.get("id") != rid:
            raise WriteError(
                400,
                "invalid",
                "resource.id does not match the id in the URL",
                expression=f"{at}.id",
            )
    resource: Resource = json.loads(json.dumps(body))  # a private deep copy
    resource["id"] = rid  # a create ignores any id it was given (http.html#create)
    meta = resource.get("meta")
    if isinstance(meta, dict):  # the store stamps these
        meta.pop("versionId", None)
        meta.pop("lastUpdated", None)
        if not meta:
            del resource["meta"]
    return _Op(index, method, rtype, rid, where, resource=resource)


def _response_entry(result: _Result, prefer: str) -> dict[str, Any]:
    """A transaction/batch-response entry; `prefer` is the Prefer `return=` value."""
    response: dict[str, Any] = {"status": status_line(result.status)}
    entry: dict[str, Any] = {}
    res = result.resource
    if res is not None and not result.read:
        response["location"] = f"{res['resourceType']}/{res['id']}/_history/{result.version}"
    if result.version:
        response["etag"] = f'W/"{result.version}"'
    if result.last_modified:
        response["lastModified"] = result.last_modified
    if res is not None and (result.read or prefer == "representation"):
        entry["resource"] = res
    if prefer == "OperationOutcome" and not result.read:
        response["outcome"] = _info(status_line(result.status))
    entry["response"] = response
    return entry


# ---------------------------------------------------------------------------------------------
# request helpers
# ---------------------------------------------------------------------------------------------
def accepts_json(request: Request) -> bool:
    """Whether `_format` and `Accept` allow a JSON answer (the only format the sandbox speaks);
    the read side (`ehr_api.py`) uses the same rule."""
    fmt = request.query_params.get("_format")
    if fmt is not None and fmt not in ("json", "application/json", FHIR_JSON):
        return False
    accept = request.headers.get("accept", "")
    if not accept:
        return True
    types = [a.split(";")[0].strip().lower() for a in accept.split(",")]
    return any(
        t in ("*/*", "application/*", FHIR_JSON, "application/json", "application/json+fhir")
        for t in types
    )


def _check_accept(request: Request) -> None:
    if not accepts_json(request):
        raise WriteError(406, "not-supported", "this server speaks JSON only")


def _check_query(request: Request) -> None:
    for name in request.query_params:
        if name != "_format":
            raise WriteError(
                400,
                "not-supported",
                f"parameter {name[:40]!r} is not supported here (no conditional operations)",
            )


async def _read_json(request: Request) -> Any:
    media, _, rest = request.headers.get("content-type", "").partition(";")
    if media.strip().lower() not in (FHIR_JSON, "application/json"):
        raise WriteError(
            415, "not-supported", "the body must be application/fhir+json (or application/json)"
        )
    for param in rest.split(";"):
        name, _, value = param.partition("=")
        name, value = name.strip().lower(), value.strip().strip('"').lower()
        if name == "charset" and value not in ("utf-8", "utf8"):
            raise WriteError(415, "not-supported", "FHIR JSON is UTF-8")
        if name == "fhirversion" and value != "4.0":
            raise WriteError(415, "not-supported", "this server speaks FHIR 4.0 (fhirVersion=4.0)")
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise WriteError(413, "too-costly", "the body is too large")
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise WriteError(413, "too-costly", "the body is too large")
    try:
        data = json.loads(
            body.decode("utf-8"), object_pairs_hook=_unique_keys, parse_constant=_no_constant
        )
    except UnicodeDecodeError:
        raise WriteError(400, "structure", "the body is not UTF-8") from None
    except RecursionError:
        raise WriteError(400, "structure", "the JSON is nested too deeply") from None
    except ValueError as exc:
        why = str(exc) if str(exc).startswith("duplicate") else "the body is not valid JSON"
        raise WriteError(400, "structure", why) from None
    if _depth(data) > MAX_DEPTH:
        raise WriteError(400, "structure", "the JSON is nested too deeply")
    return data


def _depth(value: Any) -> int:
    """How deeply objects and arrays nest in `value` (iterative: no recursion limit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, level)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, level + 1) for child in children)
    return deepest


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate JSON property {key[:64]!r}")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _prefer(request: Request, default: str) -> str:
    for part in request.headers.get("prefer", "").split(","):
        for item in part.split(";"):
            name, _, value = item.partition("=")
            if name.strip().lower() == "return":
                value = value.strip().strip('"')
                if value in ("minimal", "representation", "OperationOutcome"):
                    return value
    return default


def _if_match(value: Any, where: str | None) -> str | None:
    if value is None:
        return None
    match = _ETAG_RE.fullmatch(value.strip()) if isinstance(value, str) else None
    if not match:
        raise WriteError(
            400, "invalid", 'If-Match must be a version ETag such as W/"3"', expression=where
        )
    return match.group(1)


def _check_id(rid: str, where: str | None) -> None:
    if not _ID_RE.fullmatch(rid):
        raise WriteError(
            400, "invalid", "a resource id is 1-64 characters of A-Z a-z 0-9 - .", expression=where
        )


def _check_keys(obj: Mapping[str, Any], allowed: frozenset[str], where: str) -> None:
    unknown = sorted(k for k in obj if k not in allowed and k.removeprefix("_") not in allowed)
    if unknown:
        raise WriteError(
            400,
            "structure",
            f"unknown element {unknown[0][:64]!r}",
            expression=f"{where}.{unknown[0][:64]}",
        )
    if obj.get("modifierExtension"):
        raise WriteError(
            400,
            "not-supported",
            "modifier extensions are not understood here",
            expression=f"{where}.modifierExtension",
        )


def _bundle_entries(body: Any) -> tuple[str, list[Any]]:
    if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
        raise WriteError(400, "invalid", "POST to the base takes a Bundle")
    _check_keys(body, _BUNDLE_KEYS, "Bundle")
    kind = body.get("type")
    if kind not in ("transaction", "batch"):
        raise WriteError(
            400,
            "invalid",
            "the Bundle type must be transaction or batch",
            expression="Bundle.type",
        )
    if "total" in body:
        raise WriteError(400, "invalid", "Bundle.total is for searchset and history (bdl-1)")
    entries = body.get("entry", [])
    if not isinstance(entries, list):
        raise WriteError(
            400, "structure", "Bundle.entry must be an array", expression="Bundle.entry"
        )
    return kind, entries


def _check_full_url(value: Any, where: str) -> None:
    if not isinstance(value, str) or not value:
        raise WriteError(400, "invalid", "fullUrl must be a non-empty string", expression=where)
    if value.startswith("urn:"):
        if not (_UUID_URN_RE.fullmatch(value) or _OID_URN_RE.fullmatch(value)):
            raise WriteError(
                400,
                "invalid",
                "a urn fullUrl must be urn:uuid:<lower-case UUID> or urn:oid:<OID>",
                expression=where,
            )
        return
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise WriteError(
            400, "invalid", "fullUrl must be an absolute URL or a urn:uuid", expression=where
        )
    if "/_history/" in parts.path:
        raise WriteError(
            400, "invalid", "fullUrl cannot be a version-specific URL (bdl-8)", expression=where
        )


def _check_full_url_agrees(full_url: str, resource: Resource, where: str) -> None:
    tail = urllib.parse.urlsplit(full_url).path.rstrip("/").split("/")[-2:]
    if tail != [resource.get("resourceType"), resource.get("id")]:
        raise WriteError(
            400,
            "invalid",
            "fullUrl disagrees with the resource's type and id",
            expression=where,
        )


def _check_unique_full_urls(ops: list[_Op]) -> None:
    seen: dict[str, int] = {}
    for op in ops:
        if op.full_url is None:
            continue
        if op.full_url in seen:
            raise WriteError(
                400,
                "invalid",
                f"entries {seen[op.full_url]} and {op.index} have the same fullUrl (bdl-7)",
                expression=op.at("fullUrl"),
            )
        seen[op.full_url] = op.index


# ---------------------------------------------------------------------------------------------
# content: local references, validation
# ---------------------------------------------------------------------------------------------
def _rewrite(value: Any, local: Mapping[str, str]) -> Any:
    """A copy of `value` with every string equal to a local fullUrl replaced by `Type/id`."""
    if isinstance(value, dict):
        return {
            k: (
                _DIV_LINK_RE.sub(lambda m: m[1] + local.get(m[2], m[2]) + m[3], v)
                if k == "div" and isinstance(v, str)
                else _rewrite(v, local)
            )
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_rewrite(v, local) for v in value]
    if isinstance(value, str):
        return local.get(value, value)
    return value


def _check_local_refs(resource: Resource, where: str, *, in_transaction: bool) -> None:
    """A `reference` still naming a urn:uuid / urn:oid resolves to nothing: refuse it."""
    for path, ref in _references(resource, ""):
        if ref.startswith(("urn:uuid:", "urn:oid:")):
            why = (
                "matches no fullUrl of this transaction"
                if in_transaction
                else "cannot be resolved (only transactions resolve references between entries)"
            )
            raise WriteError(
                400, "invalid", f"reference {path.lstrip('.')} {why}", expression=f"{where}{path}"
            )


def _references(value: Any, path: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    if isinstance(value, dict):
        for k, v in value.items():
            if k == "reference" and isinstance(v, str):
                out.append((f"{path}.{k}", v))
            else:
                out.extend(_references(v, f"{path}.{k}"))
    elif isinstance(value, list):
        for n, v in enumerate(value):
            out.extend(_references(v, f"{path}[{n}]"))
    return out


def _validate(resource: Resource, where: str) -> None:
    """422 unless the resource follows FHIR JSON rules and the R4B model (no content echoed)."""
    rtype = resource["resourceType"]
    problem = _json_problem(resource, "")
    if problem is not None:
        path, why = problem
        raise WriteError(422, "invalid", f"{rtype}{path}: {why}", expression=f"{where}{path}")
    try:
        model = get_fhir_model_class(rtype).model_validate(resource)
    except pydantic.ValidationError as exc:
        err = exc.errors()[0]
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
        msg = str(err.get("msg") or err.get("type"))
        given = err.get("input")
        if isinstance(given, str | int | float) and len(str(given)) > 2 and str(given) in msg:
            msg = str(err.get("type"))  # never echo resource content
        raise WriteError(
            422, "invalid", f"{rtype}{path}: {msg[:300]}", expression=f"{where}{path}"
        ) from None
    found = _code_problem(model, "")
    if found is not None:
        path, allowed = found
        raise WriteError(
            422,
            "code-invalid",
            f"{rtype}{path}: the code must be one of {', '.join(allowed)}",
            expression=f"{where}{path}",
        )


def _code_problem(model: pydantic.BaseModel, path: str) -> tuple[str, list[str]] | None:
    """The first `code` outside its required binding, where the model lists the whole value set.

    The R4B models keep each element's code list (`enum_values`, from the spec's short
    definition); a list ending in `+` is partial, so those elements are not checked.
    """
    for name, info in type(model).model_fields.items():
        value = getattr(model, name, None)
        if value is None:
            continue
        key = info.alias or name
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        codes = extra.get("enum_values")
        items = value if isinstance(value, list) else [value]
        for n, item in enumerate(items):
            at = f"{path}.{key}" + (f"[{n}]" if isinstance(value, list) else "")
            if isinstance(item, pydantic.BaseModel):
                found = _code_problem(item, at)
                if found is not None:
                    return found
            elif (
                isinstance(codes, list)
                and "+" not in codes
                and isinstance(item, str)
                and item not in codes
            ):
                return at, [str(c) for c in codes]
    return None


def _json_problem(value: Any, path: str) -> tuple[str, str] | None:
    """FHIR JSON rules (json.html) the models accept: no nulls, no empty objects or arrays."""
    if isinstance(value, dict):
        if not value:
            return path, "empty objects are not allowed"
        for key, item in value.items():
            if item is None:
                return f"{path}.{key}", "null is not allowed"
            if isinstance(item, list):
                if not item:
                    return f"{path}.{key}", "empty arrays are not allowed"
                twin = key[1:] if key.startswith("_") else f"_{key}"
                if any(x is None for x in item) and (
                    not isinstance(value.get(twin), list)
                    or len(value[twin]) != len(item)
                    or all(x is None for x in item)
                ):
                    return f"{path}.{key}", "null is only allowed to align primitive arrays"
            found = _json_problem(item, f"{path}.{key}")
            if found is not None:
                return found
    elif isinstance(value, list):
        for n, item in enumerate(value):
            found = _json_problem(item, f"{path}[{n}]")
            if found is not None:
                return found
    return None


def _info(text: str) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "information", "code": "informational", "diagnostics": text}],
    }
