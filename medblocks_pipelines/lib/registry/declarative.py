"""Registry as code: tenants, sources and organizations declared in a YAML file.

The same file can be applied again and again (upserts); it ends in the same store as the CLI commands.

```yaml
tenants:
  - id: acme
    name: Acme Health App
    settings: {delete_on_revoke: true, network: {purposes: [T-TREAT]}}
sources:
  - id: mercy-ehr
    name: Mercy General EHR
    vendor: epic
    kind: ehr
    fhir_base_url: https://fhir.mercy.example/api/FHIR/R4
    patterns: [backend, patient_access, clinician_workflow]
    config: {client_id: our-client, cadence: "0 2 * * *"}
organizations:
  - id: mercy
    tenant: acme
    source: mercy-ehr
    name: Mercy General
    config: {group_id: cohort-1}
```
"""

from pathlib import Path
from typing import Any

import yaml

from medblocks_pipelines.lib.errors import ConfigError
from medblocks_pipelines.lib.registry.store import ControlPlane


def apply_registry(cp: ControlPlane, doc: dict[str, Any]) -> dict[str, int]:
    """Upsert every tenant, source and organization in ``doc``; returns counts by kind."""
    counts = {"tenants": 0, "sources": 0, "organizations": 0}
    try:
        for t in doc.get("tenants") or []:
            cp.add_tenant(t["id"], t.get("name", t["id"]), t.get("settings") or {})
            counts["tenants"] += 1
        for s in doc.get("sources") or []:
            cp.add_source(
                s["id"],
                s.get("name", s["id"]),
                s.get("vendor", "generic"),
                s.get("kind", "ehr"),
                s.get("fhir_base_url"),
                s.get("patterns") or [],
                s.get("config") or {},
            )
            counts["sources"] += 1
        for o in doc.get("organizations") or []:
            cp.add_organization(
                o["id"], o["tenant"], o["source"], o.get("name", o["id"]), o.get("config") or {}
            )
            counts["organizations"] += 1
    except KeyError as exc:
        raise ConfigError(f"registry entry is missing the field {exc.args[0]!r}") from exc
    return counts


def load_registry_file(cp: ControlPlane, path: str | Path) -> dict[str, int]:
    """Read a registry YAML file and apply it."""
    try:
        doc = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read registry file {path}: {exc}") from exc
    if not isinstance(doc, dict):
        raise ConfigError(f"registry file {path} must hold a mapping")
    return apply_registry(cp, doc)
