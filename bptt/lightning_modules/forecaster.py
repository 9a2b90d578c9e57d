"""``ForecastTask``: predict the next value(s) of a long series with an RNN on the TBPTT engine.

Stream mode: the hidden state carries from window to window, so the model reads x1..xt
and predicts x(t+1)..x(t+H) at every step t. Metrics in the series' own units: MAE, RMSE,
and MASE, the mean absolute error divided by that of the seasonal-naive forecast
(x(t) = x(t - season)) on the training range (Hyndman & Koehler 2006): below 1 beats it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import MLFlowLogger
from torch import Tensor, nn
from torchmetrics import MeanAbsoluteError, MeanMetric, MeanSquaredError

from bptt.datamodules.timeseries import ForecastData
from bptt.errors import ConfigError
from bptt.lightning_modules.tbptt import State, StepLossModule
from bptt.losses.conformal import conformal_quantile, rolling_shifts
from bptt.losses.predictive import predictive
from bptt.metric_names import metric


class ForecastTask(StepLossModule):
    """Squared error (or a Gaussian's NLL, or the pinball loss of quantiles) on normalized values; MAE,
    RMSE and MASE of the point forecasts in the series' units, and for probabilistic forecasts CRPS
    (Gaussian) or the mean pinball loss (quantiles) and the coverage of the central interval.

    Batches (``bptt.datamodules.TimeSeriesDataModule``) hold ``inputs`` (B, T, C_in),
    ``targets`` (B, T, H, C_out), ``target_mask`` (B, T, H, C_out) (observed targets inside
    the range that counts), ``mask`` (B, T), ``positions`` (B, T), ``series`` (B,) and ``reset`` (B,).

    Args:
        model: the network, ``(inputs (B, T, C_in), state) -> (forecasts (B, T, H', C_out[, P]), state)``,
            e.g. ``bptt.models.RNNForecaster``; P (``model.num_outputs``) values per forecast, as ``loss`` needs.
        horizon_mode: ``direct``: the model's head forecasts all H steps (H' = H);
            ``recursive``: the model forecasts one step (H' = 1, trained on the next value) and
            evaluation feeds each forecast back in as the next input, H times (needs the
            target columns to be the input columns).
        residual: forecast the change from the last observed value of each target column (which
            must be an input column too): forecast = input at t + the model's output. A trending
            series then leaves the range seen in training without the model having to extrapolate.
        loss: ``mse`` (a point forecast, P = 1), ``gaussian_nll`` (mean and scale, P = 2) or ``quantile``
            (the pinball loss averaged over ``quantiles``, P = their number); see ``bptt.losses.predictive``.
        quantiles: the levels of ``loss: quantile`` (default 0.1, 0.5, 0.9); the reported interval runs
            from the lowest to the highest.
        interval: the central interval of ``loss: gaussian_nll`` whose coverage is reported (default 0.8).
        conformal: calibrate the central interval of a probabilistic forecast (``bptt.losses.conformal``):
            ``none``; ``validation``: after each validation, per horizon and target, the conformal quantile
            of the validation targets' scores, kept with the checkpoint (``interval_shift``), widens the
            test split's and ``bptt forecast``'s intervals (validation itself scores the model's own: it is
            the calibration set); ``rolling``: at every origin, the conformal quantile of the scores of the
            last ``conformal_window`` origins whose targets are known by then (test and ``bptt forecast``).
        conformal_window: the origins a ``rolling`` calibration looks back over (default 156: three
            years of weeks).
        test_after_fit: ``bptt fit`` ends with the test split on the best checkpoint, logging
            ``test/*`` and ``forecast_test.png`` (forecast against actual) to MLflow.
        **engine: the ``StepLossModule`` arguments (optimizer, scheduler, k1/k2, clipping, ...).
    """

    time_keys = ("inputs", "targets", "target_mask", "mask", "positions")

    def __init__(
        self, *, model: nn.Module, horizon_mode: Literal["direct", "recursive"] = "direct", residual: bool = False,
        level_inputs: bool = True, loss: Literal["mse", "gaussian_nll", "quantile"] = "mse",
        quantiles: list[float] | None = None, interval: float = 0.8,
        conformal: Literal["none", "validation", "rolling"] = "none", conformal_window: int = 156,
        test_after_fit: bool = True, **engine: Any,
    ) -> None:
        super().__init__(**engine)
        if horizon_mode not in ("direct", "recursive"):
            raise ConfigError(f"task.horizon_mode must be 'direct' or 'recursive', got {horizon_mode!r}")
        if horizon_mode == "recursive" and getattr(model, "horizon", 1) != 1:
            raise ConfigError("task.horizon_mode: recursive forecasts one step at a time: "
                              "set model.init_args.horizon: 1")
        if not level_inputs and not residual:
            raise ConfigError("task.level_inputs: false needs task.residual: true (the model forecasts changes; the "
                              "residual adds the last level back)")
        self.predictive = predictive(loss, quantiles, interval)
        if horizon_mode == "recursive" and self.predictive.score_name is not None:
            raise ConfigError(f"task.loss: {loss} needs task.horizon_mode: direct (a recursive evaluation feeds "
                              "points back and would understate the spread of later steps)")
        if getattr(model, "num_outputs", 1) != self.predictive.num_outputs:
            raise ConfigError(f"task.loss: {loss} needs {self.predictive.num_outputs} values per forecast, but the "
                              f"model gives {getattr(model, 'num_outputs', 1)}; set model.init_args.num_outputs: "
                              f"{self.predictive.num_outputs}")
        if conformal not in ("none", "validation", "rolling"):
            raise ConfigError(f"task.conformal must be none, validation or rolling, got {conformal!r}")
        if conformal != "none" and self.predictive.score_name is None:
            raise ConfigError("task.conformal calibrates intervals, and task.loss: mse forecasts none; set task.loss: "
                              "gaussian_nll or quantile, or task.conformal: none")
        if isinstance(conformal_window, bool) or not isinstance(conformal_window, int) or conformal_window < 1:
            raise ConfigError(f"task.conformal_window must be a number of origins >= 1, got {conformal_window!r}")
        self.model = model
        self.conformal = conformal
        self.conformal_window = conformal_window
        if conformal == "validation":  # (H', C_out): how much further out each interval end reaches, normalized
            shape = (getattr(model, "horizon", 1), getattr(model, "num_targets", 1))
            self.register_buffer("interval_shift", torch.zeros(shape))
        self._scores: list[tuple[Tensor, Tensor]] = []  # validation (score, counted), each (n, H', C_out)
        self._rolling: Tensor | None = None  # rolling: the test stream's scores so far (B, L, H', C_out)
        self.horizon_mode = horizon_mode
        self.residual = residual
        self.level_inputs = level_inputs
        self.test_after_fit = test_after_fit
        self.target_inputs: list[int] = []  # the input column of each target column, for residual forecasts
        self.model_inputs: list[int] | None = None  # the input columns the model sees, if not all: from use_data
        self.forecast_data: ForecastData | None = None  # from use_data
        probabilistic = [self.predictive.score_name, "coverage"] if self.predictive.score_name else []
        self.metrics = nn.ModuleDict({
            split: nn.ModuleDict({"mae": MeanAbsoluteError(), "rmse": MeanSquaredError(squared=False),
                                  "mase": MeanMetric(), **{name: MeanMetric() for name in probabilistic}})
            for split in ("val", "test")
        })
        self.mase_by_horizon = nn.ModuleList()  # test MASE of the forecasts h steps ahead, h = 1..H: from use_data
        self.coverage_by_horizon = nn.ModuleList()  # test coverage of their intervals (probabilistic): from use_data
        self._test_curve: list[tuple[Tensor, Tensor, Tensor]] = []  # (positions, forecast, actual) of series 0

    def use_datamodule(self, datamodule: pl.LightningDataModule) -> None:
        self.use_data(datamodule.forecast_data())

    def use_data(self, data: ForecastData) -> None:
        """Keep what the data describes for the metrics and the plot; check the model against its
        columns and horizon; find the residual's input columns."""
        horizon = 1 if self.horizon_mode == "recursive" else data.horizon
        seen = list(range(data.num_inputs))
        if not self.level_inputs:
            seen = [i for i, name in enumerate(data.input_names) if name not in data.target_names]
            if not seen:
                raise ConfigError("task.level_inputs: false leaves the model no input: add data.differences, "
                                  "data.calendar or covariate columns, or set task.level_inputs: true")
        expected = {"num_inputs": len(seen), "num_targets": data.num_targets, "horizon": horizon}
        for name, value in expected.items():
            if getattr(self.model, name, value) != value:
                raise ConfigError(f"model.{name}={getattr(self.model, name)} but the data needs {value}; "
                                  f"set model.init_args.{name}: {value}")
        if self.horizon_mode == "recursive" and list(data.target_names) != list(data.input_names):
            raise ConfigError("task.horizon_mode: recursive feeds forecasts back as inputs, so data.target_columns "
                              "must be all of the value columns; use horizon_mode: direct")
        if self.residual:
            missing = [name for name in data.target_names if name not in data.input_names]
            if missing:
                raise ConfigError(f"task.residual adds the last input value, but target columns {missing} are not "
                                  "inputs; add them to data.value_columns or set task.residual: false")
            self.target_inputs = [list(data.input_names).index(name) for name in data.target_names]
        self.model_inputs = None if len(seen) == data.num_inputs else seen
        self.forecast_data = data
        self.mase_by_horizon = nn.ModuleList(MeanMetric() for _ in range(data.horizon)).to(self.device)
        if self.predictive.score_name is not None:
            self.coverage_by_horizon = nn.ModuleList(MeanMetric() for _ in range(data.horizon)).to(self.device)

    def forecast(self, inputs: Tensor, state: State | None) -> tuple[Tensor, State]:
        """The model's forecasts (B, t, H', C_out[, P]), their location moved by the last inputs of the
        targets when residual."""
        seen = inputs if self.model_inputs is None else inputs[..., self.model_inputs]  # (B, t, C_model)
        forecasts, state = self.model(seen, state)  # (B, t, H', C_out[, P])
        if self.residual:
            forecasts = self.predictive.shift(forecasts, inputs[:, :, None, self.target_inputs])  # (B, t, 1, C_out)
        return forecasts, state

    def window_step(self, window: dict[str, Tensor], state: State | None) -> tuple[Tensor, State]:
        """Args: window with ``inputs``, ``targets``, ``target_mask``. Returns: losses (B, t), new state."""
        evaluating = not self.training and self._trainer is not None and not self.trainer.training  # not a probe
        if evaluating and self.horizon_mode == "recursive":
            forecasts, state = self._recursive(window["inputs"], state, window["targets"].shape[2])
        else:
            forecasts, state = self.forecast(window["inputs"], state)  # (B, t, H', C_out)
        forecasts = forecasts.to(torch.promote_types(forecasts.dtype, torch.float32))  # the loss in >= fp32
        targets = window["targets"][:, :, : forecasts.shape[2]]
        observed = window["target_mask"][:, :, : forecasts.shape[2]]
        if evaluating and self.trainer.testing:
            forecasts = self.calibrated(forecasts, targets, window["positions"] >= 0)
        elementwise = self.predictive.loss(forecasts, targets) * observed  # (B, t, H', C_out)
        # (B, t): mean over observed targets
        losses = elementwise.sum(dim=(2, 3)) / observed.sum(dim=(2, 3)).clamp(min=1)
        if evaluating:
            self._update_metrics(window, forecasts, targets, observed)
        return losses, state

    def calibrated(self, raw: Tensor, targets: Tensor | None = None, real: Tensor | None = None) -> Tensor:
        """``raw`` (B, t, H', C_out, P) with its intervals widened (``conformal``). ``rolling`` adds the
        window's scores against its ``targets`` (B, t, H', C_out) at its ``real`` steps (B, t) (not padding) to
        those of the stream so far: the warm-up's too, where no target counts, but every target is the
        series' (filled) value; an origin t only uses targets up to t, which the series had reached."""
        if self.conformal == "validation":
            return self.predictive.widen(raw, self.interval_shift.to(raw.dtype))
        if self.conformal == "rolling":
            scores = self._outside(raw, targets).masked_fill(~real[:, :, None, None], math.nan)
            self._rolling = scores if self._rolling is None else torch.cat([self._rolling, scores], dim=1)
            shifts = rolling_shifts(self._rolling, raw.shape[1], self.conformal_window, self.predictive.level)
            return self.predictive.widen(raw, shifts)
        return raw

    def _outside(self, raw: Tensor, targets: Tensor) -> Tensor:
        """The conformal score of each forecast (...): how far its target lies outside its central interval,
        max(lower - y, y - upper), in normalized units (negative inside)."""
        lower, upper = self.predictive.normalized_interval(raw)
        return torch.maximum(lower - targets, targets - upper)

    def check_horizon(self, horizon: int) -> None:
        """Raise unless ``forecast_ahead`` reaches ``horizon`` steps: beyond the model's own horizon only
        when the targets are all of the inputs, so that forecasts can be fed back in as the next inputs.

        Raises:
            ConfigError: naming the most steps this model forecasts.
        """
        data = self._data()
        if horizon > self.model.horizon and list(data.target_names) != list(data.input_names):
            raise ConfigError(
                f"the model forecasts {self.model.horizon} step(s) ahead and its inputs are not only its targets, so "
                f"its forecasts cannot be fed back in for {horizon}; ask for --horizon {self.model.horizon} or less"
            )

    @torch.no_grad()
    def forecast_ahead(
        self, history: Tensor, horizon: int, levels: Sequence[float] = (), samples: int = 1000, seed: int = 0
    ) -> tuple[Tensor, Tensor | None]:
        """The ``horizon`` values after the end of a series: the state warmed up over all of ``history``,
        then, past the model's own horizon H', its point forecasts fed back in as inputs, H' at a time.

        Quantiles at ``levels`` come from the model's own distribution for its H' steps; past them from
        ``samples`` paths, each fed back its own draws (ancestral sampling, seeded by ``seed``), so the
        spread of the fed-back values carries into later steps.

        Args:
            history: (N, C_in) normalized inputs of one series.
            horizon: steps ahead (``check_horizon``).
            levels: quantile levels (``predictive.check_levels``); none: no quantiles.

        Returns:
            (horizon, C_out) normalized point forecasts, and (horizon, C_out, Q) quantiles or None.
        """
        self.check_horizon(horizon)
        raw, state = self.forecast(history[None], None)  # (1, N, H', C_out[, P])
        first, shift = self._calibrated_last(raw, history)  # (H', C_out[, P]): the steps after the last input
        points, rolled = [self.predictive.point(first)], state
        while sum(len(p) for p in points) < horizon:
            raw, rolled = self.forecast(points[-1][None], rolled)  # the last H' forecasts as the next inputs
            points.append(self.predictive.point(raw[0, -1]))
        point = torch.cat(points)[:horizon]
        if not levels:
            return point, None
        own = self.predictive.quantiles(first, list(levels))  # (H', C_out, Q)
        if horizon <= len(own):
            return point, own[:horizon]
        generator = torch.Generator(device=history.device).manual_seed(seed)
        paths_state = tuple(s.repeat(samples, *[1] * (s.dim() - 1)) for s in state)  # (S, ...) each
        drawn = [self.predictive.sample(first.expand(samples, *first.shape), generator)]  # (S, H', C_out)
        while sum(d.shape[1] for d in drawn) < horizon:
            raw, paths_state = self.forecast(drawn[-1], paths_state)
            later = raw[:, -1] if shift is None else self.predictive.widen(raw[:, -1], shift)  # the last origin's
            drawn.append(self.predictive.sample(later, generator))
        paths = torch.cat(drawn, dim=1)[:, :horizon]  # (S, horizon, C_out)
        sampled = torch.quantile(paths, paths.new_tensor(list(levels)), dim=0).permute(1, 2, 0)
        return point, torch.cat([own, sampled[len(own):]])  # (horizon, C_out, Q)

    def _calibrated_last(self, raw: Tensor, history: Tensor) -> tuple[Tensor, Tensor | None]:
        """The forecasts from the last step of ``history`` (H', C_out[, P]), calibrated, and the shift
        (H', C_out) they were widened by (None: not calibrated). ``rolling`` scores every earlier origin
        of the history against the history's own later values."""
        last = raw[0, -1]
        if self.conformal == "validation":
            shift = self.interval_shift.to(last.dtype)
        elif self.conformal == "rolling":
            data = self._data()
            levels = history[:, [list(data.input_names).index(name) for name in data.target_names]]  # (N, C_out)
            length, horizon = history.shape[0], raw.shape[2]
            steps = torch.arange(length + horizon, device=history.device)
            ahead = steps[:length, None] + steps[None, 1 : horizon + 1]  # (N, H'): the target times
            known = ahead < length
            targets = levels[ahead.clamp(max=length - 1)].to(raw.dtype)  # (N, H', C_out)
            scores = self._outside(raw[0], targets).masked_fill(~known[:, :, None], math.nan)
            shift = rolling_shifts(scores[None], 1, self.conformal_window, self.predictive.level)[0, 0]
        else:
            return last, None
        return self.predictive.widen(last, shift), shift

    @torch.no_grad()
    def _recursive(self, inputs: Tensor, state: State | None, horizon: int) -> tuple[Tensor, State]:
        """(B, t, H, C) forecasts, each step's H - 1 later ones fed back from the one before."""
        steps = []
        for t in range(inputs.shape[1]):
            forecast, state = self.forecast(inputs[:, t : t + 1], state)  # (B, 1, 1, C)
            ahead, rolled = [forecast], state
            for _ in range(horizon - 1):
                forecast, rolled = self.forecast(forecast[:, :, 0], rolled)  # the forecast as the next input
                ahead.append(forecast)
            steps.append(torch.cat(ahead, dim=2))  # (B, 1, H, C)
        return torch.cat(steps, dim=1), state  # (B, t, H, C)

    def _update_metrics(self, window: dict[str, Tensor], forecasts: Tensor, targets: Tensor, observed: Tensor) -> None:
        split = "test" if self.trainer.testing else "val"
        data = self._data()
        mean, std = data.target_mean.to(self.device), data.target_std.to(self.device)  # (C_out,)
        predicted = self.predictive.point(forecasts) * std + mean  # (B, t, H, C_out) in the series' units
        actual = targets * std + mean
        chosen = observed.bool()
        if not bool(chosen.any()):
            return
        metrics = self.metrics[split]
        if self.conformal == "validation" and split == "val":  # the calibration set: how far outside each target falls
            self._scores.append((self._outside(forecasts, targets).flatten(0, 1).detach(), chosen.flatten(0, 1)))
        if self.predictive.score_name is not None:
            units = self.predictive.to_units(forecasts, mean, std)  # (B, t, H, C_out, P)
            metrics[self.predictive.score_name].update(self.predictive.score(units, actual)[chosen])
            lower, upper = self.predictive.interval(units)
            inside = ((actual >= lower) & (actual <= upper)).to(actual.dtype)  # (B, t, H, C_out)
            metrics["coverage"].update(inside[chosen])
            if split == "test":
                for h, coverage in enumerate(self.coverage_by_horizon):
                    if bool(chosen[:, :, h].any()):
                        coverage.update(inside[:, :, h][chosen[:, :, h]])
        metrics["mae"].update(predicted[chosen], actual[chosen])
        metrics["rmse"].update(predicted[chosen], actual[chosen])
        scale = data.mase_scale.to(self.device).expand_as(predicted)  # (B, t, H, C_out)
        scaled = (predicted - actual).abs() / scale  # (B, t, H, C_out)
        metrics["mase"].update(scaled[chosen])
        if split == "test":
            for h, mase in enumerate(self.mase_by_horizon):  # rolling origin: every origin whose target h ahead counts
                if bool(chosen[:, :, h].any()):
                    mase.update(scaled[:, :, h][chosen[:, :, h]])
        if split == "test" and self.trainer.is_global_zero:
            first = chosen[0, :, 0, 0]  # row 0 of the eval streams is series 0; one step ahead, first target
            self._test_curve.append((window["positions"][0, first].cpu(), predicted[0, first, 0, 0].cpu(),
                                     actual[0, first, 0, 0].cpu()))

    def _data(self) -> ForecastData:
        if self.forecast_data is None:
            raise RuntimeError("ForecastTask evaluates in the data's units: call use_data(data.forecast_data()) first")
        return self.forecast_data

    def _log_metrics(self, split: str) -> None:
        for name, quantity in self.metrics[split].items():
            if quantity.update_count:  # none in Lightning's sanity check, whose windows only warm up
                self.log(metric(split, name), quantity.compute())
            quantity.reset()

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self._log_metrics("val")
        if self._scores and not self.trainer.sanity_checking:
            self._calibrate()
        self._scores = []

    def _calibrate(self) -> None:
        """``interval_shift`` from this validation's scores (every rank holds the same eval streams)."""
        score = torch.cat([s for s, _ in self._scores])  # (n, H', C_out)
        counted = torch.cat([c for _, c in self._scores])
        scores = score.masked_fill(~counted, math.nan).permute(1, 2, 0)  # (H', C_out, n)
        shift = conformal_quantile(scores, self.predictive.level)
        self.interval_shift.copy_(shift)

    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self._test_curve = []
        self._rolling = None  # a new stream

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        self._log_metrics("test")
        by_horizon = [float(mase.compute()) for mase in self.mase_by_horizon if mase.update_count]
        for h, value in enumerate(by_horizon, start=1):
            self.log(metric("test", f"mase_h{h}"), value)
        for h, coverage in enumerate(self.coverage_by_horizon, start=1):
            if coverage.update_count:
                self.log(metric("test", f"coverage_h{h}"), coverage.compute())
        for quantity in [*self.mase_by_horizon, *self.coverage_by_horizon]:
            quantity.reset()
        if self.trainer.is_global_zero:
            if self._test_curve:
                self._log_forecast_png()
            if len(by_horizon) > 1:
                self._log_horizon_png(by_horizon)

    def _log_figure(self, fig: Any, name: str) -> None:
        import matplotlib.pyplot as plt

        for logger in self.loggers:
            if isinstance(logger, MLFlowLogger):
                logger.experiment.log_figure(logger.run_id, fig, name)
        plt.close(fig)

    def _log_horizon_png(self, by_horizon: list[float]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        steps = range(1, len(by_horizon) + 1)
        ax.plot(steps, by_horizon, marker="o")
        ax.axhline(1.0, color="gray", linewidth=0.8, linestyle="--", label="seasonal naive on the train range")
        ax.set_xlabel("steps ahead (h)")
        ax.set_ylabel("test MASE")
        ax.set_title(f"{self._data().target_names[0]}: test MASE by horizon (every origin)")
        ax.legend()
        fig.tight_layout()
        self._log_figure(fig, "mase_by_horizon.png")

    def _log_forecast_png(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        data = self._data()
        positions, predicted, actual = (torch.cat(parts).numpy() for parts in zip(*self._test_curve))
        when = data.timestamps[positions + 1]  # the forecast is for the step after its input
        fig, ax = plt.subplots(figsize=(10, 4))
        ax.plot(when, actual, label="actual", color="black", linewidth=1)
        ax.plot(when, predicted, label="forecast (1 step ahead)", color="tab:red", linewidth=1)
        ax.set_title(f"{data.target_names[0]}: test range")
        ax.legend()
        fig.tight_layout()
        self._log_figure(fig, "forecast_test.png")
