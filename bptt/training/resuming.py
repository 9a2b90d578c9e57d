"""What ``bptt resume`` needs besides a fresh run: the checkpoint a target names (a file, a run's
``checkpoints/`` directory, or an MLflow run id), and optimizer settings that changed since it was written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from jsonargparse import ArgumentParser, Namespace
from pytorch_lightning.callbacks import Callback

from bptt.config.parser import parse_config, parse_tracking
from bptt.errors import CheckpointError
from bptt.tracking.mlflow_tracking import CHECKPOINT_DIR_TAG, MlflowTracking
from bptt.training.checkpointing import latest_checkpoint


def checkpoint_of(target: str, overrides: list[str]) -> Path:
    """The checkpoint file ``target`` names: itself, the newest in a directory, or the newest of an MLflow
    run (its ``bptt.checkpoint_dir`` tag, in the store ``--tracking.*`` among ``overrides`` names)."""
    path = Path(target)
    if path.is_dir():
        return latest_checkpoint(path)
    if not path.exists() and not target.endswith(".ckpt") and "/" not in target:
        return latest_checkpoint(_checkpoint_dir_of_run(target, overrides))
    return path


def _checkpoint_dir_of_run(run_id: str, overrides: list[str]) -> Path:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    tracking = MlflowTracking(**vars(parse_tracking(overrides).tracking))
    uri, local = tracking.uri(), tracking.local_store()
    if local is not None and not local.exists():  # MLflow's client would create an empty store there
        raise CheckpointError(f"{run_id!r} is neither a checkpoint file nor a run id: there is no MLflow store at "
                              f"{uri}; pass a checkpoint path, or --tracking.tracking_uri naming the run's store")
    tracking.check()
    try:
        run = MlflowClient(uri).get_run(run_id)
    except MlflowException:
        raise CheckpointError(
            f"{run_id!r} is neither a checkpoint file nor a run id at {tracking.uri()}; pass a checkpoint path "
            "or --tracking.tracking_uri"
        ) from None
    if CHECKPOINT_DIR_TAG not in run.data.tags:
        raise CheckpointError(f"run {run_id} has no {CHECKPOINT_DIR_TAG} tag; pass its checkpoint path instead")
    return Path(run.data.tags[CHECKPOINT_DIR_TAG])


class OptimizerSettings(Callback):
    """Puts the configured optimizer settings (lr, weight decay, ...) into the optimizer after its
    state came back from a checkpoint taken under other settings: the checkpoint's would win."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group.update({k: v for k, v in self.settings.items() if k in group})
        for config in trainer.lr_scheduler_configs:
            if "lr" in self.settings and hasattr(config.scheduler, "base_lrs"):
                config.scheduler.base_lrs = [self.settings["lr"]] * len(config.scheduler.base_lrs)


def changed_optimizer_settings(
    cfg: Namespace, checkpoint: dict[str, Any], parser: ArgumentParser, trusted: bool
) -> list[Callback]:
    """An ``OptimizerSettings`` callback when ``cfg`` sets the optimizer otherwise than the
    checkpoint's run did (``bptt resume ... --task.optimizer.init_args.lr``, or a PBT exploit)."""
    def settings(config: Namespace) -> dict[str, Any]:
        optimizer = config.task.init_args.get("optimizer")
        return dict(vars(optimizer.init_args)) if optimizer is not None and optimizer.get("init_args") else {}

    new = settings(cfg)
    old = settings(parse_config(["--config", checkpoint["bptt"]["config"]], parser, trusted=trusted,
                                source="the config inside the checkpoint"))
    changed = {k: v for k, v in new.items() if old.get(k) != v}
    return [OptimizerSettings(changed)] if changed else []
