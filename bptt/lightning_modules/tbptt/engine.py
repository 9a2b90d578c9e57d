"""``TBPTTModule``: what every task shares, whatever its loss: the optimizer step with its one
all-reduce and at most one host wait, the non-finite guard, clipping, schedulers, the logged
metrics, and the carried state with its checkpoint format.

One optimizer step, as ``StepLossModule`` and ``SequenceLossModule`` run it::

    forward (the subclass)  ->  totals = _sum_over_ranks(...)        one all-reduce, on the device
                            ->  backward of loss * totals.loss_factor  (the subclass)
                            ->  _optimizer_step(totals, ...)          skip, clip, step

``task.host_reads`` says where ``_optimizer_step`` decides: ``every_step``, the host reads the
gradient norm and the non-finite flag (one wait for the device per step); ``logging_steps``, the
device decides (a fused optimizer skips a non-finite step by itself) and keeps the counters, which
the host reads only on the steps that log (``trainer.log_every_n_steps``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torchmetrics import MeanMetric

from bptt import private_api
from bptt.datamodules.sharding import shard
from bptt.errors import BpttError, ConfigError
from bptt.metric_names import (
    CLIP_FRACTION,
    GRAD_NORM,
    SKIPPED_STEPS,
    TEST,
    TOKENS_PER_SEC,
    TRAIN,
    TRAIN_LOSS,
    VAL,
    metric,
)
from bptt.models.cores import State
from bptt.progress_bar import RedrawClock


class NonFiniteLossError(BpttError, RuntimeError):
    """Too many consecutive optimizer steps had a non-finite loss or gradient."""


def detach(state: State | None) -> State | None:
    return None if state is None else tuple(s.detach() for s in state)


def zero_rows(state: State | None, rows: Tensor) -> State | None:
    """``state`` with the rows where ``rows`` (B,) is true set to zeros, on the device: no host wait."""
    if state is None:
        return None
    return tuple(torch.where(rows.to(s.device).view(-1, *([1] * (s.dim() - 1))), torch.zeros_like(s), s) for s in state)


def _check_device_skip(optimizer: Any) -> None:
    """Raises ConfigError: ``task.host_reads: logging_steps`` with an optimizer that cannot skip on the device."""
    if not private_api.supports_device_skip(optimizer):
        raise ConfigError(
            "task.host_reads=logging_steps skips non-finite steps on the device, which needs an optimizer that takes "
            "a skip flag (torch.optim.Adam, AdamW or SGD with fused: true); set task.optimizer.init_args.fused: true, "
            "or task.host_reads: every_step"
        )


@dataclass
class CarriedState:
    """What stream mode carries from one batch to the next; every tensor is (B, ...), detached.

    Attributes:
        start: the state where ``history`` starts (where the next new steps start when there is
            no history); None: zeros.
        history: the last k2 - k1 steps of input ({time key: (B, k2 - k1, ...)}), replayed without
            loss in front of the next new steps; None when k1 = k2.
        end: the state after the last step (where evaluation or the next stream window goes on).
    """

    start: State | None = None
    history: dict[str, Tensor] | None = None
    end: State | None = None

    def to_checkpoint(self, gather_rows: Callable[[Tensor], Tensor]) -> dict[str, Any]:
        """The checkpoint's form, every rank's rows in global stream order on the CPU
        (``gather_rows``: (B_local, ...) -> (B_global, ...)), under the keys checkpoints have always used."""
        def gather(state: State | None) -> list[Tensor] | None:
            return None if state is None else [gather_rows(s) for s in state]

        history = None if self.history is None else {k: gather_rows(v) for k, v in self.history.items()}
        return {"train_state": gather(self.start), "end_state": gather(self.end), "history": history}

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any], rank: int, world_size: int, device: torch.device) -> CarriedState:
        """This rank's rows (``bptt.datamodules.sharding.shard``) of a checkpoint's carried state; the world
        size may differ from the one that saved it."""
        def mine(rows: Tensor) -> Tensor:
            return shard(rows, rank, world_size).to(device)

        def state(saved_state: list[Tensor] | None) -> State | None:
            return None if saved_state is None else tuple(mine(s) for s in saved_state)

        history = saved["history"]
        return cls(start=state(saved["train_state"]), end=state(saved["end_state"]),
                   history=None if history is None else {k: mine(v) for k, v in history.items()})


@dataclass(frozen=True)
class StepTotals:
    """A step's sums over all ranks, device scalars from one all-reduce before the backward pass.

    Attributes:
        loss_sum: the loss summed over every target of every rank.
        count: the number of those targets.
        nonfinite: > 0 when some rank's loss (or carried state) was not finite.
        loss_factor: what the backward pass multiplies this rank's loss sum by: DDP averages
            gradients over ranks, so world / count makes that the mean over all targets.
    """

    loss_sum: Tensor
    count: Tensor
    nonfinite: Tensor
    loss_factor: Tensor


@dataclass(frozen=True)
class GradientSize:
    """The gradients after the backward pass, read by the host once; it decides skip and clip.

    Attributes:
        norm: global 2-norm of the unscaled gradients (NaN or Inf when any gradient is).
        largest: largest absolute unscaled gradient (only computed for value clipping, else 0).
        nonfinite_loss: some rank's loss was not finite.
        scale: the mixed-precision loss scale the gradients still carry (1 without a scaler).
        norm_on_device: ``norm`` as a device scalar, to clip without a host-to-device copy.
    """

    norm: float
    largest: float
    nonfinite_loss: bool
    scale: float
    norm_on_device: Tensor


class TBPTTModule(pl.LightningModule):
    """Base class of every task: manual optimization, one optimizer step per window.

    Subclass ``StepLossModule`` or ``SequenceLossModule``, not this.

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
        host_reads: when the host reads a step's outcome from the device. ``every_step``: it reads
            the gradient norm and the non-finite flag to decide skip and clip (a host wait per step).
            ``logging_steps``: the device decides (clipping by a device-side factor, a non-finite step
            skipped by the optimizer itself, which must take GradScaler's skip flag: ``fused: true``
            Adam, AdamW or SGD); the counters and the gradient norm stay on the device until a logging
            step, where the consecutive-skip limit is checked too; a skipped step still counts as an
            optimizer step (``trainer.global_step``, step schedulers). ``auto``: ``logging_steps`` on a
            CUDA device with such an optimizer and without an fp16 loss scaler, else ``every_step``.
    """

    time_keys: tuple[str, ...] = ("inputs", "targets", "mask")

    # ------------------------------------------------------------ hooks a task may override (bptt's, not Lightning's)

    test_after_fit: bool = False
    """Whether ``bptt fit`` ends with the test split on the best checkpoint, logged in the same run."""

    def use_datamodule(self, datamodule: pl.LightningDataModule) -> None:
        """Take what the task needs from its DataModule (units, features, tokens) before it trains, evaluates
        or predicts; ``setup`` calls it, and so do commands that run the task without a Trainer. Default: nothing."""

    def serving_model(self) -> tuple[nn.Module, Tensor] | None:
        """The network as MLflow's logged model serves it, and an example input to trace it with; the
        default, None: the run logs no model."""
        return None

    def setup(self, stage: str) -> None:
        if self.trainer.datamodule is not None:  # none: fit on bare dataloaders
            self.use_datamodule(self.trainer.datamodule)

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
        host_reads: Literal["auto", "every_step", "logging_steps"] = "auto",
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
        if host_reads not in ("auto", "every_step", "logging_steps"):
            raise ConfigError(f"task.host_reads must be auto, every_step or logging_steps, got {host_reads!r}")
        if host_reads == "logging_steps":
            try:
                probe = optimizer([torch.nn.Parameter(torch.zeros(1))])
            except (ValueError, TypeError):
                probe = None  # a bad optimizer setting: the optimizer check before training names it
            if probe is not None:
                _check_device_skip(probe)
        self.automatic_optimization = False
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.lr_scheduler_interval = lr_scheduler_interval
        self.k1 = k1
        self.k2 = k2 if k2 is not None else k1
        self.grad_clip = grad_clip
        self.grad_clip_algorithm = grad_clip_algorithm
        self.max_consecutive_nonfinite = max_consecutive_nonfinite
        self.host_reads = host_reads
        # host_reads on the device (on_train_start decides): (taken, clipped, skipped, consecutive skipped,
        # longest run of consecutive skips since the host last read them), int64 on the device
        self._device_counts: Tensor | None = None
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        self.carried = CarriedState()  # training streams, across batches (stream mode)
        self.eval_state: State | None = None  # evaluation streams, across batches (stream mode)
        self._restored: dict[str, Any] | None = None  # a checkpoint's carried state, until on_train_start
        # counters behind the logged fractions
        self.steps_taken = 0
        self.steps_clipped = 0
        self._pending_clip: Callable[[], None] | None = None  # the step's clip, for on_before_optimizer_step
        self.steps_skipped = 0
        self.consecutive_skipped = 0
        self.last_grad_norm: float | Tensor = 0.0  # of the latest step taken (unscaled); a device scalar
        # while the device keeps the counters
        self.last_lr: float | None = None  # the learning rate the latest step taken used
        self._last_log_time: float | None = None
        self._tokens_since_log = 0.0
        self._bar_clock = RedrawClock()  # when to log train/loss for the progress bar

    # ---- what a loss kind supplies ----------------------------------------------------------
    def evaluate_batch(self, batch: dict[str, Any], metric: MeanMetric) -> Tensor | None:
        """Add a batch's loss to ``metric``, weighted by its target count."""
        raise NotImplementedError

    def derived_metrics(self, split: str, loss: Tensor) -> dict[str, Tensor]:
        """Metrics computed from a split's mean loss (e.g. perplexity); logged beside ``{split}/loss``."""
        return {}

    # ---- windows ------------------------------------------------------------------------------
    def _slice(self, batch: dict[str, Any], start: int, end: int) -> dict[str, Tensor]:
        """The batch's time-indexed entries from step ``start`` to ``end``, each (B, end - start, ...)."""
        return {k: batch[k][:, start:end] for k in self.time_keys if k in batch}

    def _windows(self, batch: dict[str, Any], size: int | None) -> list[dict[str, Tensor]]:
        """The batch cut into consecutive windows of ``size`` steps (the last may be shorter); None: one."""
        length = batch[self.time_keys[0]].shape[1]
        size = size or length
        return [self._slice(batch, start, min(start + size, length)) for start in range(0, length, size)]

    # ---- optimizers -------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": self.lr_scheduler_interval}}

    def _scheduler(self) -> Any:
        schedulers = self.lr_schedulers()
        return schedulers[0] if isinstance(schedulers, list) else schedulers

    def _scaler(self) -> torch.amp.GradScaler | None:
        """The fp16 loss scaler of Lightning's mixed-precision plugin, if enabled."""
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        return scaler if scaler is not None and scaler.is_enabled() else None

    def _loss_scale(self, device: torch.device) -> Tensor:
        """The fp16 loss scale as a device scalar (1 without a scaler), read without waiting for the device."""
        one = torch.ones((), device=device)
        scaler = self._scaler()
        return one if scaler is None else scaler.scale(one)  # scale() multiplies on the device; get_scale() would wait

    # ---- one optimizer step -------------------------------------------------------------------
    def _sum_over_ranks(self, loss_sum: Tensor, count: Tensor, row_bad: Tensor) -> StepTotals:
        """Sum (loss sum, target count, non-finite flag) over the ranks in one all-reduce, enqueued on the
        device like any kernel (``strategy.reduce`` would add a barrier: a host wait under NCCL).

        Args:
            loss_sum: this rank's loss sum (device scalar).
            count: this rank's number of targets in the loss (device scalar, float).
            row_bad: (B,) this rank's rows whose loss (or state) is not finite.
        """
        world = self.trainer.world_size
        totals = torch.stack([loss_sum.detach().to(count.dtype), count, row_bad.any().to(count.dtype)])  # (3,)
        if world > 1:
            torch.distributed.all_reduce(totals)
        global_loss, global_count, nonfinite = totals.unbind()
        return StepTotals(global_loss, global_count, nonfinite, world / global_count.clamp(min=1.0))

    def _optimizer_step(self, totals: StepTotals, row_bad: Tensor, loss_sum: Tensor) -> bool | None:
        """After the backward pass: one optimizer step, unless some rank saw a non-finite value.

        The host waits for the device once per step, here (``_gradient_size``), for the gradient
        norm and whether any rank's loss was non-finite; the backward pass ran either way (a
        skipped step discards its gradients), so a GPU is never idle while Python decides.

        Args:
            totals: the step's sums over all ranks.
            row_bad: (B,) this rank's rows whose loss (or state) is not finite, for the error message.
            loss_sum: this rank's loss sum, for the error message.

        Returns:
            whether the step was taken: False when skipped for a non-finite loss on some rank; None
            when the device decided (``host_reads`` on the device): the host does not know.
        """
        opt = self.optimizers()
        if self._device_counts is not None:
            self._step_on_device(opt, totals.nonfinite)
            return None
        size = self._gradient_size(totals.nonfinite)
        if size.nonfinite_loss:
            here = bool(row_bad.any())
            self._skip_step(opt, f"loss is {loss_sum.item()}" if here else "a non-finite loss on another rank")
            return False
        if not (math.isfinite(size.norm) and math.isfinite(size.largest)):
            if self._scaler() is not None:  # fp16 overflow: the scaler skips the step and lowers its scale
                opt.step()
                opt.zero_grad(set_to_none=True)
                self.steps_skipped += 1
            else:
                self._skip_step(opt, f"gradient norm is {size.norm}")
            return True
        self.consecutive_skipped = 0
        self.last_grad_norm = size.norm
        self._pending_clip = partial(self._clip, size, unscaled=self._scaler() is not None and not
                                     private_api.supports_device_skip(opt))
        self.last_lr = opt.param_groups[0]["lr"]  # what this step used: logged as lr-<optimizer>
        opt.step()  # callbacks' on_before_optimizer_step, then this module's: the clip
        opt.zero_grad(set_to_none=True)
        self.steps_taken += 1
        self._step_scheduler()
        return True

    def _step_scheduler(self, interval: Literal["step", "epoch"] = "step") -> None:
        """Step an LR scheduler that counts ``interval``s (``ReduceLROnPlateau`` steps after validations)."""
        if self.lr_scheduler_factory is not None and self.lr_scheduler_interval == interval:
            scheduler = self._scheduler()
            if not isinstance(scheduler, ReduceLROnPlateau):
                scheduler.step()

    def _step_on_device(self, opt: Any, nonfinite: Tensor) -> None:
        """``_optimizer_step`` without a host read: the same clipping (by a factor of at most 1,
        computed on the device), the optimizer step skipped on the device where some rank's loss or
        the gradients are not finite, and the counters kept on the device."""
        device = nonfinite.device
        norm, largest = self._gradient_norms(device)
        norm = norm.to(torch.promote_types(norm.dtype, torch.float32))  # float64 runs clip in float64
        bad = (nonfinite > 0) | ~torch.isfinite(norm) | ~torch.isfinite(largest)
        clipped = torch.zeros((), dtype=torch.bool, device=device)
        params = [p for p in self.parameters() if p.grad is not None]
        if params and self.grad_clip is not None:
            clipped = (largest if self.grad_clip_algorithm == "value" else norm) > self.grad_clip
            self._pending_clip = partial(self._clip_on_device, params, norm)
        self.last_lr = opt.param_groups[0]["lr"]
        private_api.step_unless(opt, bad)  # callbacks' on_before_optimizer_step, then this module's: the clip
        opt.zero_grad(set_to_none=True)
        counts = self._device_counts
        consecutive = (counts[3] + 1) * bad
        taken = ~bad
        self._device_counts = torch.stack([counts[0] + taken, counts[1] + (clipped & taken), counts[2] + bad,
                                           consecutive, torch.maximum(counts[4], consecutive)])
        self.last_grad_norm = torch.where(bad, torch.as_tensor(self.last_grad_norm, dtype=norm.dtype, device=device),
                                          norm)
        self._step_scheduler()

    def check_precision(self, precision_plugin: Any) -> None:
        """Raises ConfigError: ``host_reads: logging_steps`` under an fp16 loss scaler, which reads its
        overflow flag every step (checked before training starts, and again when it starts)."""
        scaler = getattr(precision_plugin, "scaler", None)
        if self.host_reads == "logging_steps" and scaler is not None and scaler.is_enabled():
            raise ConfigError("task.host_reads=logging_steps cannot skip fp16 overflow steps on the device (the "
                              "loss scaler reads its flag every step); use trainer.precision bf16-mixed or 32-true, "
                              "or task.host_reads: every_step")

    def _reads_on_device(self) -> bool:
        """Whether the device decides each step (``host_reads``), now that device, optimizer and precision are known."""
        self.check_precision(self.trainer.precision_plugin)
        if self.host_reads == "every_step" or self._scaler() is not None:
            return False
        if self.host_reads == "logging_steps":
            _check_device_skip(self.optimizers())  # an unfused optimizer would step on a non-finite gradient
            return True
        return self.device.type == "cuda" and private_api.supports_device_skip(self.optimizers())

    def _read_counts(self) -> None:
        """Bring the counters the device keeps to the host (one wait), and stop training after too many
        consecutive skipped steps since the last read."""
        if self._device_counts is None:
            return
        taken, clipped, skipped, consecutive, longest = self._device_counts.tolist()
        self.steps_taken, self.steps_clipped, self.steps_skipped, self.consecutive_skipped = (
            taken, clipped, skipped, consecutive)
        self._device_counts[4] = consecutive
        if longest >= self.max_consecutive_nonfinite:
            raise NonFiniteLossError(
                f"{longest} consecutive steps skipped for non-finite values (the device decided; read at step "
                f"{self.trainer.global_step}); lower the learning rate, set task.grad_clip, or use precision 32"
            )

    def _gradient_norms(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """The gradients' global 2-norm and, for value clipping only, their largest absolute value (else 0),
        as device scalars (0 without gradients)."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        zero = torch.zeros((), device=device)
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0).to(device) if grads else zero
        largest = zero
        if grads and self.grad_clip is not None and self.grad_clip_algorithm == "value":
            largest = torch.nn.utils.get_total_norm(grads, norm_type=math.inf).to(device)
        return norm, largest

    def _gradient_size(self, nonfinite: Tensor) -> GradientSize:
        """The gradients' size and the non-finite flag, read from the device at once: the step's one host wait."""
        device = nonfinite.device
        norm, largest = self._gradient_norms(device)
        dtype = torch.promote_types(norm.dtype, torch.float32)  # float64 runs clip in float64
        values = torch.stack([v.to(device, dtype) for v in (norm, largest, nonfinite, self._loss_scale(device))])
        norm_on_device = values[0] / values[3]
        norm_, largest_, nonfinite_, scale = values.tolist()
        return GradientSize(norm_ / scale, largest_ / scale, nonfinite_ > 0, scale, norm_on_device)

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        """Clip the gradients of the step being taken. Lightning calls this hook inside
        ``opt.step()``, after every callback's ``on_before_optimizer_step``: a callback sees the
        gradients as the backward pass left them (unclipped), as Lightning's contract says."""
        clip, self._pending_clip = self._pending_clip, None
        if clip is not None:
            clip()

    def _clip(self, size: GradientSize, *, unscaled: bool) -> None:
        """Clip the gradients if they exceed ``grad_clip`` (counted in ``steps_clipped``).

        Under an fp16 loss scale Lightning unscales the gradients before this hook, unless the
        optimizer unscales inside its own step (fused): there they still carry the scale, and
        clipping them to ``grad_clip`` times the scale, a power of two, is clipping the unscaled
        ones to ``grad_clip``. By norm, the factor is the same either way.
        """
        if self.grad_clip is None:
            return
        params = [p for p in self.parameters() if p.grad is not None]
        if self.grad_clip_algorithm == "value":
            if size.largest <= self.grad_clip:
                return
            torch.nn.utils.clip_grad_value_(params, self.grad_clip * (1.0 if unscaled else size.scale))
            self.steps_clipped += 1
            return
        if size.norm <= self.grad_clip:  # only steps over the limit: clipping the others would multiply by 1
            return
        # multiplies by grad_clip / (unscaled norm): the norm is not computed a second time (2% of a word-LM step)
        torch.nn.utils.clip_grads_with_norm_(params, self.grad_clip, size.norm_on_device)
        self.steps_clipped += 1

    def _clip_on_device(self, params: list[Tensor], norm: Tensor) -> None:
        """``_clip`` without a host read: by value always (the identity below the limit), by norm
        times min(1, grad_clip / norm)."""
        if self.grad_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, self.grad_clip)
        else:
            torch.nn.utils.clip_grads_with_norm_(params, self.grad_clip, norm)

    def _skip_step(self, opt: Any, reason: str) -> None:
        opt.zero_grad(set_to_none=True)
        self.steps_skipped += 1
        self.consecutive_skipped += 1
        if self.consecutive_skipped >= self.max_consecutive_nonfinite:
            raise NonFiniteLossError(
                f"{self.consecutive_skipped} consecutive steps skipped for non-finite values (last: {reason}); "
                "lower the learning rate, set task.grad_clip, or use precision 32"
            )

    def on_train_epoch_end(self) -> None:
        self._step_scheduler("epoch")

    # ---- training metrics -------------------------------------------------------------------
    def _log_train(self, loss_sum: Tensor, count: Tensor) -> None:
        """Log a batch's training metrics from its loss sum and target count over all ranks (device
        scalars): every rank logs the same, global values. The gradient norm and the clip and skip
        counters are global already: DDP averaged the gradients before the engine read their norm."""
        self._tokens_since_log += count
        # Lightning keeps step values only every trainer.log_every_n_steps, and a self.log costs ~1 ms (a
        # tenth of a small model's step on a CPU): the other steps log the loss only as often as the
        # progress bar redraws (for it to show), and nothing else
        logs = private_api.logs_this_step(self.trainer)
        loss = loss_sum / count.clamp(min=1.0)
        if logs or self._bar_clock.due():
            self.log(TRAIN_LOSS, loss, on_step=True, on_epoch=False, prog_bar=True)
        if not logs:
            return
        now = time.perf_counter()
        if self._last_log_time is not None:
            self.log(TOKENS_PER_SEC, self._tokens_since_log / max(now - self._last_log_time, 1e-9),
                     on_step=True, on_epoch=False)
        self._last_log_time, self._tokens_since_log = now, 0.0
        self._read_counts()
        for name, value in self.derived_metrics(TRAIN, loss).items():
            self.log(name, value, on_step=True, on_epoch=False)
        attempted = max(self.steps_taken + self.steps_skipped, 1)
        self._log_step_axis()
        if self.last_lr is not None:  # LearningRateMonitor's name; its value: the lr of the batch's last step
            lr = torch.tensor(self.last_lr, dtype=torch.float64)  # exact: a float would go through float32
            self.log(f"lr-{type(self.optimizers().optimizer).__name__}", lr, on_step=True, on_epoch=False)
        self.log(GRAD_NORM, self.last_grad_norm, on_step=True, on_epoch=False)
        self.log(CLIP_FRACTION, self.steps_clipped / attempted, on_step=True, on_epoch=False)
        self.log(SKIPPED_STEPS, float(self.steps_skipped), on_step=True, on_epoch=False)
        for name, value in self._module_metrics().items():
            self.log(name, value, on_step=True, on_epoch=False)

    def _module_metrics(self) -> dict[str, float]:
        """What the network's modules report about their latest training step (a module with a
        ``training_metrics()`` method, e.g. a core's Newton iterations), logged on logging steps."""
        metrics: dict[str, float] = {}
        for module in self.modules():
            report = getattr(module, "training_metrics", None)
            if module is not self and callable(report):
                metrics.update(report())
        return metrics

    # ---- checkpoints: the carried state keyed by global stream index -----------------------
    def _gather_rows(self, tensor: Tensor) -> Tensor:
        """(B_local, ...) on every rank -> (B_global, ...) in global stream order, on the CPU."""
        if self.trainer.world_size == 1:
            return tensor.detach().cpu()
        return self.all_gather(tensor.detach()).flatten(0, 1).cpu()  # (W, B_local, ...) -> (B_global, ...)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._read_counts()
        checkpoint["tbptt"] = {
            **self.carried.to_checkpoint(self._gather_rows),
            "counters": [self.steps_taken, self.steps_clipped, self.steps_skipped, self.consecutive_skipped],
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._restored = checkpoint.get("tbptt")
        if self._restored is not None:
            counters = self._restored["counters"]
            self.steps_taken, self.steps_clipped, self.steps_skipped, self.consecutive_skipped = counters

    def on_train_start(self) -> None:
        """Start the throughput clock; after a resume, take this rank's rows of the saved streams."""
        self._last_log_time, self._tokens_since_log = time.perf_counter(), 0.0
        self._device_counts = None
        if self._reads_on_device():
            counts = [self.steps_taken, self.steps_clipped, self.steps_skipped, self.consecutive_skipped,
                      self.consecutive_skipped]
            self._device_counts = torch.tensor(counts, dtype=torch.int64, device=self.device)
        saved, self._restored = self._restored, None
        if saved is not None:
            self.carried = CarriedState.from_checkpoint(saved, self.trainer.global_rank, self.trainer.world_size,
                                                        self.device)

    def on_train_end(self) -> None:
        self._read_counts()

    # ---- evaluation ---------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self.eval_state = None

    def on_test_epoch_start(self) -> None:
        self.eval_state = None

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.evaluate_batch(batch, self.val_loss)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.evaluate_batch(batch, self.test_loss)

    def steps_per_batch_vary(self) -> bool:
        """Whether a training batch may take more than one optimizer step (a task with ``k1`` windows
        over longer batches says so); then the logged x-axis counts optimizer steps (``_log_step_axis``)."""
        return False

    def _log_step_axis(self) -> None:
        """Log ``step`` (Lightning's key for the loggers' x-axis) as the index of the last optimizer step
        taken, where a batch may take several: Lightning would count batches. With one step per batch both
        are the same number, and Lightning's own is left alone."""
        if self.steps_per_batch_vary() and not self.trainer.sanity_checking:
            self.log("step", float(max(self.trainer.global_step - 1, 0)))  # Lightning logs int(step)

    def _log_eval(self, split: str, loss_metric: MeanMetric) -> Tensor:
        loss = loss_metric.compute()  # weighted by target counts, reduced over ranks
        loss_metric.reset()
        if split == VAL:
            self._log_step_axis()
        self.log(metric(split, "loss"), loss, prog_bar=True)
        for name, value in self.derived_metrics(split, loss).items():
            self.log(name, value)
        return loss

    def on_validation_epoch_end(self) -> None:
        loss = self._log_eval(VAL, self.val_loss)
        if self.lr_scheduler_factory is not None and not self.trainer.sanity_checking:
            scheduler = self._scheduler()
            if isinstance(scheduler, ReduceLROnPlateau):
                scheduler.step(loss)

    def on_test_epoch_end(self) -> None:
        self._log_eval(TEST, self.test_loss)
