"""The diagonal GRU (ParaRNN): its Jacobian is df/dh, Newton's parallel evaluation equals the
step-by-step loop in values, states and gradients window after window, converges in at most T
iterations whatever the weights, and trains under the TBPTT engine as the loop does. float64."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from bptt.errors import ConfigError
from bptt.lightning_modules import LanguageModelTask
from bptt.metric_names import NEWTON_ITERATIONS
from bptt.models import DiagonalGRU, RNNLanguageModel
from bptt.models.newton_rnn import diagonal_gru_step
from tests.engine_harness import run, sgd, stream_batches
from tests.models.core_windows import assert_same_windows

B, T, E, H, L = 3, 9, 5, 4, 2


def _core(*, scale: float = 1.0, dropout: float = 0.0, **kwargs) -> DiagonalGRU:
    torch.manual_seed(0)
    core = DiagonalGRU(input_size=E, hidden_size=H, num_layers=L, dropout=dropout, tolerance=1e-13, **kwargs).double()
    with torch.no_grad():
        for u in core.recurrent:
            u.mul_(scale)
        for norm in core.norms:
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    return core


def test_the_cells_jacobian_is_diagonal_and_equals_autograds():
    gen = torch.Generator().manual_seed(3)
    k = torch.randn(2, 3 * H, generator=gen, dtype=torch.float64)
    u = torch.randn(3, H, generator=gen, dtype=torch.float64)
    h = torch.randn(2, H, generator=gen, dtype=torch.float64)
    for row in range(2):
        full = torch.autograd.functional.jacobian(  # (H, H)
            lambda v, row=row: diagonal_gru_step(k[row], u, v)[0], h[row]
        )
        torch.testing.assert_close(full, torch.diag(diagonal_gru_step(k[row], u, h[row])[1]), rtol=0, atol=1e-14)
    # the cell written out as a GRU with diagonal recurrent weights
    k_z, k_r, k_h = k.chunk(3, dim=-1)
    z, r = torch.sigmoid(k_z + u[0] * h), torch.sigmoid(k_r + u[1] * h)
    expected = (1 - z) * h + z * torch.tanh(k_h + u[2] * (r * h))
    torch.testing.assert_close(diagonal_gru_step(k, u, h)[0], expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("scale", [1.0, 8.0], ids=["as-initialized", "far-from-contractive"])
def test_newton_equals_sequential_in_values_states_and_gradients_window_after_window(scale):
    newton = _core(scale=scale, dropout=0.25)  # training mode: dropout on, the same masks by seed
    sequential = copy.deepcopy(newton)
    sequential.evaluation = "sequential"
    state = torch.randn(B, L, H, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def iterations_within_t():
        assert len(newton.iterations) == L and all(1 <= i <= T for i in newton.iterations)

    # parameters: the projection; per layer a norm's two, the cell's two and u
    assert_same_windows(newton, sequential, state, steps=T, parameters=2 + 5 * L, after_window=iterations_within_t)


def test_newton_needs_few_iterations_at_initialization_and_stops_at_its_limit():
    core = _core()
    x = torch.randn(B, 64, E, dtype=torch.float64)
    core(x)
    assert max(core.iterations) < 16, core.iterations  # nearly linear at initialization: far fewer than T = 64
    capped = _core(scale=8.0, max_iterations=2)  # strongly nonlinear: two iterations are not the solution yet
    y, _ = capped(x)
    assert capped.iterations == [2, 2]
    capped.evaluation = "sequential"
    assert (y - capped(x)[0]).abs().max() > 0.1


@pytest.mark.parametrize(("args", "message"), [
    ({"evaluation": "scan"}, "model.core.evaluation"),
    ({"tolerance": 0.0}, "model.core.tolerance must be > 0"),
    ({"max_iterations": 0}, "model.core.max_iterations must be >= 1"),
])
def test_bad_newton_arguments_fail_with_one_line(args, message):
    with pytest.raises(ConfigError, match=message):
        DiagonalGRU(input_size=E, hidden_size=H, **args)


def test_tbptt_with_newton_trains_as_the_loop_and_logs_its_iterations():
    """TBPTT(k1 = 4, k2 = 6) over streams: the Newton core's run equals the sequential core's, and the
    engine logs the mean iterations per layer."""
    tokens = torch.randint(0, 7, (3, 18), generator=torch.Generator().manual_seed(1))
    tasks = {}
    for evaluation in ("newton", "sequential"):
        torch.manual_seed(0)
        core = lambda input_size, evaluation=evaluation: DiagonalGRU(  # noqa: E731
            input_size=input_size, hidden_size=H, num_layers=L, evaluation=evaluation, tolerance=1e-13)
        model = RNNLanguageModel(vocab_size=7, embedding_size=4, core=core)
        tasks[evaluation] = LanguageModelTask(model=model, optimizer=sgd(0.5), k1=4, k2=6)
        trainer = run(tasks[evaluation], stream_batches(tokens, 8))
    for (name, p), q in zip(tasks["newton"].named_parameters(), tasks["sequential"].parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-10, msg=name)
    assert NEWTON_ITERATIONS not in trainer.callback_metrics  # the sequential run has none
    task = LanguageModelTask(model=copy.deepcopy(tasks["newton"].model), optimizer=sgd(0.5), k1=4, k2=6)
    trainer = run(task, stream_batches(tokens, 8))
    assert 1 <= trainer.callback_metrics[NEWTON_ITERATIONS].item() <= 6


def test_bptt_fit_trains_a_diagonal_gru_from_the_config_and_logs_its_iterations(tmp_path):
    from bptt.config.parser import parse_config
    from bptt.training.run import fit
    from tests.bptt_command import SMALL

    core = {"class_path": "bptt.models.DiagonalGRU", "init_args": {"hidden_size": 16, "num_layers": 2}}
    metrics = fit(parse_config([
        *SMALL, "--model.rnn_type", "null", "--model.hidden_size", "null", "--model.num_layers", "null",
        "--model.core", json.dumps(core), "--trainer.max_steps", "2", "--trainer.log_every_n_steps", "1",
        "--trainer.val_check_interval", "2",
        "--trainer.default_root_dir", str(tmp_path / "run"),
        "--tracking.tracking_uri", f"sqlite:///{tmp_path}/mlflow.db"]))
    assert 1 <= metrics[NEWTON_ITERATIONS] <= 16  # SMALL's windows are 16 steps
