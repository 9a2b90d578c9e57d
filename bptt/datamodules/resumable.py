"""``ResumableDataModule``: the base of DataModules whose training read position goes into checkpoints.

Training batches carry their position as python ints, ``epoch`` and the index named by
``position_key``; the DataModule records the next one to read, its ``state_dict`` saves it
and ``load_state_dict`` makes the next training iteration start there, so that a run
resumed mid-epoch reads exactly the batches the uninterrupted run would have read.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.accelerators import CUDAAccelerator
from torch.utils.data import DataLoader


class ResumableDataModule(pl.LightningDataModule):
    """Subclasses supply ``_loader(split)`` for ``train``, ``validation`` and ``test``, put
    ``self._position`` into their ``state_dict`` and restore it in ``load_state_dict``."""

    position_key = "window"  # the batch entry that numbers batches within an epoch

    def __init__(self) -> None:
        super().__init__()
        self._position = (0, 0)  # (epoch, the next batch to read) of training

    def _loader(self, split: str) -> DataLoader:
        raise NotImplementedError

    def _pin_memory(self) -> bool:
        """Page-locked batches when training on a GPU: copying one to the device then does not
        wait for the GPU to finish the previous step."""
        return isinstance(getattr(getattr(self, "trainer", None), "accelerator", None), CUDAAccelerator)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.trainer is not None and self.trainer.training:
            self._position = (batch["epoch"], batch[self.position_key] + 1)  # the next one to read
        return batch
