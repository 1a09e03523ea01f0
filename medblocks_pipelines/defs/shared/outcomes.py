"""A run whose work failed is not green: the rule every landing asset applies at its end."""

from collections.abc import Mapping

import dagster as dg


def fail_if_nothing_succeeded(
    *, attempted: int, failed: int, what: str, metadata: Mapping[str, int] | None = None
) -> None:
    """Raise ``dg.Failure`` when ``attempted`` units of work were tried and every one failed.

    Nothing attempted (an empty request) is not a failure: the asset says so in its metadata.
    Some failed, some succeeded: the run is green and the metadata counts the failures (partial)."""
    if attempted > 0 and failed >= attempted:
        raise dg.Failure(
            description=f"every {what} failed ({failed} of {attempted})",
            metadata=dict(metadata or {}),
        )
