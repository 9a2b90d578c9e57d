"""Every check that runs before training starts. A setting, checkpoint or machine that would fail inside
``trainer.fit`` (after the run was written) or silently train something else is refused here, with one
line that names it and the fix. In the order a run meets them:

    check_trainer_config     the trainer node alone, as the config is parsed (``bptt.config.parser``)
    check_window_fits        task.k1 against a batch's window
    check_resume_matches     a checkpoint's read layout and network against the config (resume)
    check_training_left      a checkpoint that trainer.max_steps / max_epochs already stops (resume)
    check_optimizer          the optimizer and scheduler settings, built once
    check_trainer_runs_here  the Trainer's precision and processes on this machine
    check_before_fit         the task under the Trainer's precision, the data split over its processes,
                             the validation interval within an epoch
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from jsonargparse import Namespace
from pytorch_lightning.accelerators import CPUAccelerator

from bptt.errors import CheckpointError, ConfigError
from bptt.hardware import usable_cores


def check_trainer_config(trainer: Namespace) -> None:
    """Trainer settings that would silently do the wrong thing under TBPTT."""
    if trainer.gradient_clip_val:
        raise ConfigError("trainer.gradient_clip_val does not apply to TBPTT's manual optimization; set task.grad_clip")
    if trainer.accumulate_grad_batches != 1:
        raise ConfigError("trainer.accumulate_grad_batches must be 1: raise task.k1 (steps per update) instead")
    if trainer.use_distributed_sampler:
        raise ConfigError(
            "trainer.use_distributed_sampler must stay false: the DataModule gives each rank its own streams"
        )
    interval = trainer.val_check_interval
    if isinstance(interval, (int, float)) and not isinstance(interval, bool) and interval <= 0:
        raise ConfigError(
            f"trainer.val_check_interval must be > 0 (batches, or a fraction of an epoch), got {interval}; "
            "set trainer.limit_val_batches: 0 to skip validation"
        )
    if trainer.log_every_n_steps is not None and trainer.log_every_n_steps < 1:
        raise ConfigError(f"trainer.log_every_n_steps must be >= 1, got {trainer.log_every_n_steps}")
    if trainer.max_steps is not None and trainer.max_steps < -1:
        raise ConfigError(f"trainer.max_steps must be >= 0, or -1 for no limit; got {trainer.max_steps}")
    if trainer.max_epochs == 0 or (trainer.max_epochs is not None and trainer.max_epochs < -1):
        raise ConfigError(f"trainer.max_epochs must be >= 1, or -1 for no limit; got {trainer.max_epochs}")
    if trainer.limit_train_batches is not None and not trainer.limit_train_batches > 0:
        raise ConfigError(f"trainer.limit_train_batches={trainer.limit_train_batches} trains nothing: set it > 0 "
                          "(batches, or a fraction of an epoch); bptt validate CHECKPOINT evaluates without training")


def check_window_fits(init: Namespace) -> None:
    """In stream mode a batch is one window of ``data.bptt`` steps (without ``data.random_bptt``), cut into
    optimizer steps of ``task.k1``: a longer k1 would silently be the window's length.

    Raises:
        ConfigError: ``task.k1`` > ``data.bptt``.
    """
    bptt, k1 = getattr(init.data, "bptt", None), init.task.k1
    if isinstance(bptt, int) and isinstance(k1, int) and k1 > bptt and not getattr(init.data, "random_bptt", False):
        raise ConfigError(f"task.k1={k1} is longer than a batch's window (data.bptt={bptt}): every batch would take "
                          f"one optimizer step of {bptt} steps; set task.k1 <= {bptt}, or raise data.bptt")


def check_resume_matches(init: Namespace, checkpoint: dict[str, Any], path: Path | str) -> None:
    """The DataModule's read layout against the checkpoint's (settings only: before any data is read)."""
    init.data.check_resume(checkpoint.get(type(init.data).__qualname__), f"checkpoint {path}")


def check_same_model(task: pl.LightningModule, checkpoint: dict[str, Any], path: Path | str) -> None:
    """The network the config builds has the checkpoint's parameter names and shapes.

    Raises:
        CheckpointError: they differ (names the first keys that do).
    """
    expected = {k: tuple(v.shape) for k, v in task.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in checkpoint["state_dict"].items()}
    if expected != found:
        differing = sorted(set(expected) ^ set(found)) or sorted(k for k in expected if expected[k] != found[k])
        raise CheckpointError(
            f"{path} holds a different model than its config builds (differs at {differing[:3]}); "
            "drop the --model overrides or pass the matching checkpoint"
        )


def check_training_left(trainer: Namespace, checkpoint: dict[str, Any], path: Path) -> None:
    """Refuse to resume a checkpoint that trainer.max_steps or trainer.max_epochs already stops (Lightning
    would reopen the run, train nothing and close it again), with the override that continues it. Epochs:
    where the checkpoint records the last one as ended (not one saved by the validation at its last step)."""
    step, epoch = checkpoint.get("global_step"), checkpoint.get("epoch")
    max_steps = -1 if trainer.max_steps is None else trainer.max_steps
    max_epochs = trainer.max_epochs
    if max_epochs is None:  # Lightning's default: 1000 epochs unless max_steps is set
        max_epochs = 1000 if max_steps == -1 else -1
    if isinstance(step, int) and max_steps != -1 and step >= max_steps:
        raise ConfigError(f"checkpoint {path} is at step {step} and trainer.max_steps={max_steps} is reached: "
                          f"nothing is left to train; pass --trainer.max_steps above {step} to train further")
    if isinstance(epoch, int) and max_epochs != -1 and epoch >= max_epochs:
        raise ConfigError(f"checkpoint {path} has finished {epoch} epochs and trainer.max_epochs={max_epochs} is "
                          f"reached: nothing is left to train; pass --trainer.max_epochs above {epoch} to train "
                          "further")


def check_optimizer(task: pl.LightningModule) -> None:
    """The optimizer and scheduler settings, by building them once.

    Raises:
        ConfigError: the optimizer or scheduler refuses its settings.
    """
    try:
        task.configure_optimizers()
    except (ValueError, TypeError) as err:
        raise ConfigError(f"task.optimizer / task.lr_scheduler: {str(err).strip().splitlines()[0]}; fix the value in "
                          "the config") from None


def check_trainer_runs_here(trainer: pl.Trainer, trainer_args: Namespace, placement: dict[str, Any]) -> None:
    """A CPU Trainer: no 16-bit mixed precision (it needs a GPU), no more processes than cores. Settings that
    ``placement`` (Ray Train's) replaces are not the user's to fix.

    Raises:
        ConfigError: 16-bit mixed precision on a CPU, or more CPU processes than this machine has cores.
    """
    if not isinstance(trainer.accelerator, CPUAccelerator):
        return
    if str(trainer_args.precision) in ("16", "16-mixed") and "precision" not in placement:
        raise ConfigError(f"trainer.precision={trainer_args.precision} needs a GPU; on a CPU use bf16-mixed "
                          "(or 32-true)")
    cores = usable_cores()
    if "devices" not in placement and trainer.num_devices > cores:
        raise ConfigError(f"trainer.devices={trainer_args.devices} asks for {trainer.num_devices} CPU processes but "
                          f"this machine has {cores} cores; set trainer.devices <= {cores}")


def check_before_fit(trainer: pl.Trainer, init: Namespace) -> None:
    """What would otherwise fail inside ``trainer.fit``, after the run was written: the optimizer and
    scheduler settings, the task's settings under the Trainer's precision, and the data on this many
    processes (e.g. streams that do not divide over the ranks).

    Raises:
        ConfigError: one of them does not work.
    """
    check_optimizer(init.task)
    init.task.check_precision(trainer.precision_plugin)
    init.data.trainer = trainer  # rank and world size, as Lightning attaches it in fit
    try:
        init.data.setup("fit")
        _check_validation_interval(trainer, init)
    finally:
        init.data.trainer = None


def _check_validation_interval(trainer: pl.Trainer, init: Namespace) -> None:
    """An integer ``trainer.val_check_interval`` within an epoch's batches, as Lightning requires unless
    ``trainer.check_val_every_n_epoch`` is null (it would raise inside fit, after the run was written)."""
    interval, limit = trainer.val_check_interval, trainer.limit_train_batches
    if not isinstance(interval, int) or isinstance(interval, bool) or trainer.check_val_every_n_epoch is None:
        return
    try:
        batches = len(init.data.train_dataloader())
    except TypeError:  # a loader without a length: Lightning cannot check it either
        return
    if isinstance(limit, int):
        batches = min(batches, limit)
    elif isinstance(limit, float):
        batches = int(batches * limit)
    if interval > batches:
        m = init.data.windows_per_batch
        raise ConfigError(
            f"trainer.val_check_interval={interval * m} is more than the {batches * m} optimizer steps of an epoch "
            "(per process); lower it, or set trainer.check_val_every_n_epoch: null to count it across epochs"
        )
