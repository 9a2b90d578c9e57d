"""The Lightning Trainer of a run: built from the config's ``trainer`` node, bptt's callbacks and loggers
added, and the processes placed by Lightning or by whoever started them (``Launch``: Ray Train)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
from jsonargparse import Namespace
from lightning_fabric.utilities.exceptions import MisconfigurationException
from pytorch_lightning.callbacks import Callback, ProgressBar
from pytorch_lightning.loggers import CSVLogger, Logger

from bptt.errors import ConfigError
from bptt.progress_bar import TimedProgressBar
from bptt.training.checkpointing import AtomicCheckpointIO


@dataclass(frozen=True)
class Launch:
    """How the training processes were started when not by Lightning (Ray Train's workers).

    Attributes:
        placement: Trainer arguments that replace the config's (strategy, plugins, devices,
            accelerator, num_nodes).
        prepare: applied to the built Trainer (``ray.train.lightning.prepare_trainer``).
        agree: rank 0's answer to a question, on every rank (``trainer.precision: auto`` measures once).
    """

    placement: dict[str, Any]
    prepare: Callable[[pl.Trainer], pl.Trainer]
    agree: Callable[[Callable[[], str]], str]


def quiet_known_warnings() -> None:
    """Silence warnings that are about library internals, not about the user's run."""
    warnings.filterwarnings("ignore", message=r".*IterableDataset.*has `__len__` defined.*")  # ours is exact
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")  # Lightning on torch 2.13
    # step checkpoints hold the state after the step, which is what resuming needs
    warnings.filterwarnings("ignore", message=r".*ModelCheckpoint with manual optimization and every_n_train_steps.*")


def user_loggers(logger: Any) -> list[Logger]:
    """The loggers a config's ``trainer.logger`` adds to bptt's (null, true or false: none)."""
    if logger is None or isinstance(logger, bool):
        return []
    return list(logger) if isinstance(logger, (list, tuple)) else [logger]


def build_trainer(trainer_args: Namespace, *, callbacks: list[Callback], launch: Launch | None = None) -> pl.Trainer:
    """A Trainer from the config's ``trainer`` node (as ``trainer_node`` gives it), with ``callbacks`` after the
    config's, bptt's progress bar, a CSV logger under ``trainer.default_root_dir`` before the config's loggers,
    and checkpoints written atomically. ``launch``: the processes were started by someone else.

    Raises:
        ConfigError: Lightning refused a trainer setting (devices, strategy, accelerator, precision, ...).
    """
    args = dict(vars(trainer_args))
    callbacks = list(args.pop("callbacks") or []) + callbacks  # the engine logs the learning rate itself
    if args.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
        callbacks.append(TimedProgressBar())  # Lightning's default bar redrawn at most 4 times a second
    args["logger"] = [CSVLogger(save_dir=args["default_root_dir"], name="logs"), *user_loggers(args.get("logger"))]
    placement = dict(launch.placement) if launch is not None else {}
    args["plugins"] = [*(args.get("plugins") or []), *placement.pop("plugins", []), AtomicCheckpointIO()]
    args.update(placement)
    try:
        trainer = pl.Trainer(callbacks=callbacks, **args)
    except (MisconfigurationException, ValueError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"the trainer settings do not work here: {first} (see `bptt fit --help-all`, "
                          "trainer.*)") from None
    return launch.prepare(trainer) if launch is not None else trainer


def trainer_node(init: Namespace) -> Namespace:
    """The ``trainer`` node for Lightning, and the engine's window, when a batch holds m windows.

    With ``data.windows_per_batch`` m > 1 every optimizer step takes one window of ``data.bptt``
    steps (the engine's ``task.k1``) and a batch m of them. Users give every interval in optimizer
    steps; Lightning counts some in batches: an integer ``trainer.val_check_interval`` reaches it
    divided by m (so it must be a multiple of m), ``trainer.log_every_n_steps`` divided and rounded
    down (every ``n // m`` batches). ``trainer.max_steps`` stays (Lightning counts optimizer steps)
    but must be a multiple of m too: training stops only at a batch's end.

    Returns:
        the ``trainer`` node to build the Trainer from (``init.trainer`` itself when m = 1).

    Raises:
        ConfigError: ``task.k1`` other than ``data.bptt``, or an interval that is not a multiple of m.
    """
    m = init.data.windows_per_batch
    if m == 1:
        return init.trainer
    bptt, task = init.data.bptt, init.task
    if task.k1 is None:
        task.k1 = task.k2 = bptt
    elif task.k1 != bptt:
        raise ConfigError(f"data.windows_per_batch={m} makes every optimizer step one window of data.bptt={bptt} "
                          f"steps, but task.k1={task.k1}; drop task.k1 or set it to {bptt}")
    trainer = Namespace(**vars(init.trainer))
    for key in ("val_check_interval", "max_steps"):
        value = trainer[key]
        if isinstance(value, int) and not isinstance(value, bool) and value > 0 and value % m:
            raise ConfigError(f"trainer.{key}={value} counts optimizer steps and a batch takes "
                              f"data.windows_per_batch={m} of them; make it a multiple of {m}")
    if isinstance(trainer.val_check_interval, int) and not isinstance(trainer.val_check_interval, bool):
        trainer.val_check_interval //= m
    if trainer.log_every_n_steps:
        trainer.log_every_n_steps = max(1, trainer.log_every_n_steps // m)
    return trainer
