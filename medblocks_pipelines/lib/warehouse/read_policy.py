"""The read policy: which consumer may use warehouse rows of which relationship and purpose.

A query to an exchange network is checked against its TEFCA Exchange Purpose before it leaves
(:mod:`medblocks_pipelines.lib.network.policy`); the rows it brings back carry that purpose
(``permitted_purpose``) and the query's id (``network_query_id``) through the lake into the
warehouse. This module says, per consumer, which of those rows it may read, so that the purpose
holds on reads too, not only on queries:

- ``cds``: CDS cards (:mod:`medblocks_pipelines.lib.cds.index`);
- ``export``: exports (:mod:`medblocks_pipelines.lib.ops.exports`), per the purpose the destination
  declares in its config;
- ``analyst``: the confined analyst connection (:mod:`medblocks_pipelines.lib.warehouse.sandboxed`).

The policy is configuration, versioned like the purpose catalog: ``read-policy-v<N>.yaml`` beside
this module (the newest shipped is used), or the file named by ``MEDBLOCKS_READ_POLICY``. Codes are
checked against the Exchange Purpose catalog the file names. Rows of the other patterns are judged
by their ``pattern`` alone; a network row is usable only when its purpose is listed for the
consumer and it names the query that obtained it.

:func:`consumer_filter` renders a rule as a SQL predicate (values are checked codes and pattern
names, so they are inlined as literals); :func:`read_counts` and :func:`audit_read` give the PHI-free
counts and the audit row each consumer writes when it reads.
"""

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import duckdb
import yaml

from medblocks_pipelines.lib.errors import ConfigError
from medblocks_pipelines.lib.settings import Settings

#: The environment variable naming an operator's policy file.
ENV_VAR = "MEDBLOCKS_READ_POLICY"
CONSUMERS = ("cds", "export", "analyst")
NETWORK = "network"
_FILE = re.compile(r"^read-policy-v(\d+)\.yaml$")
_CODE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_PACKAGE = "medblocks_pipelines.lib.warehouse"


@dataclass(frozen=True)
class ConsumerRule:
    """What one consumer (for one declared purpose) may read."""

    consumer: str
    purpose: str | None  # the consumer's own purpose (audit); an export's declared purpose
    patterns: frozenset[str]  # non-network patterns it may read
    network_purposes: frozenset[str]  # network rows it may read, by their permitted purpose

    def allows(self, pattern: str | None, purpose: str | None, query_id: str | None) -> bool:
        """Whether a row of ``pattern`` (and, for network rows, purpose and query) is usable."""
        if pattern == NETWORK:
            return purpose in self.network_purposes and query_id is not None
        return pattern in self.patterns


@dataclass(frozen=True)
class ReadPolicy:
    """One version of the read policy."""

    version: str
    origin: str  # "shipped" or the operator's file path
    xp_catalog: str
    cds: ConsumerRule
    analyst: ConsumerRule
    export_patterns: frozenset[str]
    export_by_purpose: Mapping[str, frozenset[str]]

    def rule(self, consumer: str, purpose: str | None = None) -> ConsumerRule:
        """The rule of ``consumer``; for ``export``, of an export declared for ``purpose``."""
        if consumer == "cds":
            return self.cds
        if consumer == "analyst":
            return self.analyst
        if consumer == "export":
            if purpose is not None and purpose not in self.export_by_purpose:
                raise ConfigError(
                    f"no export read rule for purpose {purpose!r}",
                    hint=f"declare one of {sorted(self.export_by_purpose)}",
                )
            allowed = self.export_by_purpose.get(purpose, frozenset()) if purpose else frozenset()
            return ConsumerRule("export", purpose, self.export_patterns, allowed)
        raise ConfigError(f"unknown read-policy consumer {consumer!r}", hint=f"one of {CONSUMERS}")


def available_versions() -> list[str]:
    """Policy versions shipped beside this module, oldest first."""
    found = [
        int(m.group(1))
        for entry in resources.files(_PACKAGE).iterdir()
        if (m := _FILE.match(entry.name))
    ]
    return [str(v) for v in sorted(found)]


def load_read_policy(path: str | os.PathLike[str] | None = None) -> ReadPolicy:
    """The policy in force: ``path``, else ``$MEDBLOCKS_READ_POLICY``, else the newest shipped."""
    chosen = path if path is not None else Settings.from_env().read_policy
    return _load(str(chosen) if chosen else None)


@cache
def _load(path: str | None) -> ReadPolicy:
    if path is None:
        versions = available_versions()
        if not versions:
            raise ConfigError("no read policy shipped in lib/warehouse")
        text = resources.files(_PACKAGE).joinpath(f"read-policy-v{versions[-1]}.yaml").read_text()
        origin = "shipped"
    else:
        try:
            text = Path(path).read_text("utf-8")
        except OSError as exc:
            raise ConfigError(
                f"cannot read the read policy {path!r} ({type(exc).__name__})",
                hint=f"check {ENV_VAR}",
            ) from None
        origin = path
    return parse_read_policy(yaml.safe_load(text), origin=origin)


def _codes(values: Any, where: str, known: set[str]) -> frozenset[str]:
    if not isinstance(values, list):
        raise ConfigError(f"read policy: {where} must be a list")
    out = frozenset(str(v) for v in values)
    unknown = sorted(out - known)
    if unknown:
        raise ConfigError(f"read policy: {where} has unknown code(s) {unknown}")
    return out


def parse_read_policy(doc: Any, *, origin: str = "shipped") -> ReadPolicy:
    """Validate a policy document (codes against its XP catalog, patterns against ours)."""
    from medblocks_pipelines.lib.network.policy import load_catalog
    from medblocks_pipelines.lib.registry.store import PATTERNS

    if not isinstance(doc, dict):
        raise ConfigError("read policy: not a mapping")
    try:
        catalog = load_catalog(str(doc["xp_catalog"]))
        xp = set(catalog.purposes)
        patterns = set(PATTERNS) - {NETWORK}
        cons = doc["consumers"]
        rules = {}
        for name in ("cds", "analyst"):
            spec = cons[name]
            purpose = spec.get("purpose")
            if purpose is not None and purpose not in xp:
                raise ConfigError(f"read policy: {name}.purpose {purpose!r} is not an XP code")
            rules[name] = ConsumerRule(
                name,
                purpose,
                _codes(spec["patterns"], f"{name}.patterns", patterns),
                _codes(spec["network_purposes"], f"{name}.network_purposes", xp),
            )
        exp = cons["export"]
        by_purpose = {
            str(k): _codes(v, f"export.by_declared_purpose.{k}", xp)
            for k, v in (exp.get("by_declared_purpose") or {}).items()
        }
        bad_keys = sorted(set(by_purpose) - xp)
        if bad_keys:
            raise ConfigError(f"read policy: export declared purpose(s) {bad_keys} unknown")
        return ReadPolicy(
            version=str(doc["version"]),
            origin=origin,
            xp_catalog=catalog.version,
            cds=rules["cds"],
            analyst=rules["analyst"],
            export_patterns=_codes(exp["patterns"], "export.patterns", patterns),
            export_by_purpose=by_purpose,
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"invalid read policy: missing or malformed {exc!r}") from None


def _literals(values: frozenset[str]) -> str:
    for v in values:
        if not _CODE.match(v):  # checked at load; never inline anything else
            raise ConfigError(f"read policy: {v!r} is not a code")
    return ", ".join(f"'{v}'" for v in sorted(values))


def consumer_filter(rule: ConsumerRule, alias: str = "") -> str:
    """A SQL predicate true for the rows ``rule`` allows (columns ``pattern``,
    ``permitted_purpose``, ``network_query_id``, optionally qualified by ``alias``)."""
    a = f"{alias}." if alias else ""
    parts = []
    if rule.patterns:
        parts.append(f"{a}pattern IN ({_literals(rule.patterns)})")
    if rule.network_purposes:
        parts.append(
            f"({a}pattern = '{NETWORK}' AND {a}permitted_purpose IN "
            f"({_literals(rule.network_purposes)}) AND {a}network_query_id IS NOT NULL)"
        )
    return "(" + " OR ".join(parts) + ")" if parts else "false"


@dataclass(frozen=True)
class ReadCounts:
    """How many restricted (network) rows a read included and excluded, by purpose."""

    included: dict[str, int]
    excluded: dict[str, int]

    @property
    def restricted(self) -> int:
        return sum(self.included.values()) + sum(self.excluded.values())


def read_counts(con: duckdb.DuckDBPyConnection, table: str, rule: ConsumerRule) -> ReadCounts:
    """Network rows of ``table`` (a table name or a parenthesised query) the rule includes /
    excludes, by permitted purpose (no PHI)."""
    cols = set(con.sql(f"SELECT * FROM {table} LIMIT 0").columns)
    purpose = "permitted_purpose" if "permitted_purpose" in cols else "NULL::VARCHAR"
    qid = "network_query_id" if "network_query_id" in cols else "NULL::VARCHAR"
    src = (
        f"(SELECT pattern, {purpose} AS permitted_purpose, {qid} AS network_query_id FROM {table})"
    )
    rows = con.execute(
        f"SELECT coalesce(permitted_purpose, '(none)'), {consumer_filter(rule)}, count(*) "
        f"FROM {src} WHERE pattern = '{NETWORK}' GROUP BY ALL ORDER BY ALL"
    ).fetchall()
    inc = {str(p): int(n) for p, ok, n in rows if ok}
    exc = {str(p): int(n) for p, ok, n in rows if not ok}
    return ReadCounts(inc, exc)


def audit_read(
    cp: Any,
    *,
    tenant: str,
    rule: ConsumerRule,
    policy: ReadPolicy,
    counts: ReadCounts,
    actor: str,
    table: str,
    ref: str | None = None,
) -> int | None:
    """One audit row for a consumer's read that met restricted (network) rows; none otherwise.

    The read itself went ahead (``allowed``; a ``refused`` row would announce a refused network
    query on the outbox); ``reason`` says when restricted rows were withheld. Counts, our ids and
    the policy version only: no PHI.
    """
    if cp is None or counts.restricted == 0:
        return None
    return int(
        cp.audit(
            tenant_id=tenant,
            actor=actor,
            action=f"read.{rule.consumer}",
            decision="allowed",
            purpose=rule.purpose,
            reason="network_rows_withheld" if counts.excluded else None,
            evidence={
                "consumer": rule.consumer,
                "table": table,
                "ref": ref,
                "policy_version": policy.version,
                "policy_origin": "shipped" if policy.origin == "shipped" else "override",
                "network_purposes_allowed": sorted(rule.network_purposes),
                "included_by_purpose": counts.included,
                "excluded_by_purpose": counts.excluded,
            },
        )
    )
