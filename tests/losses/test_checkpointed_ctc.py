"""The checkpointed CTC loss equals torch's ctc_loss: losses and gradients (through log_softmax), float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bptt.losses.checkpointed_ctc import checkpointed_ctc_loss


def _case(frames: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, frames, 6, generator=gen, dtype=torch.float64, requires_grad=True)  # (B, T', V)
    targets = torch.tensor([[1, 1, 2, 5], [3, 4, 0, 0], [2, 2, 2, 0], [1, 0, 0, 0]])
    target_lengths = torch.tensor([4, 2, 3, 0])  # repeats, padding, and an empty transcript
    input_lengths = torch.tensor([frames, frames - 3, frames - 1, 2])
    return logits, targets, input_lengths, target_lengths


@pytest.mark.parametrize("frames", [7, 23, 64])  # chunks of 3, 5 and 8 frames: boundaries everywhere
def test_losses_and_gradients_equal_torch_ctc(frames):
    logits, targets, input_lengths, target_lengths = _case(frames, seed=frames)
    reference = F.ctc_loss(F.log_softmax(logits, -1).transpose(0, 1), targets, input_lengths, target_lengths,
                           reduction="none", zero_infinity=True)
    (expected,) = torch.autograd.grad(reference.sum(), logits)
    losses = checkpointed_ctc_loss(F.log_softmax(logits, -1), targets, input_lengths, target_lengths)
    (grad,) = torch.autograd.grad(losses.sum(), logits)
    torch.testing.assert_close(losses, reference, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(grad, expected, atol=1e-10, rtol=1e-10)


def test_infeasible_utterance_has_zero_loss_and_gradient_like_zero_infinity():
    logits, targets, input_lengths, target_lengths = _case(9, seed=1)
    input_lengths = torch.tensor([9, 9, 4, 2])  # 4 frames cannot hold 2 2 2 (needs 5)
    losses = checkpointed_ctc_loss(F.log_softmax(logits, -1), targets, input_lengths, target_lengths)
    (grad,) = torch.autograd.grad(losses.sum(), logits)
    assert losses[2] == 0 and bool(grad[2].eq(0).all()) and bool(torch.isfinite(grad).all())
    assert bool(grad[0].ne(0).any())
