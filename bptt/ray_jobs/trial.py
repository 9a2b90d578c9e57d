"""One sweep trial: a Ray Tune function that launches a Ray Train ``TorchTrainer`` running the same
Lightning training as ``bptt fit`` on N data-parallel workers (their side: ``worker.py``).

Three processes take part, and checkpoints flow through all three::

    Train worker (rank r)          Train controller              Tune trial (``run_trial``)
    ---------------------          ----------------              ---------------------------
    Lightning fit, streams of      gathers reports; restarts     reports to Tune; restarts
    rank r; at each validation     dead workers from the last    from Tune's checkpoint (PBT
    ray.train.report(metrics,  ->  checkpoint (worker_retries) -> exploit, trial_retries)
    checkpoint = the full .ckpt)   ``_ForwardToTune``

The checkpoint is a ``bptt fit`` checkpoint (model, optimizer, carried hidden states, data
position, RNG), so both kinds of restart continue exactly, in the trial's own MLflow run.

This module stays free of torch and Lightning: the trial and the controller processes import it
and only watch; the workers import ``worker.py``.
"""

from __future__ import annotations

import queue
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.train.v2.api.callback import UserCallback

TRIAL_TAG, SWEEP_TAG, PARENT_TAG = "bptt.trial_id", "bptt.sweep", "mlflow.parentRunId"


@dataclass
class SweepContext:
    """What every trial of one sweep shares (pickled into each trial)."""

    sweep: str  # the experiment directory's name
    base_yaml: str  # the base config's text: trials may run where its file is not
    spec: Any  # SweepSpec
    tracking_uri: str  # what trials log to (the served store while a sweep runs)
    experiment_name: str
    parent_run_id: str
    storage_path: str
    cwd: str

    def child_run(self, trial_id: str, trial_name: str) -> str:
        """The trial's MLflow run under the sweep's parent: found again on a restart, else created."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.tracking_uri)
        experiment = client.get_experiment_by_name(self.experiment_name)
        found = trial_runs(client, experiment.experiment_id, self.parent_run_id, trial_id)
        if found:
            return found[0].info.run_id
        run = client.create_run(experiment.experiment_id, run_name=trial_name,
                                tags={PARENT_TAG: self.parent_run_id, TRIAL_TAG: trial_id, SWEEP_TAG: self.sweep})
        return run.info.run_id


def trial_runs(client: Any, experiment_id: str, parent_run_id: str, trial_id: str | None = None) -> list:
    """The MLflow runs of a sweep's trials (of one trial, given ``trial_id``)."""
    query = f"tags.`{PARENT_TAG}` = '{parent_run_id}'"
    if trial_id is not None:
        query += f" and tags.`{TRIAL_TAG}` = '{trial_id}'"
    return client.search_runs([experiment_id], filter_string=query)


def run_trial(sampled: dict[str, Any], context: SweepContext) -> None:
    """The Tune trainable: one ``TorchTrainer`` fit of the sampled config, reports forwarded to Tune."""
    import ray.train
    import ray.tune
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    from bptt.ray_jobs.sweep_config import trial_args

    trial = ray.tune.get_context()
    trial_id = trial.get_trial_id()
    run_id = context.child_run(trial_id, trial.get_trial_name())
    args = [*trial_args(context.base_yaml, context.spec, sampled),
            "--tracking.tracking_uri", context.tracking_uri, "--tracking.experiment_name", context.experiment_name,
            "--tracking.parent_run_id", context.parent_run_id, "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.enable_checkpointing", "false"]
    resources = context.spec.resources
    reports: Queue = Queue(maxsize=1, actor_options={"num_cpus": 0})
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"args": args, "run_id": run_id, "start": ray.tune.get_checkpoint(),
                           "cwd": context.cwd, "use_gpu": resources.gpus_per_worker > 0,
                           "trusted": context.spec.trusted},
        scaling_config=ray.train.ScalingConfig(
            num_workers=resources.num_workers, use_gpu=resources.gpus_per_worker > 0,
            resources_per_worker={"CPU": resources.cpus_per_worker, "GPU": resources.gpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            # a fresh Train run per start: restarts resume from Tune's checkpoint, which holds every report
            name=f"{context.sweep}-{trial_id}-{uuid.uuid4().hex[:6]}",
            storage_path=str(Path(context.storage_path) / context.sweep / "train"),
            failure_config=ray.train.FailureConfig(max_failures=context.spec.failure.worker_retries),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=context.spec.train_checkpoints_to_keep()),
            callbacks=[_ForwardToTune(reports)],
        ),
    )
    outcome: dict[str, BaseException] = {}

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as err:  # re-raised in the trial's thread, where Tune sees it
            outcome["error"] = err

    thread = threading.Thread(target=fit, name="train-driver", daemon=True)
    thread.start()
    while thread.is_alive() or not reports.empty():
        try:
            metrics, checkpoint = reports.get(timeout=0.5)
        except queue.Empty:
            continue
        ray.tune.report(metrics, checkpoint=checkpoint)
    if "error" in outcome:
        raise outcome["error"]


def _train_worker(loop: dict[str, Any]) -> None:
    """Imports the worker side (torch, Lightning) only in the worker processes."""
    from bptt.ray_jobs.worker import train_worker

    train_worker(loop)


class _ForwardToTune(UserCallback):
    """Runs in the Train controller: hands each report and its persisted checkpoint to the Tune trial
    (a one-slot queue, so the controller waits until Tune has taken the previous one)."""

    def __init__(self, reports: Any) -> None:
        self.reports = reports

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        self.reports.put((metrics[0], checkpoint))
