"""What every data source shares: where it lives, the splits it is cut into, and its error.

- ``data_root``: relative data paths (``data.data_dir``, ``data.corpus``, ``data.source``)
  start at ``data_dir`` if given, else ``$BPTT_DATA_DIR``, else ``./data``.
- ``default_cache_dir``: derived data (token ids, log-mel features) is cached under
  ``$BPTT_CACHE_DIR``, else ``~/.cache/bptt``.
- ``SPLITS``: every DataModule serves these three splits, in this order.
- ``CorpusError``: a source (text, audio, series) that cannot be read; one line naming the fix.
"""

from __future__ import annotations

import os
from pathlib import Path

from bptt.errors import BpttError

SPLITS = ("train", "validation", "test")


class CorpusError(BpttError, ValueError):
    """A corpus that cannot be read: the message names the problem and the fix."""


def data_root(data_dir: str | None = None) -> Path:
    """The directory that relative data paths start from."""
    return Path(data_dir or os.environ.get("BPTT_DATA_DIR") or "data")


def default_cache_dir() -> Path:
    """``$BPTT_CACHE_DIR``, else ``~/.cache/bptt``."""
    return Path(os.environ.get("BPTT_CACHE_DIR") or Path.home() / ".cache" / "bptt")
