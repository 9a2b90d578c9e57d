"""Synthetic long-dependency tasks: the copy memory and adding problems, to show what truncation costs.

Both make a dependency of a known length ``lag``: the loss at a step needs an input ``lag``
or more steps back. TBPTT(K, K) backpropagates only within windows of K steps, so with
``task.k1`` <= lag no gradient connects the two ends. On the copy task the network then
stays at the trivial ``baseline_loss`` (``benchmarks/truncation.py``). The adding problem
is weaker evidence: its solution, an accumulator of marked values, is one rule applied at
every step, and windows that hold the second marker can teach it (seen with k1 = 10, lag 40).

Split mode (no ``reset`` key): a batch holds whole sequences (B, T) and the engine cuts them
into windows of ``task.k1`` steps itself. Every split is a fixed set of sequences drawn once
from ``numpy.random.default_rng([seed, split])`` (split 0 train, 1 validation, 2 test)::

    train, epoch e: rows permuted with rng([seed, 3, e]); the last N mod B_global dropped
                    | batch 0: B_global rows | batch 1 | ...
    validation/test: rows in order, batches of eval_batch_size (the last may be smaller)
    every batch:    | rows 0 .. B/W-1 -> rank 0 | rows B/W .. 2B/W-1 -> rank 1 | ...

Each batch also carries ``epoch`` and ``batch``; the read position (epoch, next batch) is
the DataModule's state, so a run resumes mid-epoch on the same sequences.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from bptt.datamodules.resumable import BatchOrder, ResumableDataModule, SplitReader
from bptt.datamodules.sharding import shard
from bptt.datamodules.sources import SPLITS
from bptt.datamodules.timeseries import ForecastData
from bptt.errors import ConfigError

IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default: a zero loss


class SequenceBatches(Dataset):
    """One rank's batches of one split, addressed by ``(epoch, batch)`` keys (from a ``BatchOrder``).

    Args:
        sequences: the split's arrays, each (N, T, ...).
        batch_size: B_global for training, else sequences per evaluation batch.
        rank, world_size: this process and the number of data-parallel processes.
        training: permute the rows per epoch and drop the last N mod B_global (else keep the order).
        seed: of the training order.
    """

    def __init__(self, sequences: dict[str, np.ndarray], *, batch_size: int, rank: int, world_size: int,
                 training: bool, seed: int = 0) -> None:
        self.sequences = {k: torch.from_numpy(v) for k, v in sequences.items()}
        self.count = len(next(iter(sequences.values())))
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.training = training
        self.seed = seed
        self._order: tuple[int, np.ndarray] | None = None

    def rows(self, epoch: int, index: int) -> np.ndarray:
        """The sequence indices of this rank's block of global batch ``index`` of ``epoch``."""
        if not self.training:
            return shard(np.arange(index * self.batch_size, min((index + 1) * self.batch_size, self.count)),
                         self.rank, self.world_size)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, 3, epoch]).permutation(self.count))
        return shard(self._order[1][index * self.batch_size : (index + 1) * self.batch_size],
                     self.rank, self.world_size)

    def __len__(self) -> int:
        return self.count // self.batch_size if self.training else math.ceil(self.count / self.batch_size)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Tensor | int]:
        epoch, index = key
        rows = torch.from_numpy(self.rows(epoch, index))
        return {**{k: v[rows] for k, v in self.sequences.items()}, "epoch": epoch, "batch": index}


class _SyntheticSequences(ResumableDataModule):
    """Sizes, seeds and the batches of every split; a task supplies ``generate``."""

    position_key = "batch"

    def __init__(self, *, train_size: int, validation_size: int, test_size: int, batch_size: int,
                 eval_batch_size: int, seed: int) -> None:
        super().__init__()
        self.check_at_least(1, train_size=train_size, validation_size=validation_size, test_size=test_size,
                            batch_size=batch_size, eval_batch_size=eval_batch_size)
        if seed < 0:
            raise ConfigError(f"data.seed must be >= 0 (numpy seeds the sequences and the order), got {seed}")
        if train_size < batch_size:
            raise ConfigError(f"data.train_size={train_size} is fewer than one batch (data.batch_size={batch_size}); "
                              "raise train_size or lower batch_size")
        self.sizes = {"train": train_size, "validation": validation_size, "test": test_size}
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.data: dict[str, dict[str, np.ndarray]] = {}

    def generate(self, rng: np.random.Generator, count: int) -> dict[str, np.ndarray]:
        """``count`` sequences: the batch entries, each (count, T, ...)."""
        raise NotImplementedError

    def load(self) -> None:
        """Draw every split from its own seed; idempotent."""
        if not self.data:
            self.data = {split: self.generate(np.random.default_rng([self.seed, i]), self.sizes[split])
                         for i, split in enumerate(SPLITS)}

    def readers(self, rank: int, world_size: int) -> dict[str, SplitReader]:
        self.check_divides(world_size, "sequences", batch_size=self.batch_size, eval_batch_size=self.eval_batch_size,
                           validation_size=self.sizes["validation"], test_size=self.sizes["test"])
        readers = {}
        for split in SPLITS:
            training = split == "train"
            batches = SequenceBatches(self.data[split],
                                      batch_size=self.batch_size if training else self.eval_batch_size,
                                      rank=rank, world_size=world_size, training=training, seed=self.seed)
            readers[split] = SplitReader(batches, BatchOrder(len(batches)))
        return readers


class CopyMemoryDataModule(_SyntheticSequences):
    """The copy memory task (Hochreiter & Schmidhuber 1997; Arjovsky et al. 2016), for ``LanguageModelTask``.

    Read ``length`` random symbols, wait, then output them in order. Symbol i is input at
    step i and must be output at step i + ``lag``: the lag is the distance in steps between a
    symbol's input and the step where it is the target. A sequence has T = lag + length steps::

        step     0 .. length-1 | length .. lag-2 | lag-1     | lag .. lag+length-1
        input    s_0 .. s_n-1  | blank           | delimiter | blank
        target   -100          | -100            | -100      | s_0 .. s_n-1      (mask true only here)

    Token ids: 0 is the blank, 1..symbols the data symbols, symbols + 1 the delimiter
    (V = symbols + 2). Batches: ``inputs`` (B, T) int64, ``targets`` (B, T) int64, ``mask``
    (B, T) bool. Targets outside the recall are -100, the ignore index of ``cross_entropy``,
    so their per-step loss is zero in evaluation too (the engine applies ``mask`` to the
    training loss only).

    Args:
        symbols: how many different data symbols.
        length: n, symbols to copy per sequence.
        lag: steps from a symbol's input to its recall; > length (the delimiter comes after
            the last symbol).
        train_size, validation_size, test_size: sequences in each split.
        batch_size: B_global, training sequences per step over all ranks.
        eval_batch_size: sequences per validation/test batch over all ranks.
        seed: of the sequences (each split its own stream) and the training order.
    """

    blank_id = 0

    def __init__(self, *, symbols: int = 8, length: int = 10, lag: int = 30, train_size: int = 20000,
                 validation_size: int = 1000, test_size: int = 1000, batch_size: int = 64, eval_batch_size: int = 500,
                 seed: int = 0) -> None:
        super().__init__(train_size=train_size, validation_size=validation_size, test_size=test_size,
                         batch_size=batch_size, eval_batch_size=eval_batch_size, seed=seed)
        if symbols < 2:
            raise ConfigError(f"data.symbols must be >= 2, got {symbols}")
        if length < 1:
            raise ConfigError(f"data.length must be >= 1, got {length}")
        if lag <= length:
            raise ConfigError(f"data.lag={lag} must be > data.length={length}: recall starts after the delimiter, "
                              "which follows the last symbol")
        self.symbols = symbols
        self.length = length
        self.lag = lag

    @property
    def vocab_size(self) -> int:
        """V = symbols + 2: the blank, the data symbols and the delimiter."""
        return self.symbols + 2

    @property
    def delimiter_id(self) -> int:
        return self.symbols + 1

    @property
    def sequence_length(self) -> int:
        """T = lag + length."""
        return self.lag + self.length

    @property
    def baseline_loss(self) -> float:
        """log(symbols) nats: the cross-entropy of guessing uniformly among the data symbols."""
        return math.log(self.symbols)

    def generate(self, rng: np.random.Generator, count: int) -> dict[str, np.ndarray]:
        n, lag = self.length, self.lag
        copied = rng.integers(1, self.symbols + 1, size=(count, n))  # (N, n)
        inputs = np.full((count, lag + n), self.blank_id, np.int64)  # (N, T)
        targets = np.full((count, lag + n), IGNORE_INDEX, np.int64)  # (N, T)
        mask = np.zeros((count, lag + n), bool)  # (N, T)
        inputs[:, :n] = copied
        inputs[:, lag - 1] = self.delimiter_id
        targets[:, lag:] = copied
        mask[:, lag:] = True
        return {"inputs": inputs, "targets": targets, "mask": mask}


class AddingProblemDataModule(_SyntheticSequences):
    """The adding problem (Hochreiter & Schmidhuber 1997), for ``ForecastTask`` with ``residual: false``.

    Each step inputs a value drawn uniformly from [0, 1] and a marker (0 or 1). Two steps
    are marked; after the last step the network outputs the sum of the two marked values.
    The first marker lies in steps [0, length - lag) and the second one uniformly after it,
    so the answer at the last step (length - 1) needs the value at least ``lag`` steps back::

        step     0 ...... p1 ...... length-lag-1 | ....... p2 ....... | length-1
        marker   0 ...... 1  ...........................   1  ......... 0 or 1 (p2 may be the last)
        target                                                          v[p1] + v[p2]  (counted only here)

    Batches (as ``TimeSeriesDataModule``'s, one series per sequence): ``inputs`` (B, T, 2)
    float32 (value, marker), ``targets`` (B, T, 1, 1) float32 (the sum at the last step, 0
    elsewhere), ``target_mask`` (B, T, 1, 1) and ``mask`` (B, T) bool (true only at the last
    step), ``positions`` (B, T) int64 (0..T-1). ``forecast_data`` describes them to the task.
    The sum is not an input column, so ``task.residual`` must be false; values are not
    normalized (mean 0, std 1) and the MASE scale is 1, so ``MASE`` = ``MAE``.

    Args:
        length: T, steps per sequence.
        lag: the first marker is at least this many steps before the last step; 1 <= lag < length.
        train_size, validation_size, test_size: sequences in each split.
        batch_size: B_global, training sequences per step over all ranks.
        eval_batch_size: sequences per validation/test batch over all ranks.
        seed: of the sequences (each split its own stream) and the training order.
    """

    def __init__(self, *, length: int = 50, lag: int = 40, train_size: int = 20000, validation_size: int = 1000,
                 test_size: int = 1000, batch_size: int = 64, eval_batch_size: int = 500, seed: int = 0) -> None:
        super().__init__(train_size=train_size, validation_size=validation_size, test_size=test_size,
                         batch_size=batch_size, eval_batch_size=eval_batch_size, seed=seed)
        if lag < 1 or lag >= length:
            raise ConfigError(f"data.lag must be in [1, data.length), got lag={lag} with length={length}")
        self.length = length
        self.lag = lag

    def forecast_data(self) -> ForecastData:
        """Inputs value and marker, target the sum, one step ahead; not normalized (mean 0, std 1),
        MASE scale 1; timestamps 0..T (the forecast plot reads position + 1)."""
        return ForecastData(input_names=("value", "marker"), target_names=("sum",), horizon=1,
                            target_mean=torch.zeros(1), target_std=torch.ones(1), mase_scale=torch.ones(1),
                            timestamps=np.arange(self.length + 1))

    @property
    def baseline_loss(self) -> float:
        """1/6: the squared error of always answering 1.0, the variance of a sum of two U(0, 1)."""
        return 1 / 6

    def generate(self, rng: np.random.Generator, count: int) -> dict[str, np.ndarray]:
        length, rows = self.length, np.arange(count)
        values = rng.random((count, length), dtype=np.float32)  # (N, T)
        first = rng.integers(0, length - self.lag, size=count)  # (N,) in [0, T - lag)
        second = rng.integers(first + 1, length)  # (N,) in (first, T - 1]
        inputs = np.zeros((count, length, 2), np.float32)  # (N, T, 2)
        inputs[:, :, 0] = values
        inputs[rows, first, 1] = 1.0
        inputs[rows, second, 1] = 1.0
        targets = np.zeros((count, length, 1, 1), np.float32)  # (N, T, H=1, C_out=1)
        targets[:, -1, 0, 0] = values[rows, first] + values[rows, second]
        target_mask = np.zeros((count, length, 1, 1), bool)  # (N, T, 1, 1)
        target_mask[:, -1] = True
        positions = np.broadcast_to(np.arange(length, dtype=np.int64), (count, length)).copy()  # (N, T)
        return {"inputs": inputs, "targets": targets, "target_mask": target_mask,
                "mask": target_mask[:, :, 0, 0].copy(), "positions": positions}
