"""Helpers over downloaded bulk files: ``organizeOutputBy`` block headers and attachments.

* ``organizeOutputBy`` (Bulk Data STU3): an output file holds blocks, each opened by a header line
  ``{"resourceType":"Parameters","parameter":[{"name":"header","valueReference":...}]}`` followed
  by that patient's resources; manifest items then have no ``type``. The header lines are not data:
  :func:`strip_block_headers` drops them (and only them) before the file is landed.
* Attachments (``DocumentReference.content.attachment.url``): :func:`download_attachments` fetches
  each once into ``<data>/attachments/tenant=T/source=S/`` (file name = hash of the URL) and writes
  a link table ``links/export=<id>.parquet`` tying every attachment to its DocumentReference:
  ``document_reference_id``, ``url_sha256``, ``size``, ``sha256``, ``stored_as`` (file name)
  and, for attachments of at most :data:`INLINE_MAX` bytes, the content itself (``data_base64``)
  instead of a separate file.
"""

import base64
import gzip
import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

from medblocks_pipelines.lib.errors import ProtocolError, TransientError
from medblocks_pipelines.lib.fhir.bulk import BulkClient, DownloadResult, iter_lines

#: Attachments up to this size are kept inline in the link table rather than as files.
INLINE_MAX = 16 << 10


def _is_block_header(raw: bytes) -> bool:
    if b'"Parameters"' not in raw:
        return False
    try:
        line = json.loads(raw)
    except ValueError:
        return False
    params = line.get("parameter") if isinstance(line, dict) else None
    return (
        line.get("resourceType") == "Parameters"
        and isinstance(params, list)
        and any(isinstance(p, dict) and p.get("name") == "header" for p in params)
    )


def strip_block_headers(got: DownloadResult) -> DownloadResult:
    """The file without its ``organizeOutputBy`` header lines (plain NDJSON, streamed)."""
    out = got.path.with_name(got.path.name.removesuffix(".gz") + ".blocks")
    size = 0
    with open(out, "wb") as fh:
        for raw in iter_lines(got.path, gzipped=got.gzip):
            if _is_block_header(raw):
                continue
            if not raw.endswith(b"\n"):
                raw += b"\n"
            fh.write(raw)
            size += len(raw)
    got.path.unlink(missing_ok=True)
    return replace(got, path=out, bytes=size, gzip=False)


def attachment_refs(path: Path, gzipped: bool, base: str) -> list[tuple[str, str]]:
    """(DocumentReference id, absolute URL) of each attachment; relative URLs (``Binary/x``)
    resolve on the FHIR base. Lines of other types (organizeOutputBy files) are skipped."""
    refs = []
    for raw in iter_lines(path, gzipped=gzipped):
        try:
            doc = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(doc, dict) or doc.get("resourceType") != "DocumentReference":
            continue
        for content in doc.get("content") or []:
            att = content.get("attachment") if isinstance(content, dict) else None
            url = att.get("url") if isinstance(att, dict) else None
            if not isinstance(url, str) or not url:
                continue
            if not urlsplit(url).scheme:
                url = base.rstrip("/") + "/" + url.lstrip("/")
            if urlsplit(url).scheme in ("http", "https"):
                refs.append((str(doc.get("id") or ""), url))
    return refs


@dataclass(frozen=True)
class AttachmentResult:
    """Counts of one export's attachments (PHI-free)."""

    downloaded: int
    inlined: int
    failed: int
    links: int


def download_attachments(
    client: BulkClient,
    refs: Iterable[tuple[str, str]],
    folder: Path,
    *,
    export_id: str,
    requires_token: bool,
) -> AttachmentResult:
    """Fetch each attachment once, write the link table; raise ``TransientError`` at the end if
    any could not be fetched (the land reruns; fetched ones are found again by name)."""
    refs = list(dict.fromkeys(refs))
    folder.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, object]] = []
    done: dict[str, dict[str, object]] = {}
    downloaded = inlined = failed = 0
    for doc_id, url in refs:
        name = hashlib.sha256(url.encode()).hexdigest()[:32]
        if name not in done:
            try:
                info = _fetch_one(client, url, folder, name, requires_token=requires_token)
            except (TransientError, ProtocolError):
                failed += 1
                continue
            done[name] = info
            if info["data_base64"] is not None:
                inlined += 1
            else:
                downloaded += 1
        rows.append({"document_reference_id": doc_id, "url_sha256": name, **done[name]})
    if rows:
        _write_links(folder / "links" / f"export={export_id}.parquet", rows)
    if failed:
        raise TransientError(
            f"{failed} of {len(refs)} attachment(s) could not be fetched",
            hint="rerun the land job; fetched attachments are kept",
        )
    return AttachmentResult(downloaded, inlined, failed, len(rows))


def _fetch_one(
    client: BulkClient, url: str, folder: Path, name: str, *, requires_token: bool
) -> dict[str, object]:
    stored = next((p for p in (folder / name, folder / (name + ".gz")) if p.exists()), None)
    inline_file = folder / "inline" / name
    if stored is None and not inline_file.exists():
        # With requiresAccessToken the same token works on attachments (SPECS §3.3); the client
        # still sends it only to the FHIR server's origin.
        got = client.download(url, folder / name, requires_token=requires_token, accept="*/*")
        stored = got.path
    if stored is None:
        content = inline_file.read_bytes()
    else:
        opener = gzip.open if stored.suffix == ".gz" else open
        with opener(stored, "rb") as fh:
            content = fh.read(INLINE_MAX + 1)
    small = stored is None or len(content) <= INLINE_MAX
    if small and stored is not None:
        # Keep small ones inline only: a marker file makes a rerun find them without refetching.
        inline_file.parent.mkdir(parents=True, exist_ok=True)
        inline_file.write_bytes(content)
        stored.unlink()
    digest = hashlib.sha256()
    size = 0
    if small:
        digest.update(content)
        size = len(content)
    else:
        assert stored is not None
        opener = gzip.open if stored.suffix == ".gz" else open
        with opener(stored, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
                size += len(chunk)
    return {
        "size": size,
        "sha256": digest.hexdigest(),
        "stored_as": None if small else str(stored.name if stored else ""),
        "data_base64": base64.b64encode(content).decode() if small else None,
        "fetched_at": datetime.now(UTC),
    }


def _write_links(path: Path, rows: list[dict[str, object]]) -> None:
    import polars as pl

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pl.DataFrame(
        rows,
        schema={
            "document_reference_id": pl.String,
            "url_sha256": pl.String,
            "size": pl.Int64,
            "sha256": pl.String,
            "stored_as": pl.String,
            "data_base64": pl.String,
            "fetched_at": pl.Datetime("us", "UTC"),
        },
    ).write_parquet(tmp)
    os.replace(tmp, path)
