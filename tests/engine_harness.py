"""Run the real TBPTT engine under a real Trainer on batches a test writes out by hand."""

from __future__ import annotations

from functools import partial
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from bptt.lightning_modules import LanguageModelTask
from bptt.models import RNNLanguageModel


class ListDataModule(pl.LightningDataModule):
    """Yields the given batches in order, as training (and validation) data; under DDP every process
    takes its contiguous block of rows (B / world) of each training batch, as the stream DataModules do."""

    def __init__(self, batches: list[dict[str, Any]], val_batches: list[dict[str, Any]] | None = None) -> None:
        super().__init__()
        self.batches = batches
        self.val_batches = val_batches or []

    def train_dataloader(self) -> DataLoader:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        if world == 1:
            return DataLoader(self.batches, batch_size=None)
        mine = []
        for batch in self.batches:
            rows = len(batch["targets"]) // world
            mine.append({k: v[rank * rows : (rank + 1) * rows] for k, v in batch.items()})  # (B / world, ...)
        return DataLoader(mine, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_batches, batch_size=None)


def tiny_model(
    seed: int = 0, rnn_type: str = "LSTM", vocab: int = 7, hidden: int = 5, layers: int = 2
) -> RNNLanguageModel:
    torch.manual_seed(seed)
    return RNNLanguageModel(vocab_size=vocab, rnn_type=rnn_type, embedding_size=4, hidden_size=hidden,
                            num_layers=layers)


def sgd(lr: float = 0.5) -> partial[torch.optim.SGD]:
    return partial(torch.optim.SGD, lr=lr)  # picklable, for ddp_spawn


def run(task: LanguageModelTask, batches: list[dict[str, Any]], *, precision: str | None = "64-true",
        val_batches: list[dict[str, Any]] | None = None, max_epochs: int = 1, accelerator: str = "cpu",
        devices: int = 1, data: type[ListDataModule] = ListDataModule, **trainer: Any) -> pl.Trainer:
    """Fit ``task`` on ``batches`` (one epoch by default) and return the Trainer; ``data`` may be a
    ``ListDataModule`` subclass with the attributes a task reads from its DataModule. With
    ``devices`` > 1 (and e.g. ``strategy="ddp_spawn"``) each process trains on its rows of the batches."""
    trainer_ = pl.Trainer(
        accelerator=accelerator, devices=devices, precision=precision, max_epochs=max_epochs,
        enable_checkpointing=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=len(val_batches or []), use_distributed_sampler=False,
        **{"log_every_n_steps": 1, "logger": False, "enable_progress_bar": False, **trainer},
    )
    trainer_.fit(task, datamodule=data(batches, val_batches))
    return trainer_


def stream_batches(tokens: torch.Tensor, window: int, reset_first: bool = True) -> list[dict[str, Any]]:
    """Stream-mode batches over (B, L+1) tokens: consecutive windows, reset on the first."""
    batches = []
    for start in range(0, tokens.shape[1] - 1, window):
        end = min(start + window, tokens.shape[1] - 1)
        batches.append({
            "inputs": tokens[:, start:end], "targets": tokens[:, start + 1 : end + 1],
            "reset": torch.full((tokens.shape[0],), reset_first and start == 0),
        })
    return batches
