"""The Ray Train worker side of a sweep trial (``trial.py`` has the Tune and controller side):
``bptt fit``'s Lightning training on this rank's streams under Ray Train's DDP, reporting metrics
and a full checkpoint to ``ray.train.report`` after every validation."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import pytorch_lightning as pl

from bptt.ray_jobs.trial import CHECKPOINT_FILE

if TYPE_CHECKING:
    from bptt.ray_jobs.trial import WorkerJob


def run_worker(job: WorkerJob) -> None:
    """One Ray Train worker: ``bptt fit`` of the trial's config on this rank's streams, resumed from
    Train's latest checkpoint after a worker failure, else from Tune's (PBT exploit, trial retry)."""
    import ray.train
    from ray.train.lightning import (
        RayDDPStrategy,
        RayLightningEnvironment,
        prepare_trainer,
    )

    from bptt.checkpointing import load_checkpoint
    from bptt.config import parse_config
    from bptt.training import train

    if Path(job.cwd).is_dir():  # relative paths in configs mean what they mean to `bptt fit` there
        os.chdir(job.cwd)
    context = ray.train.get_context()
    root = Path(tempfile.gettempdir()) / "bptt-trials" / context.get_experiment_name() / f"rank{context.get_world_rank()}"
    # the sweep driver checked these arguments against the allow-list, or was told to trust them
    cfg = parse_config([*job.args, "--trainer.default_root_dir", str(root)], trusted=job.trusted)
    placement = {"strategy": RayDDPStrategy(), "plugins": [RayLightningEnvironment()], "devices": "auto",
                 "accelerator": "gpu" if job.use_gpu else "cpu", "num_nodes": 1}
    start = ray.train.get_checkpoint() or job.start
    try:
        with start.as_directory() if start is not None else nullcontext(None) as directory:
            checkpoint = None
            if directory is not None:
                path = Path(directory) / CHECKPOINT_FILE
                checkpoint = (path, load_checkpoint(path))
            train(cfg, callbacks=[ReportToRay()], checkpoint=checkpoint, run_id=job.run_id, placement=placement,
                  prepare=prepare_trainer, agree=_rank_zero_answer, trusted=job.trusted)  # the checkpoint's config is the trial's own
    finally:  # config, vocabulary, curves and CSV logs: all of it is in MLflow by now
        shutil.rmtree(root, ignore_errors=True)


def _rank_zero_answer(ask: Callable[[], str]) -> str:
    """Rank 0's answer to ``ask`` on every rank (``trainer.precision: auto`` measures once per trial)."""
    import ray.train
    from ray.train.collective import broadcast_from_rank_zero

    return broadcast_from_rank_zero(ask() if ray.train.get_context().get_world_rank() == 0 else None)


class ReportToRay(pl.Callback):
    """After each validation: the metrics and a full checkpoint to ``ray.train.report`` (every rank
    takes part; rank 0 writes the file). Tune counts one report as one training iteration."""

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import ray.train

        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        metrics["step"] = trainer.global_step
        with tempfile.TemporaryDirectory(prefix="bptt-report-") as directory:
            trainer.save_checkpoint(Path(directory) / CHECKPOINT_FILE)  # collective: gathers every rank's streams
            checkpoint = ray.train.Checkpoint.from_directory(directory) if trainer.is_global_zero else None
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"step-{trainer.global_step:07d}")
