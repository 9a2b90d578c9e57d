"""The `bptt` command on forecasting, end to end: `bptt fit` of conf/forecast/sunspots.yaml tracked in a
real MLflow server, its test MASE checked against an independent plain-PyTorch evaluation of the best
checkpoint on the raw series; bad series stop in one line before training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import statsmodels.api as sm
import torch
from mlflow.tracking import MlflowClient

from bptt.cli import main
from bptt.models import RNNForecaster
from tests.bptt_command import bptt
from tests.conftest import PROJECT

SUNSPOTS = str(PROJECT / "conf/forecast/sunspots.yaml")


@pytest.mark.slow
def test_sunspots_fit_logs_test_metrics_equal_to_an_independent_evaluation(mlflow_server, tmp_path):
    result = bptt("fit", "--config", SUNSPOTS, "--trainer.max_epochs", "30", "--trainer.enable_progress_bar", "false",
                  "--trainer.default_root_dir", str(tmp_path / "run"), "--tracking.tracking_uri", mlflow_server,
                  "--tracking.experiment_name", "forecast-cli", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"val/mase", "test/mae", "test/rmse", "test/mase"} <= set(metrics)

    # independent: the raw series, train-range statistics, the best checkpoint run over the whole series at once
    raw = sm.datasets.sunspots.load_pandas().data["SUNACTIVITY"].to_numpy()  # (309,)
    n = len(raw)
    train_end, test_start = int(n * 0.7), int(n * 0.85)
    mean, std = raw[:train_end].mean(), raw[:train_end].std()
    scale = np.abs(raw[11:train_end] - raw[: train_end - 11]).mean()  # seasonal naive, 11 years back
    model = RNNForecaster(num_inputs=1, num_targets=1, horizon=3, hidden_size=64, num_layers=1)
    state = torch.load(tmp_path / "run/checkpoints/best.ckpt", weights_only=True)["state_dict"]
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    with torch.no_grad():
        forecasts, _ = model(torch.tensor((raw - mean) / std, dtype=torch.float32).view(1, n, 1))  # (1, N, 3, 1)
    predicted = forecasts[0, :, :, 0].double().numpy() * std + mean  # (N, 3)
    errors = [abs(predicted[t, h] - raw[t + h + 1]) for t in range(n) for h in range(3) if test_start <= t + h + 1 < n]
    assert len(errors) == 3 * (n - test_start)  # every test value, at every horizon, once
    assert metrics["test/mae"] == pytest.approx(np.mean(errors), rel=1e-4)
    assert metrics["test/mase"] == pytest.approx(np.mean(errors) / scale, rel=1e-4)
    assert metrics["test/rmse"] == pytest.approx(np.sqrt(np.mean(np.square(errors))), rel=1e-4)

    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("forecast-cli").experiment_id])
    assert {"forecast_test.png", "normalization.json", "config.yaml"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert run.data.metrics["test/mase"] == pytest.approx(metrics["test/mase"])


@pytest.mark.parametrize(
    ("csv", "message"),
    [
        ("timestamp,value\n2020-01-01,1\n2020-01-03,2\n2020-01-02,3\n", "not sorted"),
        ("timestamp,value\n2020-01-01,1\n2020-01-01,2\n2020-01-02,3\n", "duplicate"),
        ("timestamp,value\n2020-01-01,1\n2020-01-02,abc\n2020-01-03,3\n", "abc"),
        ("timestamp,value,empty\n2020-01-01,1,\n2020-01-02,2,\n2020-01-03,3,\n", "empty"),
    ],
    ids=["unsorted", "duplicated", "non-numeric", "all-nan"],
)
def test_bad_series_fail_in_one_line_before_training(csv, message, tmp_path, capsys, monkeypatch):
    (tmp_path / "series.csv").write_text(csv)
    monkeypatch.setenv("BPTT_DATA_DIR", str(tmp_path))
    run_dir = tmp_path / "run"
    code = main(["fit", "--config", SUNSPOTS, "--data.source", "series.csv", "--data.bptt", "2", "--data.horizon", "1",
                 "--model.horizon", "1", "--trainer.default_root_dir", str(run_dir)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("bptt: error: ") and message in err[0], err
    assert not run_dir.exists()


def test_series_shorter_than_a_window_fails_in_one_line(tmp_path, capsys, monkeypatch):
    rows = "".join(f"2020-01-{d:02d},{d}\n" for d in range(1, 11))
    (tmp_path / "short.csv").write_text("timestamp,value\n" + rows)
    monkeypatch.setenv("BPTT_DATA_DIR", str(tmp_path))
    code = main(["fit", "--config", SUNSPOTS, "--data.source", "short.csv", "--trainer.default_root_dir",
                 str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "fewer than one window" in err[0], err


@pytest.mark.slow
def test_two_windows_per_batch_forecast_bit_for_bit_like_one(tmp_path):
    """The series DataModule's data.windows_per_batch: 2 windows of data.bptt steps per batch, the same run."""
    final = {}
    for m in (1, 2):
        root = tmp_path / f"m{m}"
        result = bptt("fit", "--config", SUNSPOTS, "--trainer.max_steps", "8", "--trainer.enable_progress_bar", "false",
                      "--data.windows_per_batch", str(m), "--trainer.default_root_dir", str(root), cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        final[m] = torch.load(root / "checkpoints/last.ckpt", weights_only=True)
    assert final[1]["global_step"] == final[2]["global_step"] == 8
    for key, value in final[1]["state_dict"].items():
        assert torch.equal(final[2]["state_dict"][key], value), key
