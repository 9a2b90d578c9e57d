"""``ResumableDataModule``: the skeleton of every DataModule, whose training read position goes into checkpoints.

What a DataModule repeats lives here once: the rank and world size it shards for, the
divisibility checks of its counts, the loaders, and the read position. A subclass supplies
its source (``load``), its readers per split (``readers``) and what else it checkpoints
(``data_state``/``load_data_state``).

Read position: training batches carry their position as python ints, ``epoch`` and the index
named by ``position_key``; the DataModule records the next one to read, ``state_dict`` saves
it and ``load_state_dict`` makes the next training iteration start there (``start_at`` of the
training reader's cursor, now or once ``setup`` has built it), so that a run resumed mid-epoch
reads exactly the batches the uninterrupted run would have read::

    epoch e:  batch 0 | batch 1 | ... | batch k (checkpoint: position (e, k + 1)) | ...
    resumed:                                    start_at(e, k + 1) -> batch k + 1 | ...
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import pytorch_lightning as pl
from pytorch_lightning.accelerators import CUDAAccelerator
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from bptt.datamodules.sharding import check_divides
from bptt.datamodules.sources import SPLITS
from bptt.errors import CheckpointError, ConfigError


class EpochCursor(Protocol):
    """Where the next pass over a split starts; ``StreamWindows`` and ``BatchOrder`` are cursors."""

    def start_at(self, epoch: int, index: int) -> None: ...


class BatchOrder(Sampler):
    """Yields ``(epoch, batch)`` keys of one epoch per iteration; ``start_at`` resumes mid-epoch.

    The cursor of map-style batch datasets (speech utterances, synthetic sequences): the
    dataset turns a key into a collated batch, so workers may build batches in any order.

    Args:
        num_batches: batches per epoch on this rank.
    """

    def __init__(self, num_batches: int) -> None:
        self.num_batches = num_batches
        self.epoch = 0
        self.start_batch = 0

    def start_at(self, epoch: int, batch: int) -> None:
        """Make the next iteration start at ``batch`` of ``epoch``."""
        self.epoch, self.start_batch = epoch, batch

    def __len__(self) -> int:
        # the whole epoch, also when resuming mid-epoch: Lightning counts the consumed batches itself
        return self.num_batches

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, first = self.epoch, self.start_batch
        self.epoch, self.start_batch = epoch + 1, 0  # also when the loop stops early
        for batch in range(first, self.num_batches):
            yield epoch, batch


@dataclass(frozen=True)
class SplitReader:
    """What one split is read from.

    Args:
        batches: an iterable of ready batches (``StreamWindows``: its own cursor), or a map-style
            dataset of batches addressed by the keys of ``order``.
        order: the cursor of a map-style ``batches``; None for an iterable one.
    """

    batches: Dataset | IterableDataset
    order: BatchOrder | None = None

    @property
    def cursor(self) -> EpochCursor:
        return self.order if self.order is not None else self.batches  # type: ignore[return-value]


class ResumableDataModule(pl.LightningDataModule):
    """Subclasses supply ``load()``, ``readers(rank, world_size)`` and, when they checkpoint more
    than the read position, ``data_state()``/``load_data_state(state)``."""

    windows_per_batch = 1  # optimizer steps per training batch: each a window of ``bptt`` steps (stream mode)
    position_key = "window"  # the batch entry that numbers batches within an epoch
    num_workers = 0  # DataLoader worker processes; order comes from the cursor, so any number reads the same

    def __init__(self) -> None:
        super().__init__()
        self._position = (0, 0)  # (epoch, the next batch to read) of training
        self._resume_at: tuple[int, int] | None = None  # a position restored before setup built the readers
        self._readers: dict[str, SplitReader] = {}
        self._shard = (0, 1)  # (rank, world size) the readers were built for

    # ------------------------------------------------------------ what a subclass supplies

    def load(self) -> None:
        """Read the source and fit what is fitted on the train split; idempotent."""
        raise NotImplementedError

    def readers(self, rank: int, world_size: int) -> dict[str, SplitReader]:
        """This rank's reader of each split (``SPLITS``), after checking the counts against ``world_size``."""
        raise NotImplementedError

    def data_state(self) -> dict[str, Any]:
        """What the checkpoint keeps besides the read position (vocabulary, normalization)."""
        return {}

    def save_artifacts(self, directory: Path) -> list[Path]:
        """Write the files a run keeps beside its checkpoints (vocabulary, a data report) into ``directory``;
        returns them, for MLflow. Default: none."""
        return []

    def load_data_state(self, state: dict[str, Any]) -> None:
        """Restore ``data_state``; called before the read position is restored."""

    def check_data_state(self, state: dict[str, Any]) -> None:
        """Refuse a checkpoint's ``data_state`` that these settings cannot continue (a ``ConfigError`` or
        ``CheckpointError`` naming the setting and the checkpoint's value); ``check_resume`` calls it before
        training, ``bptt.training.restore`` before evaluating."""

    # the settings (``data.<key>``) that fix what the read position counts and how many rows a carried
    # state has: a resumed run must keep them (``check_resume``), PBT may not perturb them
    READ_LAYOUT: ClassVar[tuple[str, ...]] = ("batch_size",)

    def read_layout(self) -> dict[str, Any]:
        """``READ_LAYOUT``'s settings and their values in this DataModule."""
        return {key: getattr(self, key) for key in self.READ_LAYOUT}

    # ------------------------------------------------------------ the skeleton

    def rank_and_world(self) -> tuple[int, int]:
        """(global rank, world size) of the Trainer this DataModule is attached to; (0, 1) without one."""
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)

    @staticmethod
    def check_at_least(minimum: int, **values: int) -> None:
        """Each setting ``data.<key>`` must be >= ``minimum``."""
        for key, value in values.items():
            if value < minimum:
                raise ConfigError(f"data.{key} must be >= {minimum}, got {value}")

    @staticmethod
    def check_batch_fits(steps: int, bptt: int, windows_per_batch: int) -> None:
        """Every window of a training batch of ``data.windows_per_batch`` windows of ``data.bptt`` steps
        must hold steps of a training stream of ``steps`` steps (the last may be shorter): a batch
        past that would count empty windows as optimizer steps."""
        most = -(-steps // bptt)  # ceil: the windows a stream fills
        if windows_per_batch > most:
            raise ConfigError(
                f"data.windows_per_batch={windows_per_batch} windows of data.bptt={bptt} steps make a training batch "
                f"longer than each training stream ({steps} steps, {most} window(s)); set data.windows_per_batch "
                f"<= {most}"
            )

    @staticmethod
    def check_divides(world_size: int, unit: str, **counts: int) -> None:
        """Each ``data.<key>=<count> <unit>`` must split evenly over ``world_size`` processes."""
        for key, count in counts.items():
            check_divides(count, world_size, f"data.{key}={count} {unit}")

    def prepare_data(self) -> None:
        self.load()

    def setup(self, stage: str) -> None:
        self.load()
        self._shard = self.rank_and_world()
        self._build_readers()
        if self._resume_at is not None:
            self._readers["train"].cursor.start_at(*self._resume_at)
            self._resume_at = None

    def _build_readers(self) -> None:
        self._readers = self.readers(*self._shard)
        assert set(self._readers) == set(SPLITS)

    def _pin_memory(self) -> bool:
        """Page-locked batches when training on a GPU: copying one to the device then does not
        wait for the GPU to finish the previous step."""
        return isinstance(getattr(getattr(self, "trainer", None), "accelerator", None), CUDAAccelerator)

    def _loader(self, split: str) -> DataLoader:
        # batch_size=None: each item already is a batch; order matters, so the cursor is the only sampler
        reader = self._readers[split]
        return DataLoader(reader.batches, batch_size=None, sampler=reader.order, num_workers=self.num_workers,
                          pin_memory=self._pin_memory())

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

    def state_dict(self) -> dict[str, Any]:
        """``data_state()``, the read position of training (``epoch`` and the next ``position_key``)
        and the ``read_layout`` that position is counted in."""
        return {**self.data_state(), "epoch": self._position[0], self.position_key: self._position[1],
                "read_layout": self.read_layout()}

    def check_resume(self, state: dict[str, Any] | None, source: str) -> None:
        """Refuse to continue ``source``'s checkpointed read position (its ``state_dict``) under other
        ``read_layout`` settings: batch k of another layout is other data, and carried rows would not fit;
        or its ``data_state`` under settings ``check_data_state`` refuses.

        Raises:
            ConfigError: ``check_data_state`` refused the checkpoint's data state.
            CheckpointError: a setting differs (or ``check_data_state`` refused); names each with the checkpoint's
                value.
        """
        if state:
            self.check_data_state(state)
        saved = (state or {}).get("read_layout") or {}  # checkpoints from before read_layout: nothing to compare
        now = self.read_layout()
        changed = [key for key in now if key in saved and saved[key] != now[key]]
        if changed:
            was = ", ".join(f"data.{key}={saved[key]}" for key in changed)
            given = ", ".join(f"data.{key}={now[key]}" for key in changed)
            raise CheckpointError(
                f"{source} read its training data with {was} and its read position counts those batches; it cannot "
                f"continue with {given}: resume with {was} (drop those overrides) or start a new run with bptt fit"
            )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.load_data_state(state_dict)
        self._position = (int(state_dict["epoch"]), int(state_dict[self.position_key]))
        if "train" in self._readers:
            self._readers["train"].cursor.start_at(*self._position)
        else:
            self._resume_at = self._position
