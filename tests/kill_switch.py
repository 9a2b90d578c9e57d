"""A callback that SIGKILLs its own training process once, at a given optimizer step, as a crash would.

Used through the run config (``trainer.callbacks``), so the kill happens inside the real
`bptt fit` process. ``marker`` makes it one-shot: a resumed run passes the step unharmed.
``when`` picks the moment, once the step is reached:

- ``"step"``: at the end of the training batch;
- ``"in-write"``: inside the next checkpoint write, after its bytes went to the temporary file and
  before it was renamed into place;
- ``"after-write"``: right after the next checkpoint was renamed into place (before anything else
  happens, e.g. the step's metrics reaching the logger); with ``writes``, after the n-th write.

With ``rank``, only that data-parallel rank dies (its peers find out through the collective they
wait in).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytorch_lightning as pl


class KillAt(pl.Callback):
    def __init__(self, step: int, marker: str, during_checkpoint: bool = False, rank: int | None = None,
                 when: str = "step", writes: int = 1) -> None:
        self.step, self.marker, self.rank, self.writes = step, Path(marker), rank, writes
        self.when = "in-write" if during_checkpoint else when
        assert self.when in ("step", "in-write", "after-write"), when

    def _die(self) -> None:
        self.marker.write_text(str(self.step))
        os.kill(os.getpid(), signal.SIGKILL)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.marker.exists() or trainer.global_step < self.step:
            return
        if self.rank is not None and trainer.global_rank != self.rank:
            return
        if self.when == "step":
            self._die()
        fsync, calls = os.fsync, []

        def die_in_write(fd: int) -> None:  # a write fsyncs the file, renames it, then fsyncs the directory
            fsync(fd)
            calls.append(fd)
            if self.when == "in-write" or len(calls) == 2 * self.writes:
                self._die()

        os.fsync = die_in_write
