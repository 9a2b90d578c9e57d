"""Gradient through time: how strongly the loss at the end of a window depends on the state tau steps back.

For a probe window ending at step t, ``g(tau) = E_b || d L_t / d h_(t - tau) ||`` per layer,
tau = 0..K, where L_t is the task's loss at step t alone and h_(t - tau) the hidden state that
step t - tau starts from (tau = 0: the state the loss's own step reads). Vanishing gradients
show as g falling fast, exploding ones as g growing; truncating backpropagation at k steps
drops everything beyond tau = k. The suggested truncation is the smallest tau at which g
falls below ``eps * g(0)`` in every layer, in the spirit of adaptive truncation (Aicher,
Foti & Fox 2019)::

    probe:   x(t-K-w) ... x(t-K-1) | x(t-K)  ...  x(t-1)  x(t)
             warm-up, no graph      | one step at a time, graph kept -> L_t
                                      h(t-K)      h(t-1)  h(t) read by step t
    g(tau) = || d L_t / d h(t - tau) ||,  tau = K .. 0

The measurement runs in eval mode (no dropout) and differentiates with respect to the states
only, so the parameters' gradients, the random generators and therefore training are untouched.
Tasks with a per-step loss (language models, forecasters, the synthetic tasks) are supported.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import MLFlowLogger
from torch import Tensor

from bptt.errors import ConfigError
from bptt.lightning_modules.tbptt import StepLossModule, TBPTTModule


def gradient_through_time(task: TBPTTModule, window: dict[str, Tensor], probe_steps: int) -> Tensor:
    """g(tau) for tau = 0..K on one probe window.

    Args:
        task: a step-loss task (``window_step`` returns per-step losses).
        window: its time-indexed entries, (B, T, ...); the last K + 1 steps are the probe, the
            steps before them warm the state up without a graph.
        probe_steps: K; at most T - 1.

    Returns:
        (K + 1, L): the mean over rows of the hidden state's gradient norm, per tau and layer.
    """
    if not isinstance(task, StepLossModule):
        raise ConfigError(f"{type(task).__name__} has a loss over whole sequences; gradient diagnostics need a "
                          "per-step loss (language model, forecaster, synthetic tasks)")
    length = window[task.time_keys[0]].shape[1]
    if not 1 <= probe_steps < length:
        raise ConfigError(f"probe_steps={probe_steps} needs a window of more steps than that (got {length})")
    start = length - probe_steps - 1
    was_training = task.training
    task.eval()
    try:
        with torch.enable_grad():
            state = None
            if start > 0:
                with torch.no_grad():
                    _, state = task.window_step(_steps(window, 0, start), None)
            read: list[Tensor] = []  # the hidden state each probe step starts from, (B, L, H)
            for t in range(start, length):
                if state is None:  # zeros, as the model would start from, made differentiable
                    state = _zero_state(task, window, t)
                state = tuple(s.detach().requires_grad_() if not s.requires_grad else s for s in state)
                read.append(state[0])
                losses, state = task.window_step(_steps(window, t, t + 1), state)
            loss = losses[:, -1].sum()  # the last step's loss, summed over rows
            grads = torch.autograd.grad(loss, read, allow_unused=True)
    finally:
        task.train(was_training)
    norms = torch.stack([torch.zeros(read[0].shape[1]) if g is None
                         else g.detach().float().norm(dim=2).mean(dim=0).cpu()
                         for g in grads])  # (K + 1, L), oldest first
    return norms.flip(0)  # tau = 0 (newest) first


def _steps(window: dict[str, Tensor], start: int, end: int) -> dict[str, Tensor]:
    return {k: v[:, start:end] for k, v in window.items()}


def _zero_state(task: TBPTTModule, window: dict[str, Tensor], t: int) -> tuple[Tensor, ...]:
    """The model's zero state, shaped by running one step from None (the step's outputs are discarded)."""
    with torch.no_grad():
        _, shaped = task.window_step(_steps(window, t, t + 1), None)
    return tuple(torch.zeros_like(s) for s in shaped)


def suggest_truncation(curve: Tensor, eps: float) -> int | None:
    """The smallest tau at which every layer's g(tau) < eps * g(0); None when none within the curve.

    Args:
        curve: (K + 1, L) from ``gradient_through_time``.
        eps: the fraction of g(0) below which the dependency counts as gone.
    """
    below = (curve < eps * curve[0]).all(dim=1)  # (K + 1,)
    hits = torch.nonzero(below).flatten()
    return int(hits[0]) if len(hits) else None


class ProbeWindows:
    """Builds probe windows of ``needed`` steps from consecutive batches.

    Split mode (no ``reset``): each batch holds whole sequences; its own steps are the window.
    Stream mode: rows continue from batch to batch, so recent batches since the last reset are
    joined along time.
    """

    def __init__(self, time_keys: Iterable[str], needed: int) -> None:
        self.time_keys = tuple(time_keys)
        self.needed = needed
        self.recent: deque[dict[str, Tensor]] = deque()

    def add(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Take the next batch; returns the newest window of up to ``needed`` steps."""
        window = {k: batch[k].detach() for k in self.time_keys if k in batch}
        if "reset" not in batch or bool(batch["reset"].any()):
            self.recent.clear()
        self.recent.append(window)
        while len(self.recent) > 1 and sum(w[self.time_keys[0]].shape[1] for w in list(self.recent)[1:]) >= self.needed:
            self.recent.popleft()
        joined = {k: torch.cat([w[k] for w in self.recent], dim=1) for k in self.recent[0]}
        return {k: v[:, -self.needed :] for k, v in joined.items()}


class GradientThroughTime(pl.Callback):
    """Measures g(tau) every ``every_n_steps`` optimizer steps on the current training data and
    logs it to MLflow (``trainer.callbacks`` in the config: ``bptt.gradient_diagnostics.GradientThroughTime``).

    Logged at the measurement's optimizer step: metrics ``gradient_through_time/layer{l}/tau{tau}`` for
    tau = 0, 1, 2, 4, ... and K, the ratio ``.../tau{K}_over_tau0`` and ``gradient_through_time/suggested_k``; artifacts
    ``gradient_through_time/step-N.png`` (g(tau) per layer on a log scale, and the gradient-norm
    history per window, ``train/grad_norm``) and ``step-N.json`` (the whole curve).

    Args:
        every_n_steps: measure after every this many optimizer steps.
        probe_steps: K, how far back; may exceed the training window (stream mode joins batches).
        warmup_steps: steps run before the probe without a graph, to warm the state up.
        eps: the fraction of g(0) that defines the suggested truncation.
    """

    def __init__(self, *, every_n_steps: int = 200, probe_steps: int = 64, warmup_steps: int = 64,
                 eps: float = 0.01) -> None:
        if every_n_steps < 1 or probe_steps < 1 or warmup_steps < 0 or not 0 < eps < 1:
            raise ConfigError("GradientThroughTime needs every_n_steps >= 1, probe_steps >= 1, warmup_steps >= 0 "
                              f"and 0 < eps < 1; got {every_n_steps}, {probe_steps}, {warmup_steps}, {eps}")
        self.every_n_steps, self.probe_steps = every_n_steps, probe_steps
        self.warmup_steps, self.eps = warmup_steps, eps
        self.windows: ProbeWindows | None = None
        self.grad_norms: list[tuple[int, float]] = []
        self.last: dict[str, float] = {}  # the latest measurement's metrics
        self._last_measured = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not trainer.is_global_zero:
            return
        if self.windows is None:
            self.windows = ProbeWindows(pl_module.time_keys, self.probe_steps + 1 + self.warmup_steps)
        window = self.windows.add(batch)
        self.grad_norms.append((trainer.global_step, float(getattr(pl_module, "last_grad_norm", math.nan))))
        step = trainer.global_step
        if step // self.every_n_steps == self._last_measured // self.every_n_steps:
            return
        self._last_measured = step
        length = window[pl_module.time_keys[0]].shape[1]
        curve = gradient_through_time(pl_module, window, min(self.probe_steps, length - 1))  # (K + 1, L)
        suggested = suggest_truncation(curve, self.eps)
        metrics = {}
        taus = sorted({0, *(2**i for i in range(int(math.log2(max(len(curve) - 1, 1))) + 1)), len(curve) - 1})
        for layer in range(curve.shape[1]):
            for tau in taus:
                metrics[f"gradient_through_time/layer{layer}/tau{tau}"] = float(curve[tau, layer])
            metrics[f"gradient_through_time/layer{layer}/tau{len(curve) - 1}_over_tau0"] = float(
                curve[-1, layer] / curve[0, layer]) if curve[0, layer] > 0 else math.nan
        metrics["gradient_through_time/suggested_k"] = float(suggested if suggested is not None else len(curve))
        self.last = metrics
        for logger in trainer.loggers:  # at every measurement, not only on trainer.log_every_n_steps
            logger.log_metrics(metrics, step=step)
            if isinstance(logger, MLFlowLogger):
                record = {"step": step, "eps": self.eps, "suggested_k": suggested, "curve": curve.tolist()}
                logger.experiment.log_dict(logger.run_id, record, f"gradient_through_time/step-{step:07d}.json")
                figure = curve_figure(curve, self.eps, suggested, self.grad_norms)
                logger.experiment.log_figure(logger.run_id, figure, f"gradient_through_time/step-{step:07d}.png")
                import matplotlib.pyplot as plt

                plt.close(figure)


def curve_figure(curve: Tensor, eps: float, suggested: int | None, grad_norms: list[tuple[int, float]] | None = None):
    """g(tau) per layer on a log scale, beside the gradient-norm history per window if given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if grad_norms else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 3.8), squeeze=False)
    ax = axes[0][0]
    for layer in range(curve.shape[1]):
        ax.semilogy(range(len(curve)), curve[:, layer].clamp(min=1e-30), label=f"layer {layer}")
    ax.axhline(eps * float(curve[0].min()), color="grey", linestyle=":", linewidth=1, label=f"eps = {eps:g} of tau 0")
    if suggested is not None:
        ax.axvline(suggested, color="tab:red", linestyle="--", linewidth=1, label=f"suggested k = {suggested}")
    ax.set_xlabel("tau (steps back)")
    ax.set_ylabel("|| dL_t / dh_(t - tau) ||")
    ax.legend(fontsize=8)
    if grad_norms:
        steps, norms = zip(*grad_norms)
        axes[0][1].semilogy(steps, norms, linewidth=0.8)
        axes[0][1].set_xlabel("optimizer step")
        axes[0][1].set_ylabel("gradient norm per window")
    fig.tight_layout()
    return fig


def diagnose(task: TBPTTModule, batches: Iterator[dict[str, Any]], *, probe_steps: int, warmup_steps: int,
             probes: int) -> Tensor:
    """The mean g(tau) curve over ``probes`` probe windows drawn from consecutive ``batches``.

    Returns:
        (K + 1, L).
    """
    windows = ProbeWindows(task.time_keys, probe_steps + 1 + warmup_steps)
    curves = []
    for batch in batches:
        window = windows.add(batch)
        length = window[task.time_keys[0]].shape[1]
        if length < 2 or ("reset" in batch and length <= probe_steps):
            continue  # stream mode: the next batches continue these rows, so wait for K + 1 steps
        curves.append(gradient_through_time(task, window, min(probe_steps, length - 1)))  # split mode: what is there
        if len(curves) == probes:
            break
    if not curves:
        raise ConfigError("no training batch gave a probe window; lower --probe-steps")
    size = min(len(c) for c in curves)
    return torch.stack([c[:size] for c in curves]).mean(dim=0)


def curve_report(curve: Tensor, eps: float) -> str:
    """The curve as a table (tau, g / g(0) per layer) and the suggestion, for ``bptt diagnose``."""
    suggested = suggest_truncation(curve, eps)
    layers = curve.shape[1]
    lines = ["tau  " + "  ".join(f"layer {layer} g/g(0)" for layer in range(layers))]
    taus = sorted({0, *(2**i for i in range(int(math.log2(max(len(curve) - 1, 1))) + 1)), len(curve) - 1,
                   *([suggested] if suggested is not None else [])})
    for tau in taus:
        lines.append(f"{tau:<5d}" + "  ".join(f"{float(curve[tau, layer] / curve[0, layer]):>16.3e}"
                                              for layer in range(layers)))
    if suggested is None:
        lines.append(f"the gradient stays above {eps:g} of its tau = 0 value for all {len(curve) - 1} steps probed: "
                     "the dependency reaches further; raise --probe-steps, or keep the truncation at least that long")
    else:
        lines.append(f"suggested truncation: k = {suggested} steps (the gradient falls below {eps:g} of its tau = 0 "
                     f"value there); e.g. --task.k1 {suggested} or --data.bptt {suggested}")
    return "\n".join(lines)


def save_curve(curve: Tensor, eps: float, path: Path) -> Path:
    """``path`` (.json) and its .png beside it."""
    suggested = suggest_truncation(curve, eps)
    path.write_text(json.dumps({"eps": eps, "suggested_k": suggested, "curve": curve.tolist()}, indent=1))
    figure = curve_figure(curve, eps, suggested)
    figure.savefig(path.with_suffix(".png"), dpi=100)
    return path


def diagnose_run(target: str, overrides: list[str], *, probe_steps: int, warmup_steps: int, probes: int, eps: float,
                 out: Path | None = None, trusted: bool = False) -> str:
    """``bptt diagnose``: the gradient-through-time curve of a run's network on its training data, and the
    truncation it suggests.

    Args:
        target: a run config (YAML: a freshly initialized network) or a checkpoint (its trained network).
        overrides: dotted config overrides.
        probe_steps: K, how many steps back to measure.
        warmup_steps: steps before each probe that warm the state up.
        probes: probe windows averaged, from consecutive training batches.
        eps: the fraction of the tau = 0 gradient that defines the suggestion.
        out: also write the curve there (.json, and a .png beside it).
        trusted: the config may name code outside the allow-list (``--trust-config``).

    Returns:
        the report: a table of g(tau) / g(0) per layer and the suggested truncation.
    """
    from bptt.config.parser import instantiate, parse_config
    from bptt.directories import check_writable_directory
    from bptt.training.restore import restore
    from bptt.training.trainer import quiet_known_warnings

    if probe_steps < 1 or warmup_steps < 0 or probes < 1 or not 0 < eps < 1:
        raise ConfigError(f"need --probe-steps >= 1, --warmup-steps >= 0, --probes >= 1 and 0 < --eps < 1; got "
                          f"{probe_steps}, {warmup_steps}, {probes}, {eps}")
    if out is not None:
        check_writable_directory(out.parent, label=f"--out={out.parent}", fix="choose a writable directory")
    if target.endswith((".yaml", ".yml")):
        quiet_known_warnings()
        cfg = parse_config(["--config", target, *overrides], trusted=trusted)
        pl.seed_everything(cfg.seed_everything, workers=True, verbose=False)
        init = instantiate(cfg)
    else:
        _, init, checkpoint = restore(target, overrides, trusted)
        init.task.load_state_dict(checkpoint["state_dict"])
    if not isinstance(init.task, StepLossModule):
        raise ConfigError(f"{type(init.task).__name__} has a loss over whole sequences; bptt diagnose needs a per-step "
                          "loss (language models, forecasters, the synthetic tasks)")
    init.data.prepare_data()
    init.data.setup("fit")
    init.task.use_datamodule(init.data)
    curve = diagnose(init.task, iter(init.data.train_dataloader()), probe_steps=probe_steps,
                     warmup_steps=warmup_steps, probes=probes)
    if out is not None:
        save_curve(curve, eps, out)
    return curve_report(curve, eps)
