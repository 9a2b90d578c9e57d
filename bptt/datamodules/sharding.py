"""The one rule that decides which rows of a global batch each data-parallel rank owns.

Every DataModule (streams, utterance batches) and the engine (carried stream states restored
from a checkpoint onto another number of processes) shard with it, so a rank always holds the
same streams in its data and in its carried state::

    global rows   0 1 2 3 | 4 5 6 7        world_size 2, B_global 8
    rank          0       | 1
"""

from __future__ import annotations

from typing import TypeVar

from bptt.errors import ConfigError

Rows = TypeVar("Rows")  # anything sliceable along its first axis: Tensor, np.ndarray, list


def check_divides(count: int, world_size: int, what: str) -> None:
    """Check that ``count`` rows can be dealt out evenly over ``world_size`` processes.

    Args:
        what: the count as the user set it, e.g. ``"data.batch_size=6 streams"``.

    Raises:
        ConfigError: ``world_size`` does not divide ``count``.
    """
    if count % world_size:
        raise ConfigError(f"{what} cannot be split evenly over {world_size} processes; make it a multiple "
                          f"of {world_size}")


def rank_rows(total: int, rank: int, world_size: int) -> slice:
    """The contiguous block of ``total`` global rows that ``rank`` owns.

    Raises:
        ConfigError: ``world_size`` does not divide ``total``.
    """
    check_divides(total, world_size, f"{total} rows")
    per_rank = total // world_size
    return slice(rank * per_rank, (rank + 1) * per_rank)


def shard(rows: Rows, rank: int, world_size: int) -> Rows:
    """``rows`` (B_global, ...) -> this rank's (B_global / world_size, ...)."""
    return rows[rank_rows(len(rows), rank, world_size)]  # type: ignore[index]
