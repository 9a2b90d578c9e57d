"""What every data source shares: where it lives, the splits it is cut into, its error, and the
cache of what is derived from it.

- ``data_root``: relative data paths (``data.data_dir``, ``data.corpus``, ``data.source``)
  start at ``data_dir`` if given, else ``$BPTT_DATA_DIR``, else ``./data``.
- ``SPLITS``: every DataModule serves these three splits, in this order.
- ``CorpusError``: a source (text, audio, series) that cannot be read; one line naming the fix.
- ``load_saved``: a ``datasets`` directory written by ``save_to_disk`` (a text or speech corpus).

Derived data (token ids, log-mel features) is cached under ``cache_dir`` (``default_cache_dir``:
``$BPTT_CACHE_DIR``, else ``~/.cache/bptt``) the first time a DataModule sees a corpus and read
back afterwards. Both ends fail in one line instead of a traceback:

- ``check_writable``, before anything is built: the directory (or the nearest existing one
  above it) must be a directory this process can create files in; nothing is created when it
  fails. A cache that needs no writing (every entry already built) may lie on a read-only mount.
- ``reading_cache``, around every read of a cache file: a file that cannot be parsed (cut
  short, overwritten, edited) names itself and what to delete so that it is rebuilt.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from bptt.directories import check_writable_directory
from bptt.errors import BpttError

if TYPE_CHECKING:
    import datasets

SPLITS = ("train", "validation", "test")
FIX = "point data.cache_dir or $BPTT_CACHE_DIR at another directory"


class CorpusError(BpttError, ValueError):
    """A corpus that cannot be read: the message names the problem and the fix."""


def data_root(data_dir: str | None = None) -> Path:
    """The directory that relative data paths start from."""
    return Path(data_dir or os.environ.get("BPTT_DATA_DIR") or "data")

def load_saved(path: Path) -> datasets.Dataset | datasets.DatasetDict:
    """A directory written by ``save_to_disk``; a one-line CorpusError when its files are damaged."""
    import datasets

    try:
        return datasets.load_from_disk(str(path))
    except Exception as err:  # json, pyarrow and datasets raise many types for damaged files
        detail = " ".join(str(err).split())[:160]
        raise CorpusError(f"cannot load the saved dataset {path} ({type(err).__name__}: {detail}); save it again "
                          "with save_to_disk, or point data.corpus at another corpus") from None


def default_cache_dir() -> Path:
    """``$BPTT_CACHE_DIR``, else ``~/.cache/bptt``."""
    return Path(os.environ.get("BPTT_CACHE_DIR") or Path.home() / ".cache" / "bptt")


def check_writable(directory: Path) -> None:
    """Check that files can be created in the cache directory ``directory`` (created later, with
    its parents, if missing); creates nothing.

    Raises:
        ConfigError: a file lies where the directory or one above it should be, or the nearest
            existing directory cannot be written (read-only mount, permissions).
    """
    check_writable_directory(directory, label=f"cache directory {directory}", fix=FIX)


@contextmanager
def reading_cache(path: Path, *, remove: Path | None = None) -> Iterator[None]:
    """Turn any failure to read cache file ``path`` back into one ``CorpusError``.

    Args:
        path: the file or directory being read.
        remove: what to delete so that it is rebuilt (default ``path``).

    Raises:
        CorpusError: naming ``path``, what went wrong and the fix.
    """
    try:
        yield
    except BpttError:
        raise
    except Exception as err:  # json, numpy, pyarrow and datasets raise many types for a damaged file
        detail = " ".join(str(err).split())
        detail = detail if len(detail) <= 160 else detail[:157] + "..."
        raise CorpusError(
            f"the cache {path} is corrupt ({type(err).__name__}: {detail}); delete {remove or path} to rebuild it, "
            f"or {FIX}"
        ) from None
