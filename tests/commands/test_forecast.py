"""The `bptt` command on forecasting, end to end: `bptt fit` of conf/forecast/sunspots.yaml tracked in a
real MLflow server, its test MASE (overall and per horizon) checked against an independent plain-PyTorch
evaluation of the best checkpoint on the raw series; `bptt forecast` of that checkpoint against an
independent rollout; bad series, files and arguments stop in one line before training or writing."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
import torch
from mlflow.tracking import MlflowClient

from bptt.cli import main
from bptt.models import RNNForecaster
from bptt.training.checkpointing import with_checksum
from tests.bptt_command import bptt
from tests.conftest import PROJECT

SUNSPOTS = str(PROJECT / "conf/forecast/sunspots.yaml")


RAW = sm.datasets.sunspots.load_pandas().data  # YEAR 1700..2008, SUNACTIVITY: 309 years
TRAIN_END = int(len(RAW) * 0.7)
MEAN, STD = RAW["SUNACTIVITY"][:TRAIN_END].mean(), RAW["SUNACTIVITY"][:TRAIN_END].std(ddof=0)


@pytest.fixture(scope="module")
def sunspots_run(mlflow_server, tmp_path_factory):
    """conf/forecast/sunspots.yaml trained for 30 epochs, tracked: (run directory, final metrics, server)."""
    tmp_path = tmp_path_factory.mktemp("sunspots")
    result = bptt("fit", "--config", SUNSPOTS, "--trainer.max_epochs", "30", "--trainer.enable_progress_bar", "false",
                  "--trainer.default_root_dir", str(tmp_path / "run"), "--tracking.tracking_uri", mlflow_server,
                  "--tracking.experiment_name", "forecast-cli", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp_path / "run", json.loads(result.stdout.strip().splitlines()[-1]), mlflow_server


def trained_model(run) -> RNNForecaster:
    """The run's best checkpoint in a plain RNNForecaster (sunspots.yaml's sizes), for independent evaluations."""
    model = RNNForecaster(num_inputs=1, num_targets=1, horizon=3, hidden_size=64, num_layers=1)
    state = torch.load(run / "checkpoints/best.ckpt", weights_only=True)["state_dict"]
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    return model.eval()


@pytest.mark.slow
def test_sunspots_fit_logs_test_metrics_equal_to_an_independent_evaluation(sunspots_run):
    run, metrics, mlflow_server = sunspots_run
    assert {"val/mase", "test/mae", "test/rmse", "test/mase"} <= set(metrics)

    # independent: the raw series, train-range statistics, the best checkpoint run over the whole series at once
    raw = RAW["SUNACTIVITY"].to_numpy()  # (309,)
    n = len(raw)
    test_start = int(n * 0.85)
    scale = np.abs(raw[11:TRAIN_END] - raw[: TRAIN_END - 11]).mean()  # seasonal naive, 11 years back
    with torch.no_grad():
        forecasts, _ = trained_model(run)(torch.tensor((raw - MEAN) / STD, dtype=torch.float32).view(1, n, 1))
    predicted = forecasts[0, :, :, 0].double().numpy() * STD + MEAN  # (N, 3)
    errors = [abs(predicted[t, h] - raw[t + h + 1]) for t in range(n) for h in range(3) if test_start <= t + h + 1 < n]
    assert len(errors) == 3 * (n - test_start)  # every test value, at every horizon, once
    assert metrics["test/mae"] == pytest.approx(np.mean(errors), rel=1e-4)
    assert metrics["test/mase"] == pytest.approx(np.mean(errors) / scale, rel=1e-4)
    assert metrics["test/rmse"] == pytest.approx(np.sqrt(np.mean(np.square(errors))), rel=1e-4)
    for h in range(3):  # rolling origin: every origin t whose target t + h + 1 lies in the test range
        errors_h = [abs(predicted[t, h] - raw[t + h + 1]) for t in range(n) if test_start <= t + h + 1 < n]
        assert metrics[f"test/mase_h{h + 1}"] == pytest.approx(np.mean(errors_h) / scale, rel=1e-4)

    client = MlflowClient(mlflow_server)
    (tracked,) = client.search_runs([client.get_experiment_by_name("forecast-cli").experiment_id])
    assert {"forecast_test.png", "mase_by_horizon.png", "normalization.json", "config.yaml"} <= {
        a.path for a in client.list_artifacts(tracked.info.run_id)}
    assert tracked.data.metrics["test/mase"] == pytest.approx(metrics["test/mase"])
    assert tracked.data.metrics["test/mase_h3"] == pytest.approx(metrics["test/mase_h3"])


def rollout(model: RNNForecaster, raw: np.ndarray, steps: int) -> np.ndarray:
    """Independent: the series step by step into the model, then its forecasts fed back one at a time."""
    x = torch.tensor((raw - MEAN) / STD, dtype=torch.float32)
    state, out = None, None
    with torch.no_grad():
        for value in x:
            out, state = model(value.view(1, 1, 1), state)  # out (1, 1, 3, 1)
        ahead = list(out[0, 0, :, 0])  # 3 years after the last one
        while len(ahead) < steps:
            for value in ahead[-3:]:
                out, state = model(value.view(1, 1, 1), state)
            ahead += list(out[0, 0, :, 0])
    return np.array([float(v) for v in ahead[:steps]]) * STD + MEAN


@pytest.mark.slow
def test_forecast_continues_the_series_like_an_independent_rollout(sunspots_run, tmp_path):
    run, _, _ = sunspots_run
    result = bptt("forecast", str(run / "checkpoints/best.ckpt"), "--horizon", "8", "--out", "f.csv", "--plot",
                  "f.png", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    table = pd.read_csv(tmp_path / "f.csv")
    assert list(table.columns) == ["series", "timestamp", "SUNACTIVITY"]
    assert table["timestamp"].tolist() == list(range(2009, 2017))  # the years after 2008
    expected = rollout(trained_model(run), RAW["SUNACTIVITY"].to_numpy(), 8)
    np.testing.assert_allclose(table["SUNACTIVITY"], expected, rtol=1e-5, atol=1e-4)
    assert (tmp_path / "f.png").stat().st_size > 10_000

    # a file with the run's columns, here the series up to 1979: its own continuation, the run's normalization
    RAW.iloc[:280].to_csv(tmp_path / "to1979.csv", index=False)
    result = bptt("forecast", str(run / "checkpoints/best.ckpt"), "--series", "to1979.csv", "--horizon", "4",
                  cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    table = pd.read_csv(io.StringIO(result.stdout))
    assert table["timestamp"].tolist() == [1980, 1981, 1982, 1983]
    expected = rollout(trained_model(run), RAW["SUNACTIVITY"][:280].to_numpy(), 4)
    np.testing.assert_allclose(table["SUNACTIVITY"], expected, rtol=1e-5, atol=1e-4)


@pytest.mark.slow
def test_several_checkpoints_forecast_as_the_mean_of_their_forecasts(sunspots_run, tmp_path, capsys):
    """An ensemble: the best checkpoint and a copy with other weights; the forecast is the mean of the two
    independent rollouts, past the model's horizon too."""
    run, _, _ = sunspots_run
    checkpoint = torch.load(run / "checkpoints/best.ckpt", weights_only=True)
    other = copy.deepcopy(checkpoint)
    generator = torch.Generator().manual_seed(0)
    for key, value in other["state_dict"].items():
        if key.startswith("model."):
            value.add_(0.05 * torch.randn(value.shape, generator=generator))
    torch.save(with_checksum(other), tmp_path / "other.ckpt")
    models = [trained_model(run), trained_model(run)]
    models[1].load_state_dict({k.removeprefix("model."): v for k, v in other["state_dict"].items()
                               if k.startswith("model.")})
    assert main(["forecast", str(run / "checkpoints/best.ckpt"), str(tmp_path / "other.ckpt"), "--horizon", "5"]) == 0
    table = pd.read_csv(io.StringIO(capsys.readouterr().out))
    each = [rollout(model, RAW["SUNACTIVITY"].to_numpy(), 5) for model in models]
    assert np.abs(each[0] - each[1]).min() > 0.1  # two members that differ
    np.testing.assert_allclose(table["SUNACTIVITY"], (each[0] + each[1]) / 2, rtol=1e-5, atol=1e-4)


FORECAST_BAD = [
    (["--horizon", "0"], "--horizon must be >= 1"),
    (["--quantiles", "0.1,1.5"], "strictly between 0 and 1"),
    (["--quantiles", "0.1,0.9"], "drop --quantiles"),
    (["--out", "f.txt"], "does not end in .csv"),
    (["--bogus", "1"], "unrecognized arguments: --bogus"),
    (["--series", "cols.csv"], "trained on columns ['SUNACTIVITY']"),
    (["--series", "unsorted.csv"], "not sorted"),
    (["--series", "trailing_gap.csv"], "ends in 1 step(s) with missing values"),
    (["--series", "absent.csv"], "not found"),
    (["--data.gaps", "mask", "second.ckpt"], "'second.ckpt' follows the config overrides; name every checkpoint"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("args", "message"), FORECAST_BAD, ids=[
    "horizon-0", "quantile-1.5", "quantiles-of-a-point-model", "out-not-csv", "unknown-flag", "other-columns",
    "unsorted", "trailing-gap", "absent-file", "checkpoint-after-overrides"])
def test_forecast_bad_input_fails_in_one_line_and_writes_nothing(sunspots_run, args, message, tmp_path, capsys,
                                                                  monkeypatch):
    run, _, _ = sunspots_run
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cols.csv").write_text("YEAR,SUNACTIVITY,extra\n1700,5,1\n1701,11,2\n")
    (tmp_path / "unsorted.csv").write_text("YEAR,SUNACTIVITY\n1700,5\n1702,16\n1701,11\n")
    (tmp_path / "trailing_gap.csv").write_text("YEAR,SUNACTIVITY\n1700,5\n1701,11\n1702,\n")
    out = [] if "--out" in args else ["--out", "out.csv"]
    code = main(["forecast", str(run / "checkpoints/best.ckpt"), *args, *out])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("bptt: error: ") and message in err[0], err
    assert not (tmp_path / "out.csv").exists()


# checked before any checkpoint is read: the checkpoint named does not exist, and the line is not about it
BEFORE_THE_CHECKPOINT = {
    "out-unwritable": (["--out", "/proc/bptt-forecast.csv"],
                       "--out /proc/bptt-forecast.csv cannot be written (No such file or directory: /proc); name a "
                       "file in a directory you can write"),
    "plot-unwritable": (["--plot", "/proc/bptt-forecast.png"], "--plot /proc/bptt-forecast.png cannot be written"),
    "out-missing-directory": (["--out", "{tmp}/absent/f.csv"],
                              "--out {tmp}/absent/f.csv: the directory {tmp}/absent does not exist; create it or name "
                              "a file in a directory you can write"),
    "plot-missing-directory": (["--plot", "{tmp}/absent/f.png"], "the directory {tmp}/absent does not exist"),
    "out-a-directory": (["--out", "{tmp}/dir.csv"],
                        "--out {tmp}/dir.csv: {tmp}/dir.csv is a directory; name a file in a directory you can write"),
    "plot-a-directory": (["--plot", "{tmp}/dir.png"], "--plot {tmp}/dir.png: {tmp}/dir.png is a directory"),
    "out-under-a-file": (["--out", "{tmp}/file/f.csv"],
                         "--out {tmp}/file/f.csv: {tmp}/file is a file, not a directory"),
    "horizon-1e9": (["--horizon", "1000000000"],
                    "--horizon 1000000000 is more than the 10000 steps bptt forecast takes; ask for --horizon 10000 "
                    "or less"),
    "horizon-10001": (["--horizon", "10001"], "ask for --horizon 10000 or less"),
    "quantiles-empty": (["--quantiles", ""], "--quantiles takes levels like 0.1,0.5,0.9, got ''"),
    "quantiles-blank": (["--quantiles", " "], "--quantiles takes levels like 0.1,0.5,0.9, got ' '"),
}


@pytest.mark.parametrize(("args", "message"), list(BEFORE_THE_CHECKPOINT.values()), ids=list(BEFORE_THE_CHECKPOINT))
def test_forecast_destinations_horizon_and_quantiles_fail_in_one_line_before_the_checkpoint_is_read(
        args, message, tmp_path, capsys):
    """Each case with a good --out and --plot beside it (or a good --plot beside a bad --out): neither is written."""
    (tmp_path / "dir.csv").mkdir()
    (tmp_path / "dir.png").mkdir()
    (tmp_path / "file").write_text("")
    args = [arg.format(tmp=tmp_path) for arg in args]
    good = [option for flag, name in (("--out", "ok.csv"), ("--plot", "ok.png")) if flag not in args
            for option in (flag, str(tmp_path / name))]
    code = main(["forecast", str(tmp_path / "absent.ckpt"), *args, *good])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("bptt: error: "), err
    assert message.format(tmp=tmp_path) in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.csv", "dir.png", "file"]


def test_forecast_at_the_largest_horizon_goes_on_to_read_the_checkpoint(tmp_path, capsys):
    assert main(["forecast", str(tmp_path / "absent.ckpt"), "--horizon", "10000", "--quantiles", "0.1,0.9"]) == 2
    assert capsys.readouterr().err == (f"bptt: error: checkpoint {tmp_path / 'absent.ckpt'} does not exist; pass a "
                                       ".ckpt from a run's checkpoints/ directory\n")


@pytest.fixture(scope="module")
def monthly_run(tmp_path_factory) -> Path:
    """A forecaster of a monthly series (2000-01 .. 2009-12), one step of training: its last checkpoint."""
    tmp_path = tmp_path_factory.mktemp("monthly")
    stamps = pd.date_range("2000-01-01", periods=120, freq="MS")
    pd.DataFrame({"timestamp": stamps, "value": np.sin(np.arange(120) / 5)}).to_csv(tmp_path / "monthly.csv",
                                                                                     index=False)
    assert main(["fit", "--config", SUNSPOTS, "--data.source", str(tmp_path / "monthly.csv"), "--data.batch_size", "1",
                 "--data.bptt", "4", "--trainer.max_steps", "1", "--trainer.enable_progress_bar", "false",
                 "--trainer.default_root_dir", str(tmp_path / "run"), "--tracking.tracking_uri",
                 f"sqlite:///{tmp_path}/mlflow.db"]) == 0
    return tmp_path / "run/checkpoints/last.ckpt"


@pytest.mark.slow
def test_forecast_past_pandas_last_date_fails_in_one_line_before_forecasting(monthly_run, tmp_path, capsys,
                                                                              monkeypatch):
    """Months from 2010-01 on: 3,028 of them end on 2262-04-01; 3,029 pass pandas' last date."""
    from bptt.lightning_modules import ForecastTask

    def never(*args, **kwargs):
        raise AssertionError("forecast_ahead ran")

    monkeypatch.setattr(ForecastTask, "forecast_ahead", never)
    capsys.readouterr()
    code = main(["forecast", str(monthly_run), "--horizon", "3029", "--out", str(tmp_path / "f.csv"), "--plot",
                 str(tmp_path / "f.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["bptt: error: 3029 steps of MS after the series' end (2009-12-01) pass 2262-04-11, "
                                 "the last date pandas' timestamps hold; ask for --horizon 3028 or less"], err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_forecast_writes_both_files_or_neither(monthly_run, tmp_path, capsys, monkeypatch):
    """A plot that fails after the CSV is written (a full disk, say) leaves no CSV, the older files as they were,
    and no partial file."""
    out, png = tmp_path / "f.csv", tmp_path / "f.png"
    capsys.readouterr()
    assert main(["forecast", str(monthly_run), "--horizon", "2", "--out", str(out), "--plot", str(png)]) == 0
    assert pd.read_csv(out)["timestamp"].tolist() == ["2010-01-01", "2010-02-01"]
    assert png.stat().st_size > 10_000
    before = {path.name: path.read_bytes() for path in (out, png)}

    def full_disk(result, path):
        path.write_bytes(b"half a png")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("bptt.inference.forecasting.plot", full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        main(["forecast", str(monthly_run), "--horizon", "3", "--out", str(out), "--plot", str(png)])
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before
    out.unlink()
    png.unlink()
    with pytest.raises(OSError, match="No space left on device"):
        main(["forecast", str(monthly_run), "--horizon", "3", "--out", str(out), "--plot", str(png)])
    assert list(tmp_path.iterdir()) == []


def test_forecast_of_a_language_model_checkpoint_fails_in_one_line(capsys, tmp_path):
    code = main(["forecast", str(PROJECT / "tests/fixtures/lm-step3.ckpt"), "--out", str(tmp_path / "out.csv")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "LanguageModelTask checkpoint; forecast needs a forecaster" in err[0], err
    assert not (tmp_path / "out.csv").exists()


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


@pytest.mark.slow
def test_forecast_past_the_horizon_of_a_model_with_other_inputs_fails_in_one_line(sunspots_run, tmp_path, capsys,
                                                                                  monkeypatch):
    """Forecasts fed back in cannot stand for an input that is not forecast (here ``covariate``); nor can
    this model join an ensemble with the sunspots model."""
    steps = np.arange(120)
    pd.DataFrame({"timestamp": steps, "value": np.sin(steps / 5), "covariate": np.cos(steps / 7)}).to_csv(
        tmp_path / "two.csv", index=False)
    monkeypatch.setenv("BPTT_DATA_DIR", str(tmp_path))
    run = tmp_path / "run"
    assert main(["fit", "--config", SUNSPOTS, "--data.source", "two.csv", "--data.target_columns", '["value"]',
                 "--data.batch_size", "1", "--data.bptt", "4", "--model.num_inputs", "2", "--trainer.max_steps", "1",
                 "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(run),
                 "--tracking.tracking_uri", f"sqlite:///{tmp_path}/mlflow.db"]) == 0
    capsys.readouterr()
    checkpoint = str(run / "checkpoints/last.ckpt")
    assert main(["forecast", checkpoint, "--horizon", "3", "--out", str(tmp_path / "ok.csv")]) == 0
    assert len(pd.read_csv(tmp_path / "ok.csv")) == 3
    code = main(["forecast", checkpoint, "--horizon", "4", "--out", str(tmp_path / "out.csv")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "ask for --horizon 3 or less" in err[0], err
    assert not (tmp_path / "out.csv").exists()
    sunspots = str(sunspots_run[0] / "checkpoints/best.ckpt")
    code = main(["forecast", checkpoint, sunspots, "--out", str(tmp_path / "out.csv")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "an ensemble needs checkpoints of the same series, columns" in err[0], err
    assert not (tmp_path / "out.csv").exists()


def checkpoint_quantiles(run) -> tuple[np.ndarray, dict]:
    """The quantile run's best checkpoint (sunspots.yaml's sizes, 3 levels) over the whole series at once:
    its sorted quantiles (N, H, Q), normalized, and its state dict."""
    model = RNNForecaster(num_inputs=1, num_targets=1, horizon=3, num_outputs=3, hidden_size=64, num_layers=1)
    state = torch.load(run / "checkpoints/best.ckpt", weights_only=True)["state_dict"]
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    normalized = (RAW["SUNACTIVITY"].to_numpy() - MEAN) / STD
    with torch.no_grad():
        out, _ = model.eval()(torch.tensor(normalized, dtype=torch.float32).view(1, -1, 1))  # (1, N, 3, 1, 3)
    return np.sort(out[0, :, :, 0].double().numpy(), axis=-1), state


@pytest.mark.slow
def test_quantile_forecaster_scores_and_forecasts_its_own_quantiles(tmp_path, capsys):
    """task.loss: quantile on sunspots: test/pinball and test/coverage equal an independent evaluation of
    the checkpoint; `bptt forecast --quantiles` gives its sorted quantiles within its horizon, sampled
    paths past it (the same for the same seed)."""
    levels = [0.1, 0.5, 0.9]
    run = tmp_path / "run"
    result = bptt("fit", "--config", SUNSPOTS, "--task.loss", "quantile", "--task.quantiles", json.dumps(levels),
                  "--model.num_outputs", "3", "--trainer.max_epochs", "10", "--trainer.enable_progress_bar", "false",
                  "--trainer.default_root_dir", str(run), "--tracking.tracking_uri", f"sqlite:///{tmp_path}/mlflow.db",
                  cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(result.stdout.strip().splitlines()[-1])

    raw = RAW["SUNACTIVITY"].to_numpy()
    n, test_start = len(raw), int(len(raw) * 0.85)
    quantiles = checkpoint_quantiles(run)[0] * STD + MEAN  # (N, H, Q) in units
    pinball, inside = [], []
    for t in range(n):
        for h in range(3):
            if test_start <= t + h + 1 < n:
                y, q = raw[t + h + 1], quantiles[t, h]
                pinball.append(np.mean([max(a * (y - v), (a - 1) * (y - v)) for a, v in zip(levels, q)]))
                inside.append(q[0] <= y <= q[-1])
    assert metrics["test/pinball"] == pytest.approx(np.mean(pinball), rel=1e-4)
    assert metrics["test/coverage"] == pytest.approx(np.mean(inside), abs=1e-6)

    checkpoint = str(run / "checkpoints/best.ckpt")
    assert main(["forecast", checkpoint, "--quantiles", "0.1,0.5,0.9", "--horizon", "3"]) == 0
    table = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert list(table.columns) == ["series", "timestamp", "SUNACTIVITY", "SUNACTIVITY_q0.1", "SUNACTIVITY_q0.5",
                                   "SUNACTIVITY_q0.9"]
    own = quantiles[-1]  # (H, Q): from the last year's state
    np.testing.assert_allclose(table[["SUNACTIVITY_q0.1", "SUNACTIVITY_q0.5", "SUNACTIVITY_q0.9"]], own, rtol=1e-5)
    np.testing.assert_allclose(table["SUNACTIVITY"], own[:, 1], rtol=1e-5)  # the point: the median

    longer = []
    for _ in range(2):
        assert main(["forecast", checkpoint, "--quantiles", "0.1,0.9", "--horizon", "8"]) == 0
        longer.append(capsys.readouterr().out)
    assert longer[0] == longer[1]  # sampled paths: seeded
    table = pd.read_csv(io.StringIO(longer[0]))
    np.testing.assert_allclose(table[["SUNACTIVITY_q0.1", "SUNACTIVITY_q0.9"]][:3], own[:, [0, 2]], rtol=1e-5)
    assert (table["SUNACTIVITY_q0.1"] < table["SUNACTIVITY_q0.9"]).all()

    assert main(["forecast", checkpoint, "--quantiles", "0.2,0.5"]) == 2
    assert "forecasts the quantiles [0.1, 0.5, 0.9] (task.quantiles); ask for some of them" in capsys.readouterr().err


@pytest.mark.slow
def test_conformal_intervals_are_calibrated_on_validation_and_used_by_test_and_forecast(tmp_path, capsys):
    """task.conformal on a sunspots quantile run: the checkpoint's interval_shift equals an independent
    split-conformal calibration of its own quantiles on the validation years; test/coverage and
    `bptt forecast --quantiles` use the intervals widened by it."""
    run = tmp_path / "run"
    result = bptt("fit", "--config", SUNSPOTS, "--task.loss", "quantile", "--task.conformal", "validation",
                  "--model.num_outputs", "3", "--trainer.max_epochs", "10", "--trainer.enable_progress_bar", "false",
                  "--trainer.default_root_dir", str(run), "--tracking.tracking_uri", f"sqlite:///{tmp_path}/mlflow.db",
                  cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(result.stdout.strip().splitlines()[-1])

    raw = RAW["SUNACTIVITY"].to_numpy()
    n, val_end = len(raw), int(len(raw) * 0.85)
    quantiles, state = checkpoint_quantiles(run)  # (N, H, Q), normalized
    normalized = (raw - MEAN) / STD
    shifts = []
    for h in range(3):
        origins = [t for t in range(n) if TRAIN_END <= t + h + 1 < val_end]
        y = normalized[[t + h + 1 for t in origins]]
        scores = np.sort(np.maximum(quantiles[origins, h, 0] - y, y - quantiles[origins, h, -1]))
        shifts.append(scores[int(np.ceil((len(scores) + 1) * 0.8)) - 1])
    np.testing.assert_allclose(state["interval_shift"][:, 0].double().numpy(), shifts, atol=1e-5)
    assert max(shifts) > 0.05  # ten epochs leave intervals too narrow: the calibration widens them

    widened = quantiles + np.array(shifts)[None, :, None] * np.array([-1.0, 0.0, 1.0])  # (N, H, Q)
    inside = [widened[t, h, 0] <= normalized[t + h + 1] <= widened[t, h, -1]
              for t in range(n) for h in range(3) if val_end <= t + h + 1 < n]
    assert metrics["test/coverage"] == pytest.approx(np.mean(inside), abs=1e-6)
    for h in range(3):  # and per horizon, from every origin whose target h + 1 ahead lies in the test range
        inside_h = [widened[t, h, 0] <= normalized[t + h + 1] <= widened[t, h, -1]
                    for t in range(n) if val_end <= t + h + 1 < n]
        assert metrics[f"test/coverage_h{h + 1}"] == pytest.approx(np.mean(inside_h), abs=1e-6)

    assert main(["forecast", str(run / "checkpoints/best.ckpt"), "--quantiles", "0.1,0.5,0.9"]) == 0
    table = pd.read_csv(io.StringIO(capsys.readouterr().out))
    own = widened[-1] * STD + MEAN  # (H, Q): from the last year's state, in units
    np.testing.assert_allclose(table[["SUNACTIVITY_q0.1", "SUNACTIVITY_q0.5", "SUNACTIVITY_q0.9"]], own, rtol=1e-5)


@pytest.mark.slow
def test_rolling_conformal_intervals_follow_the_recent_errors_in_test_and_forecast(tmp_path, capsys):
    """task.conformal: rolling (window of 20 years) on a sunspots quantile run: test/coverage_h{h} and the
    forecast's quantiles equal an independent computation: at origin t and horizon h, the intervals
    widened by the conformal quantile of the scores of origins t - h - 19 .. t - h against the series."""
    run = tmp_path / "run"
    result = bptt("fit", "--config", SUNSPOTS, "--task.loss", "quantile", "--task.conformal", "rolling",
                  "--task.conformal_window", "20", "--model.num_outputs", "3", "--trainer.max_epochs", "10",
                  "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(run),
                  "--tracking.tracking_uri", f"sqlite:///{tmp_path}/mlflow.db", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(result.stdout.strip().splitlines()[-1])

    raw = RAW["SUNACTIVITY"].to_numpy()
    n, val_end, window = len(raw), int(len(raw) * 0.85), 20
    quantiles, state = checkpoint_quantiles(run)  # (N, H, Q), normalized
    normalized = (raw - MEAN) / STD

    def shift(t: int, h: int) -> float:  # horizon h + 1 from origin t
        past = [u for u in range(max(0, t - h - window), t - h)]
        y = normalized[[u + h + 1 for u in past]]
        scores = np.sort(np.maximum(quantiles[past, h, 0] - y, y - quantiles[past, h, -1]))
        return float(scores[min(int(np.ceil((len(scores) + 1) * 0.8)), len(scores)) - 1]) if len(scores) else 0.0

    for h in range(3):
        inside = []
        for t in range(n):
            if val_end <= t + h + 1 < n:
                q = shift(t, h)
                inside.append(quantiles[t, h, 0] - q <= normalized[t + h + 1] <= quantiles[t, h, -1] + q)
        assert metrics[f"test/coverage_h{h + 1}"] == pytest.approx(np.mean(inside), abs=1e-6)

    assert main(["forecast", str(run / "checkpoints/best.ckpt"), "--quantiles", "0.1,0.5,0.9"]) == 0
    table = pd.read_csv(io.StringIO(capsys.readouterr().out))
    shifts = np.array([shift(n - 1, h) for h in range(3)])
    assert shifts.max() > 0.05  # the recent errors widen the intervals
    own = (quantiles[-1] + shifts[:, None] * np.array([-1.0, 0.0, 1.0])) * STD + MEAN  # (H, Q) in units
    np.testing.assert_allclose(table[["SUNACTIVITY_q0.1", "SUNACTIVITY_q0.5", "SUNACTIVITY_q0.9"]], own, rtol=1e-5)
