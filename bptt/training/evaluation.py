"""``bptt validate`` and ``bptt test``: a checkpoint's model on a split, with state carried."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from bptt.training.checks import check_trainer_runs_here
from bptt.training.restore import restore
from bptt.training.trainer import build_trainer


def evaluate(
    checkpoint_path: str | Path, stage: Literal["validate", "test"], overrides: list[str], *, trusted: bool = False
) -> dict[str, float]:
    """Run the validation or test split through a checkpoint's model with state carried.

    Args:
        checkpoint_path: a ``.ckpt`` written by ``bptt fit``.
        stage: ``validate`` or ``test``.
        overrides: dotted config overrides, e.g. ``["--data.data_dir", "/data"]``.
        trusted: the checkpoint's config may name code outside the allow-list (``--trust-config``).

    Returns:
        the split's metrics (``val/loss`` and ``val/ppl``, or ``test/...``).
    """
    _, init, _ = restore(checkpoint_path, overrides, trusted)
    trainer = build_trainer(init.trainer, callbacks=[])
    check_trainer_runs_here(trainer, init.trainer, {})
    run = trainer.validate if stage == "validate" else trainer.test
    results = run(init.task, datamodule=init.data, ckpt_path=str(checkpoint_path), verbose=True)
    return {k: float(v) for k, v in results[0].items()}
