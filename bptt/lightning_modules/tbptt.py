"""The TBPTT engine: truncated backpropagation through time as a LightningModule base class.

A task subclasses ``TBPTTModule`` and supplies ``window_step(window, state) ->
(losses, new_state)``; everything about truncation lives here: windows, detaching,
optimizer steps, clipping, the non-finite guard, schedulers and the loss metrics.

TBPTT(k1, k2) (Williams & Peng 1990): every k1 new time steps, one optimizer step
whose loss is over those k1 steps and whose gradient flows back k2 steps. With
k1 < k2 the engine keeps the last k2 - k1 steps of input as *history* and the
detached state where that history starts, and replays the history in front of the
new steps::

    time ->        |<---------------- k2 ---------------->|
                   |<-- history (k2-k1) -->|<---- k1 ---->|
    state (detached)^      no loss          loss over these
                                           ^ the next history starts k1 steps later

With k1 = k2 (the common case) there is no history: each window starts from the
detached state where the previous one ended.

Batches come in two layouts, told apart by a ``reset`` key:

- *stream mode* (``reset`` present, shape (B,)): the batch is the next window of B
  persistent streams; state (and history) carry over from the previous batch, and
  rows where ``reset`` is true start again from zeros.
- *split mode* (no ``reset``): the batch holds whole sequences (B, T); every batch
  starts from zeros and the engine cuts it into windows itself.

Time-indexed entries of a batch (``time_keys``) are (B, T, ...); an optional ``mask``
(B, T) marks valid steps. A recurrent state is a tuple of batch-first tensors.

*Sequence-level losses* (``loss_per = "sequence"``, e.g. CTC) are defined over a whole
sequence and cannot be cut into per-window losses. Split mode only; the engine runs
three passes over windows of k1 steps, so that activation memory grows with k1, not
with T::

    1. no graph:   s0 -> [w0] -> s1 -> [w1] -> s2 -> [w2]      keep s_i and the outputs
    2. loss:       g = d loss / d outputs (whole sequence, outputs only)
    3. per window: recompute [w_i] from s_i with graph, backpropagate g_i into it

``backprop="truncated"`` starts every recomputed window from the detached s_i (the
gradient stops at window boundaries); ``backprop="exact"`` goes through the windows
last to first and carries d loss / d s_i back into the previous window, which is full
BPTT with only one window's activations alive. Dropout sees the same random numbers in
pass 1 and pass 3 (each window has its own seed).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from pytorch_lightning.strategies import ParallelStrategy
from torch import Tensor
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torchmetrics import MeanMetric

from bptt.errors import BpttError, ConfigError

State = tuple[Tensor, ...]

# Metric names, defined once: the checkpoint monitor, the Tune metric and MLflow use these.
TRAIN_LOSS, VAL_LOSS, TEST_LOSS = "train/loss", "val/loss", "test/loss"


class NonFiniteLossError(BpttError, RuntimeError):
    """Too many consecutive optimizer steps had a non-finite loss or gradient."""


def _detach(state: State | None) -> State | None:
    return None if state is None else tuple(s.detach() for s in state)


def _zero_rows(state: State | None, rows: Tensor) -> State | None:
    """``state`` with the rows where ``rows`` (B,) is true set to zeros."""
    if state is None or not bool(rows.any()):
        return state
    return tuple(torch.where(rows.to(s.device).view(-1, *([1] * (s.dim() - 1))), torch.zeros_like(s), s) for s in state)


class TBPTTModule(pl.LightningModule):
    """Base class of every task: manual optimization over truncated windows.

    Args:
        optimizer: builds the optimizer from the parameters (``class_path`` + ``init_args``
            of a ``torch.optim.Optimizer``).
        lr_scheduler: optional; builds an LR scheduler from the optimizer.
            ``ReduceLROnPlateau`` steps on ``val/loss`` after every validation.
        lr_scheduler_interval: step other schedulers every optimizer ``step`` or every ``epoch``.
        k1: new time steps per optimizer step; None: one step per batch (stream mode)
            or per whole sequence (split mode).
        k2: time steps the gradient flows back, k2 >= k1; None: k2 = k1.
        grad_clip: clip gradients at this norm or value; None: no clipping.
        grad_clip_algorithm: ``norm`` (global 2-norm) or ``value``.
        max_consecutive_nonfinite: stop training with an error after this many
            consecutive steps skipped for a NaN/Inf loss or gradient.
        backprop: for sequence-level losses: ``truncated`` stops the gradient at window
            boundaries, ``exact`` carries it back through every window (full BPTT).
    """

    time_keys: tuple[str, ...] = ("inputs", "targets", "mask")
    loss_per: Literal["step", "sequence"] = "step"  # a task with a loss over whole sequences sets "sequence"

    def __init__(
        self,
        *,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["step", "epoch"] = "step",
        k1: int | None = None,
        k2: int | None = None,
        grad_clip: float | None = None,
        grad_clip_algorithm: Literal["norm", "value"] = "norm",
        max_consecutive_nonfinite: int = 10,
        backprop: Literal["truncated", "exact"] = "truncated",
    ) -> None:
        super().__init__()
        if k2 is not None and k1 is None:
            raise ConfigError(f"task.k2={k2} needs task.k1 (the steps between optimizer steps); set task.k1 <= {k2}")
        if k1 is not None and k1 < 1:
            raise ConfigError(f"task.k1 must be >= 1, got {k1}")
        if k1 is not None and k2 is not None and k1 > k2:
            raise ConfigError(
                f"task.k1={k1} > task.k2={k2}: the gradient must flow back at least as many steps as each "
                "optimizer step adds (TBPTT(k1, k2) needs k1 <= k2); lower k1 or raise k2"
            )
        if grad_clip is not None and grad_clip <= 0:
            raise ConfigError(f"task.grad_clip must be > 0 or null, got {grad_clip}")
        if self.loss_per == "step" and backprop != "truncated":
            raise ConfigError(
                "task.backprop: exact applies to sequence-level losses (CTC); per-step losses reach full BPTT "
                "with task.k1: null"
            )
        if self.loss_per == "sequence" and k2 is not None and k2 != k1:
            raise ConfigError(
                f"task.k2={k2}: a sequence-level loss backpropagates window by window (task.k1) and has no k2; "
                "drop task.k2, or set task.backprop: exact for the full gradient"
            )
        self.automatic_optimization = False
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.lr_scheduler_interval = lr_scheduler_interval
        self.k1 = k1
        self.k2 = k2 if k2 is not None else k1
        self.grad_clip = grad_clip
        self.grad_clip_algorithm = grad_clip_algorithm
        self.max_consecutive_nonfinite = max_consecutive_nonfinite
        self.backprop = backprop
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        # carried across batches in stream mode: the state where the history starts, the history,
        # and the state after the last step
        self.train_state: State | None = None
        self.history: dict[str, Tensor] | None = None
        self.end_state: State | None = None
        self.eval_state: State | None = None
        self._restored_streams: dict[str, Any] | None = None  # from a checkpoint, until on_train_start
        # counters behind the logged fractions
        self.steps_taken = 0
        self.steps_clipped = 0
        self.steps_skipped = 0
        self.consecutive_skipped = 0
        self._clip_now, self._grad_norm = False, 0.0
        self._grad_norm_on_device: Tensor | None = None  # the same, for clipping without a host-to-device copy
        self._last_log_time: float | None = None
        self._tokens_since_log = 0.0

    # ---- what a task supplies -------------------------------------------------------------
    def window_step(self, window: dict[str, Tensor], state: State | None) -> tuple[Tensor, State]:
        """Run the network over one window.

        Args:
            window: the batch's time-indexed entries sliced to this window, each (B, t, ...).
            state: the state before the window, or None for zeros.

        Returns:
            per-step losses (B, t) (zero where ``mask`` is false) and the state after the window.
        """
        raise NotImplementedError

    def window_outputs(self, window: dict[str, Tensor], state: State | None) -> tuple[Tensor, State]:
        """For ``loss_per = "sequence"``: run the network over one window.

        Returns:
            outputs (B, t', ...) (e.g. log-probabilities; t' may be t / subsampling) and the
            state after the window. Outputs of consecutive windows concatenate along dim 1.
        """
        raise NotImplementedError

    def sequence_losses(self, outputs: Tensor, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """For ``loss_per = "sequence"``: the loss of every whole sequence.

        Args:
            outputs: (B, T', ...) the windows' outputs, concatenated.
            batch: the whole batch (lengths, targets, ...).

        Returns:
            per-sequence loss sums (B,) and the number of targets each counts (B,); a sequence
            left out of the loss has loss 0 and count 0.
        """
        raise NotImplementedError

    def derived_metrics(self, split: str, loss: Tensor) -> dict[str, Tensor]:
        """Metrics computed from a split's mean loss (e.g. perplexity); logged beside ``{split}/loss``."""
        return {}

    # ---- optimizers -----------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.lr_scheduler_interval}}

    def _scheduler(self) -> Any:
        schedulers = self.lr_schedulers()
        return schedulers[0] if isinstance(schedulers, list) else schedulers

    # ---- training -------------------------------------------------------------------------
    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Everything to the device but ``reset``: the engine branches on it in Python, and a
        device tensor there would make the host wait for the GPU at every batch."""
        if not (isinstance(batch, dict) and "reset" in batch):
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        rest = {k: v for k, v in batch.items() if k != "reset"}
        return {**super().transfer_batch_to_device(rest, device, dataloader_idx), "reset": batch["reset"]}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if self.loss_per == "sequence":
            self._train_sequences(batch)
            return
        length = batch[self.time_keys[0]].shape[1]
        k1 = self.k1 or length
        k2 = self.k2 or k1
        stream = "reset" in batch
        state, history, end_state = None, None, None
        if stream:
            state, history, end_state = self.train_state, self.history, self.end_state
            if bool(batch["reset"].any()):  # restarted streams: drop the shared history, zero their rows
                state, history = _zero_rows(end_state, batch["reset"]), None
        total_loss = total_count = torch.zeros((), device=self.device)
        for start in range(0, length, k1):
            new = self._slice(batch, start, min(start + k1, length))
            state, history, end_state, loss_sum, count = self._train_window(new, state, history, k2 - k1)
            total_loss, total_count = total_loss + loss_sum, total_count + count
        if stream:
            self.train_state, self.history, self.end_state = state, history, end_state
        self._log_train(total_loss, total_count)

    def _slice(self, batch: dict[str, Any], start: int, end: int) -> dict[str, Tensor]:
        return {k: batch[k][:, start:end] for k in self.time_keys if k in batch}

    def _train_window(
        self, new: dict[str, Tensor], state: State | None, history: dict[str, Tensor] | None, keep: int
    ) -> tuple[State | None, dict[str, Tensor] | None, State | None, Tensor, Tensor]:
        """One optimizer step on ``new`` steps, backpropagating through ``history`` too.

        Args:
            new: the k1 (or fewer) new steps.
            state: detached state where ``history`` starts (where ``new`` starts if no history).
            history: earlier steps replayed without loss, or None.
            keep: how many steps of history the next window replays (k2 - k1).

        Returns:
            the next window's (state, history), the detached state after ``new``, and this
            window's (loss sum, target count) over all ranks.
        """
        window = new if history is None else {k: torch.cat([history[k], new[k]], dim=1) for k in new}
        total = window["targets"].shape[1]
        replay = total - new["targets"].shape[1]
        split_at = total - keep  # the next history starts here
        if split_at <= 0:  # not enough steps yet to drop any history
            pieces, next_history = [(0, total)], window
        else:
            pieces = [(0, split_at), (split_at, total)] if split_at < total else [(0, total)]
            next_history = {k: v[:, split_at:] for k, v in window.items()} if keep > 0 else None
        losses, next_state, end_state = [], state, state
        for a, b in pieces:
            piece_losses, end_state = self.window_step({k: v[:, a:b] for k, v in window.items()}, end_state)
            losses.append(piece_losses)
            if b == split_at:
                next_state = _detach(end_state)
        end_state = _detach(end_state)
        if split_at >= total:
            next_state = end_state
        step_losses = torch.cat(losses, dim=1)[:, replay:]  # (B, t) losses of the new steps only
        mask = new.get("mask")
        if mask is not None:
            step_losses = step_losses * mask
        # a device tensor, like everything below until the one read in _optimizer_step: no waiting on the GPU
        exact = torch.promote_types(step_losses.dtype, torch.float32)  # counts stay exact integers
        count = mask.to(exact).sum() if mask is not None else step_losses.new_full((), step_losses.numel(), dtype=exact)
        loss_sum = step_losses.sum()
        row_bad = ~torch.isfinite(step_losses.detach().float().sum(dim=1))
        for s in end_state or ():
            row_bad |= ~torch.isfinite(s.float().flatten(1)).all(dim=1)

        def backward(scale: Tensor) -> None:
            self.manual_backward(loss_sum * scale)

        taken, global_loss, global_count = self._optimizer_step(backward, row_bad, loss_sum, count)
        if not taken:
            # no update; streams whose loss or state went non-finite start again from zeros
            end_state = _zero_rows(end_state, row_bad)
            next_state, next_history = end_state, None
        return next_state, next_history, end_state, global_loss, global_count

    def _optimizer_step(
        self, backward: Callable[[Tensor], None], row_bad: Tensor, loss_sum: Tensor, count: Tensor
    ) -> tuple[bool, Tensor, Tensor]:
        """One optimizer step over this rank's ``count`` targets, unless a rank saw a non-finite value.

        The host waits for the device once: after the backward pass, for the gradient norm and
        whether any rank's loss was non-finite (the backward pass runs either way; a skipped step
        discards its gradients), so a GPU is never idle while Python decides. Under DDP one
        all-reduce sums (loss sum, target count, non-finite flag) over the ranks before the
        backward pass: the count sets the step size, the sums are what the logs report.

        Args:
            backward: backpropagates the loss sum times the given factor (a device scalar).
            row_bad: (B,) rows whose loss (or state) is not finite.
            loss_sum: this rank's loss sum, for the error message.
            count: this rank's number of targets in the loss (a device scalar).

        Returns:
            whether the step was taken (False when skipped for a non-finite loss on some rank),
            and the loss sum and target count over all ranks (device scalars).
        """
        world = self.trainer.world_size
        totals = torch.stack([loss_sum.detach().to(count.dtype), count, row_bad.any().to(count.dtype)])  # (3,)
        if world > 1:
            # enqueued on the device like any kernel; strategy.reduce would add a barrier, a host wait under NCCL
            torch.distributed.all_reduce(totals)
        global_loss, global_count, bad = totals.unbind()
        opt = self.optimizers()
        # DDP averages gradients over ranks; scaling by world / global count makes that the mean over all targets.
        backward(world / global_count.clamp(min=1.0))
        norm, largest, bad = self._gradient_size(bad)
        if bad > 0:
            here = bool(row_bad.any())
            self._skip_step(opt, f"loss is {loss_sum.item()}" if here else "a non-finite loss on another rank")
            return False, global_loss, global_count
        if not (math.isfinite(norm) and math.isfinite(largest)):
            if self._scaler() is not None:  # fp16 overflow: the scaler skips the step and lowers its scale
                self._clip_now = False
                opt.step()
                opt.zero_grad(set_to_none=True)
                self.steps_skipped += 1
            else:
                self._skip_step(opt, f"gradient norm is {norm}")
            return True, global_loss, global_count
        self.consecutive_skipped = 0
        self._grad_norm = norm
        self._clip_now = self.grad_clip is not None and (
            (norm if self.grad_clip_algorithm == "norm" else largest) > self.grad_clip
        )
        self.steps_clipped += int(self._clip_now)
        opt.step()  # clipping happens in on_before_optimizer_step, after mixed precision unscaled the gradients
        opt.zero_grad(set_to_none=True)
        self.steps_taken += 1
        if self.lr_scheduler_factory is not None and self.lr_scheduler_interval == "step":
            scheduler = self._scheduler()
            if not isinstance(scheduler, ReduceLROnPlateau):
                scheduler.step()
        return True, global_loss, global_count

    # ---- sequence-level losses: three passes over the windows (see the module docstring) ----
    def _windows(self, batch: dict[str, Any]) -> list[dict[str, Tensor]]:
        length = batch[self.time_keys[0]].shape[1]
        size = self.k1 or length
        return [self._slice(batch, start, min(start + size, length)) for start in range(0, length, size)]

    @contextmanager
    def _window_rng(self, seed: int) -> Iterator[None]:
        """The same random numbers (dropout) each time a window runs with this seed."""
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            yield

    def sequence_outputs(self, batch: dict[str, Any]) -> Tensor:
        """The outputs (B, T', ...) of whole sequences, run window by window with the state carried."""
        pieces, state = [], None
        for window in self._windows(batch):
            out, state = self.window_outputs(window, state)
            pieces.append(out)
        return torch.cat(pieces, dim=1)

    def _train_sequences(self, batch: dict[str, Any]) -> None:
        if "reset" in batch:
            raise ConfigError(
                f"{type(self).__name__} has a loss over whole sequences and needs batches of whole sequences; "
                "its DataModule yields streams (stream mode): use one that yields sequences"
            )
        windows = self._windows(batch)
        seeds = torch.randint(2**62, (len(windows),)).tolist()  # from the global generator: resumes exactly
        starts: list[State | None] = []
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
        row_bad = ~torch.isfinite(losses.detach().float())
        sizes = [p.shape[1] for p in pieces]

        def backward(scale: Tensor) -> None:  # pass 3: each window again, with graph
            (grad,) = torch.autograd.grad(loss_sum * scale, outputs)
            grads = grad.split(sizes, dim=1)
            carried: State | None = None  # d loss / d (state where the later window starts), exact mode
            order = range(len(windows) - 1, -1, -1) if self.backprop == "exact" else range(len(windows))
            for n, i in enumerate(order):
                start = starts[i]
                if start is not None and self.backprop == "exact":
                    start = tuple(s.detach().requires_grad_() for s in start)
                with self._window_rng(seeds[i]):
                    out, end = self.window_outputs(windows[i], start)
                surrogate = (out * grads[i]).sum()  # its gradient is the vector-Jacobian product with grads[i]
                if carried is not None:
                    surrogate = surrogate + sum((e * c).sum() for e, c in zip(end, carried))
                last = n == len(windows) - 1
                parallel = isinstance(self.trainer.strategy, ParallelStrategy)
                with self.trainer.strategy.block_backward_sync() if parallel and not last else nullcontext():
                    self.manual_backward(surrogate)  # DDP all-reduces the gradients once, after the last window
                if self.backprop == "exact" and start is not None:
                    unscale = self._scaler().get_scale() if self._scaler() is not None else 1.0
                    carried = tuple(s.grad / unscale for s in start)

        _, global_loss, global_count = self._optimizer_step(backward, row_bad, loss_sum.detach(), count)
        self._log_train(global_loss, global_count)

    def _scaler(self) -> Any:
        return getattr(self.trainer.precision_plugin, "scaler", None)

    def _gradient_size(self, bad: Tensor) -> tuple[float, float, float]:
        """(global 2-norm, largest absolute value) of the gradients, unscaled, and ``bad``, read
        from the device at once; the 2-norm is NaN or Inf when any gradient is, and the largest
        value is only computed for value clipping."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        zero = torch.zeros((), device=bad.device)
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0).to(bad.device) if grads else zero
        largest = zero
        if grads and self.grad_clip is not None and self.grad_clip_algorithm == "value":
            largest = torch.nn.utils.get_total_norm(grads, norm_type=math.inf).to(bad.device)
        scaler = self._scaler()  # its scale as a tensor: get_scale() would wait for the device on its own
        scale = scaler._get_scale_async() if scaler is not None and scaler.is_enabled() else torch.ones_like(zero)
        dtype = torch.promote_types(norm.dtype, torch.float32)  # float64 runs clip in float64
        values = torch.stack([v.to(bad.device, dtype) for v in (norm, largest, bad, scale)])
        self._grad_norm_on_device = values[0] / values[3]
        norm, largest, bad, scale = values.tolist()
        return norm / scale, largest / scale, bad

    def _skip_step(self, opt: Any, reason: str) -> None:
        opt.zero_grad(set_to_none=True)
        self.steps_skipped += 1
        self.consecutive_skipped += 1
        if self.consecutive_skipped >= self.max_consecutive_nonfinite:
            raise NonFiniteLossError(
                f"{self.consecutive_skipped} consecutive steps skipped for non-finite values (last: {reason}); "
                "lower the learning rate, set task.grad_clip, or use precision 32"
            )

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        """Clip here: Lightning calls this after mixed precision unscaled the gradients."""
        if not self._clip_now:  # only steps over the limit: clipping the others would multiply by 1
            return
        if self.grad_clip_algorithm == "value":
            self.clip_gradients(optimizer, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="value")
        else:  # Lightning's norm clipping would compute the norm a second time (2% of a word-LM step)
            params = [p for p in self.parameters() if p.grad is not None]
            torch.nn.utils.clip_grads_with_norm_(params, self.grad_clip, self._grad_norm_on_device)

    def _log_train(self, loss_sum: Tensor, count: Tensor) -> None:
        """Log a batch's training metrics from its loss sum and target count over all ranks (device
        scalars): every rank logs the same, global values. The gradient norm and the clip and skip
        counters are global already: DDP averaged the gradients before the engine read their norm."""
        loss = loss_sum / count.clamp(min=1.0)
        self.log(TRAIN_LOSS, loss, on_step=True, on_epoch=False, prog_bar=True)  # the progress bar shows it
        self._tokens_since_log += count
        # Lightning keeps step values only every trainer.log_every_n_steps; a self.log costs ~1 ms
        if not self.trainer._logger_connector.should_update_logs:
            return
        now = time.perf_counter()
        if self._last_log_time is not None:
            self.log("train/tokens_per_sec", self._tokens_since_log / max(now - self._last_log_time, 1e-9),
                     on_step=True, on_epoch=False)
        self._last_log_time, self._tokens_since_log = now, 0.0
        for name, value in self.derived_metrics("train", loss).items():
            self.log(name, value, on_step=True, on_epoch=False)
        attempted = max(self.steps_taken + self.steps_skipped, 1)
        self.log("train/grad_norm", self._grad_norm, on_step=True, on_epoch=False)
        self.log("train/clip_fraction", self.steps_clipped / attempted, on_step=True, on_epoch=False)
        self.log("train/skipped_steps", float(self.steps_skipped), on_step=True, on_epoch=False)

    def on_train_epoch_end(self) -> None:
        if self.lr_scheduler_factory is not None and self.lr_scheduler_interval == "epoch":
            scheduler = self._scheduler()
            if not isinstance(scheduler, ReduceLROnPlateau):
                scheduler.step()

    # ---- checkpoints: carried state keyed by global stream index ---------------------------
    def _gather_rows(self, tensor: Tensor) -> Tensor:
        """(B_local, ...) on every rank -> (B_global, ...) in global stream order, on the CPU."""
        if self.trainer.world_size == 1:
            return tensor.detach().cpu()
        return self.all_gather(tensor.detach()).flatten(0, 1).cpu()  # (W, B_local, ...) -> (B_global, ...)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        def gather(state: State | None) -> list[Tensor] | None:
            return None if state is None else [self._gather_rows(s) for s in state]

        checkpoint["tbptt"] = {
            "train_state": gather(self.train_state),
            "end_state": gather(self.end_state),
            "history": None if self.history is None else {k: self._gather_rows(v) for k, v in self.history.items()},
            "counters": [self.steps_taken, self.steps_clipped, self.steps_skipped, self.consecutive_skipped],
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._restored_streams = checkpoint.get("tbptt")
        if self._restored_streams is not None:
            self.steps_taken, self.steps_clipped, self.steps_skipped, self.consecutive_skipped = (
                self._restored_streams["counters"]
            )

    def on_train_start(self) -> None:
        """Start the throughput clock; after a resume, take this rank's rows of the saved streams
        (the world size may differ)."""
        self._last_log_time, self._tokens_since_log = time.perf_counter(), 0.0
        saved, self._restored_streams = self._restored_streams, None
        if saved is None:
            return
        rank, world = self.trainer.global_rank, self.trainer.world_size

        def mine(tensor: Tensor) -> Tensor:
            per_rank = tensor.shape[0] // world
            return tensor[rank * per_rank : (rank + 1) * per_rank].to(self.device)

        def shard(state: list[Tensor] | None) -> State | None:
            return None if state is None else tuple(mine(s) for s in state)

        self.train_state, self.end_state = shard(saved["train_state"]), shard(saved["end_state"])
        self.history = None if saved["history"] is None else {k: mine(v) for k, v in saved["history"].items()}

    # ---- evaluation -----------------------------------------------------------------------
    def evaluate_batch(self, batch: dict[str, Any], metric: MeanMetric) -> Tensor | None:
        """Add a batch's loss to ``metric``, weighted by its target count, with state carried
        across windows (and across batches in stream mode).

        Returns:
            for sequence-level losses the outputs (B, T', ...) of the whole sequences (for
            decoding), else None.
        """
        if self.loss_per == "sequence":
            outputs = self.sequence_outputs(batch)
            losses, counts = self.sequence_losses(outputs, batch)
            if counts.sum() > 0:
                metric.update(losses.sum() / counts.sum(), weight=counts.sum())
            return outputs
        length = batch[self.time_keys[0]].shape[1]
        stream = "reset" in batch
        state = _zero_rows(self.eval_state, batch["reset"]) if stream else None
        size = self.k2 or length
        for start in range(0, length, size):
            window = self._slice(batch, start, min(start + size, length))
            losses, state = self.window_step(window, state)
            mask = window.get("mask")
            if mask is not None:  # as in training: only the marked steps count
                losses = losses * mask
            count = mask.sum() if mask is not None else torch.tensor(losses.numel(), device=self.device)
            if count > 0:
                metric.update(losses.sum() / count, weight=count)
        if stream:
            self.eval_state = state
        return None

    def on_validation_epoch_start(self) -> None:
        self.eval_state = None

    def on_test_epoch_start(self) -> None:
        self.eval_state = None

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.evaluate_batch(batch, self.val_loss)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.evaluate_batch(batch, self.test_loss)

    def _log_eval(self, split: str, metric: MeanMetric) -> Tensor:
        loss = metric.compute()  # weighted by target counts, reduced over ranks
        metric.reset()
        self.log(f"{split}/loss", loss, prog_bar=True)
        for name, value in self.derived_metrics(split, loss).items():
            self.log(name, value)
        return loss

    def on_validation_epoch_end(self) -> None:
        loss = self._log_eval("val", self.val_loss)
        if self.lr_scheduler_factory is not None and not self.trainer.sanity_checking:
            scheduler = self._scheduler()
            if isinstance(scheduler, ReduceLROnPlateau):
                scheduler.step(loss)

    def on_test_epoch_end(self) -> None:
        self._log_eval("test", self.test_loss)
