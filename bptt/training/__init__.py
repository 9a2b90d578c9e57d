"""Training a run: its phases (``run``: ``fit``, ``resume``, ``train``), the checks before it (``checks``), the
Trainer (``trainer``), checkpoints (``checkpointing``, ``resuming``, ``restore``), ``trainer.precision: auto``
(``precision``) and ``bptt validate``/``test`` (``evaluation``).

``from bptt.training import fit, resume, evaluate`` imports ``run`` (or ``evaluation``) on first use, so that
importing one module of the package does not import them all.
"""

from __future__ import annotations

from typing import Any

_PUBLIC = {"fit": "run", "resume": "run", "train": "run", "evaluate": "evaluation"}


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'bptt.training' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"bptt.training.{_PUBLIC[name]}"), name)
