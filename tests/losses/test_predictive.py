"""The forecast distributions of task.loss against independent references: the Gaussian's NLL, CRPS
(numerical integral of the squared CDF difference), interval and quantiles (scipy); the quantiles'
pinball loss written out, their point and interval; samples whose empirical CDF matches the model's."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from bptt.errors import ConfigError
from bptt.losses import Gaussian, Predictive, Quantiles, predictive


def _raw_gaussian() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(3, 4, 2, generator=gen, dtype=torch.float64)  # (..., 2): mean, unconstrained scale


def test_gaussian_loss_is_the_negative_log_likelihood():
    raw, target = _raw_gaussian(), torch.linspace(-2, 2, 12, dtype=torch.float64).view(3, 4)
    mean, scale = raw[..., 0].numpy(), np.log1p(np.exp(raw[..., 1].numpy())) + 1e-4
    expected = -stats.norm.logpdf(target.numpy(), mean, scale)
    np.testing.assert_allclose(Gaussian().loss(raw, target).numpy(), expected, rtol=1e-12)


def test_gaussian_crps_interval_and_quantiles_in_units_equal_scipy():
    g = Gaussian(interval=0.8)
    raw = _raw_gaussian()
    mean_c, std_c = torch.tensor([10.0, -3.0, 0.5, 2.0], dtype=torch.float64), torch.tensor([2.0, 0.5, 1.0, 3.0],
                                                                                            dtype=torch.float64)
    units = g.to_units(raw, mean_c, std_c)  # (3, 4, 2): the last target dim (4) takes the column statistics
    target = units[..., 0] + torch.tensor([[-1.5, 0.0, 0.7, 3.0]], dtype=torch.float64) * units[..., 1]
    crps = g.score(units, target).numpy()
    for idx in np.ndindex(3, 4):
        mu, sigma, y = float(units[idx][0]), float(units[idx][1]), float(target[idx])
        below, _ = integrate.quad(lambda x, mu=mu, sigma=sigma: stats.norm.cdf(x, mu, sigma) ** 2,
                                  mu - 12 * sigma, y, limit=200)
        above, _ = integrate.quad(lambda x, mu=mu, sigma=sigma: (1 - stats.norm.cdf(x, mu, sigma)) ** 2,
                                  y, mu + 12 * sigma, limit=200)
        assert crps[idx] == pytest.approx(below + above, rel=1e-7)
    lower, upper = g.interval(units)
    np.testing.assert_allclose(lower.numpy(), stats.norm.ppf(0.1, units[..., 0], units[..., 1]), rtol=1e-10)
    np.testing.assert_allclose(upper.numpy(), stats.norm.ppf(0.9, units[..., 0], units[..., 1]), rtol=1e-10)
    levels = [0.05, 0.5, 0.975]
    scale = np.log1p(np.exp(raw[..., 1].numpy())) + 1e-4
    expected = stats.norm.ppf(np.array(levels), raw[..., 0].numpy()[..., None], scale[..., None])
    np.testing.assert_allclose(g.quantiles(raw, levels).numpy(), expected, rtol=1e-10, atol=1e-12)


def test_quantile_loss_is_the_mean_pinball_loss_and_the_point_is_the_median():
    q = Quantiles([0.1, 0.5, 0.9])
    raw = torch.tensor([[3.0, 1.0, 2.0], [-1.0, 0.0, 4.0]], dtype=torch.float64)  # the first crosses: sorted at use
    target = torch.tensor([2.5, 5.0], dtype=torch.float64)
    expected = []
    for values, y in zip(raw.sort(dim=-1).values.tolist(), target.tolist()):
        expected.append(np.mean([max(level * (y - v), (level - 1) * (y - v)) for level, v in zip((0.1, 0.5, 0.9),
                                                                                                 values)]))
    np.testing.assert_allclose(q.loss(raw.sort(dim=-1).values, target).numpy(), expected, rtol=1e-12)
    assert q.point(raw).tolist() == [2.0, 0.0]
    lower, upper = q.interval(q.to_units(raw, torch.tensor(0.0), torch.tensor(1.0)))
    assert lower.tolist() == [1.0, -1.0] and upper.tolist() == [3.0, 4.0] and q.level == pytest.approx(0.8)
    assert q.quantiles(raw, [0.9, 0.1]).tolist() == [[3.0, 1.0], [4.0, -1.0]]


@pytest.mark.parametrize("kind", ["gaussian", "quantile"])
def test_samples_follow_the_forecast_distribution(kind):
    """The empirical CDF of 200,000 draws at the distribution's quantiles equals their levels within 5
    standard errors (sqrt(p (1 - p) / n) = 0.0011 at most)."""
    n = 200_000
    if kind == "gaussian":
        dist, raw, levels = Gaussian(), torch.tensor([1.0, 0.3], dtype=torch.float64), [0.1, 0.3, 0.5, 0.8, 0.95]
    else:
        levels = [0.1, 0.25, 0.5, 0.75, 0.9]
        dist, raw = Quantiles(levels), torch.tensor([-2.0, -0.5, 0.0, 1.5, 4.0], dtype=torch.float64)
    draws = dist.sample(raw.expand(n, *raw.shape), torch.Generator().manual_seed(1))  # (n,)
    for level, value in zip(levels, dist.quantiles(raw, levels).tolist()):
        assert float((draws <= value).double().mean()) == pytest.approx(level, abs=5 * math.sqrt(0.25 / n))


@pytest.mark.parametrize("kind", ["gaussian_nll", "quantile"])
def test_widen_moves_both_interval_ends_by_the_shift_and_keeps_the_point(kind):
    """Conformal calibration's widening, by positive and negative shifts per element: the interval ends
    move out (in) by exactly that much; the point stays; a Gaussian stays a Gaussian (its 5% and 95%
    quantiles against scipy's with the widened scale); quantiles other than the ends move with their side."""
    gen = torch.Generator().manual_seed(2)
    levels = [0.1, 0.3, 0.5, 0.9]
    dist = predictive(kind, levels if kind == "quantile" else None, 0.8)
    raw = torch.randn(5, 3, 2 if kind == "gaussian_nll" else 4, generator=gen, dtype=torch.float64)
    by = torch.tensor([[0.3, -0.02, 0.0]], dtype=torch.float64).expand(5, 3)
    widened = dist.widen(raw, by)
    lower, upper = dist.normalized_interval(raw)
    wide_lower, wide_upper = dist.normalized_interval(widened)
    torch.testing.assert_close(wide_lower, lower - by, rtol=0, atol=1e-9)
    torch.testing.assert_close(wide_upper, upper + by, rtol=0, atol=1e-9)
    torch.testing.assert_close(dist.point(widened), dist.point(raw), rtol=0, atol=0)
    if kind == "gaussian_nll":
        mean = raw[..., 0].numpy()
        scale = np.log1p(np.exp(raw[..., 1].numpy())) + 1e-4 + by.numpy() / stats.norm.ppf(0.9)
        expected = np.stack([stats.norm.ppf(0.05, mean, scale), stats.norm.ppf(0.95, mean, scale)], axis=-1)
        np.testing.assert_allclose(dist.quantiles(widened, [0.05, 0.95]).numpy(), expected, rtol=1e-9)
    else:
        before, after = raw.sort(dim=-1).values, widened.sort(dim=-1).values
        torch.testing.assert_close(after[..., 1], before[..., 1] - by, rtol=0, atol=1e-9)  # 0.3: below the median


def test_bad_settings_fail_in_one_line():
    assert type(predictive("mse", None, 0.8)) is Predictive
    for args, message in [
        (("quantile", [0.5, 0.1], 0.8), "increasing order"),
        (("quantile", [0.1, 1.0], 0.8), "in (0, 1)"),
        (("gaussian_nll", None, 1.2), "task.interval must be a probability"),
        (("mse", [0.1, 0.9], 0.8), "task.quantiles is for task.loss: quantile"),
        (("laplace", None, 0.8), "task.loss must be mse, gaussian_nll or quantile"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            predictive(*args)
    with pytest.raises(ConfigError, match="single values"):
        Predictive().check_levels([0.5])
    with pytest.raises(ConfigError, match=r"ask for some of them, not \[0.2\]"):
        Quantiles([0.1, 0.5, 0.9]).check_levels([0.2, 0.5])
