"""Every logged metric's name, defined once: the engine and the tasks log under these, the
checkpoint monitor, the Tune metric, the leaderboard and ``bptt runs`` read them.

Names are ``split/quantity``; ``metric(split, quantity)`` builds one for a split given at run
time (validation or test).
"""

from __future__ import annotations

TRAIN, VAL, TEST = "train", "val", "test"


def metric(split: str, quantity: str) -> str:
    """``"val/loss"`` from ``("val", "loss")``."""
    return f"{split}/{quantity}"


# the loss (mean per target: per token, step or label) of each split
TRAIN_LOSS, VAL_LOSS, TEST_LOSS = metric(TRAIN, "loss"), metric(VAL, "loss"), metric(TEST, "loss")
# training diagnostics the engine logs every trainer.log_every_n_steps
TOKENS_PER_SEC = metric(TRAIN, "tokens_per_sec")
GRAD_NORM = metric(TRAIN, "grad_norm")
CLIP_FRACTION = metric(TRAIN, "clip_fraction")
SKIPPED_STEPS = metric(TRAIN, "skipped_steps")
# a core's own (bptt.models.DiagonalGRU): Newton iterations per layer in the latest training window
NEWTON_ITERATIONS = metric(TRAIN, "newton_iterations")
# derived from a split's loss by the language-model task: perplexity (word level) or bits per character
PPL, BPC = "ppl", "bpc"
