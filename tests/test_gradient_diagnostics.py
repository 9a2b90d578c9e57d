"""Gradient through time: on a linear RNN h_t = W h_(t-1) + U x_t with W = rho * (orthogonal), the measured
curve is rho^tau times its tau = 0 value and the suggestion is the analytic one; the callback leaves
training bit for bit unchanged; a minGRU's curve is the product of its gates; `bptt fit` logs it to MLflow
and `bptt diagnose` prints it."""

from __future__ import annotations

import json
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient
from torch import nn

from bptt.gradient_diagnostics import (
    GradientThroughTime,
    gradient_through_time,
    suggest_truncation,
)
from bptt.lightning_modules import LanguageModelTask
from bptt.lightning_modules.tbptt import StepLossModule
from bptt.models import MinGRU, RNNLanguageModel
from tests.bptt_command import SMALL, bptt
from tests.engine_harness import run, sgd, stream_batches, tiny_model


class LinearRNN(nn.Module):
    """h_t = W h_(t-1) + U x_t, output v . h_t; W = rho * Q with Q orthogonal. State: (h,) with h (B, 1, H)."""

    def __init__(self, rho: float, hidden: int = 6, inputs: int = 3) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        q, _ = torch.linalg.qr(torch.randn(hidden, hidden, generator=gen, dtype=torch.float64))
        self.w = nn.Parameter(rho * q)
        self.u = nn.Parameter(torch.randn(hidden, inputs, generator=gen, dtype=torch.float64))
        self.v = nn.Parameter(torch.randn(hidden, generator=gen, dtype=torch.float64))

    def forward(self, x: torch.Tensor, state=None):
        h = torch.zeros(x.shape[0], self.w.shape[0], dtype=x.dtype) if state is None else state[0][:, 0]
        outputs = []
        for t in range(x.shape[1]):
            h = h @ self.w.T + x[:, t] @ self.u.T  # (B, H)
            outputs.append(h @ self.v)  # (B,)
        return torch.stack(outputs, dim=1), (h[:, None],)  # (B, T), ((B, 1, H),)


class LinearTask(StepLossModule):
    """The loss at each step is the network's output there."""

    time_keys = ("inputs",)

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def window_step(self, window, state):
        return self.model(window["inputs"], state)


@pytest.mark.parametrize("rho", [0.5, 0.9, 1.1])
def test_linear_rnn_curve_is_rho_to_the_tau(rho):
    model = LinearRNN(rho)
    window = {"inputs": torch.randn(4, 40, 3, dtype=torch.float64)}
    curve = gradient_through_time(LinearTask(model), window, probe_steps=30)  # (31, 1)
    taus = torch.arange(31, dtype=torch.float64)
    torch.testing.assert_close(curve[:, 0].double(), curve[0, 0].double() * rho**taus, rtol=1e-5, atol=0)
    # tau = 0: the state the last step reads is one W away from its output: || W^T v || = rho || v ||
    assert float(curve[0, 0]) == pytest.approx(rho * float(model.v.detach().norm()), rel=1e-6)


@pytest.mark.parametrize(("rho", "eps"), [(0.5, 0.01), (0.9, 0.01), (0.8, 0.001)])
def test_suggestion_is_the_analytic_truncation(rho, eps):
    curve = gradient_through_time(LinearTask(LinearRNN(rho)), {"inputs": torch.randn(2, 80, 3, dtype=torch.float64)},
                                  probe_steps=70)
    analytic = math.floor(math.log(eps) / math.log(rho)) + 1  # the smallest tau with rho^tau < eps
    assert suggest_truncation(curve, eps) == analytic
    assert suggest_truncation(curve[: analytic], eps) is None  # not reached within the probe


def test_a_scan_cores_curve_is_the_product_of_its_gates():
    """One minGRU layer: h_t = a_t * h_(t-1) + b_t with a_t from the input only, so the last step's loss reaches
    the state tau steps back through G * a_(n-2) * ... * a_(n-1-tau), G its gradient at tau = 0."""
    torch.manual_seed(0)
    model = RNNLanguageModel(vocab_size=7, embedding_size=4, core=partial(MinGRU, hidden_size=5, num_layers=1)).double()
    task = LanguageModelTask(model=model, optimizer=sgd())
    tokens = torch.randint(0, 7, (3, 26), generator=torch.Generator().manual_seed(1))
    window = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}  # n = 25 steps
    curve = gradient_through_time(task, window, probe_steps=20)  # (21, 1)
    core = model.rnn
    with torch.no_grad():
        x = core.input_projection(model.embedding(window["inputs"]))
        a, _ = core.coefficients(core.cells[0](core.norms[0](x)))  # (B, n, H)
        _, state = model(window["inputs"][:, :-1])  # the state the last step reads
    state = state[0].detach().requires_grad_()
    logits, _ = model(window["inputs"][:, -1:], (state,))
    loss = F.cross_entropy(logits[:, -1], window["targets"][:, -1], reduction="sum")
    (g,) = torch.autograd.grad(loss, state)
    g = g[:, 0]  # (B, H)
    expected = [g.norm(dim=1).mean()]
    for tau in range(1, 21):
        g = g * a[:, -1 - tau]
        expected.append(g.norm(dim=1).mean())
    torch.testing.assert_close(curve[:, 0].double(), torch.stack(expected), rtol=1e-5, atol=0)
    assert curve[20, 0] < 0.5 * curve[0, 0]  # the gates forget: a curve that falls


def test_callback_leaves_training_unchanged():
    tokens = torch.randint(0, 7, (3, 41), generator=torch.Generator().manual_seed(2))
    results = {}
    for measured in (False, True):
        model = tiny_model()
        model.dropout.p = 0.3  # dropout: the measurement must not draw random numbers either
        task = LanguageModelTask(model=model, optimizer=sgd(0.5))
        callbacks = [GradientThroughTime(every_n_steps=1, probe_steps=12, warmup_steps=4)] if measured else []
        run(task, stream_batches(tokens, 8), precision="64-true", callbacks=callbacks)
        results[measured] = (task, callbacks)
    for p, q in zip(results[False][0].model.parameters(), results[True][0].model.parameters()):
        assert torch.equal(p, q)
    metrics = results[True][1][0].last  # measured, with a probe joining two stream windows (12 + 1 + 4 > 8)
    assert "gradient_through_time/suggested_k" in metrics and metrics["gradient_through_time/layer1/tau12"] > 0


@pytest.mark.slow
def test_fit_logs_the_curve_and_diagnose_reads_a_checkpoint(mlflow_server, tmp_path):
    callback = [{"class_path": "bptt.gradient_diagnostics.GradientThroughTime",
                 "init_args": {"every_n_steps": 6, "probe_steps": 24, "warmup_steps": 8}}]
    result = bptt("fit", *SMALL, "--trainer.callbacks", json.dumps(callback), "--tracking.tracking_uri", mlflow_server,
                  "--tracking.experiment_name", "diagnostics", "--trainer.default_root_dir", str(tmp_path / "run"),
                  cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(mlflow_server)
    (run_,) = client.search_runs([client.get_experiment_by_name("diagnostics").experiment_id])
    files = {a.path for a in client.list_artifacts(run_.info.run_id, "gradient_through_time")}
    assert files == {f"gradient_through_time/step-{s:07d}.{ext}" for s in (6, 12) for ext in ("png", "json")}
    history = client.get_metric_history(run_.info.run_id, "gradient_through_time/layer0/tau0")
    assert [m.step for m in history] == [6, 12]

    out = tmp_path / "curve.json"
    result = bptt("diagnose", str(tmp_path / "run/checkpoints/last.ckpt"), "--probe-steps", "30", "--probes", "2",
                  "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "suggested truncation" in result.stdout or "stays above" in result.stdout
    record = json.loads(out.read_text())
    assert len(record["curve"]) == 31 and out.with_suffix(".png").is_file()


def test_diagnose_bad_input_fails_in_one_line(capsys):
    from bptt.cli import main
    from tests.conftest import PROJECT

    cases = [([], "needs --config FILE or a checkpoint"),
             (["--config", str(PROJECT / "conf/asr/fsdd_digits.yaml")], "needs a per-step loss"),
             (["--config", str(PROJECT / "conf/lm/quickstart.yaml"), "--eps", "2"], "0 < --eps < 1")]
    for args, message in cases:
        assert main(["diagnose", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
