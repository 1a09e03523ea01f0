"""The network source a query goes to: our home community id and signing identity in it, and
its responding gateways (a registry source of kind="network")."""

from dataclasses import dataclass
from typing import Any

from medblocks_pipelines.lib.errors import ConfigError, NotFound
from medblocks_pipelines.lib.network import ihe
from medblocks_pipelines.lib.network.client import GatewayConfig
from medblocks_pipelines.lib.network.policy import tenant_network_settings


# -- configuration ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class NetworkConfig:
    """A network source: our identity in it and its responding gateways."""

    id: str
    home_community_id: str
    gateways: tuple[GatewayConfig, ...]
    max_parallel: int = 4
    signing_key_secret: str | None = None
    signing_cert_secret: str | None = None


def network_config(cp: Any, network: str | None, tenant_settings: dict[str, Any]) -> NetworkConfig:
    """Load the network source (``kind="network"``) named by ``network`` or by the tenant."""
    net = tenant_network_settings(tenant_settings)
    listed = tenant_settings.get("networks") or []
    network = network or net.get("network") or (listed[0] if len(listed) == 1 else None)
    if network is None:
        candidates = [s for s in cp.list_sources() if s.kind == "network"]
        if len(candidates) != 1:
            raise ConfigError(
                "no network named and not exactly one network source",
                hint="pass --network or set tenant settings network.network",
            )
        network = candidates[0].id
    try:
        src = cp.get_source(network)
    except NotFound:
        raise ConfigError(f"network source {network!r} is not registered") from None
    cfg = src.config or {}
    if not cfg.get("gateways"):
        raise ConfigError(f"network source {network!r} has no gateways configured")
    return NetworkConfig(
        id=src.id,
        home_community_id=ihe.as_urn(
            str(cfg.get("home_community_id", "urn:oid:2.16.840.1.113883.3.9999.100"))
        ),
        gateways=tuple(GatewayConfig.from_dict(g) for g in cfg["gateways"]),
        max_parallel=int(cfg.get("max_parallel", 4)),
        signing_key_secret=cfg.get("signing_key_secret"),
        signing_cert_secret=cfg.get("signing_cert_secret"),
    )


def signing_identity(cp: Any, cfg: NetworkConfig) -> tuple[bytes | None, bytes | None]:
    """Our signing key and certificate (PEM) from the vault; ``(None, None)`` when not configured."""
    if not cfg.signing_key_secret or not cfg.signing_cert_secret:
        return None, None
    key, cert = cp.vault.get(cfg.signing_key_secret), cp.vault.get(cfg.signing_cert_secret)
    if key is None or cert is None:
        raise ConfigError(f"network {cfg.id}: signing key or certificate missing from the vault")
    return key.reveal().encode(), cert.reveal().encode()
