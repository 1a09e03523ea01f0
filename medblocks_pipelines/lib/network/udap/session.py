"""One UDAP client session for a network: discover, register once, get bound tokens per node.

Thread-safe: the Facilitated FHIR fan-out calls :meth:`UdapSession.tokens_for` from many threads.
Metadata is cached per node for the session; registrations persist in the vault across runs; tokens
are cached per (node, client_id, requestor, purpose) in a :class:`TokenCache` that outlives a query
when the caller keeps the session.
"""

import hashlib
import threading
from dataclasses import dataclass, field
from typing import Any

import httpx
from cryptography import x509

from medblocks_pipelines.lib.errors import NoUdap
from medblocks_pipelines.lib.network.udap.certs import CrlChecker, VaultSigner
from medblocks_pipelines.lib.network.udap.discovery import TEFCA_COMMUNITY, UdapMetadata, discover
from medblocks_pipelines.lib.network.udap.registration import (
    ClientProfile,
    Registration,
    RegistrationStore,
    register,
)
from medblocks_pipelines.lib.network.udap.token import (
    XP_SYSTEM,
    BoundTokens,
    Requestor,
    Token,
    TokenCache,
    request_token,
)

#: Tokens live in memory only, shared by the sessions of a process: a key holds the node and the
#: node's own client_id, so two sessions can never mix tokens of different servers or contexts.
SHARED_TOKENS = TokenCache()


@dataclass
class UdapSession:
    """Everything needed to talk UDAP to the nodes of one network."""

    network: str
    vault: Any
    signer: VaultSigner
    anchors: list[x509.Certificate]
    profile: ClientProfile
    http: httpx.Client
    community: str = TEFCA_COMMUNITY
    code_system: str = XP_SYSTEM
    check_revocation: bool = True
    cache: TokenCache = field(default_factory=lambda: SHARED_TOKENS)
    _meta: dict[str, UdapMetadata] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    registered: int = 0

    def __post_init__(self) -> None:
        self.store = RegistrationStore(self.vault)
        self.crl = CrlChecker(self.http) if self.check_revocation else None

    def metadata(self, node: str, fhir_base: str, *, timeout: float = 10.0) -> UdapMetadata:
        """Verified metadata of ``node`` (cached); :class:`NoUdap` on 404."""
        with self._lock:
            meta = self._meta.get(node)
        if meta is None:
            found = discover(
                self.http,
                fhir_base,
                self.anchors,
                community=self.community,
                crl=self.crl,
                timeout=timeout,
            )
            if found is None:
                raise NoUdap(f"node {node} offers no UDAP for this community")
            meta = found
            with self._lock:
                self._meta[node] = meta
        return meta

    def registration(self, node: str, meta: UdapMetadata, purpose: str) -> Registration:
        """The stored registration for (node, community, purpose), registering if missing."""
        reg = self.store.get(self.network, node, self.community, purpose)
        if reg is not None and reg.registration_endpoint == meta.registration_endpoint:
            return reg
        reg = register(
            self.http,
            meta,
            self.signer,
            self.profile,
            network=self.network,
            node=node,
            purpose=purpose,
        )
        self.store.put(reg)
        with self._lock:
            self.registered += 1
        return reg

    def tokens_for(
        self,
        node: str,
        fhir_base: str,
        requestor: Requestor,
        purpose: str,
        *,
        ias: dict[str, Any] | None = None,
        timeout: float = 10.0,
    ) -> BoundTokens:
        """A token provider bound to (node, requestor, purpose) for a FhirClient."""
        meta = self.metadata(node, fhir_base, timeout=timeout)
        reg = self.registration(node, meta, purpose)

        def fetch() -> Token:
            return request_token(
                self.http,
                meta.token_endpoint,
                self.signer,
                reg,
                requestor,
                purpose,
                code_system=self.code_system,
                ias=ias,
                timeout=timeout,
            )

        context = ""
        if ias is not None:
            # A T-IAS token is bound to the individual too, not only to (requestor, purpose).
            context = hashlib.sha256(str(ias.get("id_token")).encode()).hexdigest()[:16]
        tokens = BoundTokens(self.cache, reg, requestor, purpose, fetch, context=context)
        tokens.access_token()  # fail here (refused token) rather than mid-query
        return tokens
