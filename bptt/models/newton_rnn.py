"""A nonlinear recurrent core evaluated parallel in time: a diagonal GRU solved by Newton's method.

ParaRNN (Danieli et al. 2025, arXiv 2510.21450) and DEER (Lim et al., ICLR 2024): a recurrence
h_t = f(h_{t-1}, x_t) over a window is a system of T equations in h_1 ... h_T. Newton's method
linearizes every step around the current guess h^k and solves the linear system exactly::

    h^{k+1}_t = J_t h^{k+1}_{t-1} + f(h^k_{t-1}, x_t) - J_t h^k_{t-1},   J_t = df/dh at h^k_{t-1}

a linear recurrence in h^{k+1}: with a diagonal Jacobian, the parallel scan the minGRU uses
(``bptt.models.min_rnn.linear_scan``). The system is triangular, so the k-th iterate is exact for
the first k steps: at most T iterations, and far fewer for a contractive cell (the iteration stops
when no state moves by more than ``tolerance``).

The cell is ParaRNN's diagonal GRU: a GRU whose recurrent weights are diagonal (u_z, u_r, u_h, one
per hidden unit), so that each unit's next state depends on its own previous state only::

    z = sigmoid(k_z + u_z h),  r = sigmoid(k_r + u_r h),  c = tanh(k_h + u_h r h),  f = h + z (c - h)

with the k's linear in the layer's input. Unlike the minGRU's gates, these read the state: the
recurrence is nonlinear, and a sequential evaluation is the only other way to compute it.

Gradients (DEER's): at the solution h*, one more Newton step, h = scan(J, f(h*_{t-1}, x_t) - J h*_{t-1}, h_0)
with h*_{t-1} and J held constant, equals h* and carries exactly the sequential recurrence's
gradient: its backward is the adjoint scan g_t = dL/dh_t + J_{t+1} g_{t+1}, and dL/dθ = Σ_t g_t df_t/dθ.
No graph of the iterations is kept.

Shape legend as in ``bptt.models.min_rnn``: B batch, T steps, H hidden size, L layers; the state is
``(h,)``, h (B, L, H). The stack around the cells (input projection, pre-norm residual blocks,
dropout) is the minGRU's.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from bptt.errors import ConfigError
from bptt.metric_names import NEWTON_ITERATIONS
from bptt.models.min_rnn import _MinRNNCore, linear_scan


def diagonal_gru_step(k: Tensor, u: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
    """The diagonal GRU cell and its Jacobian's diagonal.

    Args:
        k: (..., 3 * H) pre-activations [k_z; k_r; k_h] from the input.
        u: (3, H) diagonal recurrent weights u_z, u_r, u_h.
        h: (..., H) the previous state.

    Returns:
        f (..., H), the next state, and J (..., H) = df/dh (elementwise: the Jacobian is diagonal).
    """
    k_z, k_r, k_h = k.chunk(3, dim=-1)
    u_z, u_r, u_h = u.unbind(0)
    z = torch.sigmoid(k_z + u_z * h)
    r = torch.sigmoid(k_r + u_r * h)
    c = torch.tanh(k_h + u_h * r * h)
    f = h + z * (c - h)
    dz = z * (1 - z) * u_z
    dc = (1 - c * c) * u_h * (r + h * r * (1 - r) * u_r)
    return f, (1 - z) + dz * (c - h) + z * dc


class DiagonalGRU(_MinRNNCore):
    """A stack of diagonal GRU cells (ParaRNN), evaluated by parallel Newton iterations or step by step.

    Args:
        input_size: E.
        hidden_size: H, the width of every layer and of y.
        num_layers: L.
        dropout: dropout on every block's branch before the residual sum; in [0, 1).
        evaluation: ``newton`` (parallel in time, default) or ``sequential`` (a loop over steps: the
            reference, and what a core called one step at a time runs).
        tolerance: Newton stops when no state moves by more than this (absolute) in an iteration.
        max_iterations: at most this many iterations per layer and window (None: T, where Newton is exact).

    Attributes:
        iterations: the Newton iterations of each layer in the latest training window (for logging).
    """

    gates = 3
    evaluations = ("newton", "sequential")

    def __init__(self, *, input_size: int, hidden_size: int = 256, num_layers: int = 2, dropout: float = 0.0,
                 evaluation: Literal["newton", "sequential"] = "newton", tolerance: float = 1e-5,
                 max_iterations: int | None = None) -> None:
        super().__init__(input_size=input_size, hidden_size=hidden_size, num_layers=num_layers, dropout=dropout,
                         evaluation=evaluation)
        if not tolerance > 0:
            raise ConfigError(f"model.core.tolerance must be > 0, got {tolerance}")
        if max_iterations is not None and max_iterations < 1:
            raise ConfigError(f"model.core.max_iterations must be >= 1 or null, got {max_iterations}")
        self.tolerance, self.max_iterations = tolerance, max_iterations
        # u_z, u_r, u_h per layer, within +-1 / sqrt(H) as a GRU's recurrent weights start
        bound = 1 / math.sqrt(hidden_size)
        self.recurrent = nn.ParameterList(nn.Parameter(torch.empty(3, hidden_size).uniform_(-bound, bound))
                                          for _ in range(num_layers))
        self.iterations: list[int] = []

    def recurrence(self, layer: int, k: Tensor, h0: Tensor) -> Tensor:
        u = self.recurrent[layer].to(k.dtype)
        if layer == 0 and self.training:
            self.iterations = []
        if self.evaluation == "sequential":
            h, steps = h0, []
            for k_t in k.unbind(1):
                h = diagonal_gru_step(k_t, u, h)[0]
                steps.append(h)
            return torch.stack(steps, dim=1)
        solution, iterations = self._solve(k.detach(), u.detach(), h0.detach())
        if self.training:
            self.iterations.append(iterations)
        before = torch.cat([h0.detach().unsqueeze(1), solution[:, :-1]], dim=1)  # h*_{t-1}, (B, T, H)
        f, jacobian = diagonal_gru_step(k, u, before)
        jacobian = jacobian.detach()
        return linear_scan(jacobian, f - jacobian * before, h0)  # = h*, with the sequential recurrence's gradient

    @torch.no_grad()
    def _solve(self, k: Tensor, u: Tensor, h0: Tensor) -> tuple[Tensor, int]:
        """Newton's iterations from h = 0 at every step; returns the solution (B, T, H) and the iterations run."""
        steps = k.shape[1]
        guess = k.new_zeros(k.shape[0], steps, self.hidden_size)
        limit = steps if self.max_iterations is None else min(self.max_iterations, steps)
        for iteration in range(1, limit + 1):  # noqa: B007 (the count is returned after the loop)
            before = torch.cat([h0.unsqueeze(1), guess[:, :-1]], dim=1)
            f, jacobian = diagonal_gru_step(k, u, before)
            new = linear_scan(jacobian, f - jacobian * before, h0)
            moved = float((new - guess).abs().max())  # the host decides: one wait per iteration
            guess = new
            if moved <= self.tolerance or not math.isfinite(moved):  # non-finite: the engine skips the step
                break
        return guess, iteration

    def training_metrics(self) -> dict[str, float]:
        """Logged by the engine on logging steps: the mean Newton iterations over layers, latest window."""
        return {NEWTON_ITERATIONS: sum(self.iterations) / len(self.iterations)} if self.iterations else {}
