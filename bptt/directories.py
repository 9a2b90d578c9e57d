"""Whether a directory can be written, asked before anything is written there."""

from __future__ import annotations

import tempfile
from pathlib import Path

from bptt.errors import ConfigError


def check_writable_directory(directory: Path, *, label: str, fix: str) -> None:
    """Fail when files cannot be created in ``directory`` (created later, with its parents, if
    missing); creates nothing.

    Args:
        directory: where files will be written.
        label: what the directory is, for the message (``trainer.default_root_dir=runs/x``).
        fix: what the user can do, for the message.

    Raises:
        ConfigError: a file lies where the directory or one above it should be, or the nearest
            existing directory cannot be written (a real write test: permission bits do not stop
            root, a read-only mount does).
    """
    existing = directory.absolute()
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{label}: {existing} is a file, not a directory; {fix}")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".bptt-write-check-"):
            pass
    except OSError as err:
        raise ConfigError(f"{label} cannot be written ({err.strerror}: {existing}); {fix}") from None
