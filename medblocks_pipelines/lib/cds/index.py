"""A read-only, in-memory index of a tenant's published warehouse for CDS Hooks answers.

The warehouse build publishes ``<warehouse_dir>/<tenant>.duckdb`` by an atomic rename. The index
opens the published file read-only, copies what the cards need into memory and closes it at once,
so a build never waits on us and we never wait on a build:

* ``patient_person``: source patient key (``source/Patient/id``, the patient's id at the calling
  organization's source) -> person, from ``patient_links`` (identity);
* ``identifier_person``: ``system|value`` of every Patient identifier (MRNs, member ids; not SSNs)
  -> person, for a patient the warehouse knows only by identifier (ambiguous ones are dropped);
* ``facts``: the unified record (``facts`` with the organizations and patterns of ``fact_sources``
  and the codes of ``fact_mentions``) as one Polars frame sorted by person, plus each person's row
  range, so a lookup is a dict hit and a slice. The frame is read from a memory-mapped file that
  every serving process of the machine shares (``lib/warehouse/shared_facts``): the first to load a publish
  writes it, the others map it without querying. Only facts with a source the read policy lets
  consumer ``cds`` use (``lib/warehouse/read_policy.py``: network rows obtained for treatment) are
  kept, and they list only such sources; :attr:`Snapshot.read` counts the network fact sources
  kept and withheld, which the CDS service writes to the audit log once per load.

:meth:`TenantIndex.current` checks the file's inode/mtime/size at most once a second; a change is
loaded in a background thread while the last good snapshot keeps answering. A file that is
missing, half written or lacks the tables leaves the last good snapshot in place.
"""

import gc
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import polars as pl

from medblocks_pipelines.lib.cds.inline import may_block
from medblocks_pipelines.lib.errors import WarehouseError
from medblocks_pipelines.lib.settings import Tuning
from medblocks_pipelines.lib.warehouse.read_policy import (
    ConsumerRule,
    ReadCounts,
    audit_read,
    consumer_filter,
    load_read_policy,
    read_counts,
)
from medblocks_pipelines.lib.warehouse.shared_facts import map_facts, share_facts, shared_path

if TYPE_CHECKING:
    from medblocks_pipelines.lib.registry import ControlPlane

log = logging.getLogger(__name__)

CHECK_INTERVAL = 1.0
# With warehouses published to object storage, how often a server asks whether a newer one exists.
REFRESH_INTERVAL = Tuning.from_env().warehouse_poll_seconds  # MEDBLOCKS_WAREHOUSE_POLL_SECONDS
RETRY_FAILED_AFTER = 30.0
LOAD_MEMORY_LIMIT = "512MB"
SSN_SYSTEMS = ("http://hl7.org/fhir/sid/us-ssn", "urn:oid:2.16.840.1.113883.4.1")

# {src}: fact_sources with the provenance columns the read policy needs; {ok}: the cds rule;
# {mentions}: fact_mentions restricted to usable mentions. A fact is served when at least one of
# its sources may be used for treatment; what it lists (organizations, sources, patterns) is
# then only what may be (network rows obtained for payment never show up in a card).
_FACTS_SQL = """
WITH src AS (
    SELECT fact_id, organization, source, pattern, {ok} AS ok FROM {src}
), orgs AS (
    SELECT fact_id,
           list(DISTINCT organization) FILTER (WHERE ok AND organization IS NOT NULL)
               AS organizations,
           bool_or(ok) AS any_ok, bool_and(ok) AS all_ok,
           list_sort(list(DISTINCT source) FILTER (WHERE ok AND source IS NOT NULL)) AS ok_sources,
           list_sort(list(DISTINCT pattern) FILTER (WHERE ok)) AS ok_patterns
    FROM src GROUP BY fact_id
), codes AS (
    SELECT fact_id, list(DISTINCT c) AS codes
    FROM (SELECT fact_id, unnest(codes) AS c FROM {mentions} WHERE fact_id IS NOT NULL)
    GROUP BY fact_id
)
SELECT f.person_id, f.fact_id, f.kind, f.code_system, f.code, f.display, f.text,
       f.effective_date, f.last_date, f.value_num, f.value_unit, f.value_text, f.status,
       f.category,
       CASE WHEN o.all_ok THEN f.sources ELSE o.ok_sources END AS sources,
       CASE WHEN o.all_ok THEN f.patterns ELSE o.ok_patterns END AS patterns,
       f.from_claims,
       coalesce(o.organizations, []::VARCHAR[]) AS organizations,
       coalesce(c.codes, []::VARCHAR[]) AS codes
FROM facts f JOIN orgs o USING (fact_id) LEFT JOIN codes c USING (fact_id)
WHERE f.person_id IS NOT NULL AND o.any_ok
ORDER BY f.person_id, f.last_date DESC NULLS LAST, f.fact_id
"""

_POLICY_COLUMNS = ("organization", "source", "pattern", "permitted_purpose", "network_query_id")


def _policy_source(con: duckdb.DuckDBPyConnection, table: str) -> str:
    """``table`` with every column the read policy reads (NULL where a warehouse lacks one)."""
    present = {r[0] for r in con.execute(f"DESCRIBE {table}").fetchall()}
    extra = ", ".join(f"NULL::VARCHAR AS {c}" for c in _POLICY_COLUMNS if c not in present)
    return f"(SELECT *{', ' + extra if extra else ''} FROM {table})"


def facts_sql(con: duckdb.DuckDBPyConnection, rule: ConsumerRule) -> str:
    """The facts query of the index under ``rule`` (the read policy's cds rule)."""
    ok = consumer_filter(rule)
    mentions = f"(SELECT * FROM {_policy_source(con, 'fact_mentions')} WHERE {ok})"
    present = {r[0] for r in con.execute("DESCRIBE fact_mentions").fetchall()}
    if "pattern" not in present:  # a warehouse without mention provenance: codes as they are
        mentions = "fact_mentions"
    return _FACTS_SQL.format(src=_policy_source(con, "fact_sources"), ok=ok, mentions=mentions)


_IDENT_SQL = """
WITH ids AS (
    SELECT pl.person_id,
           unnest(from_json(r.resource, '{"identifier":[{"system":"VARCHAR","value":"VARCHAR"}]}')
                  .identifier) AS i
    FROM patient_links pl JOIN {resources} r ON r.resource_key = pl.patient_key
)
SELECT i.system || '|' || i.value AS ident, min(person_id) AS person_id,
       count(DISTINCT person_id) AS n
FROM ids
WHERE i.system IS NOT NULL AND i.value IS NOT NULL AND i.system NOT IN ?
GROUP BY 1
"""


def ident_sql(con: duckdb.DuckDBPyConnection, rule: ConsumerRule) -> str:
    """The identifier query under ``rule``: a person is found by identifiers only of Patient
    resources the CDS may read (not by one a payment-purpose network document revealed)."""
    present = set(con.sql("SELECT * FROM resources LIMIT 0").columns)
    if "pattern" not in present:  # a warehouse without provenance on resources
        return _IDENT_SQL.replace("{resources}", "resources")
    usable = f"(SELECT * FROM {_policy_source(con, 'resources')} WHERE {consumer_filter(rule)})"
    return _IDENT_SQL.replace("{resources}", usable)


@dataclass
class Snapshot:
    """One loaded warehouse: the lookups the cards need, and where they came from."""

    signature: tuple[int, int, int]
    loaded_at: float
    built_at: str | None
    patient_person: dict[str, str]
    identifier_person: dict[str, str]
    facts: pl.DataFrame = field(repr=False)
    ranges: dict[str, tuple[int, int]] = field(repr=False)
    person_sources: dict[str, tuple[str, ...]] = field(repr=False)
    load_seconds: float = 0.0
    # network fact sources the read policy let into (and kept out of) this snapshot, by purpose
    read: ReadCounts | None = None
    policy_version: str | None = None

    @property
    def persons(self) -> int:
        """Number of persons with at least one source patient."""
        return len(self.person_sources)

    def person_for(
        self, source: str, patient_id: str, identifiers: list[str] | None = None
    ) -> str | None:
        """The person of ``Patient/patient_id`` at ``source``, else of one of ``identifiers``."""
        person = self.patient_person.get(f"{source}/Patient/{patient_id}")
        if person is not None:
            return person
        for ident in identifiers or []:
            person = self.identifier_person.get(ident)
            if person is not None:
                return person
        return None

    def facts_of(self, person_id: str) -> list[dict[str, Any]]:
        """The person's facts, most recent first (dicts; empty when none)."""
        rng = self.ranges.get(person_id)
        if rng is None:
            return []
        return self.facts.slice(rng[0], rng[1]).to_dicts()


def audit_index_read(cp: "ControlPlane", tenant: str, snap: Snapshot) -> int | None:
    """One audit row for an index load that met purpose-restricted (network) rows."""
    if snap.read is None:
        return None
    policy = load_read_policy()
    return audit_read(
        cp,
        tenant=tenant,
        rule=policy.rule("cds"),
        policy=policy,
        counts=snap.read,
        actor="cds-index",
        table="fact_sources",
        ref=snap.built_at,
    )


def file_signature(path: Path) -> tuple[int, int, int] | None:
    """(inode, mtime_ns, size) of the published file, or None when it does not exist."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def load_snapshot(path: Path) -> Snapshot:
    """Read what the cards need from the published warehouse at ``path`` (read-only), the facts
    filtered by the read policy for consumer ``cds`` (lib/warehouse/read_policy.py)."""
    started = time.perf_counter()
    policy = load_read_policy()
    rule = policy.rule("cds")
    for _attempt in range(3):
        before = file_signature(path)
        if before is None:
            raise WarehouseError("no published warehouse")
        # Another serving process may have loaded this publish already: its facts are mapped.
        shared_at = shared_path(path, before, policy.version)
        shared = map_facts(shared_at)
        try:
            con = duckdb.connect(str(path), read_only=True)
        except duckdb.Error as exc:
            raise WarehouseError(f"the warehouse cannot be opened ({type(exc).__name__})") from exc
        try:
            # A background load must not take the serving process's memory and cores.
            con.execute("SET threads = 1")
            con.execute(f"SET memory_limit = '{LOAD_MEMORY_LIMIT}'")
            links = con.execute(
                "SELECT patient_key, person_id, source FROM patient_links "
                "WHERE person_id IS NOT NULL"
            ).fetchall()
            idents = con.execute(ident_sql(con, rule), [list(SSN_SYSTEMS)]).fetchall()
            facts = shared if shared is not None else con.sql(facts_sql(con, rule)).pl()
            read = read_counts(con, _policy_source(con, "fact_sources"), rule)
            try:
                row = con.execute(
                    "SELECT CAST(max(built_at) AS VARCHAR) FROM build_info"
                ).fetchall()
                built_at = row[0][0] if row else None
            except duckdb.Error:
                built_at = None
        except duckdb.Error as exc:
            raise WarehouseError(
                f"the warehouse lacks identity or unified-record tables ({type(exc).__name__})"
            ) from exc
        finally:
            con.close()
        after = file_signature(path)
        if after == before and before is not None:
            break
        # Republished while we read: read the new one instead of labelling it with a stale signature.
    else:
        raise WarehouseError("the warehouse kept changing while it was read")
    if shared is None:  # the first process to load this publish shares its facts with the others
        facts = share_facts(shared_at, facts)
    patient_person: dict[str, str] = {}
    sources_of: dict[str, list[str]] = {}
    intern = sys.intern  # one str object per person id, however many keys point at it
    for key, person, source in links:
        person = intern(person)
        patient_person[key] = person
        srcs = sources_of.setdefault(person, [])
        if source not in srcs:
            srcs.append(source)
    # Tuples of strings are untracked by the garbage collector: no GC pauses over 100k persons.
    person_sources = {p: tuple(s) for p, s in sources_of.items()}
    del sources_of
    del links
    identifier_person = {ident: intern(person) for ident, person, n in idents if n == 1}
    del idents
    ranges: dict[str, tuple[int, int]] = {}
    if facts.height:
        runs = (
            facts.select(pl.col("person_id"))
            .with_row_index("row")
            .group_by("person_id", maintain_order=True)
            .agg(pl.col("row").min().alias("start"), pl.len().alias("n"))
        )
        ranges = {p: (int(s), int(n)) for p, s, n in runs.iter_rows()}
    return Snapshot(
        signature=before,
        loaded_at=time.time(),
        built_at=built_at,
        patient_person=patient_person,
        identifier_person=identifier_person,
        facts=facts,
        ranges=ranges,
        person_sources=person_sources,
        load_seconds=time.perf_counter() - started,
        read=read,
        policy_version=policy.version,
    )


class TenantIndex:
    """The latest good snapshot of one tenant's warehouse, refreshed without blocking readers."""

    def __init__(
        self,
        path: Path,
        *,
        loader: Callable[[Path], Snapshot] = load_snapshot,
        refresh: Callable[[], object] | None = None,
        refresh_interval: float = REFRESH_INTERVAL,
        on_load: Callable[[Snapshot], object] | None = None,
    ) -> None:
        self.path = path
        self.loader = loader
        # ``on_load`` is told of every snapshot loaded (the CDS service audits the read of
        # purpose-restricted rows there).
        self.on_load = on_load
        # ``refresh`` brings ``path`` up to date from object storage (published warehouses); it
        # runs off the request path except before the very first snapshot.
        self.refresh = refresh
        self.refresh_interval = refresh_interval
        self._last_refresh: float | None = None
        self._refreshing = False
        self._snapshot: Snapshot | None = None
        self._lock = threading.Lock()
        self._loading = False
        self._last_check = 0.0
        self._failed: tuple[tuple[int, int, int] | None, float] | None = None
        self.last_error: str | None = None
        self.loads = 0

    def current(self) -> Snapshot | None:
        """The snapshot to answer from (None only when no good warehouse was ever read)."""
        if self._snapshot is None:
            may_block("warehouse index")  # the first refresh and load are synchronous
        now = time.monotonic()
        if self.refresh is not None and (
            self._last_refresh is None or now - self._last_refresh >= self.refresh_interval
        ):
            self._last_refresh = now
            if self._snapshot is None:
                self._refresh()
            else:
                self._refresh_in_background()
        if now - self._last_check >= CHECK_INTERVAL or self._snapshot is None:
            self._last_check = now
            sig = file_signature(self.path)
            snap = self._snapshot
            if (
                sig is not None
                and (snap is None or snap.signature != sig)
                and not self._recently_failed(sig)
            ):
                if snap is None:
                    self._load(sig)  # nothing to serve yet: the first load is synchronous
                else:
                    self._load_in_background(sig)
        return self._snapshot

    def _refresh(self) -> None:
        with self._lock:
            if self._refreshing:
                return
            self._refreshing = True
        try:
            assert self.refresh is not None
            self.refresh()
        except Exception as exc:  # noqa: BLE001 (keep serving what we have; say why in the log)
            self.last_error = str(exc)
            log.warning("cds index could not refresh the published warehouse: %s", exc)
        finally:
            with self._lock:
                self._refreshing = False

    def _refresh_in_background(self) -> None:
        threading.Thread(target=self._refresh, name="cds-index-refresh", daemon=True).start()

    def _recently_failed(self, sig: tuple[int, int, int]) -> bool:
        failed = self._failed
        return (
            failed is not None
            and failed[0] == sig
            and time.monotonic() - failed[1] < RETRY_FAILED_AFTER
        )

    def _load(self, sig: tuple[int, int, int]) -> None:
        with self._lock:
            if self._loading or (self._snapshot is not None and self._snapshot.signature == sig):
                return
            self._loading = True
        try:
            snap = self.loader(self.path)
            # The snapshot lives until the next publish: move it (and what came before) out of the
            # collector's generations, so a full collection never walks it mid-request.
            gc.collect()
            gc.freeze()
            self._snapshot = snap
            self.loads += 1
            self.last_error = None
            log.info("cds index loaded %s persons in %.2fs", snap.persons, snap.load_seconds)
            if self.on_load is not None:
                try:
                    self.on_load(snap)
                except Exception as exc:  # noqa: BLE001 (an audit outage must not stop CDS)
                    self.last_error = f"on_load: {type(exc).__name__}"
                    log.error("cds index could not record its read: %s", type(exc).__name__)
        except WarehouseError as exc:
            # Keep serving the last good snapshot; try this file again later.
            self._failed = (sig, time.monotonic())
            self.last_error = str(exc)
            log.warning("cds index kept the last good warehouse: %s", exc)
        finally:
            with self._lock:
                self._loading = False

    def _load_in_background(self, sig: tuple[int, int, int]) -> None:
        with self._lock:
            if self._loading:
                return
        threading.Thread(target=self._load, args=(sig,), name="cds-index-load", daemon=True).start()

    def wait_loaded(self, timeout: float = 10.0) -> None:
        """Block until no load is running (tests)."""
        deadline = time.monotonic() + timeout
        while self._loading and time.monotonic() < deadline:
            time.sleep(0.01)


class WarehouseIndexes:
    """One :class:`TenantIndex` per tenant, over ``<warehouse_dir>/<tenant>.duckdb``."""

    def __init__(
        self,
        path_of: Callable[[str], Path],
        *,
        refresh_of: Callable[[str], object] | None = None,
        on_load_of: Callable[[str, Snapshot], object] | None = None,
    ) -> None:
        self.path_of = path_of
        self.refresh_of = refresh_of
        self.on_load_of = on_load_of
        self._by_tenant: dict[str, TenantIndex] = {}
        self._lock = threading.Lock()

    def for_tenant(self, tenant_id: str) -> TenantIndex:
        """The tenant's index (created on first use)."""
        idx = self._by_tenant.get(tenant_id)
        if idx is None:
            with self._lock:
                refresh_of, on_load_of = self.refresh_of, self.on_load_of
                idx = self._by_tenant.get(tenant_id) or TenantIndex(
                    self.path_of(tenant_id),
                    refresh=(lambda: refresh_of(tenant_id)) if refresh_of else None,
                    on_load=(lambda snap: on_load_of(tenant_id, snap)) if on_load_of else None,
                )
                self._by_tenant[tenant_id] = idx
        return idx
