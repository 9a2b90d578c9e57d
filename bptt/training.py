"""The importable entry points behind the ``bptt`` command: ``fit``, ``evaluate`` and ``generate``.

Nothing happens at import time; ``bptt.cli`` and ``bptt.ray_jobs`` call these.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from jsonargparse import Namespace
from pytorch_lightning.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

from bptt import __version__
from bptt.datamodules.vocabulary import Vocabulary
from bptt.config import build_parser, instantiate, parse_config
from bptt.errors import CheckpointError, ConfigError
from bptt.lightning_modules.language_model import LanguageModelTask
from bptt.lightning_modules.tbptt import VAL_LOSS


def _quiet_known_warnings() -> None:
    """Silence warnings that are about library internals, not about the user's run."""
    warnings.filterwarnings("ignore", message=r".*IterableDataset.*has `__len__` defined.*")  # ours is exact
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")  # Lightning on torch 2.13


class RunConfigInCheckpoint(Callback):
    """Stores the resolved config in every checkpoint, so a checkpoint alone rebuilds its run."""

    def __init__(self, config_yaml: str) -> None:
        self.config_yaml = config_yaml

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint["bptt"] = {"config": self.config_yaml, "version": __version__}


def _trainer(
    trainer_args: Namespace, config_yaml: str, *, checkpoints: bool = True, extra_callbacks: list[Callback] = ()
) -> pl.Trainer:
    args = dict(vars(trainer_args))
    root = Path(args["default_root_dir"])
    callbacks = list(args.pop("callbacks") or []) + list(extra_callbacks)
    if checkpoints and args.get("enable_checkpointing") is not False:
        callbacks.append(
            ModelCheckpoint(dirpath=root / "checkpoints", filename="best", monitor=VAL_LOSS, mode="min", save_last=True)
        )
    callbacks += [RunConfigInCheckpoint(config_yaml), LearningRateMonitor(logging_interval="step")]
    if args.get("logger") is None:
        args["logger"] = CSVLogger(save_dir=root, name="logs")
    return pl.Trainer(callbacks=callbacks, **args)


def fit(cfg: Namespace, callbacks: list[Callback] | None = None) -> dict[str, float]:
    """Train the run that ``cfg`` describes (a parsed ``bptt fit`` config).

    ``callbacks`` are added to the Trainer's (for example a sweep's reporting callback).

    Writes ``config.yaml``, the DataModule's artifacts (e.g. ``vocab.json``), logs and
    checkpoints (``checkpoints/best.ckpt``, ``checkpoints/last.ckpt``) under
    ``trainer.default_root_dir``.

    Returns:
        the last logged metrics (``train/loss``, ``val/loss``, ...).
    """
    _quiet_known_warnings()
    parser = build_parser()
    config_yaml = parser.dump(cfg)
    pl.seed_everything(cfg.seed_everything, workers=True, verbose=False)
    init = instantiate(cfg, parser)
    init.data.prepare_data()  # bad data fails here, before the Trainer starts anything
    trainer = _trainer(init.trainer, config_yaml, extra_callbacks=callbacks or [])
    if trainer.is_global_zero:
        root = Path(cfg.trainer.default_root_dir)
        root.mkdir(parents=True, exist_ok=True)
        (root / "config.yaml").write_text(config_yaml)
        if hasattr(init.data, "save_artifacts"):
            init.data.save_artifacts(root)
    trainer.fit(init.task, datamodule=init.data)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint written by ``bptt fit``, loaded with ``weights_only=True``.

    Raises:
        CheckpointError: missing, unreadable, truncated or not written by ``bptt fit``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass a .ckpt from a run's checkpoints/ directory")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged file
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(err).__name__}); it is damaged or not a checkpoint") from None
    if not isinstance(checkpoint, dict) or "bptt" not in checkpoint or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} was not written by `bptt fit` (no run config inside); pass a bptt checkpoint")
    return checkpoint


def _restore(checkpoint_path: str | Path, overrides: list[str]) -> tuple[Namespace, Namespace, dict[str, Any]]:
    """Rebuild a checkpoint's run: (config, instantiated objects, checkpoint)."""
    _quiet_known_warnings()
    checkpoint = load_checkpoint(checkpoint_path)
    datamodule_state = next((v for v in checkpoint.values() if isinstance(v, dict) and "vocab" in v), None)
    parser = build_parser()
    with tempfile.TemporaryDirectory() as tmp:
        args = ["--config", checkpoint["bptt"]["config"], *overrides]
        if datamodule_state is not None:
            vocab_file = Path(tmp) / "vocab.json"
            Vocabulary.from_state_dict(datamodule_state["vocab"]).save(vocab_file)
            args += ["--data.vocab_file", str(vocab_file)]
        cfg = parse_config(args, parser)
        init = instantiate(cfg, parser)
    expected = {k: tuple(v.shape) for k, v in init.task.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in checkpoint["state_dict"].items()}
    if expected != found:
        differing = sorted(set(expected) ^ set(found)) or sorted(k for k in expected if expected[k] != found[k])
        raise CheckpointError(
            f"{checkpoint_path} holds a different model than its config builds (differs at {differing[:3]}); "
            "drop the --model overrides or pass the matching checkpoint"
        )
    return cfg, init, checkpoint


def evaluate(checkpoint_path: str | Path, stage: Literal["validate", "test"], overrides: list[str]) -> dict[str, float]:
    """Run the validation or test split through a checkpoint's model with state carried.

    Args:
        checkpoint_path: a ``.ckpt`` written by ``bptt fit``.
        stage: ``validate`` or ``test``.
        overrides: dotted config overrides, e.g. ``["--data.data_dir", "/data"]``.

    Returns:
        the split's metrics (``val/loss`` and ``val/ppl``, or ``test/...``).
    """
    cfg, init, _ = _restore(checkpoint_path, overrides)
    trainer = _trainer(init.trainer, build_parser().dump(cfg), checkpoints=False)
    run = trainer.validate if stage == "validate" else trainer.test
    results = run(init.task, datamodule=init.data, ckpt_path=str(checkpoint_path), verbose=True)
    return {k: float(v) for k, v in results[0].items()}


def generate(
    checkpoint_path: str | Path, *, prompt: str, num_tokens: int, temperature: float, seed: int
) -> str:
    """Sample text from a language-model checkpoint.

    Returns:
        ``prompt`` followed by ``num_tokens`` sampled tokens, decoded.
    """
    if num_tokens < 1 or temperature < 0:
        raise ConfigError(f"need --num-tokens >= 1 and --temperature >= 0, got {num_tokens} and {temperature}")
    _, init, checkpoint = _restore(checkpoint_path, [])
    task = init.task
    if not isinstance(task, LanguageModelTask):
        raise CheckpointError(f"{checkpoint_path} is a {type(task).__name__} checkpoint; generate needs a language model")
    task.load_state_dict(checkpoint["state_dict"])
    task.eval()
    vocab = init.data.vocab
    ids = vocab.encode(prompt or "\n")
    if not ids:
        raise ConfigError(f"the prompt {prompt!r} has no tokens at level {vocab.level!r}; give some text")
    generator = torch.Generator().manual_seed(seed)
    sample = task.generate(torch.tensor([ids]), num_tokens, temperature, generator)  # (1, N)
    return prompt + vocab.decode(sample[0].tolist())
