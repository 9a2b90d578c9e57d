"""Loggers are additive: a logger the config adds joins MLflow and the CSV log; MLflow is off only when
``tracking.enabled: false`` says so."""

from __future__ import annotations

import csv

import pytest

from tests.bptt_command import SMALL, bptt

pytestmark = pytest.mark.slow

FOUR_STEPS = [*SMALL, "--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--trainer.log_every_n_steps",
              "2", "--trainer.default_root_dir", "run"]


def _store(tmp_path) -> list[str]:
    """The run's store, named: $MLFLOW_TRACKING_URI may point elsewhere in this process's environment."""
    return ["--tracking.tracking_uri", f"sqlite:///{tmp_path}/mlflow.db"]


def _csv_metrics(run_dir) -> set[str]:
    with open(next(run_dir.glob("logs/version_*/metrics.csv"))) as f:
        return set(next(csv.reader(f)))


def test_a_logger_the_config_adds_joins_mlflow_and_the_csv_log(tmp_path):
    from mlflow.tracking import MlflowClient

    result = bptt("fit", *FOUR_STEPS, *_store(tmp_path), "--trainer.logger+=TensorBoardLogger",
                  "--trainer.logger.save_dir", "tb", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*")), "TensorBoard wrote no events"
    assert {"train/loss", "val/loss"} <= _csv_metrics(tmp_path / "run")
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("bptt").experiment_id])
    assert len(client.get_metric_history(run.info.run_id, "val/loss")) == 2  # both validations
    assert "curves.png" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_mlflow_is_off_only_when_tracking_enabled_is_false(tmp_path):
    result = bptt("fit", *FOUR_STEPS, *_store(tmp_path), "--trainer.logger", "false", "--tracking.enabled", "false",
                  cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlartifacts").exists()
    assert {"train/loss", "val/loss"} <= _csv_metrics(tmp_path / "run")  # trainer.logger false: bptt's CSV stays
    assert (tmp_path / "run/checkpoints/last.ckpt").is_file() and (tmp_path / "run/config.yaml").is_file()
