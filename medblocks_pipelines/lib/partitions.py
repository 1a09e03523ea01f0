"""The one place partition keys are built.

Dagster partition keys must be stable, readable and free of the characters Dagster reserves in
multi-partition keys (``|``) and of ``...``. Registry ids are normalised to ``[a-z0-9-]`` and joined with ``.``.
"""

import re

_SEP = "."
_BAD = re.compile(r"[^a-z0-9-]+")


def normalise_id(value: str) -> str:
    """Lower-case ``value`` and replace anything outside ``[a-z0-9-]`` by ``-``."""
    out = _BAD.sub("-", value.strip().lower()).strip("-")
    if not out:
        raise ValueError(f"id {value!r} has no usable characters for a partition key")
    return out


def partition_key(*parts: str) -> str:
    """Join normalised ids into a partition key: ``partition_key("Acme", "mercy")`` -> ``acme.mercy``."""
    if not parts:
        raise ValueError("a partition key needs at least one part")
    return _SEP.join(normalise_id(p) for p in parts)


def split_partition_key(key: str) -> list[str]:
    """Inverse of :func:`partition_key` for ids that were already normalised."""
    return key.split(_SEP)
