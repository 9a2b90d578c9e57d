"""The Lightning side of MLflow tracking: the logger of a ``bptt fit`` run and the callback that
sends a step's metrics before that step's checkpoint is written.

``bptt.tracking.MlflowTracking.logger`` opens the run and returns its ``RunLogger``; this module is
apart so that commands that only read the store (``bptt runs``) need no Lightning.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.loggers import MLFlowLogger
from pytorch_lightning.utilities import rank_zero_only

from bptt.precision import PrecisionChoice
from bptt.private_api import pending_train_step_metrics
from bptt.tracking import DataInput, flatten

PRECISION_TAG = "bptt.precision_auto"


class RunLogger(MLFlowLogger):
    """Lightning's MLflow logger on a run that ``MlflowTracking.logger`` opened, plus: params are
    the flattened config, the data is a dataset input, and a resumed run skips steps that the run
    already logged (a resumed run recomputes them bit for bit, so no step is logged twice).

    Args:
        logged_through: the last step logged of each metric of a continued run.
        kwargs: ``MLFlowLogger``'s.
    """

    def __init__(self, *, logged_through: dict[str, int] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.logged_through: dict[str, int] = dict(logged_through or {})

    @contextmanager
    def failed_on_error(self) -> Iterator[None]:
        """Mark the run FAILED (KILLED on Ctrl-C) when the block raises, so that it is never left
        RUNNING; Lightning does so only for errors inside ``fit``."""
        try:
            yield
        except BaseException as err:
            if rank_zero_only.rank == 0 and self.run_id is not None:
                status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
                try:
                    self.experiment.set_terminated(self.run_id, status)
                except Exception:  # the store itself may be what failed; the original error matters
                    pass
            raise

    def log_data_input(self, data: DataInput) -> None:
        """``data`` as the run's training dataset input (once per run: a resumed run has it)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        if self.experiment.get_run(self.run_id).inputs.dataset_inputs:
            return
        dataset = Dataset(name=data.name, digest=data.digest, source_type="bptt", source=data.source,
                          profile=json.dumps({f"{split}_batches": n for split, n in data.split_batches.items()}))
        self.experiment.log_inputs(self.run_id, datasets=[DatasetInput(dataset, tags=[
            InputTag(MLFLOW_DATASET_CONTEXT, "training"),
            *(InputTag(f"{split}_batches", str(n)) for split, n in data.split_batches.items())])])

    def log_precision_choice(self, choice: PrecisionChoice) -> None:
        """What ``trainer.precision: auto`` chose (tag ``bptt.precision_auto``) and the steps per second it
        measured for each candidate (metrics ``precision_auto/<precision>/steps_per_sec``)."""
        import time

        from mlflow.entities import Metric

        self.experiment.set_tag(self.run_id, PRECISION_TAG, choice.summary())
        now = int(time.time() * 1000)
        metrics = [Metric(f"precision_auto/{p}/steps_per_sec", v, now, 0) for p, v in choice.steps_per_sec.items()]
        if metrics:
            self.experiment.log_batch(self.run_id, metrics=metrics, synchronous=True)

    def log_config(self, config: Mapping[str, Any]) -> None:
        """Every resolved config value as a param with its dotted key (once per run)."""
        from mlflow.entities import Param

        if self.run_id and self.experiment.get_run(self.run_id).data.params:
            return  # a resumed run keeps its params
        params = [Param(k, v[:6000]) for k, v in sorted(flatten(config).items())]
        for start in range(0, len(params), 100):
            self.experiment.log_batch(self.run_id, params=params[start : start + 100], synchronous=True)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        fresh = {k: v for k, v in metrics.items() if step is None or step > self.logged_through.get(k, -1)}
        if fresh:
            super().log_metrics(fresh, step)
            if step is not None:
                self.logged_through.update(dict.fromkeys(fresh, step))

    def log_artifacts(self, paths: list[Path], artifact_dir: str | None = None) -> None:
        for path in paths:
            if path.exists():
                self.experiment.log_artifact(self.run_id, str(path), artifact_dir)


class LogStepBeforeCheckpoint(pl.Callback):
    """Sends a training step's metrics to the ``RunLogger`` before that step's checkpoint is written
    (Lightning writes it first, so a process killed in between resumes after a step that MLflow
    never received); Lightning's own send of the same step then finds them logged."""

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        loggers = [logger for logger in trainer.loggers if isinstance(logger, RunLogger)]
        if loggers and trainer.is_global_zero and (pending := pending_train_step_metrics(trainer)) is not None:
            for logger in loggers:
                logger.log_metrics(*pending)
