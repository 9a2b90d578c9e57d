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


def check_writable_file(path: Path, *, label: str, fix: str) -> None:
    """Fail unless ``path`` can be written as a new file or in place of an old one: its directory
    exists and can be written, and ``path`` is not a directory; creates nothing.

    Args:
        path: the file to be written.
        label: what the file is, for the message (``--out forecast.csv``).
        fix: what the user can do, for the message.

    Raises:
        ConfigError: ``path`` is a directory, its directory is missing or a file, or cannot be written.
    """
    directory = path.absolute().parent
    if path.is_dir():
        raise ConfigError(f"{label}: {path} is a directory; {fix}")
    if not directory.exists():
        raise ConfigError(f"{label}: the directory {directory} does not exist; create it or {fix}")
    check_writable_directory(directory, label=label, fix=fix)
