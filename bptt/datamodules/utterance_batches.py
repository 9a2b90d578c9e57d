"""Batches of whole utterances: length bucketing, sharding over ranks, collation, resumable order.

Training (B_global utterances per step over all ranks)::

    epoch e: permute utterances with rng(seed, e), drop N mod B_global of them
             | bucket 0 (batches_per_bucket * B_global) | bucket 1 | ...   each sorted by frames
             cut into global batches, then the batches shuffled with the same rng
    global batch k: | rows 0 .. B/W-1 -> rank 0 | rows B/W .. 2B/W-1 -> rank 1 | ...

Every rank sees the same number of batches; row blocks of one batch have similar lengths.
Validation/test: utterances sorted by frames, cut into ``eval_batch_size`` batches (the last
may be smaller); rank r reads batches r, r + W, r + 2W, ... (nothing dropped).

``bptt.datamodules.resumable.BatchOrder`` (a sampler, run in the main process) yields ``(epoch,
batch)`` keys and remembers where to start, so a run resumes mid-epoch; ``SpeechBatches`` (map-style, safe with workers)
turns a key into a collated batch.
"""

from __future__ import annotations

import math

import datasets
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from bptt.datamodules.audio import spec_augment
from bptt.datamodules.sharding import shard


def training_batches(
    num_frames: np.ndarray, *, batch_size: int, batches_per_bucket: int, seed: int, epoch: int
) -> list[np.ndarray]:
    """The global training batches of one epoch, bucketed by length.

    Args:
        num_frames: (N,) frames per utterance.
        batch_size: B_global.
        batches_per_bucket: how many batches' worth of utterances are sorted together.
        seed, epoch: the only sources of randomness.

    Returns:
        N // B_global arrays of B_global utterance indices, each sorted by length.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(num_frames))[: len(num_frames) // batch_size * batch_size]  # (N - N mod B,)
    bucket = batch_size * batches_per_bucket
    batches = []
    for start in range(0, len(order), bucket):
        chunk = order[start : start + bucket]
        chunk = chunk[np.argsort(num_frames[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def evaluation_batches(num_frames: np.ndarray, *, batch_size: int, world_size: int = 1) -> list[np.ndarray]:
    """Utterance indices sorted by length, in batches of ``batch_size`` (the last one may be smaller);
    split into ``world_size`` smaller batches instead when that makes fewer, so that every rank
    reads at least one (given at least ``world_size`` utterances)."""
    order = np.argsort(num_frames, kind="stable")
    if math.ceil(len(order) / batch_size) < world_size:
        return [part for part in np.array_split(order, min(world_size, len(order)))]
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def collate(features: list[np.ndarray], labels: list[np.ndarray], mean: Tensor, std: Tensor) -> dict[str, Tensor]:
    """Normalize and zero-pad utterances into one batch.

    Args:
        features: B arrays (T_b, F) of log-mel features.
        labels: B arrays (S_b,) of token ids (>= 1).
        mean, std: (F,) normalization statistics.

    Returns:
        ``inputs`` (B, T, F) float32, ``input_lengths`` (B,), ``targets`` (B, S) int64 padded with 0
        (the blank), ``target_lengths`` (B,); T, S the longest in the batch.
    """
    input_lengths = torch.tensor([len(f) for f in features], dtype=torch.int64)  # (B,)
    target_lengths = torch.tensor([len(t) for t in labels], dtype=torch.int64)  # (B,)
    inputs = torch.zeros(len(features), int(input_lengths.max()), len(mean))  # (B, T, F)
    targets = torch.zeros(len(labels), int(target_lengths.max()), dtype=torch.int64)  # (B, S)
    for row, (feats, ids) in enumerate(zip(features, labels)):
        inputs[row, : len(feats)] = (torch.tensor(feats, dtype=torch.float32) - mean) / std
        targets[row, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
    return {"inputs": inputs, "input_lengths": input_lengths, "targets": targets, "target_lengths": target_lengths}


class SpeechBatches(Dataset):
    """One rank's collated batches of one split, addressed by ``(epoch, batch)``.

    Each item is the batch contract: ``inputs`` (B, T, F) float32, ``input_lengths`` (B,),
    ``targets`` (B, S) int64, ``target_lengths`` (B,), ``epoch`` int, ``batch`` int.

    Args:
        records: the split's cached rows (``features``, ``labels``, ``num_frames``).
        mean, std: (F,) normalization statistics of the train split.
        rank, world_size: this process and the number of data-parallel processes.
        batch_size: B_global for training, else utterances per evaluation batch.
        training: bucket, shuffle per epoch and shard rows (else sort and deal out whole batches).
        batches_per_bucket, seed: of the training order.
        augment: SpecAugment mask settings (``freq_masks``, ``freq_mask_width``, ``time_masks``,
            ``time_mask_width``), or None for no augmentation.
    """

    def __init__(
        self, records: datasets.Dataset, *, mean: Tensor, std: Tensor, rank: int, world_size: int, batch_size: int,
        training: bool, batches_per_bucket: int = 1, seed: int = 0, augment: dict[str, int] | None = None,
    ) -> None:
        self.records = records.with_format("numpy", columns=["features", "labels"])
        self.num_frames = np.asarray(records["num_frames"], dtype=np.int64)
        self.mean, self.std = mean, std
        self.rank, self.world_size = rank, world_size
        self.batch_size = batch_size
        self.training = training
        self.batches_per_bucket = batches_per_bucket
        self.seed = seed
        self.augment = augment
        self._plan: tuple[int, list[np.ndarray]] | None = None

    def batches(self, epoch: int) -> list[np.ndarray]:
        """This rank's batches (arrays of row indices) of ``epoch``."""
        if self._plan is None or self._plan[0] != epoch:
            if self.training:
                batches = training_batches(self.num_frames, batch_size=self.batch_size,
                                           batches_per_bucket=self.batches_per_bucket, seed=self.seed, epoch=epoch)
                mine = [shard(b, self.rank, self.world_size) for b in batches]
            else:
                mine = evaluation_batches(self.num_frames, batch_size=self.batch_size,
                                          world_size=self.world_size)[self.rank :: self.world_size]
            self._plan = (epoch, mine)
        return self._plan[1]

    def __len__(self) -> int:
        return len(self.batches(0))

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Tensor | int]:
        epoch, index = key
        ids = self.batches(epoch)[index].tolist()
        rows = self.records[ids]
        batch: dict[str, Tensor | int] = dict(
            collate(list(rows["features"]), list(rows["labels"]), self.mean, self.std)
        )
        if self.augment:  # each utterance's masks depend on (seed, epoch, utterance), not on rank or world size
            for row, utterance in enumerate(ids):
                seed = int(np.random.SeedSequence([self.seed, epoch, utterance]).generate_state(1)[0])
                spec_augment(batch["inputs"][row : row + 1], batch["input_lengths"][row : row + 1],
                             torch.Generator().manual_seed(seed), **self.augment)
        batch["epoch"], batch["batch"] = epoch, index
        return batch
