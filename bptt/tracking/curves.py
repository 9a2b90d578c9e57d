"""A run's training and validation curves, read back from MLflow, drawn as ``curves.png``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bptt.metric_names import BPC, GRAD_NORM, PPL, TEST, TRAIN, VAL, metric


def curves_png(client: Any, run_id: str, path: Path) -> Path:
    """Training and validation curves of a run, read back from MLflow, as a PNG: one panel per
    quantity (loss; perplexity or bits per character; gradient norm), each on its own scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    logged = client.get_run(run_id).data.metrics
    splits = (TRAIN, VAL, TEST)
    panels = [  # (title, keys, log scale)
        ("loss", [metric(s, "loss") for s in splits], False),
        ("perplexity", [metric(s, PPL) for s in splits], True),  # exp(loss): thousands early on
        ("bits per character", [metric(s, BPC) for s in splits], False),  # loss / ln 2: already a log
        ("gradient norm before clipping", [GRAD_NORM], True),
    ]
    panels = [(title, [k for k in keys if k in logged], log) for title, keys, log in panels]
    panels = [panel for panel in panels if panel[1]]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5 * max(1, len(panels)), 4), squeeze=False)
    for axis, (title, keys, log) in zip(axes[0], panels):
        for key in keys:
            history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
            axis.plot([m.step for m in history], [m.value for m in history], label=key,
                      marker="." if not key.startswith(TRAIN) else None)
        axis.set_xlabel("optimizer step")
        axis.set_title(title)
        axis.legend(fontsize=8)
        if log:
            axis.set_yscale("log")
            axis.yaxis.set_major_formatter(ScalarFormatter())
            axis.yaxis.set_minor_formatter(ScalarFormatter())
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
