"""A per-resource ViewDefinition evaluator in Python, with fhirpathpy for FHIRPath.

This is the slow, obviously-correct reading of the specification's processing algorithm
(https://build.fhir.org/ig/FHIR/sql-on-fhir-v2/StructureDefinition-ViewDefinition.html, "Processing
Algorithm"): for each resource, evaluate each select against its focus, take the cartesian product
of a node's columns, nested selects and unionAll, and expand forEach/forEachOrNull/repeat. It is
the oracle the DuckDB compiler is checked against on real-shaped data and the baseline the view
benchmark compares with. Not for the hot path.
"""

import re
from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any

import fhirpathpy
from fhirpathpy.models import models

from medblocks_pipelines.lib.errors import ViewDefinitionError

__all__ = ["evaluate_view"]

_REF = re.compile(r"(?:^|/)([A-Z][A-Za-z]+)/([A-Za-z0-9\-\.]{1,64})(?:/_history/[^/]*)?$")


def _resource_key(inputs: list[Any]) -> list[Any]:
    return [i["id"] for i in inputs if isinstance(i, dict) and "id" in i]


def _reference_key(inputs: list[Any], type_spec: Any = None) -> list[Any]:
    want = getattr(type_spec, "name", None) if type_spec is not None else None
    out = []
    for item in inputs:
        ref = item.get("reference") if isinstance(item, dict) else None
        m = _REF.search(ref) if isinstance(ref, str) else None
        if m and (want is None or m.group(1) == want):
            out.append(m.group(2))
    return out


def _join(inputs: list[Any], separator: str = "") -> list[Any]:
    # The SQL on FHIR suite ("string join" in fhirpath.json) wants "" for an empty collection,
    # where plain FHIRPath would return empty.
    return [separator.join(str(i) for i in inputs)]


_OPTIONS = {
    "userInvocationTable": {
        "join": {"fn": _join, "arity": {0: [], 1: ["String"]}},
        "getResourceKey": {"fn": _resource_key, "arity": {0: []}},
        "getReferenceKey": {"fn": _reference_key, "arity": {0: [], 1: ["TypeSpecifier"]}},
    }
}
_RAW_OPTIONS = {**_OPTIONS, "returnRawData": True}
_MODEL = models["r4"]
_compiled: dict[tuple[str, bool], Any] = {}


def _eval(path: str, focus: Any, env: Mapping[str, Any], *, nodes: bool = False) -> list[Any]:
    """Evaluate ``path``; with ``nodes`` keep fhirpathpy's typed nodes for later foci.

    Iteration foci must stay typed nodes: a bare dict loses its FHIR path, and then a choice
    element inside it (``component.value.ofType(Quantity)``) resolves to nothing.
    """
    fn = _compiled.get((path, nodes))
    if fn is None:
        fn = fhirpathpy.compile(path, model=_MODEL, options=_RAW_OPTIONS if nodes else _OPTIONS)
        _compiled[(path, nodes)] = fn
    return list(fn(focus if focus is not None else {}, dict(env)))


def _plain(value: Any) -> Any:
    """fhirpathpy values as plain Python (dates as their text)."""
    if isinstance(value, bool | int | Decimal | str) or value is None:
        return value
    if isinstance(value, float):
        return Decimal(str(value))
    return str(value)


def _column_value(col: Mapping[str, Any], values: list[Any]) -> Any:
    values = [_plain(v) for v in values]
    if col.get("collection"):
        return values
    if len(values) > 1:
        raise ViewDefinitionError(f"column {col['name']!r}: more than one value")
    return values[0] if values else None


def _repeat(focus: Any, paths: list[str], env: Mapping[str, Any]) -> list[Any]:
    out: list[Any] = []

    def walk(node: Any) -> None:
        for path in paths:
            for child in _eval(path, node, env, nodes=True):
                out.append(child)
                walk(child)

    walk(focus)
    return out


def _select(sel: Mapping[str, Any], focus: Any, env: dict[str, Any]) -> list[dict[str, Any]]:
    if "forEach" in sel:
        foci: list[Any] = _eval(sel["forEach"], focus, env, nodes=True)
    elif "forEachOrNull" in sel:
        foci = _eval(sel["forEachOrNull"], focus, env, nodes=True) or [None]
    elif "repeat" in sel:
        foci = _repeat(focus, sel["repeat"], env)
    else:
        foci = [focus]
    iterating = any(k in sel for k in ("forEach", "forEachOrNull", "repeat"))
    rows: list[dict[str, Any]] = []
    for index, node in enumerate(foci):
        local = {**env, "rowIndex": index} if iterating else env
        parts: list[list[dict[str, Any]]] = []
        if sel.get("column"):
            parts.append(
                [
                    {
                        c["name"]: _column_value(c, _eval(c["path"], node, local))
                        for c in sel["column"]
                    }
                ]
            )
        for sub in sel.get("select", []):
            parts.append(_select(sub, node, local))
        if sel.get("unionAll"):
            union: list[dict[str, Any]] = []
            for branch in sel["unionAll"]:
                union.extend(_select(branch, node, local))
            parts.append(union)
        product: list[dict[str, Any]] = [{}]
        for part in parts:
            product = [{**a, **b} for a in product for b in part]
        rows.extend(product)
    return rows


def _constants(view: Mapping[str, Any]) -> dict[str, Any]:
    env: dict[str, Any] = {}
    for const in view.get("constant", []):
        key = next(k for k in const if k.startswith("value"))
        env[const["name"]] = const[key]
    return env


def evaluate_view(
    view: Mapping[str, Any], resources: Iterable[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Rows of ``view`` over ``resources`` (plain dicts; parse JSON with Decimal floats)."""
    env = {**_constants(view), "rowIndex": 0}
    rows: list[dict[str, Any]] = []
    for resource in resources:
        if resource.get("resourceType") != view["resource"]:
            continue
        keep = True
        for w in view.get("where", []):
            result = _eval(w["path"], resource, env)
            if result != [True]:
                keep = False
                break
        if keep:
            rows.extend(_select({"select": view["select"]}, resource, env))
    return rows
