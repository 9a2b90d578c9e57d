"""``SequenceLossModule``: a loss over whole sequences (CTC), backpropagated window by window.

A sequence-level loss cannot be cut into per-window losses. Split mode only; one optimizer
step per batch, in three passes over windows of k1 steps, so that activation memory grows
with k1, not with T::

    1. no graph:   s0 -> [w0] -> s1 -> [w1] -> s2 -> [w2]      keep s_i and the outputs
    2. loss:       g = d loss / d outputs (whole sequences, outputs only)
    3. per window: recompute [w_i] from s_i with graph, backpropagate g_i into it

``backprop="truncated"`` starts every recomputed window from the detached s_i (the gradient
stops at window boundaries); ``backprop="exact"`` goes through the windows last to first and
carries d loss / d s_i back into the previous window, which is full BPTT with only one
window's activations alive. Dropout sees the same random numbers in pass 1 and pass 3 (each
window has its own seed).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, Literal

import torch
from pytorch_lightning.strategies import ParallelStrategy
from torch import Tensor
from torchmetrics import MeanMetric

from bptt.errors import ConfigError
from bptt.lightning_modules.tbptt.engine import State, TBPTTModule


class SequenceLossModule(TBPTTModule):
    """Base class of the tasks whose loss is over whole sequences.

    Args:
        backprop: ``truncated`` stops the gradient at window boundaries, ``exact`` carries it
            back through every window (full BPTT).
        **engine: the ``TBPTTModule`` arguments; ``k1`` is the window, there is no ``k2``.
    """

    def __init__(self, *, backprop: Literal["truncated", "exact"] = "truncated", **engine: Any) -> None:
        super().__init__(**engine)
        if engine.get("k2") is not None and engine.get("k2") != self.k1:
            raise ConfigError(
                f"task.k2={engine['k2']}: a sequence-level loss backpropagates window by window (task.k1) and has no "
                "k2; drop task.k2, or set task.backprop: exact for the full gradient"
            )
        self.backprop = backprop

    def window_outputs(self, window: dict[str, Tensor], state: State | None) -> tuple[Tensor, State]:
        """Run the network over one window.

        Returns:
            outputs (B, t', ...) (e.g. log-probabilities; t' may be t / subsampling) and the
            state after the window. Outputs of consecutive windows concatenate along dim 1.
        """
        raise NotImplementedError

    def sequence_losses(self, outputs: Tensor, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """The loss of every whole sequence.

        Args:
            outputs: (B, T', ...) the windows' outputs, concatenated.
            batch: the whole batch (lengths, targets, ...).

        Returns:
            per-sequence loss sums (B,) and the number of targets each counts (B,); a sequence
            left out of the loss has loss 0 and count 0.
        """
        raise NotImplementedError

    def sequence_outputs(self, batch: dict[str, Any]) -> Tensor:
        """The outputs (B, T', ...) of whole sequences, run window by window with the state carried."""
        pieces, state = [], None
        for window in self._windows(batch, self.k1):
            out, state = self.window_outputs(window, state)
            pieces.append(out)
        return torch.cat(pieces, dim=1)

    @contextmanager
    def _window_rng(self, seed: int) -> Iterator[None]:
        """The same random numbers (dropout) each time a window runs with this seed."""
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            yield

    # ---- training: the three passes -----------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if "reset" in batch:
            raise ConfigError(
                f"{type(self).__name__} has a loss over whole sequences and needs batches of whole sequences; "
                "its DataModule yields streams (stream mode): use one that yields sequences"
            )
        windows = self._windows(batch, self.k1)
        seeds = torch.randint(2**62, (len(windows),)).tolist()  # from the global generator: resumes exactly
        starts: list[State | None] = []  # the state where each window starts
        pieces, state = [], None
        with torch.no_grad():  # pass 1: the state where each window starts, and the outputs
            for window, seed in zip(windows, seeds):
                starts.append(state)
                with self._window_rng(seed):
                    out, state = self.window_outputs(window, state)
                pieces.append(out)
        outputs = torch.cat(pieces, dim=1).requires_grad_()  # (B, T', ...)
        with torch.enable_grad():  # pass 2: the loss over whole sequences, differentiated w.r.t. the outputs only
            losses, counts = self.sequence_losses(outputs, batch)  # (B,), (B,)
        loss_sum, count = losses.sum(), counts.to(torch.promote_types(losses.dtype, torch.float32)).sum()
        row_bad = ~torch.isfinite(losses.detach().float())  # (B,)
        totals = self._sum_over_ranks(loss_sum, count, row_bad)
        (grad,) = torch.autograd.grad(loss_sum * totals.loss_factor, outputs)  # (B, T', ...)
        self._backward_windows(windows, seeds, starts, grad.split([p.shape[1] for p in pieces], dim=1))
        self._optimizer_step(totals, row_bad, loss_sum.detach())
        self._log_train(totals.loss_sum, totals.count)

    def _backward_windows(self, windows: list[dict[str, Tensor]], seeds: list[int], starts: list[State | None],
                          grads: tuple[Tensor, ...]) -> None:
        """Pass 3: each window again, from its start state with graph, backpropagating its outputs'
        gradient ``grads[i]`` (B, t'_i, ...); in ``exact`` mode last to first, adding the gradient
        that flows into the state where the later window starts."""
        exact = self.backprop == "exact"
        scale = self._loss_scale(self.device)  # the state gradients carry the fp16 loss scale: take it off
        parallel = isinstance(self.trainer.strategy, ParallelStrategy)
        carried: State | None = None  # d loss / d (state where the later window starts), exact mode
        order = range(len(windows) - 1, -1, -1) if exact else range(len(windows))
        for n, i in enumerate(order):
            start = starts[i]
            if start is not None and exact:
                start = tuple(s.detach().requires_grad_() for s in start)
            with self._window_rng(seeds[i]):
                out, end = self.window_outputs(windows[i], start)
            surrogate = (out * grads[i]).sum()  # its gradient is the vector-Jacobian product with grads[i]
            if carried is not None:
                surrogate = surrogate + sum((e * c).sum() for e, c in zip(end, carried))
            last = n == len(windows) - 1
            with self.trainer.strategy.block_backward_sync() if parallel and not last else nullcontext():
                self.manual_backward(surrogate)  # DDP all-reduces the gradients once, after the last window
            if exact and start is not None:
                carried = tuple(s.grad / scale for s in start)

    # ---- evaluation ---------------------------------------------------------------------------
    def evaluate_batch(self, batch: dict[str, Any], metric: MeanMetric) -> Tensor:
        """Add a batch's loss to ``metric``, weighted by its target count.

        Returns:
            the outputs (B, T', ...) of the whole sequences, for decoding.
        """
        outputs = self.sequence_outputs(batch)
        losses, counts = self.sequence_losses(outputs, batch)
        if counts.sum() > 0:
            metric.update(losses.sum() / counts.sum(), weight=counts.sum())
        return outputs
