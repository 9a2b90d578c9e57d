"""The Ray Train worker side of a sweep trial (``trial.py`` has the Tune and controller side):
``bptt fit``'s Lightning training on this rank's streams under Ray Train's DDP, reporting metrics
and a full checkpoint to ``ray.train.report`` after every validation. Rank 0 gives the trial's MLflow
run its params before training and its config and data files when fit starts, so that a trial Tune
stops early (its workers ended before ``train`` logs them at the end) has them too.

This module is the workers' contract: what a trial hands each worker (``WorkerJob``) and the file
every reported checkpoint holds (``CHECKPOINT_FILE``). It imports nothing of the trial's side."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
import yaml

if TYPE_CHECKING:
    from bptt.ray_jobs.sweep_tracking import SweepRuns

CHECKPOINT_FILE = "checkpoint.ckpt"  # in every reported checkpoint's directory


@dataclass(frozen=True)
class WorkerJob:
    """A trial's hand-off to each of its Ray Train workers (``run_worker``)."""

    args: list[str]  # the ``bptt fit`` arguments of the trial
    runs: SweepRuns  # the sweep's runs, in the served store
    run_id: str  # the trial's MLflow run
    start: Any  # ray.train.Checkpoint from Tune (PBT exploit, trial retry), or None: a fresh start
    cwd: str
    use_gpu: bool
    trusted: bool  # the driver checked ``args`` against the allow-list, or was told to trust them


def run_worker(job: WorkerJob) -> None:
    """One Ray Train worker: ``bptt fit`` of the trial's config on this rank's streams, resumed from
    Train's latest checkpoint after a worker failure, else from Tune's (PBT exploit, trial retry)."""
    import ray.train
    from ray.train.lightning import (
        RayDDPStrategy,
        RayLightningEnvironment,
        prepare_trainer,
    )

    from bptt.config.parser import build_parser, parse_config
    from bptt.training.checkpointing import load_checkpoint
    from bptt.training.run import train
    from bptt.training.trainer import Launch

    if Path(job.cwd).is_dir():  # relative paths in configs mean what they mean to `bptt fit` there
        os.chdir(job.cwd)
    context = ray.train.get_context()
    rank = context.get_world_rank()
    root = Path(tempfile.gettempdir()) / "bptt-trials" / context.get_experiment_name() / f"rank{rank}"
    # the sweep driver checked these arguments against the allow-list, or was told to trust them
    parser = build_parser()
    cfg = parse_config([*job.args, "--trainer.default_root_dir", str(root)], parser, trusted=job.trusted)
    if rank == 0:
        job.runs.log_trial_params(job.run_id, yaml.safe_load(parser.dump(cfg)))
    launch = Launch(placement={"strategy": RayDDPStrategy(), "plugins": [RayLightningEnvironment()], "devices": "auto",
                               "accelerator": "gpu" if job.use_gpu else "cpu", "num_nodes": 1},
                    prepare=prepare_trainer, agree=_rank_zero_answer)
    start = ray.train.get_checkpoint() or job.start
    try:
        with start.as_directory() if start is not None else nullcontext(None) as directory:
            checkpoint = None
            if directory is not None:
                path = Path(directory) / CHECKPOINT_FILE
                checkpoint = (path, load_checkpoint(path))
            # the checkpoint's config is the trial's own
            train(cfg, callbacks=[ReportToRay()], checkpoint=checkpoint, run_id=job.run_id,
                  launch=launch, trusted=job.trusted)
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
