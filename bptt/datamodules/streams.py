"""Lay one long sequence out as B contiguous streams and read them window by window.

The corpus is cut into B_global equal streams (the remainder is dropped); each
data-parallel rank owns a contiguous block of B_global / world_size of them::

    corpus   t0 t1 t2 ............................................ tN
    stream 0 | t0      ... t(L-1)   |  rank 0
    stream 1 | tL      ... t(2L-1)  |  rank 0
    stream 2 | t2L     ... t(3L-1)  |  rank 1
    stream 3 | t3L     ... t(4L-1)  |  rank 1
               |<- window 0 ->|<- window 1 ->| ...

Window w of a rank is the (B_local, T) slice of its streams starting where window
w - 1 ended, so row b of batch k + 1 continues row b of batch k: the hidden state
carried from one batch to the next stays valid. Targets are the inputs shifted by
one step. ``reset`` marks the first window of an epoch, where every stream starts over.
``StreamWindows`` reads windows so for text and for series (``bptt.datamodules.timeseries``);
the rows are dealt out to ranks by ``bptt.datamodules.sharding.shard``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import IterableDataset


def stream_layout(ids: Tensor, num_streams: int) -> Tensor:
    """Cut a 1-D sequence into ``num_streams`` equal contiguous rows.

    Args:
        ids: (N,) tokens or values, time along dim 0 (extra feature dims allowed).
        num_streams: B.

    Returns:
        (B, N // B, ...) view of ``ids``; the last N mod B elements are dropped.
    """
    length = ids.shape[0] // num_streams
    return ids[: num_streams * length].reshape(num_streams, length, *ids.shape[1:])  # (B, L, ...)


def window_lengths(steps: int, bptt: int, random_bptt: bool, seed: int, epoch: int) -> list[int]:
    """The window lengths of one epoch over ``steps`` steps.

    Fixed windows of ``bptt`` steps, the last one shorter; or, with ``random_bptt``,
    AWD-LSTM's schedule (Merity et al. 2018): ``bptt`` with probability 0.95 else
    ``bptt / 2``, then jittered by N(0, 5) and floored at 5 steps. The schedule depends
    only on (seed, epoch), so every rank and every resumed run draws the same one.

    Returns:
        window lengths summing to ``steps``.
    """
    if not random_bptt:
        return [min(bptt, steps - start) for start in range(0, steps, bptt)]
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    lengths, total = [], 0
    while total < steps:
        base = bptt if torch.rand((), generator=gen).item() < 0.95 else bptt / 2
        length = max(5, int(base + 5 * torch.randn((), generator=gen).item()))
        length = min(length, steps - total)
        lengths.append(length)
        total += length
    return lengths


class StreamWindows(IterableDataset):
    """Yields the consecutive windows of a rank's streams, one batch per window.

    Each item holds, for every entry of ``streams``, its (B, T, ...) slice of the window
    (integer entries as int64), the entries of ``rows`` unchanged, and ``reset`` (B,),
    ``epoch`` and ``window`` (ints). Iterating again starts the next epoch, also when
    Lightning stops after ``len()`` windows without exhausting the iterator; ``start_at``
    resumes mid-epoch. An epoch covers the L steps of the streams: text streams pass inputs
    and targets one step apart (``token_streams``), series streams their precomputed targets.

    Args:
        streams: entries (B, L, ...) that are cut along time, e.g. ``inputs`` and ``targets``.
        rows: entries (B, ...) that hold per stream, e.g. ``series``.
        bptt: nominal window length T.
        random_bptt: draw window lengths with AWD-LSTM's schedule.
        seed: seed of that schedule.
    """

    def __init__(self, streams: dict[str, Tensor], *, rows: dict[str, Tensor] | None = None, bptt: int,
                 random_bptt: bool = False, seed: int = 0) -> None:
        self.streams = streams
        self.rows = rows or {}
        self.bptt = bptt
        self.random_bptt = random_bptt
        self.seed = seed
        self.epoch = 0
        self.start_window = 0

    def start_at(self, epoch: int, window: int) -> None:
        """Make the next iteration start at ``window`` of ``epoch`` (past its last window: the next epoch)."""
        self.epoch, self.start_window = epoch, window
        if window >= len(self):
            self.epoch, self.start_window = epoch + 1, 0

    def _lengths(self) -> list[int]:
        steps = next(iter(self.streams.values())).shape[1]
        return window_lengths(steps, self.bptt, self.random_bptt, self.seed, self.epoch)

    def __len__(self) -> int:
        # the whole epoch, also when resuming mid-epoch: Lightning counts the consumed windows itself
        return len(self._lengths())

    def __iter__(self) -> Iterator[dict[str, Tensor | int]]:
        lengths = self._lengths()
        epoch, first = self.epoch, self.start_window
        offset = sum(lengths[:first])
        batch_size = next(iter(self.streams.values())).shape[0]
        for index in range(first, len(lengths)):
            if index == len(lengths) - 1:  # Lightning stops after len() items and never exhausts the generator
                self.epoch, self.start_window = epoch + 1, 0
            end = offset + lengths[index]
            window = {k: _window_slice(v[:, offset:end]) for k, v in self.streams.items()}  # (B, T, ...)
            yield {**window, **self.rows, "reset": torch.full((batch_size,), index == 0),  # (B,)
                   "epoch": epoch, "window": index}
            offset = end
        self.epoch, self.start_window = epoch + 1, 0


def token_streams(streams: Tensor) -> dict[str, Tensor]:
    """(B, L) token streams -> ``inputs`` and ``targets``, each (B, L - 1): targets are the inputs one step on."""
    return {"inputs": streams[:, :-1], "targets": streams[:, 1:]}


def _window_slice(piece: Tensor) -> Tensor:
    """A window's slice as its own contiguous tensor; integer ids widened to int64 (embedding indices)."""
    if piece.dtype != torch.bool and not piece.dtype.is_floating_point:
        return piece.long().contiguous()
    return piece.contiguous()
