"""A scripted patient browser for the consent pages (dev tool: the demo, tests, benchmarks).

:func:`connect_via_consent_page` plays the patient's browser: it opens a connect link, follows the
redirects to the source's real login and consent pages, fills and submits their HTML forms, and
follows the redirect back to the app's callback. Nothing goes around the authorization server.
It speaks HTTP and HTML only; the drivers that create the connect links with the product live in
:mod:`medblocks_sandbox.drivers.consent`.
"""

import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import lxml.html

from medblocks_sandbox.errors import SandboxError


class ConsentBrowserError(SandboxError):
    """The pages did not behave like a login and consent flow (no form, endless redirects)."""


@dataclass(frozen=True)
class ConsentOutcome:
    """Where the browser ended: our callback's verdict and the tenant return URL it sent us to."""

    connection_id: str | None
    status: str  # active | failed | refused (our callback refused the response) | error
    reason: str | None
    final_url: str
    pages: int


def _forms(page: httpx.Response) -> list[Any]:
    doc = lxml.html.document_fromstring(page.text)
    return list(doc.forms)


def _submit(
    client: httpx.Client,
    page: httpx.Response,
    *,
    button: str | None,
    values: dict[str, str],
    uncheck: Iterable[str] = (),
) -> httpx.Response:
    forms = _forms(page)
    if not forms:
        raise ConsentBrowserError(
            f"expected an HTML form at {urllib.parse.urlsplit(str(page.url)).path}"
        )
    form = forms[0]
    fields: list[tuple[str, str]] = []
    drop = set(uncheck)
    for el in form.inputs:
        name = el.get("name")
        if not name:
            continue
        kind = (el.get("type") or "text").lower()
        if kind in ("submit", "button"):
            continue
        if kind == "checkbox":
            if el.checked and el.get("value") not in drop:
                fields.append((name, el.get("value") or "on"))
            continue
        if name in values:
            fields.append((name, values[name]))
        elif kind == "hidden":
            fields.append((name, el.get("value") or ""))
    if button is not None:
        fields.append(("decision", button))
    action = urllib.parse.urljoin(str(page.url), form.get("action") or str(page.url))
    method = (form.get("method") or "get").upper()
    if method == "POST":
        return client.post(
            action,
            content=fields_to_body(fields),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
    return client.get(action, params=urllib.parse.urlencode(fields))


def fields_to_body(fields: list[tuple[str, str]]) -> bytes:
    """Form-encode repeated fields (checkbox lists) in order."""
    return urllib.parse.urlencode(fields).encode()


def connect_via_consent_page(
    connect_url: str,
    *,
    username: str,
    password: str,
    approve: bool = True,
    uncheck_scopes: Sequence[str] = (),
    http: httpx.Client | None = None,
    stop_at: str | None = None,
    tamper: Any = None,
    max_steps: int = 20,
) -> ConsentOutcome:
    """Open ``connect_url`` and go through the source's real login and consent pages.

    ``approve=False`` presses Deny on the consent page. ``uncheck_scopes`` takes scopes off before
    approving (the granted set then differs from the request). ``stop_at`` is the tenant's return
    URL prefix: the driver stops there instead of fetching it (default: stop at the first redirect
    that leaves our callback). ``tamper(url) -> url`` may rewrite the redirect to our callback (tests
    of state mismatch and replays).
    """
    own = http is None
    client = http or httpx.Client(timeout=30.0)
    pages = 0
    try:
        resp = client.get(connect_url)
        callback_seen = False
        for _ in range(max_steps):
            pages += 1
            if resp.is_redirect:
                location = urllib.parse.urljoin(str(resp.url), resp.headers["location"])
                if callback_seen or (stop_at and location.startswith(stop_at)):
                    return _outcome(location, pages, "active")
                if "/connect/callback" in urllib.parse.urlsplit(location).path:
                    callback_seen = True
                    if tamper is not None:
                        location = tamper(location)
                resp = client.get(location)
                continue
            if callback_seen:
                # Our callback answered with a page (no return URL, or a refusal).
                status = (
                    "active"
                    if resp.status_code == 200
                    else ("refused" if "not valid" in resp.text else "failed")
                )
                return ConsentOutcome(
                    None, status, None if status == "active" else "page", str(resp.url), pages
                )
            forms = _forms(resp) if "html" in resp.headers.get("content-type", "") else []
            if not forms:
                return ConsentOutcome(
                    None, "error", f"http_{resp.status_code}", str(resp.url), pages
                )
            names = {el.get("name") for el in forms[0].inputs}
            if "password" in names:
                resp = _submit(
                    client,
                    resp,
                    button="login",
                    values={"username": username, "password": password},
                )
            elif "consent_token" in names:
                resp = _submit(
                    client,
                    resp,
                    button="approve" if approve else "deny",
                    values={},
                    uncheck=uncheck_scopes,
                )
            else:
                # Our auto-submitting POST authorization form (long scope lists).
                resp = _submit(client, resp, button=None, values={})
        raise ConsentBrowserError("consent flow did not finish")
    finally:
        if own:
            client.close()


def _outcome(url: str, pages: int, default: str) -> ConsentOutcome:
    query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
    return ConsentOutcome(
        query.get("connection_id"), query.get("status", default), query.get("reason"), url, pages
    )
