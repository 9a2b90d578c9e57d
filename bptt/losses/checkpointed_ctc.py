"""CTC loss whose forward-backward lattice is kept in checkpoints: memory O(sqrt(T') * L), not O(T' * L).

``torch.nn.functional.ctc_loss`` holds the forward (alpha) and backward (beta) variables of
every frame and every state of the extended label sequence: B x T' x (2S + 1) floats each.
On a 10-minute utterance (T' = 30,000 frames, S = 1,500 labels) that is 720 MB, and it
grows with the square of the utterance's length, since labels grow with it too. Here the
forward pass keeps alpha only at the start of every chunk of C = ceil(sqrt(T')) frames; the
backward pass recomputes one chunk's alphas from its checkpoint and runs beta back through
it, turning alpha * beta into the gradient frame by frame (Graves et al. 2006, eq. 16)::

    forward:   a0 ----> a(C) ----> a(2C) ----> ... ----> loss       keep a(kC)
    backward:  for each chunk, last to first: recompute its alphas, step beta back over it

Shape legend: B batch, T' frames, V tokens (0 is the blank), S labels, L = 2S + 1 states.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

NEG_INF = float("-inf")


def _extended(targets: Tensor, target_lengths: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Blank-interleaved labels (B, L), where a skip from s - 2 to s is allowed (B, L), and L_b (B,)."""
    batch, labels = targets.shape
    ext = targets.new_zeros(batch, 2 * labels + 1)
    ext[:, 1::2] = targets  # (B, L): blank l1 blank l2 ... blank
    skip = torch.zeros_like(ext, dtype=torch.bool)
    skip[:, 2:] = (ext[:, 2:] != 0) & (ext[:, 2:] != ext[:, :-2])  # between different labels only
    return ext, skip, 2 * target_lengths + 1


def _shift(x: Tensor, by: int) -> Tensor:
    """(B, L) -> (B, L): x[:, s - by], -inf where s < by."""
    return F.pad(x, (by, 0), value=NEG_INF)[:, : x.shape[1]]


def _alpha_step(alpha: Tensor, emit: Tensor, skip: Tensor) -> Tensor:
    """alpha_t from alpha_(t-1) (B, L) and this frame's log-probabilities of the states (B, L)."""
    two_back = _shift(alpha, 2).masked_fill(~skip, NEG_INF)
    return torch.logaddexp(torch.logaddexp(alpha, _shift(alpha, 1)), two_back) + emit


def _alpha_start(emit: Tensor, ext_lengths: Tensor) -> Tensor:
    alpha = torch.full_like(emit, NEG_INF)  # (B, L)
    alpha[:, 0] = emit[:, 0]
    has_label = ext_lengths > 1
    alpha[:, 1] = torch.where(has_label, emit[:, 1], NEG_INF)
    return alpha


def _final_states(ext_lengths: Tensor, width: int) -> Tensor:
    """(B, L) true at the last two states of each utterance (the last blank and the last label)."""
    states = torch.arange(width, device=ext_lengths.device)
    return (states == ext_lengths[:, None] - 1) | ((states == ext_lengths[:, None] - 2) & (ext_lengths[:, None] > 1))


def _forward(log_probs: Tensor, ext: Tensor, skip: Tensor, ext_lengths: Tensor, input_lengths: Tensor,
             chunk: int) -> tuple[Tensor, list[Tensor]]:
    """Negative log-likelihoods (B,) and alpha at the end of every chunk but the last."""
    frames = log_probs.shape[1]
    alpha = _alpha_start(log_probs[:, 0].gather(1, ext), ext_lengths)
    checkpoints = []
    for t in range(1, frames):
        if t % chunk == 0:
            checkpoints.append(alpha)  # alpha_(t-1): where the chunk starting at t begins
        step = _alpha_step(alpha, log_probs[:, t].gather(1, ext), skip)
        alpha = torch.where((t < input_lengths)[:, None], step, alpha)  # frozen after each utterance's end
    ends = alpha.masked_fill(~_final_states(ext_lengths, ext.shape[1]), NEG_INF)
    return -torch.logsumexp(ends, dim=1), checkpoints


def _backward(log_probs: Tensor, ext: Tensor, skip: Tensor, ext_lengths: Tensor, input_lengths: Tensor,
              nll: Tensor, checkpoints: list[Tensor], chunk: int) -> Tensor:
    """d nll_b / d log_probs (B, T', V): minus the posterior of each token at each frame."""
    batch, frames, _ = log_probs.shape
    grad = torch.zeros_like(log_probs)
    feasible = torch.isfinite(nll)  # infeasible utterances get no gradient, as with zero_infinity
    final = _final_states(ext_lengths, ext.shape[1])
    beta = torch.full_like(nll[:, None].expand(batch, ext.shape[1]), NEG_INF)  # (B, L), excludes frame t's emission
    skip_next = F.pad(skip, (0, 2), value=False)[:, 2:]  # (B, L): may s jump to s + 2
    for start in reversed(range(0, frames, chunk)):
        end = min(start + chunk, frames)
        emits = log_probs[:, start:end].gather(2, ext[:, None].expand(-1, end - start, -1))  # (B, c, L)
        alphas = [_alpha_start(emits[:, 0], ext_lengths) if start == 0
                  else _alpha_step(checkpoints[start // chunk - 1], emits[:, 0], skip)]
        for i in range(1, end - start):
            alphas.append(_alpha_step(alphas[-1], emits[:, i], skip))
        for i in reversed(range(end - start)):
            t = start + i
            beta = torch.where(((input_lengths - 1) == t)[:, None] & final, 0.0, beta)  # each utterance's last frame
            posterior = torch.exp(alphas[i] + beta + nll[:, None])  # (B, L): of state s at frame t
            posterior = torch.where(((t < input_lengths) & feasible)[:, None], posterior, 0.0)
            grad[:, t].scatter_add_(1, ext, -posterior)
            here = beta + emits[:, i]  # beta_(t-1)(s) sums over s, s + 1, s + 2 at frame t
            beta = torch.logaddexp(torch.logaddexp(here, F.pad(here, (0, 1), value=NEG_INF)[:, 1:]),
                                   F.pad(here, (0, 2), value=NEG_INF)[:, 2:].masked_fill(~skip_next, NEG_INF))
    return grad


class _CheckpointedCTC(torch.autograd.Function):
    @staticmethod
    def forward(ctx, log_probs: Tensor, targets: Tensor, input_lengths: Tensor, target_lengths: Tensor) -> Tensor:
        chunk = max(1, math.ceil(math.sqrt(log_probs.shape[1])))
        ext, skip, ext_lengths = _extended(targets, target_lengths)
        nll, checkpoints = _forward(log_probs, ext, skip, ext_lengths, input_lengths, chunk)
        ctx.save_for_backward(log_probs, ext, skip, ext_lengths, input_lengths, nll, *checkpoints)
        ctx.chunk = chunk
        return nll

    @staticmethod
    def backward(ctx, grad_nll: Tensor) -> tuple[Tensor | None, None, None, None]:
        log_probs, ext, skip, ext_lengths, input_lengths, nll, *checkpoints = ctx.saved_tensors
        grad = _backward(log_probs, ext, skip, ext_lengths, input_lengths, nll, checkpoints, ctx.chunk)
        return grad * grad_nll[:, None, None], None, None, None


def checkpointed_ctc_loss(log_probs: Tensor, targets: Tensor, input_lengths: Tensor, target_lengths: Tensor) -> Tensor:
    """CTC negative log-likelihood per utterance, with infeasible ones at 0 (like ``zero_infinity``).

    Args:
        log_probs: (B, T', V) log-probabilities, batch-first; blank = 0.
        targets: (B, S) label ids, padded.
        input_lengths: (B,) valid frames.
        target_lengths: (B,) labels.

    Returns:
        (B,) losses, differentiable with respect to ``log_probs``.
    """
    nll = _CheckpointedCTC.apply(log_probs, targets, input_lengths, target_lengths)
    return torch.where(torch.isfinite(nll), nll, torch.zeros_like(nll))
