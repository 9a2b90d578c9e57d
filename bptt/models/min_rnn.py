"""minGRU and minLSTM: recurrent cores whose gates read the input only, so a window runs parallel in time.

Feng et al. 2024, "Were RNNs All We Needed?" (arXiv 2410.01201). Both cells drop the hidden state
from their gates, which leaves a linear recurrence with input-dependent coefficients::

    h_t = a_t * h_{t-1} + b_t,    a_t in (0, 1), b_t > 0 (elementwise)

    minGRU:  z = sigmoid(k_z), a = 1 - z, b = z * g(k_h)
    minLSTM: f = sigmoid(k_f), i = sigmoid(k_i), a = f / (f + i), b = i / (f + i) * g(k_h)

with the k's linear in the cell's input and g(v) = v + 0.5 for v >= 0, sigmoid(v) below (> 0).

Shape legend: B batch (streams), T time steps, E input size, H hidden size (the width of y and of
every layer), L layers, N = ceil(T / C) chunks of C steps. The state is ``(h,)``, h (B, L, H): the
last step's h of every layer (what ``bptt.gradient_diagnostics`` differentiates through).

The stack: a linear projection E -> H (none when E == H), then L pre-norm residual blocks,
``x = x + dropout(cell(LayerNorm(x), h0 of the layer))``; y is the last block's x. The dropout lies on
every block's branch, the last one's too, never on the residual path or the carried state.

Three evaluations of the same parameters, equal up to rounding:

- ``scan`` (default, training): the window in two levels of C ~ sqrt(T) steps, in linear space.
  Within every chunk at once (one tensor op per step of a chunk, over all N chunks): the recurrence from
  a zero state, s; then a loop over the N chunk ends finds each chunk's start state h_c, and C more ops
  carry it in, h_t = s_t + (a_1 ... a_t) * h_c. About 3 sqrt(T) small ops instead of T, and no log, no
  division: a running product of a's in (0, 1) that underflows to 0 is its exact value, so any window
  length and saturated gates are as safe as the loop. Its backward is the same scan run backwards in time
  (``LinearScan``): g_t = dL/dh_t + a_{t+1} g_{t+1}, dL/db_t = g_t, dL/da_t = g_t h_{t-1}; it keeps a and
  h for the backward, nothing per op.
- ``log_scan``: Heinsen's log-space scan (arXiv 2311.06281), the paper's choice: a*_t = cumsum(log a)_t,
  log s_t = a*_t + logcumsumexp(log b - a*)_t, one cumsum and one logcumsumexp over a chunk of
  ``LOG_SCAN_CHUNK`` steps (unchunked, |a*_t| grows with t and the sum cancels: 2e-4 relative error in
  float32 at T = 4096; in chunks of 32, about 2e-6). Only log a and log b enter logs (b > 0 is why g
  exists), never the carried h_0. Fewer, larger ops than ``scan`` (for a GPU), but a dozen passes over
  the window and a logcumsumexp: on a 2-core CPU 2.5x slower than ``scan`` (benchmarks/parallel_time.py).
- ``sequential``: a loop over t, h = a_t * h + b_t in linear space: the reference. The gates of the
  whole window are one matmul either way; a core called one step at a time (generation, streaming
  inference) is this with T = 1.

All three compute the recurrence in float32 at least (bf16 / fp16 under autocast are cast up; float64
stays float64).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bptt.models.arguments import check_choice, check_dropout, check_sizes
from bptt.models.cores import RecurrentCore, State

MinRNNEvaluation = Literal["scan", "log_scan", "sequential"]
EVALUATIONS = ("scan", "log_scan", "sequential")

# The steps of one chunk of the log-space scan: its float32 error grows with it (about 1e-7 * C * |log a|),
# its loop over chunk ends with T / C.
LOG_SCAN_CHUNK = 32


class _MinRNNCore(RecurrentCore):
    """The stack shared by minGRU and minLSTM (and ``bptt.models.newton_rnn.DiagonalGRU``); a subclass
    gives the cell's coefficients a and b, or its own ``recurrence``.

    Args:
        input_size: E.
        hidden_size: H, the width of every layer and of y.
        num_layers: L.
        dropout: dropout on every block's branch before the residual sum; in [0, 1).
        evaluation: ``scan`` (parallel in time, linear space), ``log_scan`` (log space) or ``sequential``.
    """

    gates: int  # pre-activations per hidden unit: k_z, k_h (minGRU) or k_f, k_i, k_h (minLSTM)
    evaluations: tuple[str, ...] = EVALUATIONS  # what ``evaluation`` may be

    def __init__(self, *, input_size: int, hidden_size: int = 256, num_layers: int = 2, dropout: float = 0.0,
                 evaluation: MinRNNEvaluation = "scan") -> None:
        check_sizes(prefix="model.core", input_size=input_size, hidden_size=hidden_size, num_layers=num_layers)
        check_dropout(dropout, key="model.core.dropout")
        check_choice(evaluation, self.evaluations, key="model.core.evaluation")
        super().__init__()
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.evaluation = evaluation
        self.input_projection = nn.Identity() if input_size == hidden_size else nn.Linear(input_size, hidden_size)
        self.norms = nn.ModuleList(nn.LayerNorm(hidden_size) for _ in range(num_layers))
        # one Linear per layer; its output is [k_z; k_h] (minGRU) or [k_f; k_i; k_h] (minLSTM), H rows each
        self.cells = nn.ModuleList(nn.Linear(hidden_size, self.gates * hidden_size) for _ in range(num_layers))
        self.dropout = nn.Dropout(dropout)

    def coefficients(self, k: Tensor) -> tuple[Tensor, Tensor]:
        """(a, b), each (B, T, H), from the pre-activations k (B, T, gates * H)."""
        raise NotImplementedError

    def log_coefficients(self, k: Tensor) -> tuple[Tensor, Tensor]:
        """(log a, log b), each (B, T, H), computed stably from k (B, T, gates * H)."""
        raise NotImplementedError

    def recurrence(self, layer: int, k: Tensor, h0: Tensor) -> Tensor:
        """One layer's states h (B, T, H) from its pre-activations k (B, T, gates * H) and h0 (B, H), float32+."""
        if self.evaluation == "scan":
            return linear_scan(*self.coefficients(k), h0)
        if self.evaluation == "log_scan":
            return chunked_log_scan(*self.log_coefficients(k), h0)
        return sequential_scan(*self.coefficients(k), h0)

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """Run the stack over one window.

        Args:
            x: (B, T, E) inputs.
            state: ``(h,)``, h (B, L, H), the carried state, or None for zeros.

        Returns:
            y (B, T, H), the last block's outputs, and ``(h,)``, h (B, L, H) after the last step; both in
            x's dtype.
        """
        dtype = x.dtype
        x = self.input_projection(x)  # (B, T, H)
        last = []
        for layer, (norm, cell) in enumerate(zip(self.norms, self.cells)):
            k = cell(norm(x))  # (B, T, gates * H)
            k = k.to(torch.promote_types(k.dtype, torch.float32))  # bf16 / fp16 (autocast) -> float32
            if state is None:
                h0 = k.new_zeros(k.shape[0], self.hidden_size)
            else:
                h0 = state[0][:, layer].to(k.dtype)  # (B, H)
            h = self.recurrence(layer, k, h0)  # (B, T, H)
            last.append(h[:, -1])
            x = x + self.dropout(h)
        return x.to(dtype), (torch.stack(last, dim=1).to(dtype),)


class MinGRU(_MinRNNCore):
    """minGRU (Feng et al. 2024): z = sigmoid(k_z), h_t = (1 - z_t) * h_{t-1} + z_t * g(k_h,t).

    A stack of pre-norm residual blocks; see the module docstring for the stack, the state and the
    two evaluations.

    Args:
        input_size: E.
        hidden_size: H, the width of every layer and of y.
        num_layers: L.
        dropout: dropout on every block's branch before the residual sum; in [0, 1).
        evaluation: ``scan`` (parallel in time, default), ``log_scan`` or ``sequential`` (a loop over steps).
    """

    gates = 2

    def coefficients(self, k: Tensor) -> tuple[Tensor, Tensor]:
        k_z, k_h = k.chunk(2, dim=-1)
        return torch.sigmoid(-k_z), torch.sigmoid(k_z) * _g(k_h)  # 1 - z, z * h~

    def log_coefficients(self, k: Tensor) -> tuple[Tensor, Tensor]:
        k_z, k_h = k.chunk(2, dim=-1)
        return -F.softplus(k_z), -F.softplus(-k_z) + _log_g(k_h)  # log(1 - z), log z + log h~


class MinLSTM(_MinRNNCore):
    """minLSTM (Feng et al. 2024): f, i = sigmoid(k_f), sigmoid(k_i), normalized to f' + i' = 1;
    h_t = f'_t * h_{t-1} + i'_t * g(k_h,t).

    A stack of pre-norm residual blocks; see the module docstring for the stack, the state (h only:
    the paper's minLSTM has no cell state) and the two evaluations.

    Args:
        input_size: E.
        hidden_size: H, the width of every layer and of y.
        num_layers: L.
        dropout: dropout on every block's branch before the residual sum; in [0, 1).
        evaluation: ``scan`` (parallel in time, default), ``log_scan`` or ``sequential`` (a loop over steps).
    """

    gates = 3

    def coefficients(self, k: Tensor) -> tuple[Tensor, Tensor]:
        k_f, k_i, k_h = k.chunk(3, dim=-1)
        diff = F.softplus(-k_f) - F.softplus(-k_i)  # log i - log f
        return torch.sigmoid(-diff), torch.sigmoid(diff) * _g(k_h)  # f / (f + i), i / (f + i) * h~

    def log_coefficients(self, k: Tensor) -> tuple[Tensor, Tensor]:
        k_f, k_i, k_h = k.chunk(3, dim=-1)
        diff = F.softplus(-k_f) - F.softplus(-k_i)
        return -F.softplus(diff), -F.softplus(-diff) + _log_g(k_h)  # log f', log i' + log h~


def _g(v: Tensor) -> Tensor:
    """g(v) = v + 0.5 for v >= 0, sigmoid(v) below: continuous and > 0."""
    return torch.where(v >= 0, v + 0.5, torch.sigmoid(v))


def _log_g(v: Tensor) -> Tensor:
    """log g(v), with no log of a value <= 0 in either branch (a where's unused branch still gets a gradient)."""
    return torch.where(v >= 0, torch.log(F.relu(v) + 0.5), -F.softplus(-v))


def sequential_scan(a: Tensor, b: Tensor, h0: Tensor) -> Tensor:
    """h_t = a_t * h_{t-1} + b_t, a loop over t.

    Args:
        a, b: (B, T, H) coefficients.
        h0: (B, H) the state before the first step.

    Returns:
        h (B, T, H), every step's state.
    """
    h, steps = h0, []
    for a_t, b_t in zip(a.unbind(1), b.unbind(1)):  # unbind, not a[:, t]: whose backward is a (B, T, H) zeros per step
        h = a_t * h + b_t
        steps.append(h)
    return torch.stack(steps, dim=1)


def chunked_log_scan(log_a: Tensor, log_b: Tensor, h0: Tensor, chunk: int | None = None) -> Tensor:
    """h_t = a_t * h_{t-1} + b_t, parallel within chunks of C steps, in log space (Heinsen 2023).

    Within a chunk that starts from h_c: h_t = A_t * h_c + s_t, A_t = exp(a*_t), a*_t the cumsum of
    log a from the chunk's start, and s_t = exp(a*_t + logcumsumexp(log b - a*)_t) the chunk's
    recurrence from zero. The N chunk-start states h_c follow by a loop over the chunk ends. Only log a
    and log b (finite for finite inputs) enter logs, never h0.

    Args:
        log_a, log_b: (B, T, H) logs of the coefficients, a in (0, 1) and b > 0.
        h0: (B, H) the state before the first step; any sign.
        chunk: C (default ``LOG_SCAN_CHUNK``); T <= C is one chunk, the plain Heinsen scan.

    Returns:
        h (B, T, H), every step's state.
    """
    batch, steps, width = log_a.shape
    size = min(LOG_SCAN_CHUNK if chunk is None else chunk, steps)  # C
    count = -(-steps // size)  # N
    pad = count * size - steps  # the last chunk's tail: a = b = 1, after every real step, so it changes none
    if pad:
        log_a, log_b = F.pad(log_a, (0, 0, 0, pad)), F.pad(log_b, (0, 0, 0, pad))
    log_a = log_a.reshape(batch, count, size, width)  # (B, N, C, H)
    log_b = log_b.reshape(batch, count, size, width)
    a_star = log_a.cumsum(dim=2)  # (B, N, C, H), <= 0
    decay = a_star.exp()  # A, (B, N, C, H); underflow to 0 is harmless
    rise = (a_star + torch.logcumsumexp(log_b - a_star, dim=2)).exp()  # s, (B, N, C, H)
    h, starts = h0, []
    for decay_n, rise_n in zip(decay[:, :, -1].unbind(1), rise[:, :, -1].unbind(1)):  # each (B, H), chunk n's end
        starts.append(h)
        h = decay_n * h + rise_n  # the state after chunk n
    start = torch.stack(starts, dim=1).unsqueeze(2)  # (B, N, 1, H)
    return (decay * start + rise).reshape(batch, count * size, width)[:, :steps]


def linear_scan(a: Tensor, b: Tensor, h0: Tensor, chunk: int | None = None) -> Tensor:
    """h_t = a_t * h_{t-1} + b_t in two levels of chunks, in linear space, with its own backward.

    Args:
        a, b: (B, T, H) coefficients; a in [0, 1] keeps every product bounded (any a is exact, though).
        h0: (B, H) the state before the first step; any sign.
        chunk: C, the steps of a chunk (default: a divisor of T near sqrt(T), else ceil(sqrt(T)): about
            2 sqrt(T) small ops, the fewest).

    Returns:
        h (B, T, H), every step's state.
    """
    return LinearScan.apply(a, b, h0, chunk)


class LinearScan(torch.autograd.Function):
    """The autograd of ``linear_scan``: the backward is the same two-level scan, backwards in time.

    With g_t = dL/dh_t in total (the direct gradient plus what h_{t+1} = a_{t+1} h_t + ... hands back):
    g_t = grad_t + a_{t+1} g_{t+1}, so dL/db_t = g_t, dL/da_t = g_t * h_{t-1}, dL/dh0 = a_1 * g_1.
    Saves a, h0 and h; no graph of the scan's own ops, and one (B, T, H) buffer per pass (on a CPU every
    fresh buffer that size is page-faulted in anew: see docs/parallel-in-time.md). Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, h0: Tensor, chunk: int | None) -> Tensor:  # noqa: D102
        a, b = a.contiguous(), b.contiguous()
        h = _scan_forward(a, b, h0, chunk)
        ctx.save_for_backward(a, h0, h)
        ctx.chunk = chunk
        return h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:  # noqa: D102
        a, h0, h = ctx.saved_tensors
        g = _scan_backward(a, grad.contiguous(), ctx.chunk)  # (B, T, H), dL/dh_t in total
        grad_a = torch.empty_like(g)
        torch.mul(g[:, 1:], h[:, :-1], out=grad_a[:, 1:])  # g_t * h_{t-1}
        torch.mul(g[:, 0], h0, out=grad_a[:, 0])
        return grad_a, g, a[:, 0] * g[:, 0], None


def _chunks(a: Tensor, *others: Tensor, chunk: int | None) -> tuple[int, int, list[Tensor]]:
    """(C, N, the tensors as (B, N, C, H) views): T padded to N * C steps with a = 1, the others 0 (a
    tail after every real step that changes none of them). C divides T where a divisor lies within
    [sqrt(T) / 2, sqrt(T)], so that no padding copy is needed."""
    batch, steps, width = a.shape
    if chunk:
        size = min(chunk, steps)
    else:
        root = math.isqrt(steps - 1) + 1  # ceil(sqrt(T))
        size = next((c for c in range(root, max(root // 2, 1) - 1, -1) if steps % c == 0), root)
    count = -(-steps // size)
    pad = count * size - steps
    if pad:
        a = F.pad(a, (0, 0, 0, pad), value=1.0)
        others = tuple(F.pad(t, (0, 0, 0, pad)) for t in others)
    return size, count, [t.reshape(batch, count, size, width) for t in (a, *others)]


def _scan_forward(a: Tensor, b: Tensor, h0: Tensor, chunk: int | None) -> Tensor:
    """``linear_scan``'s values: in every chunk at once the recurrence from zero (C ops over (B, N, H)
    slices), the chunk-start states by a loop over the N chunk ends, then each chunk-start state
    carried in (C more ops): h_c = s_c + (a_1 ... a_c) * h_start."""
    steps = a.shape[1]
    size, count, (a4, b4) = _chunks(a, b, chunk=chunk)
    out = torch.empty_like(b4)  # (B, N, C, H): s, then h
    out[:, :, 0] = b4[:, :, 0]
    for c in range(1, size):
        torch.addcmul(b4[:, :, c], a4[:, :, c], out[:, :, c - 1], out=out[:, :, c])
    decay = a4.prod(dim=2)  # (B, N, H): a chunk's product; underflow to 0 is its value
    starts = torch.empty_like(decay)  # h before every chunk
    h = h0
    for n in range(count):
        starts[:, n] = h
        h = torch.addcmul(out[:, n, -1], decay[:, n], h)
    carry = starts
    for c in range(size):
        carry = carry * a4[:, :, c]
        out[:, :, c] += carry
    return out.reshape(a.shape[0], count * size, a.shape[2])[:, :steps]


def _scan_backward(a: Tensor, grad: Tensor, chunk: int | None) -> Tensor:
    """g_t = grad_t + a_{t+1} g_{t+1} (g after the last step: 0), the forward's scheme backwards in time:
    within every chunk from zero at its end, then what chunk n + 1 hands back to chunk n's last step,
    e_n = a at chunk n + 1's first step times g there, by a loop over chunks, then carried in."""
    steps = a.shape[1]
    size, count, (a4, d4) = _chunks(a, grad, chunk=chunk)
    g = torch.empty_like(d4)
    g[:, :, -1] = d4[:, :, -1]
    for c in range(size - 2, -1, -1):
        torch.addcmul(d4[:, :, c], a4[:, :, c + 1], g[:, :, c + 1], out=g[:, :, c])
    decay = a4[:, :, 1:].prod(dim=2)  # (B, N, H): from a chunk's last step back to its first (1 when C = 1)
    enter = torch.zeros_like(decay)  # e_n
    e = torch.zeros_like(decay[:, 0])
    for n in range(count - 1, -1, -1):
        enter[:, n] = e
        e = a4[:, n, 0] * torch.addcmul(g[:, n, 0], decay[:, n], e)  # a times the full g at chunk n's first step
    carry = enter
    for c in range(size - 1, -1, -1):
        g[:, :, c] += carry
        carry = carry * a4[:, :, c]
    return g.reshape(a.shape[0], count * size, a.shape[2])[:, :steps]
