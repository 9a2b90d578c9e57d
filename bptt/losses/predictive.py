"""What a forecaster's P outputs per forecast mean, chosen by ``task.loss``: a point (``mse``), a Gaussian
(``gaussian_nll``: mean and scale) or quantiles (``quantile``: one value per level of ``task.quantiles``).

Each ``Predictive`` gives the training loss, the point forecast (fed back as the next input, scored by
MAE/RMSE/MASE), its probabilistic score in the series' units (CRPS of the Gaussian, mean pinball loss
of the quantiles), the central interval whose coverage is reported, quantiles at any level and
samples (for forecasts fed back past the model's horizon). Shapes: ``raw`` is the model's
(..., P) output (a point model's (...) output, P = 1, has no last dim); targets are (...).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from bptt.errors import ConfigError

MIN_SCALE = 1e-4  # the Gaussian's scale floor, in normalized units: its NLL stays finite


class Predictive:
    """A point forecast, trained on squared error."""

    name = "mse"
    score_name: str | None = None  # the probabilistic score logged beside MAE/RMSE/MASE
    num_outputs = 1

    def loss(self, raw: Tensor, target: Tensor) -> Tensor:
        """Elementwise training loss (...)."""
        return (raw - target) ** 2

    def point(self, raw: Tensor) -> Tensor:
        """The point forecast (...)."""
        return raw

    def shift(self, raw: Tensor, delta: Tensor) -> Tensor:
        """``raw`` with the location moved by ``delta`` (...) (residual forecasts); a spread stays."""
        return raw + delta

    def to_units(self, raw: Tensor, mean: Tensor, std: Tensor) -> Tensor:
        """``raw`` in the series' units, given (C,) mean and std broadcast over the last target dim."""
        return raw * std + mean

    def score(self, units: Tensor, target: Tensor) -> Tensor:
        """Elementwise probabilistic score (...) in the series' units (``to_units`` output)."""
        raise NotImplementedError

    def interval(self, units: Tensor) -> tuple[Tensor, Tensor]:
        """The central interval (lower, upper), each (...), whose coverage is reported."""
        raise NotImplementedError

    def check_levels(self, levels: list[float]) -> None:
        """Raise unless ``quantiles`` can give ``levels``."""
        raise ConfigError("the checkpoint's model forecasts single values (it was trained with task.loss: mse), "
                          "not quantiles; drop --quantiles, or train with task.loss gaussian_nll or quantile")

    def quantiles(self, raw: Tensor, levels: list[float]) -> Tensor:
        """(..., Q) quantiles at ``levels`` (``check_levels``)."""
        raise NotImplementedError

    def sample(self, raw: Tensor, generator: torch.Generator) -> Tensor:
        """One draw (...) from the forecast distribution."""
        return raw

    def normalized_interval(self, raw: Tensor) -> tuple[Tensor, Tensor]:
        """The central interval (lower, upper), each (...), in the units of ``raw`` (normalized)."""
        return self.interval(self.to_units(raw, raw.new_zeros(()), raw.new_ones(())))

    def widen(self, raw: Tensor, by: Tensor) -> Tensor:
        """``raw`` whose central interval reaches ``by`` (...) further out at both ends (narrower where
        negative), the point forecast unchanged: conformal calibration (``task.conformal``)."""
        raise NotImplementedError


class Gaussian(Predictive):
    """Normal(mean, scale): outputs (mean, s) with scale = softplus(s) + ``MIN_SCALE``; Gaussian NLL; CRPS in
    closed form (Gneiting & Raftery 2007); the central ``interval`` (a probability) as the reported interval."""

    name = "gaussian_nll"
    score_name = "crps"
    num_outputs = 2

    def __init__(self, interval: float = 0.8) -> None:
        self.level = interval
        self.z = float(torch.special.ndtri(torch.tensor((1 + interval) / 2, dtype=torch.float64)))

    def _params(self, raw: Tensor) -> tuple[Tensor, Tensor]:
        return raw[..., 0], F.softplus(raw[..., 1]) + MIN_SCALE

    def loss(self, raw: Tensor, target: Tensor) -> Tensor:
        mean, scale = self._params(raw)
        return F.gaussian_nll_loss(mean, target, scale**2, full=True, reduction="none")

    def point(self, raw: Tensor) -> Tensor:
        return raw[..., 0]

    def shift(self, raw: Tensor, delta: Tensor) -> Tensor:
        return torch.stack([raw[..., 0] + delta, raw[..., 1]], dim=-1)

    def to_units(self, raw: Tensor, mean: Tensor, std: Tensor) -> Tensor:
        loc, scale = self._params(raw)
        return torch.stack([loc * std + mean, scale * std], dim=-1)  # (..., 2): mean and scale in units

    def score(self, units: Tensor, target: Tensor) -> Tensor:
        loc, scale = units[..., 0], units[..., 1]
        z = (target - loc) / scale
        density = torch.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)
        return scale * (z * (2 * torch.special.ndtr(z) - 1) + 2 * density - 1 / math.sqrt(math.pi))

    def interval(self, units: Tensor) -> tuple[Tensor, Tensor]:
        loc, scale = units[..., 0], units[..., 1]
        return loc - self.z * scale, loc + self.z * scale

    def check_levels(self, levels: list[float]) -> None:
        """Any level: the Gaussian has them all."""

    def quantiles(self, raw: Tensor, levels: list[float]) -> Tensor:
        loc, scale = self._params(raw)
        z = torch.special.ndtri(torch.tensor(levels, dtype=raw.dtype, device=raw.device))  # (Q,)
        return loc[..., None] + scale[..., None] * z

    def sample(self, raw: Tensor, generator: torch.Generator) -> Tensor:
        loc, scale = self._params(raw)
        noise = torch.randn(loc.shape, generator=generator, dtype=loc.dtype, device=loc.device)
        return loc + scale * noise

    def widen(self, raw: Tensor, by: Tensor) -> Tensor:
        """The scale grown by ``by / z``, so that mean +- z * scale moves by ``by`` (floored at ``MIN_SCALE``):
        still a Gaussian, every level's quantile consistent with the calibrated interval."""
        loc, scale = self._params(raw)
        softplus = (scale + by / self.z - MIN_SCALE).clamp(min=1e-12)  # softplus(s') of the new scale
        s = torch.where(softplus > 20, softplus, torch.log(torch.expm1(softplus)))  # its inverse, exact to float
        return torch.stack([loc, s], dim=-1)


class Quantiles(Predictive):
    """Quantiles at ``levels`` (sorted, distinct, in (0, 1)), trained by the pinball loss averaged over
    levels; sorted at use (no crossing); the point forecast is the level nearest 0.5; the reported
    interval runs from the lowest level to the highest."""

    name = "quantile"
    score_name = "pinball"

    def __init__(self, levels: list[float]) -> None:
        levels = [float(q) for q in levels]
        if not levels or any(not 0 < q < 1 for q in levels) or sorted(set(levels)) != levels:
            raise ConfigError(f"task.quantiles must be distinct levels in (0, 1), in increasing order, got {levels}")
        self.levels = levels
        self.num_outputs = len(levels)
        self.middle = min(range(len(levels)), key=lambda i: abs(levels[i] - 0.5))
        self.level = levels[-1] - levels[0]

    def _levels(self, like: Tensor) -> Tensor:
        return torch.tensor(self.levels, dtype=like.dtype, device=like.device)

    def _pinball(self, values: Tensor, target: Tensor) -> Tensor:
        diff = target[..., None] - values  # (..., Q)
        q = self._levels(values)
        return torch.maximum(q * diff, (q - 1) * diff).mean(dim=-1)

    def loss(self, raw: Tensor, target: Tensor) -> Tensor:
        return self._pinball(raw, target)

    def point(self, raw: Tensor) -> Tensor:
        return raw.sort(dim=-1).values[..., self.middle]

    def shift(self, raw: Tensor, delta: Tensor) -> Tensor:
        return raw + delta[..., None]

    def to_units(self, raw: Tensor, mean: Tensor, std: Tensor) -> Tensor:
        return raw.sort(dim=-1).values * std[..., None] + mean[..., None]

    def score(self, units: Tensor, target: Tensor) -> Tensor:
        return self._pinball(units, target)

    def interval(self, units: Tensor) -> tuple[Tensor, Tensor]:
        return units[..., 0], units[..., -1]

    def check_levels(self, levels: list[float]) -> None:
        missing = [q for q in levels if q not in self.levels]
        if missing:
            raise ConfigError(f"the model forecasts the quantiles {self.levels} (task.quantiles); ask for some of "
                              f"them, not {missing}")

    def quantiles(self, raw: Tensor, levels: list[float]) -> Tensor:
        return raw.sort(dim=-1).values[..., [self.levels.index(q) for q in levels]]

    def widen(self, raw: Tensor, by: Tensor) -> Tensor:
        """Sorted; the levels below the point's level moved down by ``by``, those above it up (conformalized
        quantile regression, Romano et al. 2019), the point's level kept; sorted again should a negative
        ``by`` cross them."""
        sides = torch.sign(torch.arange(len(self.levels), device=raw.device) - self.middle).to(raw.dtype)  # (Q,)
        return (raw.sort(dim=-1).values + by[..., None] * sides).sort(dim=-1).values

    def sample(self, raw: Tensor, generator: torch.Generator) -> Tensor:
        """Inverse-CDF sampling: a uniform level, the quantile function linear between the levels and
        extended linearly beyond the outermost ones (the first and last segments' slopes)."""
        values = raw.sort(dim=-1).values  # (..., Q)
        if len(self.levels) == 1:
            return values[..., 0]
        u = torch.rand(values.shape[:-1], generator=generator, dtype=values.dtype, device=values.device)
        q = self._levels(values)
        upper = torch.searchsorted(q, u.contiguous()).clamp(1, len(self.levels) - 1)  # (...)
        lo, hi = q[upper - 1], q[upper]
        v_lo = values.gather(-1, (upper - 1)[..., None])[..., 0]
        v_hi = values.gather(-1, upper[..., None])[..., 0]
        weight = (u - lo) / (hi - lo)  # below 0 or above 1 past the outermost levels
        return v_lo + weight * (v_hi - v_lo)


def predictive(loss: str, quantiles: list[float] | None, interval: float) -> Predictive:
    """The ``Predictive`` of ``task.loss`` (mse, gaussian_nll or quantile)."""
    if not 0 < interval < 1:
        raise ConfigError(f"task.interval must be a probability in (0, 1), got {interval}")
    if loss != "quantile" and quantiles is not None:
        raise ConfigError(f"task.quantiles is for task.loss: quantile, not {loss}; drop it or set task.loss: quantile")
    if loss == "mse":
        return Predictive()
    if loss == "gaussian_nll":
        return Gaussian(interval)
    if loss == "quantile":
        return Quantiles(quantiles if quantiles is not None else [0.1, 0.5, 0.9])
    raise ConfigError(f"task.loss must be mse, gaussian_nll or quantile, got {loss!r}")
