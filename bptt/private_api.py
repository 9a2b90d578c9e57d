"""Every use of a private attribute of Lightning that bptt cannot avoid, in one place.

Each function says what it reads and what breaks without it; tests/test_private_api.py fails
loudly (not silently) when an upgrade removes one.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from lightning_fabric.utilities.apply_func import convert_tensors_to_scalars


def pending_train_step_metrics(trainer: pl.Trainer) -> tuple[dict[str, float], int] | None:
    """The training-step metrics that Lightning sends to the loggers after ``on_train_batch_end``,
    with their step, or None when this step is not logged (``trainer.log_every_n_steps``).

    Lightning logs a step's metrics only after every ``on_train_batch_end`` hook, so after the
    step checkpoint written there: a process killed in between resumed after that step and never
    logged it. Reads ``trainer._logger_connector`` (``should_update_logs``, ``metrics``) and
    ``fit_loop.epoch_loop._batches_that_stepped``, and mirrors ``_LoggerConnector.log_metrics``.
    """
    connector = trainer._logger_connector
    if not (connector.should_update_logs or trainer.fast_dev_run):
        return None
    metrics: dict[str, Any] = convert_tensors_to_scalars(dict(connector.metrics["log"]))
    if not metrics:
        return None
    step = metrics.pop("step", None)
    if step is not None:
        return metrics, int(step)
    metrics.setdefault("epoch", trainer.current_epoch)
    return metrics, trainer.fit_loop.epoch_loop._batches_that_stepped
