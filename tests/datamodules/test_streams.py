"""Stream layout and windows: contiguous rows, disjoint covering shards, window schedules, resume."""

from __future__ import annotations

import pytest
import torch

from bptt.datamodules.resumable import ResumableDataModule
from bptt.datamodules.sharding import shard
from bptt.datamodules.streams import StreamWindows, stream_layout, token_streams, window_lengths
from bptt.errors import ConfigError


def test_row_b_of_batch_k_plus_1_continues_row_b_of_batch_k():
    ids = torch.arange(103)  # token = its position in the corpus
    windows = list(StreamWindows(token_streams(stream_layout(ids, 4)), bptt=7))
    for prev, nxt in zip(windows, windows[1:]):
        assert torch.equal(nxt["inputs"][:, 0], prev["inputs"][:, -1] + 1)
        assert torch.equal(nxt["inputs"][:, 0], prev["targets"][:, -1])
    rows = torch.cat([w["inputs"] for w in windows], dim=1)
    assert torch.equal(rows, stream_layout(ids, 4)[:, :-1])  # every step of every stream, in order
    assert [bool(w["reset"].all()) for w in windows] == [True] + [False] * (len(windows) - 1)


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_rank_shards_are_disjoint_and_cover_the_streams(world):
    streams = stream_layout(torch.arange(1000), 8)
    shards = [shard(streams, rank, world) for rank in range(world)]
    seen = torch.cat([s.flatten() for s in shards])
    assert seen.numel() == seen.unique().numel() == 8 * (1000 // 8)
    assert torch.equal(torch.cat(shards), streams)  # contiguous blocks, in rank order


def test_random_window_lengths_are_reproducible_and_cover_the_stream():
    a = window_lengths(5000, 70, True, seed=3, epoch=0)
    assert a == window_lengths(5000, 70, True, seed=3, epoch=0)
    assert a != window_lengths(5000, 70, True, seed=3, epoch=1)
    assert sum(a) == 5000 and min(a[:-1]) >= 5
    assert 55 < sum(a) / len(a) < 75  # 0.95 * 70 + 0.05 * 35, jittered
    assert window_lengths(20, 7, False, 0, 0) == [7, 7, 6]


def test_start_at_resumes_mid_epoch_and_next_epoch_starts_over():
    streams = stream_layout(torch.arange(200), 4)
    full = list(StreamWindows(token_streams(streams), bptt=6))
    resumed = StreamWindows(token_streams(streams), bptt=6)
    resumed.start_at(0, 3)
    assert len(resumed) == len(full)  # Lightning counts the three consumed windows itself
    rest = list(resumed)
    assert all(torch.equal(a["inputs"], b["inputs"]) for a, b in zip(rest, full[3:]))
    assert [w["window"] for w in list(resumed)] == list(range(len(full)))  # then a whole epoch


def test_epochs_advance_when_lightning_takes_len_windows_and_drops_the_iterator():
    windows = StreamWindows(token_streams(stream_layout(torch.arange(400), 4)), bptt=6, random_bptt=True, seed=1)
    epochs = []
    for _ in range(3):  # as Lightning's loop: len() items from a fresh iterator, never exhausting it
        iterator = iter(windows)
        taken = [next(iterator) for _ in range(len(windows))]
        epochs.append(([w["epoch"] for w in taken], [w["inputs"].shape[1] for w in taken]))
    assert [set(e) for e, _ in epochs] == [{0}, {1}, {2}]
    assert epochs[0][1] != epochs[1][1]  # random window lengths are drawn per epoch
    windows.start_at(2, len(windows))  # a checkpoint after the last window of epoch 2: epoch 3 next
    assert next(iter(windows))["epoch"] == 3


def test_precomputed_streams_cover_every_step_and_carry_their_per_row_entries():
    values = torch.arange(2 * 11, dtype=torch.float32).reshape(2, 11, 1)  # (B, L, C): series with their own targets
    series = torch.tensor([4, 7])
    windows = list(StreamWindows({"inputs": values, "mask": values[..., 0] > 3}, rows={"series": series}, bptt=4))
    assert [w["inputs"].shape[1] for w in windows] == [4, 4, 3]  # all L steps, the last window shorter
    assert torch.equal(torch.cat([w["inputs"] for w in windows], dim=1), values)
    assert all(w["series"] is series and w["mask"].dtype == torch.bool for w in windows)
    assert [bool(w["reset"].all()) for w in windows] == [True, False, False]


def test_a_split_that_does_not_divide_over_the_processes_names_the_setting():
    with pytest.raises(ConfigError, match=r"^data.batch_size=6 streams cannot be split evenly over 4 processes; "
                                          r"make it a multiple of 4$"):
        ResumableDataModule.check_divides(4, "streams", batch_size=6)
