"""minGRU and minLSTM cores: the parallel scan equals the step-by-step loop (values, states and gradients, window
after window), both equal the paper's equations written out here, the scan stays finite and accurate over 4096
steps in float32 and under bf16 autocast, and the cores build from a config and inside every model."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
import yaml

from bptt.errors import BpttError, ConfigError
from bptt.models import (
    MinGRU,
    MinLSTM,
    RecurrentCore,
    RNNAcousticModel,
    RNNForecaster,
    RNNLanguageModel,
    min_rnn,
)
from tests.models.core_windows import assert_same_windows

B, T, E, H, L = 3, 7, 5, 4, 2
CORES = [MinGRU, MinLSTM]


def _core(cls: type, *, input_size: int = E, num_layers: int = L, dropout: float = 0.0) -> RecurrentCore:
    """A float64 core whose LayerNorms have random affine parameters too (the defaults are 1 and 0)."""
    torch.manual_seed(0)
    core = cls(input_size=input_size, hidden_size=H, num_layers=num_layers, dropout=dropout).double()
    with torch.no_grad():
        for norm in core.norms:
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    return core


def _start(kind: str) -> torch.Tensor:
    """A (B, L, H) float64 start state: any sign, positive, or zeros."""
    gen = torch.Generator().manual_seed(1)
    if kind == "random":
        return torch.randn(B, L, H, generator=gen, dtype=torch.float64)
    if kind == "positive":
        return torch.rand(B, L, H, generator=gen, dtype=torch.float64) + 0.1
    return torch.zeros(B, L, H, dtype=torch.float64)


# scan: a window of 7 is chunks of ceil(sqrt(7)) = 3, 3 and 1 (padded); log_scan: chunks of 3 or one of 7
@pytest.mark.parametrize(("evaluation", "chunk"), [("scan", None), ("log_scan", 3), ("log_scan", 32)],
                         ids=["scan", "log-scan-chunks-of-3", "log-scan-one-chunk"])
@pytest.mark.parametrize("start", ["random", "positive", "zeros"])
@pytest.mark.parametrize("cls", CORES, ids=lambda c: c.__name__)
def test_scan_equals_sequential_in_values_states_and_gradients_window_after_window(cls, start, evaluation, chunk,
                                                                                    monkeypatch):
    if chunk is not None:
        monkeypatch.setattr(min_rnn, "LOG_SCAN_CHUNK", chunk)
    scan = _core(cls, dropout=0.25)  # training mode: dropout on, the same masks by seed
    scan.evaluation = evaluation
    sequential = copy.deepcopy(scan)
    sequential.evaluation = "sequential"
    # parameters: the projection's two; per layer a norm's two and the cell's two
    assert_same_windows(scan, sequential, _start(start), steps=T, parameters=2 + 4 * L)


@pytest.mark.parametrize("evaluation", ["scan", "log_scan"])
@pytest.mark.parametrize("cls", CORES, ids=lambda c: c.__name__)
def test_no_state_is_a_zero_state_and_one_step_is_the_same_either_way(cls, evaluation):
    core = _core(cls)
    core.evaluation = evaluation
    x = torch.randn(B, T, E, dtype=torch.float64)
    y, (h,) = core(x)
    y_zero, (h_zero,) = core(x, (torch.zeros(B, L, H, dtype=torch.float64),))
    assert torch.equal(y, y_zero) and torch.equal(h, h_zero)
    state = (_start("random"),)
    step, (h_step,) = core(x[:, :1], state)
    core.evaluation = "sequential"
    step_ref, (h_step_ref,) = core(x[:, :1], state)
    torch.testing.assert_close(step, step_ref, rtol=0, atol=1e-14)
    torch.testing.assert_close(h_step, h_step_ref, rtol=0, atol=1e-14)


def _g(v: torch.Tensor) -> torch.Tensor:
    return torch.where(v >= 0, v + 0.5, 1 / (1 + torch.exp(-v)))


def _paper(core: RecurrentCore, x: torch.Tensor, h0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The stack from the paper's equations, step by step in plain torch, on the core's own weights."""
    if core.input_size != core.hidden_size:
        x = x @ core.input_projection.weight.T + core.input_projection.bias
    last = []
    for layer, (norm, cell) in enumerate(zip(core.norms, core.cells)):
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        u = (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias
        k = u @ cell.weight.T + cell.bias
        if isinstance(core, MinGRU):
            z = 1 / (1 + torch.exp(-k[..., :H]))
            a, b = 1 - z, z * _g(k[..., H:])
        else:
            f, i = 1 / (1 + torch.exp(-k[..., :H])), 1 / (1 + torch.exp(-k[..., H:2 * H]))
            a, b = f / (f + i), i / (f + i) * _g(k[..., 2 * H:])
        h, steps = h0[:, layer], []
        for t in range(x.shape[1]):
            h = a[:, t] * h + b[:, t]
            steps.append(h)
        last.append(h)
        x = x + torch.stack(steps, dim=1)
    return x, torch.stack(last, dim=1)


@pytest.mark.parametrize("evaluation", ["scan", "log_scan", "sequential"])
@pytest.mark.parametrize(("num_layers", "input_size"), [(1, E), (1, H), (2, E)],
                         ids=["1-layer", "1-layer-no-projection", "2-layers"])
@pytest.mark.parametrize("cls", CORES, ids=lambda c: c.__name__)
def test_the_core_is_the_papers_cell_in_a_pre_norm_residual_stack(cls, num_layers, input_size, evaluation):
    core = _core(cls, input_size=input_size, num_layers=num_layers)
    core.evaluation = evaluation
    assert isinstance(core.input_projection, torch.nn.Identity) == (input_size == H)
    x = torch.randn(B, 9, input_size, dtype=torch.float64) * 2  # pre-activations on both sides of g's break at 0
    h0 = torch.randn(B, num_layers, H, dtype=torch.float64)
    y, (h,) = core(x, (h0,))
    y_ref, h_ref = _paper(core, x, h0)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(h, h_ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("evaluation", ["scan", "log_scan"])
@pytest.mark.parametrize("cls", CORES, ids=lambda c: c.__name__)
def test_4096_steps_in_float32_are_finite_and_match_the_loop(cls, evaluation):
    torch.manual_seed(0)
    core = cls(input_size=6, hidden_size=8, num_layers=2, evaluation=evaluation)
    x = torch.randn(2, 4096, 6)
    h0 = torch.zeros(2, 2, 8, requires_grad=True)  # zeros: a log of the state would make this gradient inf
    y, (h,) = core(x, (h0,))
    (y.sum() + h.sum()).backward()
    assert torch.isfinite(y).all() and torch.isfinite(h0.grad).all() and h0.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in core.parameters())
    with torch.no_grad():
        core.evaluation = "sequential"
        y_ref, (h_ref,) = core(x, (h0,))
        core.evaluation = evaluation
        # float32 rounding: 1e-4 of the output's scale (measured 1e-6; unchunked, the log-space scan is 1e-4 off)
        assert (y - y_ref).abs().max() <= 1e-4 * y_ref.abs().max()
        torch.testing.assert_close(h, h_ref, rtol=1e-4, atol=0)  # h > 0 (h0 = 0, b > 0); unchunked: off by 2e-4
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y_bf16, (h_bf16,) = core(x, (h0,))
    assert y_bf16.dtype == h_bf16.dtype == torch.float32  # the input's dtype
    assert torch.isfinite(y_bf16).all() and torch.isfinite(h_bf16).all()
    # the projections and gates in bf16 (eps 2^-7), the scan in float32: within 2 bf16 eps of the float32 run,
    # relative to the output's scale (measured: about 0.4 eps)
    assert (y_bf16 - y).abs().max() <= 2 * torch.finfo(torch.bfloat16).eps * y.abs().max()


@pytest.mark.parametrize(("evaluation", "tolerance"), [("scan", 1e-5), ("log_scan", 1e-2)])
@pytest.mark.parametrize("cls", CORES, ids=lambda c: c.__name__)
def test_saturated_gates_stay_finite(cls, evaluation, tolerance):
    """Gates at +-100s: a = 0 or 1 to float32, A underflows, log a is about -100 a step."""
    torch.manual_seed(0)
    core = cls(input_size=6, hidden_size=16, num_layers=2, evaluation=evaluation)
    with torch.no_grad():
        for cell in core.cells:
            cell.weight.mul_(300)
    x = torch.randn(2, 512, 6)
    h0 = torch.randn(2, 2, 16, requires_grad=True)
    y, (h,) = core(x, (h0,))
    (y.sum() + h.sum()).backward()
    assert torch.isfinite(y).all() and torch.isfinite(h).all() and torch.isfinite(h0.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in core.parameters())
    with torch.no_grad():
        core.evaluation = "sequential"
        y_ref, _ = core(x, (h0,))
    # linear space: float32 rounding of a reassociated sum, amplified by the 300x weights (measured 2e-6);
    # log space loses about 1e-7 * |sum of log a over a chunk| relative: ~1e-3 with gates this saturated
    assert (y - y_ref).abs().max() <= tolerance * y_ref.abs().max()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"hidden_size": 0}, "model.core.hidden_size must be an integer >= 1, got 0"),
        ({"num_layers": -1}, "model.core.num_layers must be an integer >= 1, got -1"),
        ({"input_size": 0}, "model.core.input_size must be an integer >= 1, got 0"),
        ({"dropout": 1.0}, r"model.core.dropout must be in \[0, 1\)"),
        ({"evaluation": "parallel"},
         r"model.core.evaluation must be one of \['log_scan', 'scan', 'sequential'\], got 'parallel'"),
    ],
)
@pytest.mark.parametrize("cls", CORES, ids=lambda c: c.__name__)
def test_bad_core_arguments_fail_with_one_line(cls, args, message):
    with pytest.raises(ConfigError, match=f"^{message}") as err:
        cls(**{"input_size": E, **args})
    assert isinstance(err.value, BpttError) and "\n" not in str(err.value)


def test_the_interface_sizes_and_state_shape():
    core = MinLSTM(input_size=E, hidden_size=H, num_layers=3)
    assert isinstance(core, RecurrentCore) and (core.input_size, core.hidden_size, core.num_layers) == (E, H, 3)
    assert core.evaluation == "scan" and core.cells[0].out_features == 3 * H
    assert MinGRU(input_size=E, hidden_size=H).cells[0].out_features == 2 * H
    y, state = core(torch.randn(B, T, E))
    assert y.shape == (B, T, H) and len(state) == 1 and state[0].shape == (B, 3, H)


def test_a_min_gru_config_instantiates_through_the_run_parser(tmp_path):
    from bptt.config.parser import build_parser, instantiate, parse_config
    from bptt.datamodules.text_corpus import Vocabulary
    from tests.conftest import PROJECT

    vocab = tmp_path / "vocab.json"
    Vocabulary(["<unk>", "<eos>", "a", "b"], "word").save(vocab)
    config = yaml.safe_load((PROJECT / "conf/lm/quickstart.yaml").read_text())
    config["model"]["init_args"] = {"embedding_size": 8, "dropout": 0.0, "core": {
        "class_path": "bptt.models.MinGRU",
        "init_args": {"hidden_size": 6, "num_layers": 2, "dropout": 0.1, "evaluation": "sequential"}}}
    path = tmp_path / "core.yaml"
    path.write_text(yaml.safe_dump(config))
    parser = build_parser()
    cfg = parse_config(["--config", str(path), "--data.vocab_file", str(vocab)], parser)
    assert cfg.model.init_args.core.init_args.hidden_size == 6 and cfg.model.init_args.hidden_size is None
    network = instantiate(cfg, parser).model
    assert isinstance(network.rnn, MinGRU) and network.rnn.evaluation == "sequential"
    rnn = network.rnn
    assert (rnn.input_size, rnn.hidden_size, rnn.num_layers, rnn.dropout.p) == (8, 6, 2, 0.1)
    again = parser.parse_args(["--config", parser.dump(cfg)])  # the config a checkpoint saves parses back
    assert again.model.init_args.core == cfg.model.init_args.core
    bad = ["--config", str(path), "--data.vocab_file", str(vocab), "--model.core.init_args.evaluation", "parallel"]
    with pytest.raises(ConfigError,
                       match=r"key .evaluation.: Expected a typing.Literal\[.scan., .log_scan., .sequential.\]"):
        instantiate(parse_config(bad, parser), parser)


@pytest.mark.parametrize(
    ("model", "args", "inputs"),
    [
        (RNNLanguageModel, {"vocab_size": 11, "embedding_size": E, "dropout": 0.25}, lambda: torch.randint(11, (B, T))),
        (RNNForecaster, {"num_inputs": 2, "num_targets": 1, "horizon": 3}, lambda: torch.randn(B, T, 2)),
        (RNNAcousticModel, {"vocab_size": 11, "num_features": 6, "subsample": 2, "conv_channels": E},
         lambda: torch.randn(B, 2 * T, 6)),
    ],
    ids=lambda v: getattr(v, "__name__", ""),
)
def test_every_model_runs_a_min_lstm_core(model, args, inputs):
    network = model(**args, core=partial(MinLSTM, hidden_size=H, num_layers=L, dropout=0.1))
    assert isinstance(network.rnn, MinLSTM) and network.rnn.hidden_size == H
    x = inputs()
    out, state = network(x)
    out2, state2 = network(x, state)  # the next window, from the carried state
    assert out.shape[:2] == (B, T) and state[0].shape == state2[0].shape == (B, L, H)
    assert torch.isfinite(out).all() and torch.isfinite(out2).all()
    out2.sum().backward()
    assert all(p.grad is not None for p in network.rnn.parameters())


@pytest.mark.parametrize("steps", [1, 2, 7, 16, 17])
@pytest.mark.parametrize("chunk", [None, 1, 3, 64], ids=["sqrt", "chunk-1", "chunk-3", "one-chunk"])
def test_the_linear_scans_own_backward_is_the_gradient_of_the_loop(steps, chunk):
    """``LinearScan`` writes its backward by hand (the reversed scan): gradcheck against finite differences,
    and values equal to the loop, for windows that are one chunk, several, and several with a padded tail."""
    gen = torch.Generator().manual_seed(steps)
    a = torch.rand(2, steps, 3, generator=gen, dtype=torch.float64).requires_grad_()
    b = torch.randn(2, steps, 3, generator=gen, dtype=torch.float64).requires_grad_()
    h0 = torch.randn(2, 3, generator=gen, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, h0: min_rnn.linear_scan(a, b, h0, chunk), (a, b, h0))
    torch.testing.assert_close(min_rnn.linear_scan(a, b, h0, chunk), min_rnn.sequential_scan(a, b, h0),
                               rtol=0, atol=1e-14)


def test_the_linear_scan_is_exact_where_the_running_product_underflows():
    """a = 1e-30 a step: A underflows to 0 after two steps of float32, which is its exact value to float32;
    h_t = b_t + 1e-30 * h_{t-1} = b_t to float32, over 4096 steps, with no inf or NaN in values or gradients."""
    a = torch.full((2, 4096, 8), 1e-30, requires_grad=True)
    b = torch.rand(2, 4096, 8, generator=torch.Generator().manual_seed(0)).requires_grad_()
    h0 = torch.randn(2, 8, requires_grad=True)
    h = min_rnn.linear_scan(a, b, h0)
    assert torch.equal(h, b.detach())
    h.sum().backward()
    assert torch.isfinite(a.grad).all() and torch.equal(b.grad, torch.ones_like(b))
    assert h0.grad.abs().max() <= 1e-30
