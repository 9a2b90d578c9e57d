"""A run's network as its MLflow logged model (``mlflow.pytorch``), with its signature and the bptt package."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch

import bptt


def log_network(task: pl.LightningModule, tracking_uri: str, run_id: str) -> bool:
    """``task.serving_model()`` as the run's logged model; False for a task without one."""
    import mlflow
    from mlflow.models import infer_signature

    served = task.serving_model()
    if served is None:
        return False
    network, example = served
    with torch.no_grad():
        signature = infer_signature(example.numpy(), network(example).numpy())
    mlflow.set_tracking_uri(tracking_uri)
    # pickle, not pt2: torch.export unrolls the RNN over the example's length and fixes T
    # its warning about pickle concerns loading models from elsewhere, not this run: keep it off the user's screen
    quiet, level = logging.getLogger("mlflow.pytorch"), logging.getLogger("mlflow.pytorch").level
    quiet.setLevel(logging.ERROR)
    try:
        with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mlflow.pytorch.log_model(network, name="model", input_example=example.numpy(), signature=signature,
                                     pip_requirements=[f"torch=={torch.__version__}"], serialization_format="pickle",
                                     code_paths=[str(Path(bptt.__file__).parent)])  # the bptt package rides along
    finally:
        quiet.setLevel(level)
    return True


def log_model(checkpoint_path: str | Path, *, tracking_uri: str, run_id: str, trusted: bool = False) -> bool:
    """Log a checkpoint's network into the MLflow run ``run_id`` as ``bptt fit`` logs its final one
    (a sweep's best trial, trained without ``tracking.log_model``).

    Returns:
        whether a model was logged (False for tasks without a serving model).
    """
    from bptt.training.restore import restore

    _, init, checkpoint = restore(checkpoint_path, [], trusted)
    init.task.load_state_dict(checkpoint["state_dict"])
    return log_network(init.task, tracking_uri, run_id)
