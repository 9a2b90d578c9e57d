"""What libraries print while a command checks its input: held back until the checks pass.

A refusal is one line (``bptt: error: ...``). Lightning announces every Trainer it builds ("GPU
available: ...", a tip), MLflow the tables of a new store, and both happen while a command is
still checking what it was given (a Trainer is built to check its settings). ``held_back`` wraps
a command: the records of those libraries' loggers wait; ``release`` lets them out, in order,
once the checks have passed (a run starts, an evaluation begins), and so does leaving the block
normally or with a bug's exception. Leaving it with a refusal (``BpttError``) drops them.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager

from bptt.errors import BpttError

LIBRARIES = ("pytorch_lightning", "lightning_fabric", "lightning", "mlflow")


class _Holding(logging.Handler):
    """Stands in for the libraries' own handlers and keeps what they would have printed."""

    def __init__(self, names: tuple[str, ...]) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.saved = {name: (logging.getLogger(name).handlers[:], logging.getLogger(name).propagate) for name in names}
        for name in names:
            logger = logging.getLogger(name)
            logger.handlers, logger.propagate = [self], False

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def restore(self) -> list[logging.LogRecord]:
        for name, (handlers, propagate) in self.saved.items():
            logger = logging.getLogger(name)
            logger.handlers, logger.propagate = handlers, propagate
        return self.records


_holding: _Holding | None = None


@contextmanager
def held_back(names: tuple[str, ...] = LIBRARIES) -> Iterator[None]:
    """Hold the log records of ``names`` (and their children) until ``release`` or the end of the block.
    Imports those libraries (seconds): for commands that use them anyway."""
    global _holding
    if _holding is not None:  # already held by an outer block
        yield
        return
    for name in names:  # each sets up its own handlers when imported: before they are stood in for
        try:
            importlib.import_module(name)
        except ImportError:
            continue
    _holding = _Holding(names)
    try:
        yield
    except BpttError:
        _holding.restore()  # a refusal: what the checks printed is not the user's business
        _holding = None
        raise
    finally:
        release()


def release() -> None:
    """Print what was held, in order, and let the libraries print directly from now on."""
    global _holding
    if _holding is None:
        return
    records, _holding = _holding.restore(), None
    for record in records:
        logger = logging.getLogger(record.name)
        if logger.isEnabledFor(record.levelno):
            logger.handle(record)
