"""Checks of the constructor arguments every recurrent core shares: sizes, dropout, the cell type.

Each failure is a one-line ``ConfigError`` that names the key (``model.<name>``), the value and
the range it must lie in, raised when the config is instantiated; without them torch fails with
a traceback (``hidden_size: -8``) or accepts a network that cannot learn (``dropout: 1.0``).
"""

from __future__ import annotations

from collections.abc import Iterable
from numbers import Integral, Real

from bptt.errors import ConfigError


def check_core_arguments(*, rnn_type: str, rnn_types: Iterable[str], dropout: float, **sizes: int | None) -> None:
    """Check a core's cell type, dropout and sizes.

    Args:
        rnn_type: the configured cell.
        rnn_types: the cells the core supports.
        dropout: must lie in [0, 1): 1 zeroes every unit.
        sizes: ``name=value`` of every size (hidden size, layers, ...); each an integer >= 1,
            None for an optional size left unset.

    Raises:
        ConfigError: the first argument out of range.
    """
    allowed = sorted(rnn_types)
    if rnn_type not in allowed:
        raise ConfigError(f"model.rnn_type must be one of {allowed}, got {rnn_type!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, Real) or not 0 <= dropout < 1:
        raise ConfigError(f"model.dropout must be in [0, 1) (the probability of zeroing a unit), got {dropout!r}")
    for name, value in sizes.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, Integral) or value < 1):
            raise ConfigError(f"model.{name} must be an integer >= 1, got {value!r}")
