"""SMART discovery: ``.well-known/smart-configuration`` and the CapabilityStatement (SPECS §1.1).

The well-known path is appended to the FHIR base even when the base has a path; relative URLs that legacy
servers return are resolved against the base. The CapabilityStatement security extensions are deprecated for
discovery and are not used.
"""

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin

import httpx

from medblocks_pipelines.lib.errors import ProtocolError, TransientError

_URL_FIELDS = (
    "authorization_endpoint",
    "token_endpoint",
    "introspection_endpoint",
    "revocation_endpoint",
    "registration_endpoint",
    "management_endpoint",
    "jwks_uri",
)


@dataclass
class Discovery:
    """What a FHIR server says about itself."""

    fhir_base_url: str
    smart_config: dict[str, Any]
    capability_statement: dict[str, Any] = field(default_factory=dict)

    @property
    def capabilities(self) -> set[str]:
        return set(self.smart_config.get("capabilities") or [])

    @property
    def resource_types(self) -> list[str]:
        """Resource types the server's CapabilityStatement lists for its server REST mode."""
        out: list[str] = []
        for rest in self.capability_statement.get("rest") or []:
            if rest.get("mode", "server") == "server":
                out.extend(r["type"] for r in rest.get("resource") or [] if r.get("type"))
        return out

    @property
    def supports_v2_scopes(self) -> bool:
        return "permission-v2" in self.capabilities


def _json(resp: httpx.Response, what: str) -> dict[str, Any]:
    if resp.status_code == 429 or resp.status_code >= 500:
        raise TransientError(f"{what}: HTTP {resp.status_code}")
    if resp.status_code != 200:
        raise ProtocolError(f"{what}: HTTP {resp.status_code}")
    try:
        body = resp.json()
    except ValueError as exc:
        ctype = resp.headers.get("content-type", "")
        raise ProtocolError(
            f"{what}: response is not JSON (content-type {ctype or 'none'})"
        ) from exc
    if not isinstance(body, dict):
        raise ProtocolError(f"{what}: expected a JSON object")
    return body


def fetch_smart_configuration(fhir_base_url: str, *, client: httpx.Client) -> dict[str, Any]:
    """GET ``{base}/.well-known/smart-configuration`` and validate the required fields."""
    base = fhir_base_url.rstrip("/") + "/"
    conf = _json(
        client.get(
            urljoin(base, ".well-known/smart-configuration"), headers={"Accept": "application/json"}
        ),
        "smart-configuration",
    )
    for key in _URL_FIELDS:
        if isinstance(conf.get(key), str):
            conf[key] = urljoin(base, conf[key])
    missing = [k for k in ("token_endpoint", "capabilities") if k not in conf]
    if missing:
        raise ProtocolError(f"smart-configuration lacks required fields {missing}")
    methods = conf.get("code_challenge_methods_supported")
    caps = set(conf.get("capabilities") or [])
    if (caps & {"launch-ehr", "launch-standalone"}) and "authorization_endpoint" not in conf:
        raise ProtocolError("smart-configuration lacks authorization_endpoint for user launches")
    if methods is not None and "plain" in methods:
        # The spec forbids advertising plain; we never use it either way.
        conf["code_challenge_methods_supported"] = [m for m in methods if m != "plain"]
    return conf


def fetch_capability_statement(fhir_base_url: str, *, client: httpx.Client) -> dict[str, Any]:
    """GET ``{base}/metadata``."""
    base = fhir_base_url.rstrip("/") + "/"
    return _json(
        client.get(urljoin(base, "metadata"), headers={"Accept": "application/fhir+json"}),
        "CapabilityStatement",
    )


def discover_source(
    fhir_base_url: str, *, client: httpx.Client | None = None, timeout: float = 15.0
) -> Discovery:
    """Run both discovery requests against ``fhir_base_url``."""
    own = client is None
    http = client or httpx.Client(timeout=timeout, follow_redirects=False)
    try:
        conf = fetch_smart_configuration(fhir_base_url, client=http)
        cap = fetch_capability_statement(fhir_base_url, client=http)
    except httpx.TransportError as exc:
        raise TransientError(f"discovery failed: {type(exc).__name__}") from exc
    finally:
        if own:
            http.close()
    return Discovery(fhir_base_url=fhir_base_url, smart_config=conf, capability_statement=cap)
