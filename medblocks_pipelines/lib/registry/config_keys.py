"""The keys of source and organization ``config``: what each means, in one place.

docs/CONFIGURATION.md is generated from these tables (``python -m
medblocks_pipelines.lib.registry.config_keys > docs/CONFIGURATION.md``), and
foundation/test_config_keys.py checks that every key the code reads is here and that the document
is up to date. ``medblocks orgs set-config`` warns about a key that is not.
"""

import re
from collections.abc import Mapping
from typing import Any

SOURCE_KEYS: dict[str, str] = {
    "client_id": "our app's client id at the source (every pattern unless `<pattern>_client_id`)",
    "backend_client_id": "client id of our backend-services client (wins over `client_id`)",
    "patient_access_client_id": "client id of our patient-facing app (wins over `client_id`)",
    "clinician_workflow_client_id": "client id of our EHR-launched app (wins over `client_id`)",
    "client_auth": "`none` (public, PKCE), `client_secret_basic` or `private_key_jwt`",
    "client_secret_secret": "vault name of the client secret (default `source/<id>/client_secret`)",
    "signing_key_secret": "vault name of our signing key: `private_key_jwt` (default "
    "`source/<id>/signing_key`), or a network's IHE signing key",
    "signing_cert_secret": "network: vault name of the certificate of the IHE signing key",
    "jku": "backend: `true` sends our JWKS URL as `jku` (default per vendor profile), or a URL; "
    "`private_key_jwt`: the `jku` header",
    "jwks_url": "backend: our JWKS URL for `jku` (default `$MEDBLOCKS_PUBLIC_BASE_URL`"
    "/.well-known/jwks.json)",
    "backend_scope": "backend token scope (default `system/*.rs`; wins over `scope`)",
    "scope": "backend token scope when `backend_scope` is not set",
    "types": "backend: default `_type` list of exports (an organization's `types` wins)",
    "max_parallel_downloads": "backend: export files downloaded at a time (default 4)",
    "land_workers": "backend: threads landing downloaded files (default 2)",
    "attachments": "backend: fetch `DocumentReference` attachments (`true`/`false`, default false)",
    "accept_gzip": "backend: ask for gzip-compressed export files (default true)",
    "lenient": "backend: send `Prefer: handling=lenient` (default false)",
    "cadence": "backend: cron of the sync schedule for its organizations (default `0 2 * * *`)",
    "resource_types": "patient access: limit the scope request to these resource types",
    "scope_syntax": "patient access: `v1` or `v2` scopes (default: what the server advertises)",
    "scopes": "patient access: a scope template replacing the default request",
    "pull_cadence_hours": "patient access: hours between pulls of a connection (default 24)",
    "rate_limit": "requests to the source at most: `{requests: N, per_seconds: S}`",
    "concurrency": "patient access: connections pulled at a time (default 4)",
    "gateways": "network: the responding gateways, each `{id, home_community_id, xcpd_url, "
    "xca_query_url, xca_retrieve_url}` (optional `name`, `organization`, `timeout_s`)",
    "home_community_id": "network: our home community OID",
    "max_parallel": "network: gateways queried at a time (default 4)",
    "facilitated_fhir": "network: TEFCA Facilitated FHIR (UDAP) block `{directory_url, "
    "trust_anchor_pem | trust_anchor_secret, directory_api_key_secret, identity, community, "
    "timeout_s, max_parallel, client_name}` (docs/OPERATIONS.md, UDAP)",
}

ORGANIZATION_KEYS: dict[str, str] = {
    "group_id": "backend: the `Group` to export (Group-level export when set)",
    "level": "backend: `group`, `system` or `patient` export (default group when `group_id`, "
    "else system)",
    "types": "backend: `_type` list (sent once, comma-joined)",
    "type_filters": "backend: `_typeFilter` values",
    "elements": "backend: `_elements` values",
    "output_format": "backend: `_outputFormat` (default: not sent, the server's NDJSON)",
    "method": "backend: kick-off `GET` (default) or `POST`",
    "patients": "backend: patient ids: a patient-list export (`POST` with a `Parameters` body)",
    "organize_output_by": "backend: STU3 `organizeOutputBy` (e.g. `Patient`)",
    "include_associated_data": "backend: e.g. `[LatestProvenanceResources]`",
    "allow_partial_manifests": "backend: STU3 `allowPartialManifests` (manifest pages are read)",
    "lenient": "backend: `Prefer: handling=lenient` (overrides the source's)",
    "attachments": "backend: fetch `DocumentReference` attachments (also a source key)",
    "client_id": "backend: client id override for this organization",
    "scope": "backend: token scope override for this organization",
    "cadence": "backend: cron of this organization's sync schedule (wins over the source's)",
    "ehr_launch": "clinician workflow: `{iss: [extra issuer URLs], scopes: [...]}` of EHR launches",
    "cds": "clinician workflow: the EHR calling our CDS Hooks service: `{iss, tenant, jwks_url, "
    "jku: [allowed URLs], jwks: {inline keys}}`",
}

# Values under these key names are shown as *** (configs should hold vault names, not secrets;
# a key ending in `_secret` names a vault entry and is shown).
_SENSITIVE = re.compile(
    r"password|passwd|token|private|credential|api_?key|^secret$|client_secret$"
)


def is_sensitive(key: str) -> bool:
    """True when a value under ``key`` is a secret (shown as ``***``, refused by set-config)."""
    return bool(_SENSITIVE.search(key.lower()))


def redact(value: Any, key: str = "") -> Any:
    """``value`` with secrets (by key name, and private JWK members) replaced by ``***``."""
    if key and is_sensitive(key):
        return "***"
    if isinstance(value, Mapping):
        private = value.get("kty") is not None
        return {
            k: "***" if private and k in ("d", "p", "q", "dp", "dq", "qi", "k") else redact(v, k)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def _table(keys: Mapping[str, str]) -> list[str]:
    rows = ["| key | meaning |", "| --- | --- |"]
    rows += [f"| `{k}` | {v} |" for k, v in keys.items()]
    return rows


def render_markdown() -> str:
    """docs/CONFIGURATION.md."""
    lines = [
        "# Configuration of sources and organizations",
        "",
        "<!-- Generated from medblocks_pipelines/lib/registry/config_keys.py:",
        "     python -m medblocks_pipelines.lib.registry.config_keys > docs/CONFIGURATION.md -->",
        "",
        "A source's and an organization's `config` is a JSON object, set by `config:` in a registry",
        "file (`medblocks registry apply`, see `registry.example.yaml`), `--config` of",
        "`medblocks sources add` / `medblocks orgs add` (which replace the whole object), or key by",
        "key with `medblocks orgs set-config --tenant T ORG key=value ... [--unset key]` (which",
        "merges). `medblocks orgs show --tenant T ORG` prints it (secrets redacted). Secrets never",
        "go into a config: it names vault entries (`*_secret` keys).",
        "",
        "Environment variables: README.md, section Using it.",
        "",
        "## Source config",
        "",
        *_table(SOURCE_KEYS),
        "",
        "## Organization config",
        "",
        *_table(ORGANIZATION_KEYS),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(render_markdown(), end="")
