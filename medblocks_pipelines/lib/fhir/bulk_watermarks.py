"""Backend watermarks that advance only over what an export delivered (issue 12).

A Bulk manifest can report, in ``error[]``, that some files failed generation while the export
still completes with ``200`` (SPECS §3.2). Moving ``_since`` to ``transactionTime`` then would lose
the failed types for good. So:

* the organization's watermark ``backend/<tenant>/<org>/since`` moves to ``transactionTime``;
* each type the error files name as failed gets a **hold** ``backend/<tenant>/<org>/held/<Type>``
  at the ``_since`` the export used (``""`` for a full export); holds only move back, never on;
* the next kick-off asks from the earliest of the watermark and the holds, so the held types come
  again (types delivered twice land as identical versions, which the warehouse deduplicates);
* a hold is cleared by the first export that asked for its type and delivered it;
* error-severity issues that name no type hold the whole watermark back (everything is asked again).

Which type an issue is about is read from ``expression``/``location``, ``details.text`` and
``diagnostics``: servers name the type there in free text (no field is standardised for it).
"""

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from medblocks_pipelines.lib.registry import ControlPlane

#: A hold recorded from a full export (no ``_since``).
FULL = ""
#: Resource types that appear in error files without being what failed.
_NOT_DATA = frozenset({"OperationOutcome", "Bundle", "Parameters"})
_WORD = re.compile(r"\b[A-Z][A-Za-z]+\b")


def watermark_key(tenant: str, org_id: str) -> str:
    """The control-plane key holding an organization's next ``_since``."""
    return f"backend/{tenant}/{org_id}/since"


def hold_prefix(tenant: str, org_id: str) -> str:
    """The key prefix of the organization's per-type holds."""
    return f"backend/{tenant}/{org_id}/held/"


@functools.lru_cache(maxsize=1024)
def is_resource_type(name: str) -> bool:
    """Whether ``name`` is a FHIR R4 resource type."""
    from fhir.resources.R4B import get_fhir_model_class

    try:
        get_fhir_model_class(name)
    except (KeyError, ValueError, AttributeError):
        return False
    return name not in _NOT_DATA


def types_named(issue: dict[str, Any]) -> set[str]:
    """Resource types an OperationOutcome issue names (``expression``, ``details``, text)."""
    texts: list[str] = []
    for key in ("expression", "location"):
        values = issue.get(key)
        if isinstance(values, list):
            texts.extend(str(v) for v in values)
    details = issue.get("details")
    if isinstance(details, dict):
        texts.append(str(details.get("text") or ""))
        for coding in details.get("coding") or []:
            if isinstance(coding, dict):
                texts.append(str(coding.get("display") or ""))
    texts.append(str(issue.get("diagnostics") or ""))
    return {w for text in texts for w in _WORD.findall(text) if is_resource_type(w)}


def _parse(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def earlier(a: str | None, b: str | None) -> str | None:
    """The earlier of two ``_since`` values; ``None`` (a full export) is the earliest."""
    if a is None or b is None:
        return None
    return a if _parse(a) <= _parse(b) else b


def holds(cp: ControlPlane, tenant: str, org_id: str) -> dict[str, str | None]:
    """The organization's held types and the ``_since`` each must be asked from again."""
    prefix = hold_prefix(tenant, org_id)
    return {
        key[len(prefix) :]: (value or None) for key, value in cp.list_watermarks(prefix).items()
    }


def effective_since(cp: ControlPlane, tenant: str, org_id: str) -> str | None:
    """The ``_since`` of the next kick-off: the watermark, or an earlier hold."""
    since = cp.get_watermark(watermark_key(tenant, org_id))
    if since is None:
        return None
    for held in holds(cp, tenant, org_id).values():
        since = earlier(since, held)
    return since


def clear(cp: ControlPlane, tenant: str, org_id: str) -> None:
    """Drop the watermark and every hold (a full re-sync)."""
    cp.set_watermark(watermark_key(tenant, org_id), None)
    for key in cp.list_watermarks(hold_prefix(tenant, org_id)):
        cp.delete_watermark(key)


@dataclass(frozen=True)
class Advance:
    """What a landed export did to the watermarks."""

    watermark: str | None
    missing_types: tuple[str, ...]
    held_back: bool  # the whole watermark stayed (serious errors naming no type)
    resume_since: str | None  # where the missing types are asked from next time
    cleared: tuple[str, ...]  # holds the export delivered


def advance(
    cp: ControlPlane,
    tenant: str,
    org_id: str,
    *,
    transaction_time: str,
    export_since: str | None,
    requested_types: Iterable[str],
    failed_types: Iterable[str],
    unnamed_errors: int,
) -> Advance:
    """Move the watermarks over what the export delivered (see the module docstring)."""
    key = watermark_key(tenant, org_id)
    failed = tuple(sorted(set(failed_types)))
    if unnamed_errors:
        # Errors we cannot pin to a type: keep the watermark where it was.
        return Advance(cp.get_watermark(key), failed or ("*",), True, export_since, ())
    requested = set(requested_types)
    current = holds(cp, tenant, org_id)
    prefix = hold_prefix(tenant, org_id)
    for rtype in failed:
        since = earlier(current[rtype], export_since) if rtype in current else export_since
        cp.set_watermark(prefix + rtype, since if since is not None else FULL)
    cleared = []
    for rtype, held in current.items():
        covered = earlier(export_since, held) == export_since
        if rtype not in failed and (not requested or rtype in requested) and covered:
            cp.delete_watermark(prefix + rtype)
            cleared.append(rtype)
    cp.set_watermark(key, transaction_time)
    return Advance(transaction_time, failed, False, export_since, tuple(sorted(cleared)))
