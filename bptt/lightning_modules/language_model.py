"""``LanguageModelTask``: next-token prediction with an RNN language model on the TBPTT engine."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bptt.errors import ConfigError
from bptt.lightning_modules.tbptt import State, StepLossModule
from bptt.metric_names import BPC, PPL, metric


class LanguageModelTask(StepLossModule):
    """Cross-entropy next-token loss; reports perplexity (words) or bits per character.

    Args:
        model: the network, ``(tokens (B, T), state) -> (logits (B, T, V), state)``,
            e.g. ``bptt.models.RNNLanguageModel``.
        report: ``ppl`` logs ``{split}/ppl`` = exp(loss); ``bpc`` logs ``{split}/bpc`` = loss / ln 2.
        **engine: the ``StepLossModule`` arguments (optimizer, scheduler, k1/k2, clipping, ...).
    """

    def __init__(self, *, model: nn.Module, report: str = "ppl", **engine: Any) -> None:
        super().__init__(**engine)
        if report not in ("ppl", "bpc"):
            raise ConfigError(f"task.report must be 'ppl' or 'bpc', got {report!r}")
        self.model = model
        self.report = report

    def window_step(self, window: dict[str, Tensor], state: State | None) -> tuple[Tensor, State]:
        """Args: window with ``inputs`` and ``targets`` (B, t). Returns: losses (B, t), new state."""
        logits, state = self.model(window["inputs"], state)  # (B, t, V)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # the softmax in >= fp32
        # over the contiguous last dim: a (B, V, t) transposed softmax is several times slower
        losses = F.cross_entropy(logits.flatten(0, 1), window["targets"].flatten(), reduction="none")  # (B * t,)
        return losses.view_as(window["targets"]), state  # (B, t)

    def derived_metrics(self, split: str, loss: Tensor) -> dict[str, Tensor]:
        if self.report == "bpc":
            return {metric(split, BPC): loss / math.log(2)}
        return {metric(split, PPL): torch.exp(loss)}

    def serving_model(self) -> tuple[nn.Module, Tensor]:
        """The network as ``mlflow.pytorch.log_model`` stores it: tokens (B, T) -> logits (B, T, V)
        from a zero state, and a (2, 8) example input to trace it with."""
        return _NextTokenLogits(self.model).cpu().eval(), torch.zeros(2, 8, dtype=torch.long)  # B, T > 1: dynamic

    @torch.no_grad()
    def generate(
        self, prompt: Tensor, num_tokens: int, temperature: float = 1.0, generator: torch.Generator | None = None
    ) -> Tensor:
        """Sample a continuation.

        Args:
            prompt: (B, P) token ids, P >= 1.
            num_tokens: N tokens to sample after the prompt.
            temperature: softmax temperature; 0 picks the most likely token.
            generator: random generator for reproducible samples.

        Returns:
            (B, N) sampled token ids.
        """
        logits, state = self.model(prompt, None)  # (B, P, V)
        out = []
        for _ in range(num_tokens):
            last = logits[:, -1].float()  # (B, V)
            if temperature == 0:
                token = last.argmax(dim=-1, keepdim=True)  # (B, 1)
            else:
                token = torch.multinomial(torch.softmax(last / temperature, dim=-1), 1, generator=generator)  # (B, 1)
            out.append(token)
            logits, state = self.model(token, state)  # (B, 1, V)
        return torch.cat(out, dim=1)  # (B, N)


class _NextTokenLogits(nn.Module):
    """``model`` without the state: tokens (B, T) -> logits (B, T, V)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor) -> Tensor:
        return self.model(tokens)[0]
