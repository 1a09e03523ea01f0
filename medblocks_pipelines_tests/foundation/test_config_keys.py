"""Every source and organization config key the code reads is documented
(lib/registry/config_keys.py, rendered into docs/CONFIGURATION.md), and the document is current."""

import ast
from pathlib import Path

import medblocks_pipelines
from medblocks_pipelines.lib.registry.config_keys import (
    ORGANIZATION_KEYS,
    SOURCE_KEYS,
    render_markdown,
)

PACKAGE = Path(medblocks_pipelines.__file__).parent
# Variables holding a source's or an organization's config, per module.
CONFIG_VARS = {
    "lib/fhir/bulk_config.py": {"scfg": "source", "ocfg": "organization"},
    "lib/smart/tokens.py": {"cfg": "source"},
    "lib/smart/launch.py": {"cfg": "source"},
    "lib/network/config.py": {"cfg": "source"},
    "lib/fhir/pull.py": {"cfg": "source"},
}
# `(<name>.config or {}).get(KEY)` / `<name>.config[KEY]` on a typed registry row (and the
# dict spellings `<name>.get("config")` / `<name>["config"]`): whose config by row name
ROW_NAMES = {"source": "source", "src": "source", "org": "organization", "o": "organization"}


def _const(node: ast.expr) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _config_owner(node: ast.expr, names: dict[str, str]) -> str | None:
    """`source`/`organization` when ``node`` evaluates to a registry row's config."""
    if isinstance(node, ast.Name):
        return names.get(node.id)
    if isinstance(node, ast.BoolOp):  # x.get("config") or {}
        return _config_owner(node.values[0], names)
    row = None
    if isinstance(node, ast.Attribute) and node.attr == "config":
        row = node.value
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        if node.func.attr == "get" and node.args and _const(node.args[0]) == "config":
            row = node.func.value
    elif isinstance(node, ast.Subscript) and _const(node.slice) == "config":  # type: ignore[arg-type]
        row = node.value
    if isinstance(row, ast.Name):
        return ROW_NAMES.get(row.id)
    return None


def keys_read() -> set[tuple[str, str, str]]:
    """(owner, key, where) of every constant key read from a source or organization config."""
    found: set[tuple[str, str, str]] = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(PACKAGE))
        if rel.startswith("sandbox/"):
            continue
        names = CONFIG_VARS.get(rel, {})
        for node in ast.walk(ast.parse(path.read_text())):
            target, key = None, None
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                if node.func.attr == "get" and node.args:
                    target, key = node.func.value, _const(node.args[0])
            elif isinstance(node, ast.Subscript):
                target, key = node.value, _const(node.slice)  # type: ignore[arg-type]
            if target is None or key is None or key == "config":
                continue
            owner = _config_owner(target, names)
            if owner:
                found.add((owner, key, f"{rel}:{getattr(node, 'lineno', 0)}"))
    return found


def test_every_config_key_read_is_documented() -> None:
    found = keys_read()
    documented = {"source": set(SOURCE_KEYS), "organization": set(ORGANIZATION_KEYS)}
    assert {k for o, k, _ in found if o == "organization"} >= {"group_id", "cadence", "cds"}
    assert {k for o, k, _ in found if o == "source"} >= {"backend_client_id", "gateways"}
    missing = sorted(
        f"{where}: {owner} key {key!r}"
        for owner, key, where in found
        if key not in documented[owner]
    )
    assert missing == [], "document them in lib/registry/config_keys.py"


def test_configuration_md_is_generated_from_the_key_tables() -> None:
    doc = (PACKAGE.parent / "docs" / "CONFIGURATION.md").read_text()
    assert doc == render_markdown(), (
        "regenerate: python -m medblocks_pipelines.lib.registry.config_keys > docs/CONFIGURATION.md"
    )
