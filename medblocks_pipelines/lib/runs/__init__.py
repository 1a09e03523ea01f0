"""What a run process leaves behind and how to tell whether it is still alive (no Dagster import).

- :mod:`.process`: who runs a run (host, pid, process start time) and whether that process lives.
- :mod:`.locks`: a lock held on this host (a file lock) and, with a PostgreSQL control plane,
  across hosts (an advisory lock), releasable from another thread.
- :mod:`.leftovers`: pull-history rows, bulk download folders and half-built warehouse files of
  runs whose process is gone.
"""
