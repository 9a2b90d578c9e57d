"""``bptt generate``: text sampled from a language-model checkpoint."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from bptt.errors import CheckpointError, ConfigError
from bptt.lightning_modules.language_model import LanguageModelTask
from bptt.training.restore import restore


def generate(
    checkpoint_path: str | Path, *, prompt: str, num_tokens: int, temperature: float, seed: int, trusted: bool = False
) -> str:
    """Sample text from a language-model checkpoint.

    Returns:
        ``prompt`` followed by ``num_tokens`` sampled tokens, decoded.
    """
    if num_tokens < 1 or not (math.isfinite(temperature) and temperature >= 0):
        raise ConfigError(f"need --num-tokens >= 1 and a finite --temperature >= 0, got {num_tokens} and {temperature}")
    _, init, checkpoint = restore(checkpoint_path, [], trusted)
    task = init.task
    if not isinstance(task, LanguageModelTask):
        raise CheckpointError(f"{checkpoint_path} is a {type(task).__name__} checkpoint; "
                              "generate needs a language model")
    task.load_state_dict(checkpoint["state_dict"])
    task.eval()
    vocab = init.data.vocab
    ids = vocab.encode(prompt or "\n")
    if not ids:
        raise ConfigError(f"the prompt {prompt!r} has no tokens at level {vocab.level!r}; give some text")
    generator = torch.Generator().manual_seed(seed)
    sample = task.generate(torch.tensor([ids]), num_tokens, temperature, generator)  # (1, N)
    return prompt + vocab.decode(sample[0].tolist())
