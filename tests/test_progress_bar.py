"""The training progress bar: Lightning's TQDM bar, redrawn at most every ``min_interval`` seconds."""

from __future__ import annotations

import os

import pytest
import pytorch_lightning as pl

from bptt.config.parser import parse_config
from bptt.lightning_modules import LanguageModelTask
from bptt.progress_bar import TimedProgressBar
from bptt.training.run import fit
from bptt.training.trainer import build_trainer
from tests.bptt_command import SMALL
from tests.engine_harness import run, sgd, stream_batches, tiny_model
from tests.lightning_modules.test_tbptt import _tokens


class CountingBar(TimedProgressBar):
    """Counts the redraws that read the logged metrics (each one a host wait on a GPU)."""

    draws = 0

    def get_metrics(self, *args, **kwargs):
        self.draws += 1
        return super().get_metrics(*args, **kwargs)


@pytest.mark.parametrize(("min_interval", "draws"), [(0.0, 9 + 1), (3600.0, 2 + 1)])
def test_the_bar_redraws_at_most_every_min_interval_and_at_the_epochs_end(min_interval, draws):
    """Nine batches: every one redrawn when the interval is 0; with an hour, the first and the last
    batch only; and once more at the epoch's end, as Lightning's bar does."""
    bar = CountingBar(min_interval=min_interval)
    task = LanguageModelTask(model=tiny_model(), optimizer=sgd(0.5))
    run(task, stream_batches(_tokens(length=37), 4), enable_progress_bar=True, callbacks=[bar])
    assert bar.draws == draws
    assert bar.train_progress_bar.n == 9  # the bar ends on the count reached


class RecordBar(pl.Callback):
    def on_train_start(self, trainer, pl_module):
        self.bar = trainer.progress_bar_callback


def test_bptt_fit_trains_with_the_timed_bar(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    record = RecordBar()
    args = [*SMALL, "--trainer.max_steps", "1", "--trainer.default_root_dir", str(tmp_path / "run"),
            "--tracking.tracking_uri", f"sqlite:///{tmp_path}/mlflow.db", "--trainer.enable_progress_bar", "true"]
    fit(parse_config(args), callbacks=[record])
    assert isinstance(record.bar, TimedProgressBar)
    # Lightning's MLflow logger set the process's $MLFLOW_TRACKING_URI; fit leaves it as it was
    assert "MLFLOW_TRACKING_URI" not in os.environ


def test_no_bar_is_added_when_the_bar_is_off(tmp_path):
    cfg = parse_config([*SMALL, "--trainer.default_root_dir", str(tmp_path)])  # SMALL turns the bar off
    assert build_trainer(cfg.trainer, callbacks=[]).progress_bar_callback is None
