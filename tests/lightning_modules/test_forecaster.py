"""The forecaster on the TBPTT engine against hand-written references: the masked squared-error,
Gaussian-NLL and pinball steps, residual forecasts, recursive multi-step rollout, MAE/RMSE/MASE in the
series' units and the interval coverage of probabilistic forecasts."""

from __future__ import annotations

import copy
import math
import types

import numpy as np
import pytest
import torch

from bptt.datamodules.timeseries import ForecastData
from bptt.errors import ConfigError
from bptt.lightning_modules import ForecastTask
from bptt.models import RNNForecaster
from tests.engine_harness import ListDataModule, run, sgd

LR = 0.5


def _model(horizon: int = 2, inputs: int = 2, targets: int = 2, outputs: int = 1) -> RNNForecaster:
    torch.manual_seed(0)
    return RNNForecaster(num_inputs=inputs, num_targets=targets, horizon=horizon, num_outputs=outputs, rnn_type="GRU",
                         hidden_size=5, num_layers=2).double()


LEVELS = [0.1, 0.5, 0.9]
OUTPUTS = {"mse": 1, "gaussian_nll": 2, "quantile": len(LEVELS)}


def _elementwise(loss: str, forecasts: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Written out: squared error; the Gaussian NLL with scale softplus(s) + 1e-4; the pinball loss
    averaged over LEVELS."""
    if loss == "mse":
        return (forecasts - targets) ** 2
    if loss == "gaussian_nll":
        mean, scale = forecasts[..., 0], torch.log1p(torch.exp(forecasts[..., 1])) + 1e-4
        return 0.5 * (math.log(2 * math.pi) + 2 * torch.log(scale) + ((targets - mean) / scale) ** 2)
    diff = targets[..., None] - forecasts
    levels = torch.tensor(LEVELS, dtype=forecasts.dtype)
    return torch.where(diff >= 0, levels * diff, (levels - 1) * diff).mean(dim=-1)


SERIES = ForecastData(input_names=("a", "b"), target_names=("a", "b"), horizon=2,
                      target_mean=torch.tensor([10.0, -1.0]), target_std=torch.tensor([2.0, 0.5]),
                      mase_scale=torch.tensor([0.8, 0.2]), timestamps=np.arange(11))


class _Data(ListDataModule):
    """Hand-written batches plus what the task needs from a TimeSeriesDataModule: columns, horizon,
    normalization, MASE scale."""

    def forecast_data(self) -> ForecastData:
        return SERIES


def _batches(horizon: int = 2) -> list[dict[str, torch.Tensor]]:
    """Two consecutive stream windows of 3 streams, with some targets unobserved."""
    gen = torch.Generator().manual_seed(4)
    batches = []
    for k in range(2):
        observed = torch.rand(3, 5, horizon, 2, generator=gen) > 0.3
        observed[1, 2] = False  # a step with nothing observed
        batches.append({
            "inputs": torch.randn(3, 5, 2, generator=gen, dtype=torch.float64),
            "targets": torch.randn(3, 5, horizon, 2, generator=gen, dtype=torch.float64),
            "target_mask": observed, "mask": observed.flatten(2).any(dim=2),
            "positions": torch.arange(5).repeat(3, 1) + 5 * k, "reset": torch.full((3,), k == 0),
        })
    return batches


def _reference(model, batches, *, residual: bool, kind: str = "mse"):
    """Plain loop: carried detached state, per-step mean loss over observed targets, the step losses'
    mean over steps with any target, one SGD step per window."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    state = None
    for batch in batches:
        forecasts, state = model(batch["inputs"], state)
        if residual:
            last = batch["inputs"][:, :, None, :]  # (B, T, 1, C): moves the mean, or every quantile
            if kind == "mse":
                forecasts = forecasts + last
            elif kind == "gaussian_nll":
                forecasts = torch.stack([forecasts[..., 0] + last, forecasts[..., 1]], dim=-1)
            else:
                forecasts = forecasts + last[..., None]
        state = tuple(s.detach() for s in state)
        err = _elementwise(kind, forecasts, batch["targets"]) * batch["target_mask"]
        per_step = err.sum(dim=(2, 3)) / batch["target_mask"].sum(dim=(2, 3)).clamp(min=1)
        loss = per_step.sum() / batch["mask"].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


@pytest.mark.parametrize("loss", ["mse", "gaussian_nll", "quantile"])
@pytest.mark.parametrize("residual", [False, True])
def test_training_step_equals_the_written_out_loss_reference(residual, loss):
    model = _model(outputs=OUTPUTS[loss])
    reference = _reference(copy.deepcopy(model), _batches(), residual=residual, kind=loss)
    task = ForecastTask(model=model, optimizer=sgd(LR), residual=residual, test_after_fit=False, loss=loss,
                        quantiles=LEVELS if loss == "quantile" else None)
    run(task, _batches(), precision="64-true", data=_Data)
    for p, q in zip(task.model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, atol=1e-10, rtol=0)


CHANGES = ForecastData(input_names=("a", "b", "a_diff1"), target_names=("a", "b"), horizon=2,
                       target_mean=SERIES.target_mean, target_std=SERIES.target_std, mase_scale=SERIES.mase_scale,
                       timestamps=SERIES.timestamps)


class _ChangesData(ListDataModule):
    def forecast_data(self) -> ForecastData:
        return CHANGES


def test_without_level_inputs_the_model_sees_the_other_columns_and_the_residual_adds_the_levels():
    """task.level_inputs: false: forecast = model(inputs[..., a_diff1]) + inputs[..., (a, b)], trained by
    the written-out loop on exactly that."""
    model = _model(inputs=1)
    batches = _batches()
    gen = torch.Generator().manual_seed(5)
    for batch in batches:  # a third input column, the one the model sees
        batch["inputs"] = torch.cat([batch["inputs"], torch.randn(3, 5, 1, generator=gen, dtype=torch.float64)], 2)
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(reference.parameters(), lr=LR)
    state = None
    for batch in batches:
        forecasts, state = reference(batch["inputs"][..., 2:], state)
        forecasts = forecasts + batch["inputs"][:, :, None, :2]
        state = tuple(s.detach() for s in state)
        err = (forecasts - batch["targets"]) ** 2 * batch["target_mask"]
        loss = (err.sum(dim=(2, 3)) / batch["target_mask"].sum(dim=(2, 3)).clamp(min=1)).sum() / batch["mask"].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    task = ForecastTask(model=model, optimizer=sgd(LR), residual=True, level_inputs=False, test_after_fit=False)
    run(task, batches, precision="64-true", data=_ChangesData)
    for p, q in zip(task.model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, atol=1e-10, rtol=0)


def test_recursive_rollout_feeds_each_forecast_back_as_the_next_input():
    model = _model(horizon=1)
    task = ForecastTask(model=model, horizon_mode="recursive")
    inputs = torch.randn(2, 4, 2, dtype=torch.float64)
    forecasts, _ = task._recursive(inputs, None, horizon=3)  # (B, t, H, C)
    state = None
    for t in range(4):
        one, state = model(inputs[:, t : t + 1], state)
        two, rolled = model(one[:, :, 0], state)
        three, _ = model(two[:, :, 0], rolled)
        torch.testing.assert_close(forecasts[:, t], torch.cat([one, two, three], dim=2)[:, 0])


def test_metrics_are_in_the_series_units_and_mase_divides_by_the_seasonal_naive_scale():
    task = ForecastTask(model=_model(), test_after_fit=False)
    task.use_data(SERIES)
    task._trainer = types.SimpleNamespace(testing=False, is_global_zero=True)
    forecasts = torch.tensor([[[[1.0, 0.0], [0.5, 2.0]]]])  # (1, 1, H=2, C=2), normalized
    targets = torch.tensor([[[[0.0, 0.0], [0.5, 0.0]]]])
    observed = torch.tensor([[[[True, True], [False, True]]]])
    task._update_metrics({"positions": torch.zeros(1, 1, dtype=torch.long)}, forecasts, targets, observed)
    errors = torch.tensor([1.0 * 2.0, 0.0 * 0.5, 2.0 * 0.5])  # |forecast - target| * std of each observed target
    scaled = errors / torch.tensor([0.8, 0.2, 0.2])
    metrics = task.metrics["val"]
    torch.testing.assert_close(metrics["mae"].compute(), errors.mean())
    torch.testing.assert_close(metrics["rmse"].compute(), errors.pow(2).mean().sqrt())
    torch.testing.assert_close(metrics["mase"].compute(), scaled.mean())


def test_probabilistic_metrics_are_in_the_series_units():
    """Gaussian forecasts: CRPS in closed form in units (std x the normalized one) and coverage of the
    central 80% interval, mean +- 1.2816 scale, counted over observed targets only."""
    task = ForecastTask(model=_model(outputs=2), loss="gaussian_nll", test_after_fit=False)
    task.use_data(SERIES)
    task._trainer = types.SimpleNamespace(testing=False, is_global_zero=True)
    s = math.log(math.expm1(1.0 - 1e-4))  # softplus(s) + 1e-4 = 1: a normalized scale of 1
    forecasts = torch.tensor([[[[[0.0, s], [0.0, s]], [[1.0, s], [0.0, s]]]]])  # (1, 1, H=2, C=2, 2)
    targets = torch.tensor([[[[1.0, 2.0], [1.0, 0.5]]]])
    observed = torch.tensor([[[[True, True], [False, True]]]])
    task._update_metrics({"positions": torch.zeros(1, 1, dtype=torch.long)}, forecasts, targets, observed)
    z = torch.tensor([1.0, 2.0, 0.5])  # (target - mean) / scale of each observed target
    phi, cdf = torch.exp(-0.5 * z**2) / math.sqrt(2 * math.pi), torch.special.ndtr(z)
    crps = torch.tensor([2.0, 0.5, 0.5]) * (z * (2 * cdf - 1) + 2 * phi - 1 / math.sqrt(math.pi))  # x std (units)
    metrics = task.metrics["val"]
    torch.testing.assert_close(metrics["crps"].compute(), crps.mean())
    torch.testing.assert_close(metrics["coverage"].compute(), torch.tensor(2 / 3))  # z = 2 lies outside 1.2816


def test_conformal_calibration_is_the_split_conformal_quantile_of_the_validation_scores():
    """task.conformal: after validation, per horizon and target, the ceil((n + 1) * 0.8)-th smallest of
    max(lower - y, y - upper) over the n counted validation targets (normalized units), written out in
    numpy; widened by it, the intervals cover at least 80% of those targets."""
    task = ForecastTask(model=_model(outputs=3), loss="quantile", conformal="validation", test_after_fit=False)
    task.use_data(SERIES)
    task._trainer = types.SimpleNamespace(testing=False, is_global_zero=True, sanity_checking=False)
    gen = torch.Generator().manual_seed(3)
    windows = []
    for _ in range(3):  # three validation windows of 2 streams x 7 steps
        forecasts = torch.randn(2, 7, 2, 2, 3, generator=gen, dtype=torch.float64)
        targets = 2 * torch.randn(2, 7, 2, 2, generator=gen, dtype=torch.float64)
        observed = torch.rand(2, 7, 2, 2, generator=gen) > 0.25
        task._update_metrics({"positions": torch.zeros(2, 7, dtype=torch.long)}, forecasts, targets, observed)
        windows.append((forecasts.numpy(), targets.numpy(), observed.numpy()))
    task._calibrate()
    quantiles = np.sort(np.concatenate([w[0].reshape(-1, 2, 2, 3) for w in windows]), axis=-1)
    targets = np.concatenate([w[1].reshape(-1, 2, 2) for w in windows])
    observed = np.concatenate([w[2].reshape(-1, 2, 2) for w in windows])
    for h in range(2):
        for c in range(2):
            counted = observed[:, h, c]
            lower, upper, y = quantiles[counted, h, c, 0], quantiles[counted, h, c, -1], targets[counted, h, c]
            scores = np.sort(np.maximum(lower - y, y - upper))
            expected = scores[math.ceil((len(scores) + 1) * 0.8) - 1]
            assert float(task.interval_shift[h, c]) == pytest.approx(expected, abs=1e-6)
            shift = expected + 1e-6  # the buffer holds it in float32
            assert np.mean((lower - shift <= y) & (y <= upper + shift)) >= 0.8


def test_task_rejects_settings_that_cannot_work():
    with pytest.raises(ConfigError, match="horizon: 1"):
        ForecastTask(model=_model(horizon=2), horizon_mode="recursive")
    with pytest.raises(ConfigError, match="set model.init_args.num_outputs: 2"):
        ForecastTask(model=_model(), loss="gaussian_nll")
    with pytest.raises(ConfigError, match="needs task.horizon_mode: direct"):
        ForecastTask(model=_model(horizon=1, outputs=3), loss="quantile", horizon_mode="recursive")
    task = ForecastTask(model=_model(horizon=3))
    task._trainer = types.SimpleNamespace(datamodule=_Data([]))
    with pytest.raises(ConfigError, match="model.horizon=3 but the data needs 2"):
        task.setup("fit")
    with pytest.raises(ConfigError, match="task.conformal calibrates intervals, and task.loss: mse forecasts none"):
        ForecastTask(model=_model(), conformal="validation")
    with pytest.raises(ConfigError, match="level_inputs: false needs task.residual: true"):
        ForecastTask(model=_model(), level_inputs=False)
    task = ForecastTask(model=_model(), residual=True, level_inputs=False)
    with pytest.raises(ConfigError, match="leaves the model no input: add data.differences, data.calendar"):
        task.use_data(SERIES)  # every input is a target
    task = ForecastTask(model=_model(), residual=True, level_inputs=False)
    with pytest.raises(ConfigError, match="model.num_inputs=2 but the data needs 1"):
        task.use_data(CHANGES)
