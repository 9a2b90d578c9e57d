"""``TimedProgressBar``: Lightning's TQDM bar redrawn at most every ``min_interval`` seconds.

Lightning's ``TQDMProgressBar`` redraws after every ``refresh_rate`` batches, and each redraw reads
the logged metrics from the device (a host wait for a GPU) and costs about 0.7 ms of Python, a
few percent of a small model's step on a CPU. A bar that moves four times a second shows the same.
"""

from __future__ import annotations

import time
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import TQDMProgressBar

# the training bar's shortest time between redraws; the engine logs train/loss for it as often
REDRAW_SECONDS = 0.25


class RedrawClock:
    """Says when ``interval`` seconds have passed since it last said so (first: at once)."""

    def __init__(self, interval: float = REDRAW_SECONDS) -> None:
        self.interval = interval
        self._at = -float("inf")

    def due(self) -> bool:
        now = time.monotonic()
        if now - self._at < self.interval:
            return False
        self._at = now
        return True


class TimedProgressBar(TQDMProgressBar):
    """The training bar redraws when ``min_interval`` seconds have passed since it last did, and at
    an epoch's last batch; validation and test bars as Lightning draws them.

    Args:
        min_interval: seconds between two redraws of the training bar.
        **kwargs: ``TQDMProgressBar``'s (``refresh_rate``, ``process_position``, ``leave``).
    """

    def __init__(self, min_interval: float = REDRAW_SECONDS, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.clock = RedrawClock(min_interval)
        self._undrawn: tuple[Any, Any, int] | None = None  # the latest batch not drawn yet

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.clock.due() or batch_idx + 1 == self.total_train_batches:
            self._undrawn = None
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        else:
            self._undrawn = (outputs, batch, batch_idx)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._undrawn is not None:  # an epoch cut short (max_steps) ends on the count it reached
            super().on_train_batch_end(trainer, pl_module, *self._undrawn)
            self._undrawn = None
        super().on_train_epoch_end(trainer, pl_module)
