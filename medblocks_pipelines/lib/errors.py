"""The exceptions of medblocks_pipelines, in one module.

Hierarchy::

    MedblocksError                      base of everything we raise on purpose
    ├── ConfigError                     bad or missing configuration (registry entry, env var, YAML)
    ├── RegistryError                   control-plane problems
    │   ├── NotFound                    a tenant, source, organization or connection does not exist
    │   └── InvalidTransition           a connection state change the lifecycle does not allow
    ├── VaultError                      a secret cannot be decrypted (wrong or rotated-away key)
    ├── LandingError                    the lake cannot be written
    ├── WarehouseError                  a warehouse build or read failed
    │   ├── QueryRefused                analyst SQL tried to leave its tenant's warehouse or change it
    │   └── QueryFailed                 analyst SQL DuckDB could not run (syntax, unknown table...)
    ├── PullsFailed                     every pull of a sync failed
    ├── ProtocolError                   a peer broke its protocol (bad JSON, HTML error page, wrong shape)
    │   ├── AuthError                   401/403, refused token or assertion
    │   │   └── ConsentRevoked          the source says the grant is gone: stop pulling
    │   ├── TransientError              retry is expected to help (429, 5xx, timeouts, dropped connections)
    │   ├── IncompleteSearch            a search's next link cannot be followed safely (lost params)
    │   └── PolicyRefused               a network query refused by purpose-of-use policy (never sent)
    └── ViewDefinitionError             an invalid SQL on FHIR ViewDefinition (raised before running)

Messages never carry tokens, keys or patient data: ids of our own and counts only.
"""


class MedblocksError(Exception):
    """Base class of every error raised on purpose by this project."""

    hint: str | None = None

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint


class ConfigError(MedblocksError):
    """Raised when configuration is missing or invalid."""


class RegistryError(MedblocksError):
    """Raised on control-plane failures."""


class NotFound(RegistryError):
    """Raised when a registry entry does not exist."""


class InvalidTransition(RegistryError):
    """Raised when a connection state change is not allowed by the lifecycle."""


class VaultError(MedblocksError):
    """Raised when a secret cannot be stored or decrypted."""


class LandingError(MedblocksError):
    """Raised when the landing lake cannot be written."""


class WarehouseError(MedblocksError):
    """Raised when a warehouse build or read fails."""


class QueryRefused(WarehouseError):
    """Raised when analyst SQL reaches outside its tenant's warehouse (files, URLs, other
    databases, extensions, settings) or tries to change it; nothing of it has run."""


class QueryFailed(WarehouseError):
    """Raised when DuckDB cannot run analyst SQL (syntax, unknown table, bad cast...): the message
    is DuckDB's first line."""


class StorageError(MedblocksError):
    """Raised when object storage (the lake or published warehouses) cannot be read or written."""


class ProtocolError(MedblocksError):
    """Raised when a peer breaks its protocol (malformed body, HTML instead of JSON...)."""


class AuthError(ProtocolError):
    """Raised on 401/403 or a refused token request."""


class ConsentRevoked(AuthError):
    """Raised when the source reports the grant as revoked (invalid_grant on refresh)."""


class TransientError(ProtocolError):
    """Raised for failures a retry may fix: 429, 5xx, timeouts, dropped connections."""

    def __init__(
        self, message: str, *, retry_after: float | None = None, hint: str | None = None
    ) -> None:
        super().__init__(message, hint=hint)
        self.retry_after = retry_after


class PolicyRefused(ProtocolError):
    """Raised when purpose-of-use policy refuses a network query; the query is never sent."""


class ViewDefinitionError(MedblocksError):
    """Raised when a ViewDefinition is invalid; raised before anything runs."""


# Exceptions added by pattern modules go below this line.


class LaunchError(AuthError):
    """Raised when a SMART launch cannot start or its callback is refused (unknown or reused
    `state`, an error redirect, a refused code exchange). `reason` is a short machine code
    (`state_mismatch`, `access_denied`, `invalid_grant`...) stored on the failed connection."""

    def __init__(self, message: str, *, reason: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.reason = reason


class PagingLoopError(ProtocolError):
    """Raised when a searchset's `next` link repeats a page already fetched in this search (a
    server paging loop), or points at another origin; the search stops instead of spinning."""


class IncompleteSearch(ProtocolError):
    """Raised when a search cannot be followed to its end safely: a `next` link that dropped the
    search's parameters (it would page through other patients' records) and carries no paging
    parameter to re-issue the search with."""


class PullsFailed(MedblocksError):
    """Raised when every pull of a sync failed (source down, refresh refused...): the CLI exits 1
    after printing what each pull did."""


class UnsafeXMLError(ProtocolError):
    """Raised when untrusted XML (SOAP, C-CDA) is refused: a DOCTYPE or entity (XXE, entity
    expansion), over the size limit, too deep, or malformed. Never carries document content."""


class SoapFault(ProtocolError):
    """Raised when an IHE gateway answers with a SOAP 1.2 Fault; `code` and `subcode` are kept,
    the peer's reason text is on `reason` (not in the message)."""

    def __init__(
        self, message: str, *, code: str | None = None, subcode: str | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.subcode = subcode
        self.reason = ""


class GatewayTimeout(TransientError):
    """Raised when a responding gateway does not answer within its per-gateway timeout."""


class CdsRequestError(ProtocolError):
    """Raised when a CDS Hooks call is refused: a JWT that fails verification (401), a malformed
    hook request (400), data the service needs that can be had neither from prefetch nor from the
    FHIR server (412). `status` is the HTTP status to answer, `reason` a short machine code
    (`bad_signature`, `unknown_issuer`, `replayed_jti`, `missing_context`...)."""

    def __init__(self, message: str, *, status: int, reason: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.status = status
        self.reason = reason


class ExportError(MedblocksError):
    """Raised when an export run cannot write to its destination (folder, object store, FHIR
    server) or another run of the same destination is in progress. Carries our ids and the
    error class only, never the destination's response body."""


class NoUdap(ProtocolError):
    """Raised when a FHIR node answers 404 to UDAP discovery (``/.well-known/udap``): it offers
    no UDAP for our community, so no Facilitated FHIR query can be made there."""


class ConsentRequired(AuthError):
    """Raised when a UDAP data holder answers ``invalid_grant`` with ``hl7-b2b.consent_required``:
    the consent policy we asserted is missing or not acceptable there. ``policies`` are the policy
    URIs it asks for; ``consent_form`` an optional form URL (neither is patient data)."""

    def __init__(
        self, message: str, *, policies: list[str], consent_form: str | None = None
    ) -> None:
        super().__init__(message)
        self.policies = policies
        self.consent_form = consent_form


class RunFailed(MedblocksError):
    """Raised by the CLI when a Dagster run it executed failed. The message is the root cause of
    each failed step (``AuthError: token request refused: ...``), not Dagster's wrapper
    (``DagsterExecutionStepExecutionError``); ``run_id`` names the run whose logs have the rest."""

    def __init__(self, message: str, *, run_id: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.run_id = run_id
