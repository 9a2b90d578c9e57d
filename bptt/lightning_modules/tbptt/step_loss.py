"""``StepLossModule``: TBPTT(k1, k2) for a loss per time step (language models, forecasters).

A batch is cut into windows of k1 new steps, one optimizer step each. With k1 < k2 the last
k2 - k1 steps of input stay as *history*, replayed without loss in front of the next new
steps from the detached state where the history starts::

    carried.start -> [ history (k2 - k1, no loss) | new (k1, loss) ] -> carried.end
                                 split ^ the next history: the last k2 - k1 steps of the window,
                                         carried.start of the next window: the state at the split

With k1 = k2 there is no history: each window starts from the detached state where the
previous one ended. In stream mode the ``CarriedState`` goes on into the next batch.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor
from torchmetrics import MeanMetric

from bptt.errors import ConfigError
from bptt.lightning_modules.tbptt.engine import CarriedState, State, StepTotals, TBPTTModule, detach, zero_rows


def _steps(window: dict[str, Tensor], start: int, end: int) -> dict[str, Tensor]:
    return {k: v[:, start:end] for k, v in window.items()}


class StepLossModule(TBPTTModule):
    """Base class of the tasks whose loss is a sum over time steps.

    Args:
        backprop: only ``truncated`` (kept so that every task takes the same config keys);
            full BPTT is ``k1: null``.
        **engine: the ``TBPTTModule`` arguments (optimizer, scheduler, k1/k2, clipping, ...).
    """

    def __init__(self, *, backprop: Literal["truncated", "exact"] = "truncated", **engine: Any) -> None:
        super().__init__(**engine)
        if backprop != "truncated":
            raise ConfigError(
                "task.backprop: exact applies to sequence-level losses (CTC); per-step losses reach full BPTT "
                "with task.k1: null"
            )
        self.backprop = backprop

    def window_step(self, window: dict[str, Tensor], state: State | None) -> tuple[Tensor, State]:
        """Run the network over one window.

        Args:
            window: the batch's time-indexed entries sliced to this window, each (B, t, ...).
            state: the state before the window, or None for zeros.

        Returns:
            per-step losses (B, t) and the state after the window.
        """
        raise NotImplementedError

    def steps_per_batch_vary(self) -> bool:
        return self.k1 is not None  # a batch longer than k1 takes several optimizer steps

    # ---- training -----------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        stream = "reset" in batch
        carried = self._continued(batch["reset"]) if stream else CarriedState()
        keep = 0 if self.k1 is None else self.k2 - self.k1  # steps of history each window leaves to the next
        loss_sum = count = torch.zeros((), device=self.device)
        for new in self._windows(batch, self.k1):
            carried, totals = self._train_window(new, carried, keep)
            loss_sum, count = loss_sum + totals.loss_sum, count + totals.count
        if stream:
            self.carried = carried
        self._log_train(loss_sum, count)

    def _continued(self, reset: Tensor) -> CarriedState:
        """The carried state with the streams where ``reset`` (B,) is true started again from zeros.

        Without history the start is the end, and zeroing rows needs no host wait. With history
        (k2 > k1) a restarted stream drops the history shared by all rows, a decision the host
        reads from the device once per batch that carries history.
        """
        carried = self.carried
        if carried.history is not None and not bool(reset.any()):
            return carried
        return CarriedState(start=zero_rows(carried.end, reset), end=carried.end)

    def _train_window(
        self, new: dict[str, Tensor], carried: CarriedState, keep: int
    ) -> tuple[CarriedState, StepTotals]:
        """One optimizer step on ``new`` steps, backpropagating through ``carried.history`` too.

        Args:
            new: the k1 (or fewer) new steps, each (B, t, ...).
            carried: where the window starts: ``start`` and ``history``.
            keep: how many steps of history the next window replays (k2 - k1).

        Returns:
            what the next window starts from, and this step's loss sum and target count over all ranks.
        """
        history = carried.history
        window = new if history is None else {k: torch.cat([history[k], new[k]], dim=1) for k in new}
        total = window[self.time_keys[0]].shape[1]
        replayed = total - new[self.time_keys[0]].shape[1]  # history steps in front of the new ones
        split = total - keep  # the next window's history starts here
        if split <= 0:  # no longer than the history to keep: all of it stays history, from the same start
            losses, end = self.window_step(window, carried.start)  # (B, total)
            next_start, next_history = carried.start, window
        elif split == total:  # k1 = k2: no history
            losses, end = self.window_step(window, carried.start)  # (B, total)
            next_start, next_history = None, None
        else:
            before, at_split = self.window_step(_steps(window, 0, split), carried.start)  # (B, split)
            after, end = self.window_step(_steps(window, split, total), at_split)  # (B, keep)
            losses = torch.cat([before, after], dim=1)  # (B, total)
            next_start, next_history = detach(at_split), _steps(window, split, total)
        end = detach(end)

        step_losses = losses[:, replayed:]  # (B, t): the new steps only
        mask = new.get("mask")
        if mask is not None:
            step_losses = step_losses * mask
        # device tensors, like everything until the one read in _optimizer_step: no waiting on the GPU
        exact = torch.promote_types(step_losses.dtype, torch.float32)  # counts stay exact integers
        count = mask.to(exact).sum() if mask is not None else step_losses.new_full((), step_losses.numel(), dtype=exact)
        loss_sum = step_losses.sum()
        row_bad = ~torch.isfinite(step_losses.detach().float().sum(dim=1))  # (B,)
        for s in end or ():
            row_bad |= ~torch.isfinite(s.float().flatten(1)).all(dim=1)

        totals = self._sum_over_ranks(loss_sum, count, row_bad)
        self.manual_backward(loss_sum * totals.loss_factor)
        taken = self._optimizer_step(totals, row_bad, loss_sum)
        if taken is False:
            end = zero_rows(end, row_bad)  # no update; streams that went non-finite start again from zeros
            return CarriedState(start=end, end=end), totals
        if taken is None:  # the device decided: streams that went non-finite start again from zeros either way
            end, next_start = zero_rows(end, row_bad), zero_rows(next_start, row_bad)
        return CarriedState(start=end if split == total else next_start, history=next_history, end=end), totals

    # ---- evaluation ---------------------------------------------------------------------------
    def evaluate_batch(self, batch: dict[str, Any], metric: MeanMetric) -> None:
        """Add a batch's loss to ``metric``, weighted by its target count, with the state carried
        across windows of k2 steps (and across batches in stream mode)."""
        stream = "reset" in batch
        state = zero_rows(self.eval_state, batch["reset"]) if stream else None
        for window in self._windows(batch, self.k2):
            losses, state = self.window_step(window, state)  # (B, t)
            mask = window.get("mask")
            if mask is not None:  # as in training: only the marked steps count
                losses = losses * mask
            count = mask.sum() if mask is not None else torch.tensor(losses.numel(), device=self.device)
            if count > 0:
                metric.update(losses.sum() / count, weight=count)
        if stream:
            self.eval_state = state
