"""What libraries print while a command checks its input: held back until the checks pass.

A refusal is one line (``bptt: error: ...``). Lightning announces every Trainer it builds ("GPU
available: ...", a tip), MLflow the tables of a new store, and both happen while a command is
still checking what it was given (a Trainer is built to check its settings). The ``bptt`` command
runs inside ``held_back``; ``start_holding`` (called where a config is parsed: the libraries are
loaded by then) makes the records of those libraries' loggers wait; ``release`` lets them out,
in order, once the checks have passed (a run starts, an evaluation begins), and so does leaving
the block normally or with a bug's exception. Leaving it with a refusal (``BpttError``) drops
them. Outside ``held_back`` (the Python API, Ray's workers) nothing is held.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager

from bptt.errors import BpttError

LIBRARIES = ("pytorch_lightning", "lightning_fabric", "mlflow")


class _Holding(logging.Handler):
    """Stands in for the libraries' own handlers and keeps what they would have printed."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.saved: dict[str, tuple[list[logging.Handler], bool]] = {}

    def start(self) -> None:
        for name in LIBRARIES:  # each sets up its own handlers when imported: before they are stood in for
            importlib.import_module(name)
            logger = logging.getLogger(name)
            self.saved[name] = (logger.handlers[:], logger.propagate)
            logger.handlers, logger.propagate = [self], False

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def restore(self) -> list[logging.LogRecord]:
        for name, (handlers, propagate) in self.saved.items():
            logger = logging.getLogger(name)
            logger.handlers, logger.propagate = handlers, propagate
        self.saved = {}
        return self.records


_holding: _Holding | None = None  # inside held_back, until release


@contextmanager
def held_back() -> Iterator[None]:
    """A command whose libraries' log records ``start_holding`` may hold until ``release``."""
    global _holding
    if _holding is not None:  # already inside
        yield
        return
    _holding = _Holding()
    try:
        yield
    except BpttError:
        if _holding is not None:  # None: released already, the checks before it passed
            _holding.restore()  # a refusal: what the checks printed is not the user's business
            _holding = None
        raise
    finally:
        release()


def start_holding() -> None:
    """From here on hold the libraries' records, if inside ``held_back`` and not yet released.
    Imports those libraries (seconds): call it where the command needs them anyway."""
    if _holding is not None and not _holding.saved:
        _holding.start()


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
