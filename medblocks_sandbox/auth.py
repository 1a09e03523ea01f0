"""The sandbox SMART authorization server (SMART App Launch 2.2 + Backend Services), one per org.

Written from SPECS.md §1 and §2 (SMART App Launch 2.x, RFC 6749, RFC 7636 PKCE, RFC 7009
revocation, RFC 7662 introspection, RFC 7523 client assertions), as strict as those texts:

- discovery: `{fhir}/.well-known/smart-configuration` (always `application/json`) and
  `{issuer}/.well-known/openid-configuration` + `jwks_uri` for id_token checks (RS256);
- `authorize` (GET and POST: `authorize-post`): registered `client_id`, exact `redirect_uri`,
  `response_type=code`, `aud` equal to the FHIR base, PKCE `S256` only, `state` required and echoed,
  scopes in v1 and v2 syntax, EHR `launch` ids minted by `AuthServer.mint_launch`;
- a login page and a consent page (plain HTML forms; deny -> `error=access_denied&state=...`);
- `token`: `authorization_code` (single use, short life, redirect_uri + code_verifier checked; a
  replayed code revokes what it issued), `refresh_token` (rotation; a rotated-out token used again
  revokes the whole grant), `client_credentials` with `private_key_jwt` (RS384/ES384, `kid`,
  `iss=sub=client_id`, `aud`=token URL, `exp` at most 5 minutes ahead, `jti` never reused, keys
  from the registered JWKS or an allow-listed `jku`/JWKS URL honouring Cache-Control);
- `revoke` (RFC 7009) and `introspect` (RFC 7662).

Access tokens are opaque random strings held in memory; `require_token` is the seam every FHIR
endpoint (ours and the Bulk Data helper's) calls to turn a request into a `TokenInfo`.
"""

from collections.abc import Iterable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from medblocks_sandbox.auth_authorize import AuthorizeEndpoints
from medblocks_sandbox.auth_model import TokenInfo
from medblocks_sandbox.auth_token import TokenEndpoints
from medblocks_sandbox.errors import FhirHttpError


# ---------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------
class AuthServer(AuthorizeEndpoints, TokenEndpoints):
    """One SMART authorization server (state in memory) for one organization's FHIR base."""

    # -- routes --------------------------------------------------------------------------------
    def routes(self) -> list[Route]:
        """Starlette routes of the authorization server, relative to its mount (`/auth`)."""
        return [
            Route("/authorize", self._authorize, methods=["GET", "POST"]),
            Route("/login", self._login, methods=["GET", "POST"]),
            Route("/consent", self._consent, methods=["POST"]),
            Route("/token", self._token, methods=["POST"]),
            Route("/introspect", self._introspect, methods=["POST"]),
            Route("/revoke", self._revoke, methods=["POST"]),
            Route("/jwks", self._jwks_endpoint, methods=["GET"]),
            Route("/.well-known/openid-configuration", self._openid_endpoint, methods=["GET"]),
        ]

    async def _jwks_endpoint(self, request: Request) -> Response:
        return JSONResponse(self.jwks(), headers={"Cache-Control": "max-age=300"})

    async def _openid_endpoint(self, request: Request) -> Response:
        return JSONResponse(self.openid_configuration())


# ---------------------------------------------------------------------------------------------
# require_token: the seam FHIR endpoints call
# ---------------------------------------------------------------------------------------------
def bearer_challenge(
    realm: str, error: str | None = None, description: str | None = None, scope: str | None = None
) -> str:
    """An RFC 6750 `WWW-Authenticate: Bearer ...` value."""
    parts = [f'realm="{realm}"']
    if error:
        parts.append(f'error="{error}"')
    if description:
        parts.append(f'error_description="{description}"')
    if scope:
        parts.append(f'scope="{scope}"')
    return "Bearer " + ", ".join(parts)


def require_token(request: Request, *, scopes_any_of: Iterable[str] = ()) -> TokenInfo:
    """Validate the bearer token of a FHIR request against this org's authorization server.

    Raises `FhirHttpError` 401 (no, unknown, expired or revoked token) with an RFC 6750
    `WWW-Authenticate` header, or 403 `insufficient_scope` when `scopes_any_of` is given and no
    granted scope covers any of them (e.g. `("system/*.rs", "system/Patient.rs")`).
    """
    server: AuthServer = request.app.state.auth_server
    realm = server.fhir_base
    header = request.headers.get("authorization", "")
    if not header.lower().startswith("bearer ") or not header[7:].strip():
        raise FhirHttpError(
            401,
            "login",
            "a bearer access token is required",
            headers={"WWW-Authenticate": bearer_challenge(realm)},
        )
    info = server.validate_access_token(header[7:].strip())
    if info is None:
        raise FhirHttpError(
            401,
            "login",
            "the access token is invalid, expired or revoked",
            headers={
                "WWW-Authenticate": bearer_challenge(
                    realm, "invalid_token", "The access token is invalid, expired or revoked"
                )
            },
        )
    required = list(scopes_any_of)
    if required and not info.satisfies_any(required):
        raise FhirHttpError(
            403,
            "forbidden",
            "the access token's scopes do not allow this request",
            headers={
                "WWW-Authenticate": bearer_challenge(
                    realm, "insufficient_scope", scope=" ".join(required)
                )
            },
        )
    return info
