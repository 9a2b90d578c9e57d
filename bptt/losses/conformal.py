"""Conformal calibration of forecast intervals (``task.conformal``): how much further out the central
interval of a probabilistic forecast must reach to cover its level of the targets.

Scores are max(lower - y, y - upper) of past forecasts whose targets y are known (NaN: not counted);
the shift is their ceil((n + 1) * level)-th smallest (split conformal prediction; in the form of
conformalized quantile regression, Romano et al. 2019), all of them if fewer, 0 if none. ``validation``
takes the scores of the validation range once; ``rolling`` takes, at every origin t and horizon h, the
scores of the last ``window`` origins whose targets were known by t (origins up to t - h), so the
intervals follow the size of recent errors (Gibbs & Candes 2021 adapt to the same drift).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def conformal_quantile(scores: Tensor, level: float) -> Tensor:
    """(...) the ceil((n + 1) * level)-th smallest of the n non-NaN ``scores`` (..., N) along the last dim;
    the largest when that rank exceeds n, 0 when n = 0."""
    count = (~scores.isnan()).sum(dim=-1)  # (...)
    ordered = scores.sort(dim=-1).values  # NaN last
    rank = torch.ceil((count + 1) * level).long().clamp(max=count)  # exact for count < 2**24
    value = ordered.gather(-1, (rank - 1).clamp(min=0)[..., None])[..., 0]
    return torch.where(count > 0, value, torch.zeros_like(value))


def rolling_shifts(scores: Tensor, steps: int, window: int, level: float) -> Tensor:
    """(B, steps, H, C) the shift at each of the last ``steps`` origins of ``scores`` (B, L, H, C), the
    scores of origins 0..L-1 at horizons 1..H (NaN: not counted): for origin t and horizon h, the
    ``conformal_quantile`` of the scores of origins t - h - window + 1 .. t - h at horizon h."""
    batch, length, horizon, columns = scores.shape
    padded = F.pad(scores, (0, 0, 0, 0, window, 0), value=math.nan)  # (B, window + L, H, C)
    shifts = scores.new_zeros(batch, steps, horizon, columns)
    origins = torch.arange(length - steps, length, device=scores.device)
    for j in range(horizon):  # horizon j + 1: origins up to t - j - 1, i.e. padded[t - j : t - j + window]
        windows = padded[:, :, j].unfold(1, window, 1)  # (B, L + 1, C, window): k covers origins k - window .. k - 1
        chosen = windows[:, (origins - j).clamp(min=0)]  # (B, steps, C, window)
        shifts[:, :, j] = conformal_quantile(chosen, level)
    return shifts
