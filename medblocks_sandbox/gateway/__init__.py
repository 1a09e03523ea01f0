"""The sandbox's responding IHE gateway (XCPD/XCA) serving C-CDA rendered from the population."""

from medblocks_sandbox.gateway.app import (
    Behaviour,
    create_gateway_app,
    gateway_role,
    network_source_config,
)
from medblocks_sandbox.gateway.render import render_ccd

__all__ = ["Behaviour", "create_gateway_app", "gateway_role", "network_source_config", "render_ccd"]
