"""The exceptions of the sandbox (the simulator), independent of the product's ``lib/errors.py``.

The sandbox imports nothing of ``medblocks_pipelines``: its servers answer with their own errors,
and the product's client code never catches a sandbox exception (it sees HTTP answers only).

Hierarchy::

    SandboxError                a sandbox server or helper refused something on purpose
    ├── SandboxConfigError      bad sandbox configuration (unknown role, missing pieces)
    ├── FhirHttpError           a FHIR endpoint's refusal, answered as an OperationOutcome
    ├── OAuthProtocolError      an authorization-server refusal, answered as RFC 6749 error JSON
    └── GeneratorError          the population generator got an inconsistent request
"""


class SandboxError(Exception):
    """Base of every error the sandbox raises on purpose; ``hint`` is shown by its CLI."""

    hint: str | None = None

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint


class SandboxConfigError(SandboxError):
    """Raised when the sandbox is asked for something it was not configured with."""


class FhirHttpError(SandboxError):
    """Raised by a sandbox FHIR endpoint; answered as an OperationOutcome with HTTP `status`.

    `code` is the OperationOutcome issue type (invalid, not-found, forbidden, login, ...).
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.headers = dict(headers or {})


class OAuthProtocolError(SandboxError):
    """Raised by a sandbox authorization-server endpoint; answered as RFC 6749 §5.2 error JSON."""

    def __init__(
        self,
        error: str,
        description: str,
        *,
        status: int = 400,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(f"{error}: {description}")
        self.error = error
        self.description = description
        self.status = status
        self.headers = dict(headers or {})


class GeneratorError(SandboxError):
    """Raised by the synthetic population generator on an inconsistent request (an evolve step
    applied twice or out of order, a bad size)."""
