"""The Lightning side of MLflow tracking: the logger of a ``bptt fit`` run, the callback that
sends a step's metrics before that step's checkpoint is written, and the run's dataset input.

``MlflowTracking.logger`` (``mlflow_tracking.py``) opens the run and returns its ``RunLogger``; this
module is apart so that commands that only read the store (``bptt runs``) need no Lightning.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
from pytorch_lightning.loggers import MLFlowLogger
from pytorch_lightning.utilities import rank_zero_only

from bptt.private_api import pending_train_step_metrics
from bptt.tracking.params import flatten

if TYPE_CHECKING:
    from bptt.training.precision import PrecisionChoice

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


@dataclass(frozen=True)
class DataInput:
    """What a run reads, as MLflow shows it among the run's dataset inputs.

    Attributes:
        name: the corpus or source (``stdlib``, ``statsmodels:co2``), else the DataModule's kind.
        digest: identifies the data: its config and the DataModule's fitted state (vocabulary,
            normalization) and split sizes.
        source: the ``data`` config node as JSON.
        split_batches: batches per split, of this process.
    """

    name: str
    digest: str
    source: str
    split_batches: dict[str, int]

    @classmethod
    def of(cls, data_config: Mapping[str, Any], datamodule: Any) -> DataInput:
        """The input of a set-up DataModule (``setup("fit")`` done) built from ``data_config``."""
        from bptt.training.checkpointing import content_digest

        init_args = dict(data_config.get("init_args") or {})
        kind = str(data_config.get("class_path", type(datamodule).__name__)).rsplit(".", 1)[-1]
        name = str(init_args.get("corpus") or init_args.get("source") or kind.removesuffix("DataModule"))
        split_batches = {}
        for split, loader in (("train", "train_dataloader"), ("validation", "val_dataloader"),
                              ("test", "test_dataloader")):
            try:
                split_batches[split] = len(getattr(datamodule, loader)())
            except (AttributeError, NotImplementedError, TypeError):  # no such split, or a length unknown
                continue
        fitted = datamodule.data_state()
        source = json.dumps(data_config, sort_keys=True, default=str)
        digest = content_digest({"source": source, "fitted": fitted, "split_batches": split_batches})
        return cls(name=name, digest=digest[:16], source=source, split_batches=split_batches)
