"""A core's parallel evaluation against its step-by-step reference, window after window (float64)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from bptt.models import RecurrentCore


def assert_same_windows(fast: RecurrentCore, reference: RecurrentCore, state: torch.Tensor, *, steps: int,
                        parameters: int, after_window: Callable[[], None] = lambda: None) -> None:
    """Three windows of ``steps`` through both cores from the carried ``state`` (B, L, H), with the same
    dropout masks (by seed): equal outputs, final states, start-state and parameter gradients (1e-10) of a
    loss that weighs every output and the state handed on; every one of the ``parameters`` gradients
    non-zero. Between windows the state is carried as TBPTT does: detached, and a reset stream's row zeroed.
    ``after_window`` runs its own checks after each window."""
    batch, layers, hidden = state.shape
    gen = torch.Generator().manual_seed(2)
    for window in range(3):
        x = torch.randn(batch, steps, fast.input_size, generator=gen, dtype=torch.float64)
        y_weight = torch.randn(batch, steps, hidden, generator=gen, dtype=torch.float64)
        h_weight = torch.randn(batch, layers, hidden, generator=gen, dtype=torch.float64)
        got = []
        for core in (fast, reference):
            core.zero_grad()
            h0 = state.clone().requires_grad_()
            torch.manual_seed(10 + window)
            y, (h,) = core(x, (h0,))
            ((y * y_weight).sum() + (h * h_weight).sum()).backward()
            got.append((y, h, h0.grad, {n: p.grad for n, p in core.named_parameters()}))
        (y, h, h0_grad, grads), (y_ref, h_ref, h0_grad_ref, grads_ref) = got
        assert y.shape == (batch, steps, hidden) and h.shape == (batch, layers, hidden)
        torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-10)
        torch.testing.assert_close(h, h_ref, rtol=0, atol=1e-10)
        torch.testing.assert_close(h0_grad, h0_grad_ref, rtol=0, atol=1e-10)
        assert h0_grad.abs().sum() > 0  # the gradient reaches the start state
        assert grads.keys() == grads_ref.keys() and len(grads) == parameters
        for name in grads:
            assert grads[name] is not None and grads[name].abs().sum() > 0, name
            torch.testing.assert_close(grads[name], grads_ref[name], rtol=0, atol=1e-10, msg=name)
        after_window()
        state = h.detach().clone()
        state[window % batch] = 0
