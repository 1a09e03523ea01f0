"""Two processes adding the same new dynamic partition: the loser of the race must not crash.

Dagster's SQLite storage checks for existing keys, then inserts; a CLI run and another CLI run
(or the partitions sensor) that both find a new tenant missing collide on the unique index. The
two-process CLI test hit it in CI. Here the collision is made certain: the instance is real (SQLite
storage on disk), and just before our insert "another process" adds the same key.
"""

from typing import Any

import dagster as dg

from medblocks_pipelines.defs.shared.sensors import add_partitions


class _LosesTheRace:
    """A real instance whose first add races another process's add of the same keys."""

    def __init__(self, instance: dg.DagsterInstance) -> None:
        self.instance = instance
        self.raced = False

    def add_dynamic_partitions(self, name: str, keys: list[str]) -> None:
        if not self.raced:
            self.raced = True
            # The other process's insert lands between our check and our insert: replay that
            # order on the real storage (its check passes, the insert hits the unique index).
            self.instance.add_dynamic_partitions(name, keys[:1])
            storage: Any = self.instance.event_log_storage
            with storage.index_connection() as conn:
                conn.exec_driver_sql(
                    "INSERT INTO dynamic_partitions (partitions_def_name, partition) VALUES (?, ?)",
                    (name, keys[0]),
                )
        self.instance.add_dynamic_partitions(name, keys)

    def get_dynamic_partitions(self, name: str) -> list[str]:
        return list(self.instance.get_dynamic_partitions(name))


def test_losing_the_race_adds_what_is_missing(tmp_path: Any) -> None:
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        racing = _LosesTheRace(instance)
        add_partitions(racing, "tenants", ["acme", "beta"])  # type: ignore[arg-type]
        assert racing.raced
        assert sorted(instance.get_dynamic_partitions("tenants")) == ["acme", "beta"]
