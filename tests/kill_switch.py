"""A callback that SIGKILLs its own training process once, at a given optimizer step, as a crash would.

Used through the run config (``trainer.callbacks``), so the kill happens inside the real
`bptt fit` process. ``marker`` makes it one-shot: a resumed run passes the step unharmed.
With ``during_checkpoint``, the process dies inside the next checkpoint write, after the
bytes went to the temporary file and before it was renamed into place. With ``rank``, only that
data-parallel rank dies (its peers find out through the collective they wait in).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytorch_lightning as pl


class KillAt(pl.Callback):
    def __init__(self, step: int, marker: str, during_checkpoint: bool = False, rank: int | None = None) -> None:
        self.step, self.marker, self.during_checkpoint, self.rank = step, Path(marker), during_checkpoint, rank

    def _die(self) -> None:
        self.marker.write_text(str(self.step))
        os.kill(os.getpid(), signal.SIGKILL)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.marker.exists() or trainer.global_step < self.step:
            return
        if self.rank is not None and trainer.global_rank != self.rank:
            return
        if not self.during_checkpoint:
            self._die()
        fsync = os.fsync

        def die_in_write(fd: int) -> None:  # the checkpoint's bytes are in its .partial file now
            fsync(fd)
            self._die()

        os.fsync = die_in_write
