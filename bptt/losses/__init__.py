"""Losses that the tasks compute beside torch's own."""

from bptt.losses.checkpointed_ctc import checkpointed_ctc_loss
from bptt.losses.predictive import Gaussian, Predictive, Quantiles, predictive

__all__ = ["Gaussian", "Predictive", "Quantiles", "checkpointed_ctc_loss", "predictive"]
