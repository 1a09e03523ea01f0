"""Test-only: ``medblocks serve`` behind a TLS-terminating reverse proxy, all on 127.0.0.1.

What a deployment looks like: a proxy (nginx, a load balancer) holds the certificate and forwards
plain HTTP to ``medblocks serve``, which knows its public address only from
``MEDBLOCKS_PUBLIC_BASE_URL``. Here the certificate is self-signed (made with ``cryptography``
for 127.0.0.1), the proxy is a small ASGI app forwarding with httpx under uvicorn's TLS, and
``medblocks serve`` runs as a real subprocess. The proxy either passes a path prefix through
(``/medblocks/cds-services`` upstream) or strips it (``/cds-services``), as proxies are set up
both ways. Nothing here is product code.
"""

import datetime
import ipaddress
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from medblocks_sandbox.run import ServerThread, bind_socket

#: Headers that belong to one hop (RFC 9110 §7.6.1) and are not forwarded.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
    }
)


def self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 / localhost: ``(cert.pem, key.pem)``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "proxy-cert.pem", directory / "proxy-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


class ReverseProxy:
    """ASGI app forwarding every HTTP request to ``upstream`` (no redirects followed), adding
    ``X-Forwarded-For/-Proto/-Host`` as a real proxy does."""

    def __init__(self, upstream: str, *, prefix: str = "", strip_prefix: bool = False) -> None:
        self.upstream = upstream.rstrip("/")
        self.prefix = prefix
        self.strip_prefix = strip_prefix
        self.forwarded = 0

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        path = scope.get("raw_path", scope["path"].encode()).decode("latin-1")
        if self.strip_prefix:
            if not (path == self.prefix or path.startswith(self.prefix + "/")):
                await self._answer(send, 404, b"not behind this proxy")
                return
            path = path[len(self.prefix) :] or "/"
        if scope.get("query_string"):
            path += "?" + scope["query_string"].decode("latin-1")
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in HOP_BY_HOP]
        host = dict(scope["headers"]).get(b"host", b"")
        headers += [
            (b"x-forwarded-for", scope["client"][0].encode()),
            (b"x-forwarded-proto", b"https"),
            (b"x-forwarded-host", host),
        ]
        async with httpx.AsyncClient(timeout=30.0, follow_redirects=False) as client:
            request = client.build_request(
                scope["method"], self.upstream + path, headers=headers, content=body
            )
            resp = await client.send(request, stream=True)
            # Raw bytes, as received: content-encoding is passed on untouched.
            raw = b"".join([chunk async for chunk in resp.aiter_raw()])
            await resp.aclose()
        self.forwarded += 1
        out = [(k, v) for k, v in resp.headers.raw if k.lower() not in HOP_BY_HOP]
        out.append((b"content-length", str(len(raw)).encode()))
        await send({"type": "http.response.start", "status": resp.status_code, "headers": out})
        await send({"type": "http.response.body", "body": raw})

    @staticmethod
    async def _answer(send: Any, status: int, body: bytes) -> None:
        headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


@dataclass
class PublicServe:
    """``medblocks serve`` reachable at ``public`` (https, through the proxy) and ``internal``."""

    public: str
    internal: str
    cert: Path
    proxy: ReverseProxy
    log: Path

    def ssl_context(self) -> ssl.SSLContext:
        """A client context trusting only the proxy's self-signed certificate."""
        return ssl.create_default_context(cafile=str(self.cert))


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"medblocks serve exited: {log.read_text()[-2000:]}")
        with suppress(httpx.TransportError):
            if httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200:
                return
        time.sleep(0.1)
    raise TimeoutError(f"medblocks serve did not answer: {log.read_text()[-2000:]}")


@contextmanager
def medblocks_behind_tls_proxy(
    workdir: Path,
    *,
    env: Mapping[str, str] | None = None,
    prefix: str = "/medblocks",
    strip_prefix: bool = False,
    public_base_url: str | None = None,
) -> Iterator[PublicServe]:
    """Start ``medblocks serve`` (a subprocess, environment ``os.environ`` + ``env``) with
    ``MEDBLOCKS_PUBLIC_BASE_URL=https://127.0.0.1:<proxy port><prefix>`` (or ``public_base_url``;
    ``""`` leaves it unset), and the TLS proxy in front of it."""
    cert, key = self_signed_cert(workdir / "tls")
    proxy_sock = bind_socket("127.0.0.1", 0)
    public = f"https://127.0.0.1:{proxy_sock.getsockname()[1]}{prefix}"
    probe = bind_socket("127.0.0.1", 0)
    port = probe.getsockname()[1]
    probe.close()  # serve binds it again at once (SO_REUSEADDR); nothing else races on loopback
    internal = f"http://127.0.0.1:{port}"
    child_env = {**os.environ, **(env or {})}
    wanted = public if public_base_url is None else public_base_url
    child_env.pop("MEDBLOCKS_PUBLIC_BASE_URL", None)
    if wanted:
        child_env["MEDBLOCKS_PUBLIC_BASE_URL"] = wanted
    log = workdir / "medblocks-serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "medblocks_pipelines.cli", "serve", "--port", str(port)],
            env=child_env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server: ServerThread | None = None
    try:
        _wait_healthy(internal, proc, log, timeout=60.0)
        proxy = ReverseProxy(internal, prefix=prefix, strip_prefix=strip_prefix)
        server = ServerThread(proxy_sock, proxy, name="tls-proxy")
        # The sandbox's server thread, with uvicorn terminating TLS on the same socket.
        server.server = uvicorn.Server(
            uvicorn.Config(
                proxy,
                log_level="warning",
                lifespan="off",
                access_log=False,
                timeout_graceful_shutdown=1,
                proxy_headers=False,
                ssl_certfile=str(cert),
                ssl_keyfile=str(key),
            )
        )
        server.start()
        yield PublicServe(public=public, internal=internal, cert=cert, proxy=proxy, log=log)
    finally:
        if server is not None:
            server.stop()
        else:
            proxy_sock.close()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
