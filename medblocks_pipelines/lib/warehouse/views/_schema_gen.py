"""Regenerate ``fhir_schema.json``: element names, types and cardinality of FHIR R4B (+R5).

The view compiler needs to know, for every element it reads, whether it repeats and what type it
holds; that decides between a struct field and a list, and which DuckDB type to parse it as. The
facts come from the ``fhir.resources`` models (generated from the official StructureDefinitions),
so nothing is typed by hand. Run ``python -m medblocks_pipelines.lib.warehouse.views._schema_gen``
after upgrading ``fhir.resources``; the JSON is what ships.
"""

import importlib
import json
import pkgutil
import typing
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("fhir_schema.json")


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """Strip Optional/Union/List from an annotation; return (inner annotation, is_list)."""
    is_list = False
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            annotation = args[0]
            continue
        if origin in (list, typing.List):  # noqa: UP006
            is_list = True
            annotation = typing.get_args(annotation)[0]
            continue
        return annotation, is_list


# fhir.resources names two primitives after their validators, not their FHIR type.
_RENAMES = {"encodedBytes": "base64Binary", "uuidVersion": "uuid"}


def _type_name(annotation: Any) -> str | None:
    """The FHIR type name of an (unwrapped) annotation."""
    if annotation is bool:
        return "boolean"
    if typing.get_origin(annotation) is typing.Annotated:
        meta = typing.get_args(annotation)[1:]
        for m in meta:
            name = type(m).__name__
            name = name[0].lower() + name[1:]
            return _RENAMES.get(name, name)
        return None
    name = getattr(annotation, "__name__", None) or str(annotation)
    name = name.rsplit(".", 1)[-1]
    if name.endswith("Type"):
        name = name[: -len("Type")]
    return name


def _collect(package: str) -> dict[str, dict[str, list[Any]]]:
    """Every model class of a fhir.resources version package, by class name."""
    pkg = importlib.import_module(package)
    out: dict[str, dict[str, list[Any]]] = {}
    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name.startswith("_") or mod.name in ("fhirtypes", "fhirtypesvalidators"):
            continue
        if mod.name[0].isupper():  # sub-packages of other versions
            continue
        try:
            module = importlib.import_module(f"{package}.{mod.name}")
        except Exception:  # noqa: S112  (a few helper modules are not models)
            continue
        for obj in vars(module).values():
            fields = getattr(obj, "model_fields", None)
            if not isinstance(obj, type) or fields is None or obj.__module__ != module.__name__:
                continue
            elements: dict[str, list[Any]] = {}
            for fname, finfo in fields.items():
                extra = finfo.json_schema_extra or {}
                if not isinstance(extra, dict) or not extra.get("element_property"):
                    continue
                inner, is_list = _unwrap(finfo.annotation)
                tname = _type_name(inner)
                if tname is None:
                    continue
                entry: list[Any] = [tname, int(is_list)]
                if extra.get("one_of_many"):
                    entry.append(extra["one_of_many"])
                elements[finfo.alias or fname] = entry
            out[obj.__name__] = elements
    return out


def main() -> None:
    """R4B first (the data we land is R4); R5 only adds elements and types R4B lacks."""
    r4b = _collect("fhir.resources.R4B")
    r5 = _collect("fhir.resources")
    merged: dict[str, dict[str, list[Any]]] = {}
    for source in (r4b, r5):
        for tname, elements in source.items():
            target = merged.setdefault(tname, {})
            choice_bases = {str(e[2]) for e in target.values() if len(e) > 2}
            for ename, entry in elements.items():
                if ename in choice_bases:
                    # R4 choice medication[x] became R5 CodeableReference medication: keep R4.
                    continue
                # An element whose shape changed in R5 (Encounter.class) keeps its R4 shape:
                # reading R4 data with the R5 shape would silently yield NULL.
                target.setdefault(ename, list(entry))
    resources = sorted(
        t
        for t, els in merged.items()
        if "resourceType" not in els and "meta" in els and "implicitRules" in els
    )
    OUT.write_text(
        json.dumps({"resources": resources, "types": merged}, sort_keys=True, separators=(",", ":"))
    )
    print(f"wrote {OUT} ({len(merged)} types, {len(resources)} resources)")


if __name__ == "__main__":
    main()
