"""Checkpoints that a long training resumes from exactly: atomic files, everything that decides
the next step, and the choice of which checkpoint to resume.

A checkpoint holds Lightning's state (model, optimizers, schedulers, precision scaler, loop
progress), the DataModule's read position and vocabulary, the engine's carried stream states
keyed by global stream index (``TBPTTModule.on_save_checkpoint``), and under ``"bptt"`` the
run's config, the MLflow run id and the RNG states of torch, numpy and Python. Everything is
tensors, numbers and strings: it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint

from bptt import __version__
from bptt.errors import CheckpointError, ConfigError
from bptt.lightning_modules.tbptt import VAL_LOSS


class CheckpointPolicy:
    """When checkpoints are written (the ``checkpoint`` config node).

    Args:
        every_n_steps: write ``step-NNNNNNN.ckpt`` every this many optimizer steps.
        keep_last: keep this many of those, the newest.
    """

    def __init__(self, *, every_n_steps: int = 500, keep_last: int = 3) -> None:
        if every_n_steps < 1 or keep_last < 1:
            raise ConfigError(
                f"checkpoint.every_n_steps and checkpoint.keep_last must be >= 1, got {every_n_steps} and {keep_last}"
            )
        self.every_n_steps = every_n_steps
        self.keep_last = keep_last

    def callbacks(self, directory: Path) -> list[ModelCheckpoint]:
        """Step checkpoints, plus at each validation ``best.ckpt`` (lowest ``val/loss``) and ``last.ckpt``."""
        return [
            _StepCheckpoint(dirpath=directory, filename="step-{step:07d}", monitor="step", mode="max",
                            save_top_k=self.keep_last, every_n_steps=self.every_n_steps,
                            auto_insert_metric_name=False, enable_version_counter=False),
            # a resumed run writes into the same directory: replace, never add "-v1" copies
            ModelCheckpoint(dirpath=directory, filename="best", monitor=VAL_LOSS, mode="min", save_last=True,
                            enable_version_counter=False),
        ]


class _StepCheckpoint(ModelCheckpoint):
    """A checkpoint each time the step count passes a multiple of ``every_n_steps`` (a batch can
    take several optimizer steps when task.k1 is shorter than the window), except after a batch
    that a validation follows: Lightning resumes a checkpoint written before a due validation by
    skipping that validation, so there the ``last.ckpt`` written after it stands in."""

    def __init__(self, *, every_n_steps: int, **kwargs: Any) -> None:
        super().__init__(every_n_train_steps=1, **kwargs)
        self.every_n_steps = every_n_steps

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any) -> None:
        if trainer.global_step // self.every_n_steps == self._last_global_step_saved // self.every_n_steps:
            return
        if trainer.fit_loop.epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher):
            return
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file, fsyncs it and renames it into place, so a crash
    mid-write leaves the previous checkpoint intact; loads with ``weights_only=True``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if "://" in str(path):  # remote storage: fsspec's own transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        with open(partial, "wb") as handle:
            torch.save(checkpoint, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        return None

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


def _rng_states() -> dict[str, Any]:
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": version, "state": list(state), "gauss": gauss},
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = states["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class RunState(pl.Callback):
    """Puts the run's config, MLflow run id and RNG states into every checkpoint, and on resume
    restores the RNG states right before the first training step (after the sanity check and
    the new dataloader iterator, which draw random numbers an uninterrupted run drew earlier)."""

    def __init__(self, config_yaml: str, run_id: str | None = None) -> None:
        self.config_yaml = config_yaml
        self.run_id = run_id
        self._pending_rng: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint["bptt"] = {"config": self.config_yaml, "version": __version__, "mlflow_run_id": self.run_id,
                              "rng": _rng_states()}

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._pending_rng = checkpoint.get("bptt", {}).get("rng")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._pending_rng is not None:
            _set_rng_states(self._pending_rng)
            self._pending_rng = None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint written by ``bptt fit``, loaded with ``weights_only=True``.

    Raises:
        CheckpointError: missing, unreadable, truncated or not written by ``bptt fit``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass a .ckpt from a run's checkpoints/ directory")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged file
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(err).__name__}); it is damaged or not a checkpoint"
        ) from None
    if not isinstance(checkpoint, dict) or "bptt" not in checkpoint or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} was not written by `bptt fit` (no run config inside); pass a bptt checkpoint")
    return checkpoint


def latest_checkpoint(directory: Path) -> Path:
    """The readable checkpoint in ``directory`` with the most optimizer steps.

    Raises:
        CheckpointError: none there can be read.
    """
    best: tuple[int, Path] | None = None
    for path in directory.glob("*.ckpt"):
        try:
            # mmap: only the pages holding global_step are read, not every tensor of every file
            step = int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])
        except Exception:  # a damaged file is skipped: an older checkpoint still resumes the run
            continue
        if best is None or step > best[0]:
            best = (step, path)
    if best is None:
        raise CheckpointError(f"no readable checkpoint in {directory}; pass a checkpoint path to bptt resume")
    return best[1]
