"""The landing pool of a bulk sync: downloaded files land on worker threads, the largest waiting
file first, and small plain files of one type are coalesced into batches before they land.

Split from :mod:`bulk_land` (the download-and-land orchestration), which feeds it."""

import concurrent.futures as cf
import heapq
import itertools
import queue
import shutil
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from medblocks_pipelines.lib.fhir.bulk import (
    DownloadResult,
)
from medblocks_pipelines.lib.warehouse.lake import LakeWriter

#: Small plain files of one type are appended into a batch of up to this size before landing:
#: each landing has a fixed cost, and servers such as HAPI write ~1000 resources per file. A
#: type's batch also lands as soon as its last file is in, so landing overlaps the downloads.
COALESCE_BYTES = 64 << 20


class LargestFirst:
    """Landing threads that take the largest waiting file first.

    Files finish downloading in no useful order; in a FIFO the largest one (whose landing is the
    longest) queued behind every small one and became the tail of the sync. Taken largest first,
    it starts as soon as a worker is free. ``shutdown`` lands what is queued, then stops."""

    def __init__(self, workers: int) -> None:
        self._heap: list[tuple[int, int, cf.Future[None], Callable[[], None]]] = []
        self._order = itertools.count()
        self._cv = threading.Condition()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._work, name=f"bulk-land_{n}", daemon=True)
            for n in range(workers)
        ]
        for t in self._threads:
            t.start()

    def submit(self, size: int, fn: Callable[[], None]) -> cf.Future[None]:
        fut: cf.Future[None] = cf.Future()
        with self._cv:
            heapq.heappush(self._heap, (-size, next(self._order), fut, fn))
            self._cv.notify()
        return fut

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._heap and not self._closed:
                    self._cv.wait()
                if not self._heap:
                    return
                _, _, fut, fn = heapq.heappop(self._heap)
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fn()
            except BaseException as exc:  # raised by the caller's Future.result()
                fut.set_exception(exc)
            else:
                fut.set_result(None)

    def shutdown(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        for t in self._threads:
            t.join()


class Batches:
    """Per-type batch files of downloaded plain NDJSON, landed when large enough.

    Landing runs on ``workers`` threads (largest waiting file first), each with its own
    :class:`LakeWriter` (the lake is append-only files, so writers never touch each other's output;
    DuckDB releases the GIL).
    :meth:`finish` waits for them and merges their stats into the main writer's.
    """

    def __init__(
        self,
        writer: LakeWriter,
        work: Path,
        export_id: str,
        received: Counter[str],
        *,
        workers: int = 2,
        limit: int = COALESCE_BYTES,
    ) -> None:
        self.writer, self.work, self.export_id = writer, work, export_id
        self.received, self.limit = received, limit
        self.open: dict[str, tuple[Path, Any, int]] = {}
        self.serial = 0
        self._lock = threading.Lock()
        self._writers: queue.Queue[LakeWriter] = queue.Queue()
        self._all = [writer.sibling() for _ in range(max(1, workers))]
        for w in self._all:
            self._writers.put(w)
        self._pool = LargestFirst(len(self._all))
        self._futures: list[cf.Future[None]] = []

    def _land(
        self, path: Path, rtype: str, origin: str, remove: bool, on_done: Callable[[], None]
    ) -> None:
        w = self._writers.get()
        try:
            before = w.stats.landed + w.stats.quarantined
            # A manifest type is checked per line; files organized by patient hold many types.
            expected = rtype if rtype.isalnum() else None
            w.add_ndjson_file(path, origin=origin, expected_type=expected)
            got = w.stats.landed + w.stats.quarantined - before
        finally:
            self._writers.put(w)
            if remove:
                path.unlink(missing_ok=True)
            on_done()
        with self._lock:
            self.received[rtype] += got

    def land_file(
        self,
        path: Path,
        rtype: str,
        origin: str,
        *,
        remove: bool,
        on_done: Callable[[], None] = lambda: None,
    ) -> None:
        """Queue ``path`` for landing (never blocks: the downloads are what is bounded, see
        ``_download_and_land``); ``on_done`` runs once it is landed and removed."""
        size = path.stat().st_size
        self._futures.append(
            self._pool.submit(size, lambda: self._land(path, rtype, origin, remove, on_done))
        )

    def add(
        self,
        got: DownloadResult,
        rtype: str,
        *,
        last: bool = False,
        on_done: Callable[[], None] = lambda: None,
    ) -> None:
        """Take a downloaded file of ``rtype``; ``last``: the type's last file in the manifest
        (its batch lands now, while other files still download). ``on_done`` runs once the
        downloaded file is gone (landed, or copied into a batch)."""
        if got.gzip or (rtype not in self.open and (got.bytes >= self.limit or last)):
            # Big enough alone, compressed, or the type's only file left: landed as downloaded,
            # no copy into a batch (no second pass over its bytes).
            origin = f"{self.export_id}/{Path(urlsplit(got.url).path).name}"
            self.land_file(got.path, rtype, origin, remove=True, on_done=on_done)
            return
        if rtype in self.open and self.open[rtype][2] + got.bytes > self.limit:
            self.flush(rtype)  # a batch stays within one landing chunk (no split)
        if rtype not in self.open:
            self.serial += 1
            path = self.work / f"batch-{self.serial:05d}.ndjson"
            self.open[rtype] = (path, open(path, "wb"), 0)  # noqa: SIM115 (closed in flush)
        path, fh, size = self.open[rtype]
        with open(got.path, "rb") as src:
            shutil.copyfileobj(src, fh, 1 << 20)
            if got.bytes:
                src.seek(-1, 2)
                if src.read(1) != b"\n":
                    fh.write(b"\n")
        got.path.unlink(missing_ok=True)
        on_done()
        size += got.bytes
        self.open[rtype] = (path, fh, size)
        if size >= self.limit or last:
            self.flush(rtype)

    def flush(self, rtype: str) -> None:
        path, fh, _ = self.open.pop(rtype)
        fh.close()
        self.land_file(path, rtype, f"{self.export_id}/{rtype}/{path.stem}", remove=True)

    def finish(self) -> None:
        """Land what is left, wait for every landing, merge stats (raises the first error)."""
        for rtype in list(self.open):
            self.flush(rtype)
        for fut in self._futures:
            fut.result()

    def close(self) -> None:
        """Stop workers, close writers (flushing their quarantine rows), merge their stats."""
        self._pool.shutdown()
        for path, fh, _ in self.open.values():
            fh.close()
            path.unlink(missing_ok=True)
        self.open.clear()
        main = self.writer.stats
        for w in self._all:
            stats = w.close()
            main.counts_by_type.update(stats.counts_by_type)
            main.quarantined += stats.quarantined
            main.quarantine_reasons.update(stats.quarantine_reasons)
            main.files += stats.files
            main.bytes += stats.bytes
        self._all = []
