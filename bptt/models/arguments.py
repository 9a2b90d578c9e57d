"""Checks of the constructor arguments of models and cores: sizes, dropout, the cell type.

Each failure is a one-line ``ConfigError`` that names the key (``model.<name>``, or
``model.core.<name>`` for a core's own), the value and the range it must lie in, raised when the
config is instantiated; without them torch fails with a traceback (``hidden_size: -8``) or
accepts a network that cannot learn (``dropout: 1.0``).
"""

from __future__ import annotations

from collections.abc import Iterable
from numbers import Integral, Real

from bptt.errors import ConfigError


def check_choice(value: str, allowed: Iterable[str], *, key: str) -> None:
    """``value`` must be one of ``allowed`` (e.g. the cell types a model supports)."""
    choices = sorted(allowed)
    if value not in choices:
        raise ConfigError(f"{key} must be one of {choices}, got {value!r}")


def check_dropout(dropout: float, *, key: str = "model.dropout") -> None:
    """``dropout`` must lie in [0, 1): 1 zeroes every unit."""
    if isinstance(dropout, bool) or not isinstance(dropout, Real) or not 0 <= dropout < 1:
        raise ConfigError(f"{key} must be in [0, 1) (the probability of zeroing a unit), got {dropout!r}")


def check_sizes(*, prefix: str = "model", **sizes: int | None) -> None:
    """Every ``name=value`` of ``sizes`` (hidden size, layers, ...) must be an integer >= 1; None is an
    optional size left unset. Keys are named ``{prefix}.{name}``."""
    for name, value in sizes.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, Integral) or value < 1):
            raise ConfigError(f"{prefix}.{name} must be an integer >= 1, got {value!r}")
