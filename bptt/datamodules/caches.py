"""The cache of derived data (token ids, log-mel features) and its two checks.

A DataModule writes its cache under ``cache_dir`` (default ``$BPTT_CACHE_DIR``, else
``~/.cache/bptt``) the first time it sees a corpus and reads it back afterwards. Both ends
fail in one line instead of a traceback:

- ``check_writable``, before anything is built: the directory (or the nearest existing one
  above it) must be a directory this process can create files in; nothing is created when it
  fails. A cache that needs no writing (every entry already built) may lie on a read-only mount.
- ``reading_cache``, around every read of a cache file: a file that cannot be parsed (cut
  short, overwritten, edited) names itself and what to delete so that it is rebuilt.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bptt.datamodules.sources import CorpusError
from bptt.directories import check_writable_directory
from bptt.errors import BpttError

FIX = "point data.cache_dir or $BPTT_CACHE_DIR at another directory"


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
