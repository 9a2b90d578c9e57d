"""Conformal calibration's quantile and its rolling form against plain loops over the scores."""

from __future__ import annotations

import math

import numpy as np
import torch

from bptt.losses.conformal import conformal_quantile, rolling_shifts


def _reference_quantile(values: np.ndarray, level: float) -> float:
    values = np.sort(values[~np.isnan(values)])
    if len(values) == 0:
        return 0.0
    return float(values[min(math.ceil((len(values) + 1) * level), len(values)) - 1])


def test_conformal_quantile_is_the_ceil_n_plus_1_level_th_smallest_of_the_counted_scores():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 3, 9, generator=gen, dtype=torch.float64)
    scores[0, 0, :5] = math.nan
    scores[1, 2, :] = math.nan  # nothing counted: 0
    scores[2, 1, 1:] = math.nan  # one score, rank 2 > 1: the largest
    for level in (0.5, 0.8, 0.95):
        got = conformal_quantile(scores, level)
        for idx in np.ndindex(4, 3):
            assert float(got[idx]) == _reference_quantile(scores[idx].numpy(), level)


def test_rolling_shifts_use_the_last_window_origins_whose_targets_are_known():
    """Origin t, horizon h (1-based): the scores of origins t - h - window + 1 .. t - h at that horizon."""
    gen = torch.Generator().manual_seed(1)
    scores = torch.randn(2, 30, 4, 2, generator=gen, dtype=torch.float64)  # (B, L, H, C)
    scores[0, 7, 1, 0] = math.nan
    window, level, steps = 6, 0.8, 12
    got = rolling_shifts(scores, steps, window, level)  # the last 12 origins
    for b, i, j, c in np.ndindex(2, steps, 4, 2):
        t = 30 - steps + i
        past = scores[b, max(0, t - j - window) : max(0, t - j), j, c].numpy()  # origins up to t - (j + 1)
        assert float(got[b, i, j, c]) == _reference_quantile(past, level), (b, t, j, c)
