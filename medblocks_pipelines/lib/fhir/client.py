"""A small FHIR REST client over httpx: bearer tokens, paging, retries, a source-wide rate limiter.

What it does on purpose:

- **Retries** 429, 5xx, dropped connections, timeouts and HTML pages served with 200 (maintenance pages)
  with exponential backoff and jitter, honouring ``Retry-After`` as seconds or an HTTP-date (RFC 9110
  §10.2.3). A 429 also pauses the whole source's limiter, so sibling connections back off too.
- **401** refreshes the token once (through a :class:`TokenProvider`) and retries; a second 401 is an
  :class:`AuthError`.
- **Paging** follows ``Bundle.link[relation=next]`` as given (SPECS §1.11), never to another
  origin or outside the server's base (our token stays home), and stops with
  :class:`PagingLoopError` when a ``next`` repeats. A ``next`` link on the search's own path that
  dropped the search's constraining parameters (seen live: ``MedicationRequest?_offset=100&_count=100``
  after ``MedicationRequest?patient=X``, which pages through every patient) is not followed: the
  anomaly ``next_link_lost_parameters`` is reported and, when the link carries paging parameters
  (``_offset``, ``_page``, ``page``), the original search is re-issued with them; otherwise the
  search stops with :class:`IncompleteSearch`.
- **Errors** carry the status and the OperationOutcome issue codes, never diagnostics text or tokens.
- **Exact numbers**: bodies are parsed with decimals kept as :class:`~decimal.Decimal`, and
  :func:`dumps_exact` writes them back digit for digit (``7.10`` stays ``7.10`` in the lake).

The rate limiter paces requests so that no window of ``per`` seconds ever holds more than
``limit`` requests, even with some jitter between our send time and the server's clock. With
``MEDBLOCKS_REDIS_URL`` set, :func:`limiter_for` hands out a
:class:`~medblocks_pipelines.lib.fhir.shared_limit.SharedRateLimiter`: one schedule per source for
every process and machine; without it, the in-process :class:`RateLimiter`.
"""

import email.utils
import json
import random
import threading
import time
import urllib.parse
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Protocol

import httpx

from medblocks_pipelines.lib.errors import (
    AuthError,
    IncompleteSearch,
    PagingLoopError,
    ProtocolError,
    TransientError,
)
from medblocks_pipelines.lib.settings import Settings
from medblocks_pipelines.lib.smart.tokens import TokenProvider

FHIR_JSON = "application/fhir+json"
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
#: Parameters that page or shape a searchset without choosing its matches.
NON_CONSTRAINING_PARAMS = frozenset(
    {
        "_count",
        "_offset",
        "_page",
        "page",
        "_format",
        "_pretty",
        "_summary",
        "_elements",
        "_include",
        "_revinclude",
        "_sort",
        "_total",
    }
)
#: Paging parameters with which a search can be re-issued at a given position.
POSITION_PARAMS = frozenset({"_offset", "_page", "page"})
#: Called with an anomaly kind and a PHI-free note (resource type, URL shape, parameter names).
AnomalyHook = Callable[[str, str], None]


# ---------------------------------------------------------------------------------------------
# Exact JSON
# ---------------------------------------------------------------------------------------------
def loads_exact(text: str | bytes) -> Any:
    """``json.loads`` keeping decimals exact (FHIR decimals carry precision: ``7.10`` != ``7.1``)."""
    return json.loads(text, parse_float=Decimal)


def dumps_exact(value: Any) -> str:
    """Compact JSON that writes :class:`Decimal` values digit for digit (inverse of :func:`loads_exact`)."""
    out: list[str] = []
    _dump(value, out)
    return "".join(out)


def _dump(value: Any, out: list[str]) -> None:
    if isinstance(value, dict):
        out.append("{")
        first = True
        for k, v in value.items():
            if not first:
                out.append(",")
            first = False
            out.append(json.dumps(str(k), ensure_ascii=False))
            out.append(":")
            _dump(v, out)
        out.append("}")
    elif isinstance(value, list):
        out.append("[")
        for i, v in enumerate(value):
            if i:
                out.append(",")
            _dump(v, out)
        out.append("]")
    elif isinstance(value, Decimal):
        out.append(str(value))
    else:
        out.append(json.dumps(value, ensure_ascii=False))


# ---------------------------------------------------------------------------------------------
# Rate limiting
# ---------------------------------------------------------------------------------------------
class Limiter(Protocol):
    """What the client needs of a rate limiter (in-process or shared across processes)."""

    limit: int
    per: float

    def acquire(self) -> None:
        """Block until this caller may send one request."""
        ...

    def backoff(self, seconds: float) -> None:
        """A 429 came back: pause every caller of the source ``seconds`` and widen the spacing."""
        ...


class RateLimiter:
    """Evenly paced requests: at most ``limit`` in any ``per``-second window, shared by threads.

    Two rules, both on the times requests actually leave (a sleep can overshoot on a busy machine):
    consecutive sends are at least ``per / limit`` apart (no bursts), and no ``per * (1 + margin)``
    window holds more than ``limit - 1`` sends. That leaves one request of room for jitter between
    our clock and the server's. :meth:`pause_until` stops every caller (a 429's
    ``Retry-After`` applies to the whole client), and each 429 (:meth:`backoff`) widens the spacing a
    little, up to ``max_widen``, because a server that counted one too many will do it again;
    ``recover_after`` sends without a 429 give half of the widening back.
    """

    def __init__(
        self,
        limit: int,
        per: float = 1.0,
        *,
        margin: float = 0.02,
        max_widen: float = 0.15,
        recover_after: int = 300,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if limit < 1 or per <= 0:
            raise ValueError("a rate limit needs limit >= 1 and per > 0")
        self.limit = limit
        self.per = per
        self.margin = margin
        self.max_widen = max_widen
        self._base = per / limit
        self.interval = self._base
        self._window = self._base_window = per * (1 + margin)
        self._cap = max(1, limit - 1)
        self._calm = 0
        self.recover_after = recover_after
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._sends: deque[float] = deque(maxlen=self._cap)
        self._paused_until = 0.0
        self.sent = 0
        self.waited = 0.0
        self.backoffs = 0

    def __repr__(self) -> str:
        return f"RateLimiter(limit={self.limit}, per={self.per})"

    @property
    def effective_rate(self) -> float:
        """Requests per second the limiter allows at most."""
        return 1.0 / self.interval

    def _earliest(self) -> float:
        earliest = self._paused_until
        if self._sends:
            earliest = max(earliest, self._sends[-1] + self.interval)
            if len(self._sends) == self._cap:
                earliest = max(earliest, self._sends[0] + self._window)
        return earliest

    def acquire(self) -> None:
        """Block until this caller may send one request (then it must send at once)."""
        while True:
            with self._lock:
                now = self._clock()
                earliest = self._earliest()
                if earliest <= now:
                    # Both rules use real departure times: a late wake-up never bunches requests
                    # (tried: catching up on a schedule drew 429s from a busy server).
                    self._sends.append(now)
                    self.sent += 1
                    self._calm += 1
                    if self._calm >= self.recover_after and self.interval > self._base:
                        # A long run without 429s: give back half of the widening.
                        self.interval = self._base + (self.interval - self._base) / 2
                        self._window = self._base_window + (self._window - self._base_window) / 2
                        self._calm = 0
                    return
                wait = earliest - now
            self.waited += wait
            self._sleep(wait)

    def pause_until(self, when: float) -> None:
        """Hold every caller until ``when`` (limiter clock)."""
        with self._lock:
            self._paused_until = max(self._paused_until, when)

    def pause_for(self, seconds: float) -> None:
        """Hold every caller for ``seconds`` from now."""
        self.pause_until(self._clock() + seconds)

    def backoff(self, seconds: float) -> None:
        """A 429 came back: pause everyone and widen the spacing by 3 % (bounded)."""
        with self._lock:
            self.backoffs += 1
            self.interval = min(self.interval * 1.03, self._base * (1 + self.max_widen))
            self._window = min(self._window * 1.03, self.per * (1 + self.margin + self.max_widen))
            self._paused_until = max(self._paused_until, self._clock() + seconds)
            self._calm = 0


_LIMITERS: dict[str, Limiter] = {}
_LIMITERS_LOCK = threading.Lock()
REDIS_URL_ENV = "MEDBLOCKS_REDIS_URL"


def limiter_for(key: str, limit: int, per: float = 1.0, *, redis_url: str | None = None) -> Limiter:
    """The limiter of one source (same key, same limiter, across connections).

    Shared by every process and machine through Redis when ``redis_url`` (default
    ``MEDBLOCKS_REDIS_URL``) is set; otherwise one :class:`RateLimiter` per process.
    """
    url = redis_url if redis_url is not None else Settings.from_env().redis_url or ""
    with _LIMITERS_LOCK:
        current = _LIMITERS.get(key)
        shared = type(current).__name__ == "SharedRateLimiter"
        if current is None or current.limit != limit or current.per != per or shared != bool(url):
            if url:
                from medblocks_pipelines.lib.fhir.shared_limit import SharedRateLimiter

                current = SharedRateLimiter.from_url(url, key, limit, per)
            else:
                current = RateLimiter(limit, per)
            _LIMITERS[key] = current
        return current


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delay-seconds or HTTP-date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------
class FhirRequestError(ProtocolError):
    """A FHIR request that failed for good: ``status`` and the OperationOutcome ``issue_codes``."""

    def __init__(self, message: str, *, status: int, issue_codes: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.issue_codes = issue_codes


def outcome_issues(body: Any) -> list[tuple[str, str]]:
    """``(severity, code)`` of each issue of an OperationOutcome (diagnostics text is left out)."""
    if not isinstance(body, dict) or body.get("resourceType") != "OperationOutcome":
        return []
    return [
        (str(i.get("severity") or "error"), str(i.get("code") or "unknown"))
        for i in body.get("issue") or []
        if isinstance(i, dict)
    ]


def _error_body(resp: httpx.Response) -> tuple[tuple[str, ...], str]:
    """An error answer's OperationOutcome issue codes and a PHI-free description of its body.

    Servers answer errors with an OperationOutcome, or (gateways in front of them) with plain
    text or HTML: the description says which, plus the ``WWW-Authenticate`` error code if any.
    """
    ctype = resp.headers.get("content-type", "").split(";")[0].strip().lower()
    issues: tuple[str, ...] = ()
    if "json" in ctype:
        try:
            issues = tuple(c for _s, c in outcome_issues(resp.json()))
        except ValueError:
            issues = ()
    if issues:
        described = ", ".join(issues)
    elif not resp.content:
        described = "empty body"
    else:
        described = f"{ctype or 'untyped'} body, not an OperationOutcome"
    challenge = resp.headers.get("www-authenticate", "")
    if 'error="' in challenge:
        code = challenge.split('error="', 1)[1].split('"', 1)[0]
        if code.replace("_", "").isalnum():
            described += f"; WWW-Authenticate error {code}"
    return issues, described


def _looks_html(resp: httpx.Response) -> bool:
    ctype = resp.headers.get("content-type", "").lower()
    if "html" in ctype:
        return True
    head = resp.content[:64].lstrip().lower()
    return head.startswith(b"<!doctype") or head.startswith(b"<html")


# ---------------------------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------------------------
@dataclass
class ClientStats:
    """Counters of one client (PHI-free)."""

    requests: int = 0
    retries: int = 0
    refreshes: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    retry_reasons: Counter[str] = field(default_factory=Counter)


@dataclass
class SearchPage:
    """One page of a search: the Bundle (decimals exact) and where it came from."""

    bundle: dict[str, Any]
    url: str
    number: int


class FhirClient:
    """FHIR REST reads and searches against one base URL, with one connection's tokens."""

    def __init__(
        self,
        base_url: str,
        *,
        http: httpx.Client,
        tokens: TokenProvider | None = None,
        limiter: Limiter | None = None,
        max_retries: int = 6,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        max_pages: int = 5000,
        timeout: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.http = http
        self.tokens = tokens
        self.limiter = limiter
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_pages = max_pages
        self.timeout = timeout
        self._sleep = sleep
        self.stats = ClientStats()
        self._origin = _origin(self.base_url)

    def __repr__(self) -> str:
        return f"FhirClient({self.base_url!r})"

    # -- URLs ----------------------------------------------------------------------------------
    def url(self, path_or_url: str) -> str:
        """Absolute URL of ``path_or_url`` (relative paths hang off the base)."""
        if path_or_url.startswith(("http://", "https://")):
            return path_or_url
        return f"{self.base_url}/{path_or_url.lstrip('/')}"

    def same_origin(self, url: str) -> bool:
        """Whether ``url`` is on our server (only then may it see our token)."""
        return _origin(url) == self._origin

    # -- the request loop ----------------------------------------------------------------------
    def request(
        self,
        method: str,
        path_or_url: str,
        *,
        params: Mapping[str, str] | list[tuple[str, str]] | None = None,
        accept: str = FHIR_JSON,
        expect_json: bool = True,
    ) -> httpx.Response:
        """Send one request with auth, rate limiting and retries; returns a 2xx response."""
        url = self.url(path_or_url)
        if self.tokens is not None and not self.same_origin(url):
            raise ProtocolError("refusing to send the token to another origin")
        refreshed = False
        attempt = 0
        token: str | None = None
        while True:
            if self.limiter is not None:
                self.limiter.acquire()
            headers = {"Accept": accept}
            if self.tokens is not None:
                token = self.tokens.access_token()
                headers["Authorization"] = f"Bearer {token}"
            self.stats.requests += 1
            try:
                resp = self.http.request(
                    method,
                    url,
                    params=params,  # type: ignore[arg-type]
                    headers=headers,
                    timeout=self.timeout,
                )
            except httpx.TransportError as exc:
                reason = type(exc).__name__
                attempt = self._retry_or_raise(attempt, reason, None)
                continue
            self.stats.statuses[resp.status_code] += 1
            status = resp.status_code
            if status == 401 and self.tokens is not None:
                if refreshed:
                    raise AuthError(
                        f"{method} {_path(url)}: HTTP 401 after a token refresh "
                        f"({_error_body(resp)[1]})"
                    )
                # Token expired mid-pull (or revoked): refresh once, retry, no backoff.
                self.tokens.refresh(stale=token)
                self.stats.refreshes += 1
                refreshed = True
                continue
            if status in RETRY_STATUSES:
                wait = parse_retry_after(resp.headers.get("retry-after"))
                if status == 429 and self.limiter is not None:
                    self.limiter.backoff(wait if wait is not None else self._delay(attempt))
                attempt = self._retry_or_raise(attempt, f"http_{status}", wait)
                continue
            if 200 <= status < 300 and expect_json and _looks_html(resp):
                # A maintenance page served with 200: not data, and often gone in a moment.
                attempt = self._retry_or_raise(attempt, "html_instead_of_json", None)
                continue
            if status >= 400:
                issues, described = _error_body(resp)
                msg = f"{method} {_path(url)}: HTTP {status} ({described})"
                if status in (401, 403):
                    raise AuthError(msg)
                raise FhirRequestError(msg, status=status, issue_codes=issues)
            return resp

    def _delay(self, attempt: int) -> float:
        return float(
            min(self.max_backoff, self.backoff * (2**attempt)) * (0.5 + random.random() / 2)
        )

    def _retry_or_raise(self, attempt: int, reason: str, wait: float | None) -> int:
        self.stats.retry_reasons[reason] += 1
        if attempt >= self.max_retries:
            if reason == "html_instead_of_json":
                raise ProtocolError("the server keeps answering HTML instead of FHIR JSON")
            raise TransientError(
                f"gave up after {attempt + 1} attempts ({reason})", retry_after=wait
            )
        self.stats.retries += 1
        delay = wait if wait is not None else self._delay(attempt)
        self._sleep(min(delay, self.max_backoff * 4))
        return attempt + 1

    # -- JSON helpers --------------------------------------------------------------------------
    def get_json(
        self, path_or_url: str, params: Mapping[str, str] | list[tuple[str, str]] | None = None
    ) -> dict[str, Any]:
        """GET a FHIR JSON object (decimals exact)."""
        resp = self.request("GET", path_or_url, params=params)
        try:
            body = loads_exact(resp.content)
        except ValueError as exc:
            raise ProtocolError(f"GET {_path(self.url(path_or_url))}: body is not JSON") from exc
        if not isinstance(body, dict):
            raise ProtocolError(f"GET {_path(self.url(path_or_url))}: expected a JSON object")
        return body

    def capabilities(self) -> dict[str, Any]:
        """The server's CapabilityStatement (``GET metadata``)."""
        return self.get_json("metadata")

    def read(self, resource_type: str, resource_id: str) -> dict[str, Any]:
        """``GET [base]/Type/id``."""
        return self.get_json(f"{resource_type}/{urllib.parse.quote(resource_id, safe='')}")

    def search(
        self,
        resource_type: str,
        params: Mapping[str, str] | list[tuple[str, str]] | None = None,
        *,
        on_anomaly: AnomalyHook | None = None,
    ) -> Iterator[SearchPage]:
        """Pages of ``GET [base]/Type?params``, following checked ``next`` links (see the module)."""
        url = self.url(resource_type)
        asked = list(params.items()) if isinstance(params, Mapping) else list(params or [])
        first = httpx.URL(url, params=asked)
        seen: set[str] = {_canonical(str(first))}
        page = self.get_json(url, asked)
        number = 1
        while True:
            if page.get("resourceType") != "Bundle":
                raise ProtocolError(f"search {resource_type}: answer is not a Bundle")
            yield SearchPage(bundle=page, url=str(first) if number == 1 else url, number=number)
            nxt = next_link(page)
            if not nxt:
                return
            nxt = self._checked_next(resource_type, url, asked, nxt, number, on_anomaly)
            key = _canonical(nxt)
            if key in seen:
                raise PagingLoopError(
                    f"search {resource_type}: next link of page {number} repeats an earlier page"
                )
            if number >= self.max_pages:
                raise PagingLoopError(f"search {resource_type}: more than {self.max_pages} pages")
            seen.add(key)
            url = nxt
            page = self.get_json(nxt)
            number += 1

    def _checked_next(
        self,
        resource_type: str,
        search_url: str,
        asked: list[tuple[str, str]],
        link: str,
        number: int,
        on_anomaly: AnomalyHook | None,
    ) -> str:
        """The URL to fetch for a ``next`` link, or an error when it cannot be followed safely."""
        nxt = urllib.parse.urljoin(self.base_url + "/", link)
        if not self.same_origin(nxt):
            raise PagingLoopError(f"search {resource_type}: next link points at another server")
        if not (nxt == self.base_url or nxt.startswith(self.base_url + "/")) and not (
            nxt.startswith(self.base_url + "?")
        ):
            raise PagingLoopError(f"search {resource_type}: next link is outside the FHIR base")
        lost = lost_parameters(asked, nxt, search_path=urllib.parse.urlsplit(search_url).path)
        if not lost:
            return nxt
        shape = url_shape(nxt, self.base_url)
        if on_anomaly is not None:
            on_anomaly(
                "next_link_lost_parameters",
                f"{resource_type}: next link of page {number} ({shape}) "
                f"dropped {', '.join(sorted(lost))}",
            )
        query = urllib.parse.parse_qsl(urllib.parse.urlsplit(nxt).query, keep_blank_values=True)
        paging = [(k, v) for k, v in query if k in POSITION_PARAMS or k == "_count"]
        if not any(k in POSITION_PARAMS for k, _v in paging):
            raise IncompleteSearch(
                f"search {resource_type}: next link of page {number} ({shape}) dropped the "
                "search's parameters and has no paging parameter to re-issue the search with"
            )
        # Re-issue our own search at the position the server named.
        kept = [(k, v) for k, v in asked if k not in {p for p, _v in paging}]
        return str(httpx.URL(self.url(resource_type), params=[*kept, *paging]))


#: Parameters naming whose records a search returns: their values must survive paging too.
PATIENT_PARAMS = frozenset({"patient", "subject", "beneficiary", "_id"})


def lost_parameters(asked: list[tuple[str, str]], link: str, *, search_path: str) -> set[str]:
    """Names of the search's constraining parameters a ``next`` link on the search's own path
    no longer carries. A link elsewhere (an opaque page token on the base, as HAPI's
    ``?_getpages=``) is the server's own state and is not judged here.

    Other parameters count as kept when their name is there (servers re-encode dates and tokens);
    patient parameters must also keep their value, compared by id (``Patient/1`` is ``1``).
    """
    parts = urllib.parse.urlsplit(link)
    own = search_path.rstrip("/")
    if parts.path.rstrip("/") not in (own, own + "/_search"):
        return set()
    have: dict[str, set[str]] = {}
    for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        have.setdefault(k.split(":")[0], set()).add(_ids(v))
    lost = set()
    for k, v in asked:
        name = k.split(":")[0]
        if name in NON_CONSTRAINING_PARAMS:
            continue
        if name not in have or (name in PATIENT_PARAMS and _ids(v) not in have[name]):
            lost.add(k)
    return lost


def _ids(value: str) -> str:
    return ",".join(sorted(x.rstrip("/").rsplit("/", 1)[-1] for x in value.split(",")))


def url_shape(url: str, base_url: str) -> str:
    """A URL's path below the base and its parameter names, no values (safe for metadata)."""
    parts = urllib.parse.urlsplit(url)
    base_path = urllib.parse.urlsplit(base_url).path.rstrip("/")
    path = parts.path[len(base_path) :] if parts.path.startswith(base_path) else parts.path
    names = sorted({k for k, _v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)})
    # Path segments after the type may be ids: keep the type only.
    segments = [s for s in path.split("/") if s]
    head = "/" + segments[0] if segments else "/"
    if len(segments) > 1:
        head += "/..."
    return head + ("?" + "&".join(names) if names else "")


def next_link(bundle: Mapping[str, Any]) -> str | None:
    """The ``next`` link of a Bundle, or None."""
    for link in bundle.get("link") or []:
        if isinstance(link, dict) and link.get("relation") == "next" and link.get("url"):
            return str(link["url"])
    return None


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urllib.parse.urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme.lower(), (parts.hostname or "").lower(), port


def _canonical(url: str) -> str:
    # The same page can come back with its parameters in another order.
    parts = urllib.parse.urlsplit(url)
    query = sorted(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    return urllib.parse.urlunsplit(
        (parts.scheme.lower(), parts.netloc.lower(), parts.path, urllib.parse.urlencode(query), "")
    )


def _path(url: str) -> str:
    # Messages name only the resource type (the first path segment that looks like one, scanning
    # from the end past ids): ids and query strings may identify a patient.
    segments = [s for s in urllib.parse.urlsplit(url).path.split("/") if s]
    if segments and segments[-1] in ("metadata",) or (segments and segments[-1].startswith("$")):
        return segments[-1]
    for i in (len(segments) - 2, len(segments) - 1):
        if 0 <= i < len(segments) and segments[i].isalpha() and segments[i][:1].isupper():
            return segments[i] + ("/..." if i < len(segments) - 1 else "")
    return "..."
