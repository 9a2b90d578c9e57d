"""One sweep trial: a Ray Tune function that launches a Ray Train ``TorchTrainer`` running the same
Lightning training as ``bptt fit`` on N data-parallel workers (their side: ``worker.py``).

Three processes take part, and checkpoints flow through all three::

    Train worker (``run_worker``)   Train controller              Tune trial (``run_trial``)
    -----------------------------   ----------------              --------------------------
    Lightning fit, streams of       gathers reports; restarts     reports to Tune; restarts
    rank r; at each validation      dead workers from the last    from Tune's checkpoint (PBT
    ray.train.report(metrics,   ->  checkpoint (worker_retries) -> exploit, trial_retries)
    checkpoint = the full .ckpt)    ``forward_train_reports``

What one process hands the next is a dataclass: the driver gives every trial a ``SweepContext``,
a trial gives each of its workers a ``WorkerJob`` (``worker.py`` holds that contract). The checkpoint
is a ``bptt fit`` checkpoint (model, optimizer, carried hidden states, data position, RNG), so both
kinds of restart continue exactly, in the trial's own MLflow run (``SweepRuns.child_run``).
"""

from __future__ import annotations

import functools
import queue
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bptt.ray_jobs.sweep_config import SweepSpec, trial_args
from bptt.ray_jobs.sweep_tracking import SweepRuns
from bptt.ray_jobs.worker import WorkerJob, run_worker


@dataclass(frozen=True)
class SweepContext:
    """What every trial of one sweep shares: the driver's hand-off to ``run_trial`` (pickled into each trial)."""

    base_yaml: str  # the base config's text: trials may run where its file is not
    spec: SweepSpec  # carries ``trusted`` (--trust-config) to every trial
    runs: SweepRuns  # the served store, the experiment and the parent run
    storage_path: str
    cwd: str  # trials run where the sweep started: relative paths in configs mean what they mean there
    run_tags: dict[str, str]  # every trial run's: the driver's command line, bptt's version, the git commit


def run_trial(sampled: dict[str, Any], context: SweepContext) -> None:
    """The Tune trainable: one ``TorchTrainer`` fit of the sampled config, reports forwarded to Tune."""
    import ray.train
    import ray.tune
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    from bptt.private_api import forward_train_reports

    spec, runs = context.spec, context.runs
    trial_id = ray.tune.get_context().get_trial_id()
    job = WorkerJob(
        args=[*trial_args(context.base_yaml, spec, sampled),
              "--tracking.tracking_uri", runs.tracking_uri, "--tracking.experiment_name", runs.experiment_name,
              "--tracking.parent_run_id", runs.parent_run_id, "--tracking.enabled", "true",
              "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
              "--trainer.enable_checkpointing", "false"],
        runs=runs, run_id=runs.child_run(trial_id, sampled, tags=context.run_tags), start=ray.tune.get_checkpoint(),
        cwd=context.cwd, use_gpu=spec.resources.gpus_per_worker > 0, trusted=spec.trusted,
    )
    resources = spec.resources
    reports: Queue = Queue(maxsize=1, actor_options={"num_cpus": 0})
    trainer = TorchTrainer(
        functools.partial(run_worker, job),
        scaling_config=ray.train.ScalingConfig(
            num_workers=resources.num_workers, use_gpu=job.use_gpu,
            resources_per_worker={"CPU": resources.cpus_per_worker, "GPU": resources.gpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            # a fresh Train run per start: restarts resume from Tune's checkpoint, which holds every report
            name=f"{runs.sweep}-{trial_id}-{uuid.uuid4().hex[:6]}",
            storage_path=str(Path(context.storage_path) / runs.sweep / "train"),
            failure_config=ray.train.FailureConfig(max_failures=spec.failure.worker_retries),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=spec.train_checkpoints_to_keep()),
            callbacks=[forward_train_reports(reports)],  # one-slot queue: the controller waits for Tune
        ),
    )
    failure: list[BaseException] = []

    def fit_workers() -> None:
        try:
            trainer.fit()
        except BaseException as err:  # re-raised in the trial's thread, where Tune sees it
            failure.append(err)

    thread = threading.Thread(target=fit_workers, name="fit-workers", daemon=True)
    thread.start()
    while thread.is_alive() or not reports.empty():
        try:
            metrics, checkpoint = reports.get(timeout=0.5)
        except queue.Empty:
            continue
        ray.tune.report(swept_metric_first(metrics, spec.metric), checkpoint=checkpoint)
    if failure:
        raise failure[0]


def swept_metric_first(metrics: dict[str, Any], metric: str) -> dict[str, Any]:
    """``metrics`` with ``metric`` first: Tune's live table shows the first few metrics of a trial's
    report (Ray 2.60's default output infers its columns so, and ignores a ``progress_reporter``)."""
    return {metric: metrics[metric], **metrics} if metric in metrics else metrics
