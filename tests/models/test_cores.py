"""The recurrent-core interface: ``TorchRNNCore`` is torch's RNN behind batch-first states, a state carries a
stream across calls exactly, and the shorthand and ``core`` config forms build the same network."""

from __future__ import annotations

import copy
import pickle
from functools import partial

import pytest
import torch
import yaml
from torch import nn

from bptt.errors import BpttError, ConfigError
from bptt.models import RecurrentCore, RNNAcousticModel, RNNForecaster, RNNLanguageModel, TorchRNNCore

B, T, E, H, L = 3, 7, 4, 5, 2
TORCH = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN_TANH": nn.RNN, "RNN_RELU": nn.RNN}


def _pair(rnn_type: str) -> tuple[TorchRNNCore, nn.RNNBase]:
    """A core and torch's own module, with the same parameters (float64)."""
    torch.manual_seed(0)
    core = TorchRNNCore(input_size=E, rnn_type=rnn_type, hidden_size=H, num_layers=L).double()
    cell = {"nonlinearity": rnn_type[4:].lower()} if rnn_type.startswith("RNN_") else {}
    reference = TORCH[rnn_type](E, H, num_layers=L, **cell).double()  # seq-first, (T, B, E)
    reference.load_state_dict(core.state_dict())
    return core, reference


@pytest.mark.parametrize("rnn_type", ["LSTM", "GRU", "RNN_TANH", "RNN_RELU"])
def test_core_equals_torch_rnn_run_directly(rnn_type):
    core, reference = _pair(rnn_type)
    x = torch.randn(B, T, E, dtype=torch.float64)
    h0 = torch.randn(L, B, H, dtype=torch.float64)
    c0 = torch.randn(L, B, H, dtype=torch.float64)
    start = (h0.transpose(0, 1), c0.transpose(0, 1)) if rnn_type == "LSTM" else (h0.transpose(0, 1),)  # each (B, L, H)
    y, state = core(x, start)
    expected_y, expected_state = reference(x.transpose(0, 1), (h0, c0) if rnn_type == "LSTM" else h0)  # (T, B, H)
    expected_state = expected_state if isinstance(expected_state, tuple) else (expected_state,)
    torch.testing.assert_close(y, expected_y.transpose(0, 1), rtol=0, atol=1e-12)
    assert len(state) == len(expected_state) == (2 if rnn_type == "LSTM" else 1)
    for got, want in zip(state, expected_state):
        assert got.shape == (B, L, H)
        torch.testing.assert_close(got, want.transpose(0, 1), rtol=0, atol=1e-12)
    zero_y, _ = core(x)  # None: zeros
    torch.testing.assert_close(zero_y, reference(x.transpose(0, 1))[0].transpose(0, 1), rtol=0, atol=1e-12)


@pytest.mark.parametrize("rnn_type", ["LSTM", "GRU"])
def test_a_carried_state_continues_the_stream_exactly(rnn_type):
    core, _ = _pair(rnn_type)
    x = torch.randn(B, 2 * T, E, dtype=torch.float64)
    whole_y, whole_state = core(x)
    first_y, state = core(x[:, :T])
    second_y, end = core(x[:, T:], state)
    # float64 rounding: the input GEMM over 2T rows and over T rows may sum in another order (on an AMD EPYC
    # they did; on an Intel Xeon they were bitwise equal)
    torch.testing.assert_close(torch.cat([first_y, second_y], dim=1), whole_y, rtol=0, atol=1e-13)
    for a, b in zip(end, whole_state):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)


def test_shapes_are_batch_first_and_the_interface_sizes_are_set():
    core = TorchRNNCore(input_size=E, rnn_type="LSTM", hidden_size=H, num_layers=L)
    assert isinstance(core, RecurrentCore) and isinstance(core, nn.LSTM) and core.rnn_type == "LSTM"
    assert (core.input_size, core.hidden_size, core.num_layers) == (E, H, L)
    y, (h, c) = core(torch.randn(B, T, E))
    assert y.shape == (B, T, H) and h.shape == c.shape == (B, L, H)
    assert core.dropout == 0.0
    assert TorchRNNCore(input_size=E, num_layers=1, dropout=0.5).dropout == 0.0  # none with 1 layer


def test_a_built_core_copies_and_pickles_as_itself():
    core = TorchRNNCore(input_size=E, rnn_type="GRU", hidden_size=H, num_layers=L)
    x = torch.randn(B, T, E)
    for twin in (copy.deepcopy(core), pickle.loads(pickle.dumps(core))):
        assert type(twin) is type(core) and torch.equal(twin(x)[0], core(x)[0])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"rnn_type": "lstm"},
         r"model.core.rnn_type must be one of \['GRU', 'LSTM', 'RNN_RELU', 'RNN_TANH'\], got 'lstm'"),
        ({"hidden_size": 0}, "model.core.hidden_size must be an integer >= 1, got 0"),
        ({"num_layers": -1}, "model.core.num_layers must be an integer >= 1, got -1"),
        ({"input_size": 0}, "model.core.input_size must be an integer >= 1, got 0"),
        ({"dropout": 1.0}, r"model.core.dropout must be in \[0, 1\)"),
    ],
)
def test_bad_core_arguments_fail_with_one_line(args, message):
    with pytest.raises(ConfigError, match=f"^{message}") as err:
        TorchRNNCore(**{"input_size": E, **args})
    assert isinstance(err.value, BpttError) and "\n" not in str(err.value)


# (model, its arguments, the shorthand, the same core as a factory)
FORMS = [
    (RNNLanguageModel, {"vocab_size": 11, "embedding_size": E, "dropout": 0.25},
     {"rnn_type": "GRU", "hidden_size": H, "num_layers": L},
     partial(TorchRNNCore, rnn_type="GRU", hidden_size=H, num_layers=L, dropout=0.25)),
    (RNNAcousticModel, {"vocab_size": 11, "num_features": 6, "subsample": 2, "conv_channels": E},
     {"hidden_size": H, "num_layers": L}, partial(TorchRNNCore, hidden_size=H, num_layers=L)),
    (RNNForecaster, {"num_inputs": 2, "num_targets": 1, "horizon": 3},
     {"rnn_type": "LSTM", "hidden_size": H, "num_layers": 1}, partial(TorchRNNCore, hidden_size=H, num_layers=1)),
]


@pytest.mark.parametrize(("model", "base", "shorthand", "core"), FORMS, ids=lambda v: getattr(v, "__name__", ""))
def test_shorthand_and_core_build_the_same_network(model, base, shorthand, core):
    torch.manual_seed(0)
    short = model(**base, **shorthand)
    torch.manual_seed(0)
    long = model(**base, core=core)
    assert [(k, v.shape) for k, v in short.state_dict().items()] == [(k, v.shape) for k, v in long.state_dict().items()]
    assert all(torch.equal(a, b) for a, b in zip(short.state_dict().values(), long.state_dict().values()))  # same draws
    assert short.rnn.dropout == long.rnn.dropout and type(short.rnn) is type(long.rnn)
    assert "rnn.weight_ih_l0" in short.state_dict()  # the key checkpoints before the core interface hold


def test_shorthand_beside_a_core_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"^model.core is set, and so is model.hidden_size, model.num_layers: "):
        RNNLanguageModel(vocab_size=11, hidden_size=8, num_layers=2, core=partial(TorchRNNCore, hidden_size=8))
    with pytest.raises(ConfigError, match=r"^model.subsample=2 with model.core needs model.conv_channels"):
        RNNAcousticModel(vocab_size=11, subsample=2, core=partial(TorchRNNCore, hidden_size=8))
    with pytest.raises(ConfigError, match=r"model.embedding_size == model.core.hidden_size \(got 4 and 5\)"):
        RNNLanguageModel(vocab_size=11, embedding_size=4, tie_weights=True, core=partial(TorchRNNCore, hidden_size=5))


def test_a_core_config_instantiates_through_the_run_parser(tmp_path):
    from bptt.config.parser import build_parser, instantiate, parse_config
    from bptt.datamodules.text_corpus import Vocabulary
    from tests.conftest import PROJECT

    vocab = tmp_path / "vocab.json"
    Vocabulary(["<unk>", "<eos>", "a", "b"], "word").save(vocab)
    config = yaml.safe_load((PROJECT / "conf/lm/quickstart.yaml").read_text())
    config["model"]["init_args"] = {"embedding_size": 8, "dropout": 0.0, "core": {
        "class_path": "bptt.models.TorchRNNCore",
        "init_args": {"rnn_type": "GRU", "hidden_size": 6, "num_layers": 2, "dropout": 0.1}}}
    path = tmp_path / "core.yaml"
    path.write_text(yaml.safe_dump(config))
    parser = build_parser()
    cfg = parse_config(["--config", str(path), "--data.vocab_file", str(vocab)], parser)
    assert cfg.model.init_args.core.init_args.hidden_size == 6 and cfg.model.init_args.hidden_size is None
    network = instantiate(cfg, parser).model
    assert isinstance(network.rnn, TorchRNNCore) and network.rnn.rnn_type == "GRU"
    rnn = network.rnn
    assert (rnn.input_size, rnn.hidden_size, rnn.num_layers, rnn.dropout) == (8, 6, 2, 0.1)
    assert network.decoder.out_features == 4
    again = parser.parse_args(["--config", parser.dump(cfg)])  # the config a checkpoint saves parses back
    assert again.model.init_args.core == cfg.model.init_args.core
    with pytest.raises(ConfigError, match=r"^model.core is set, and so is model.hidden_size: ") as err:
        instantiate(parse_config(["--config", str(path), "--data.vocab_file", str(vocab), "--model.hidden_size", "9"],
                                 parser), parser)
    assert "\n" not in str(err.value)


def test_an_lstm_core_runs_under_cpu_bf16_autocast_on_any_cpu():
    """Where this CPU's oneDNN has no bf16 LSTM (hardware.cpu_autocast_runs_lstm), the core runs it in
    fp32 under bf16 autocast: exactly the fp32 result; elsewhere oneDNN's bf16 LSTM, within bf16 rounding."""
    from bptt.hardware import cpu_autocast_runs_lstm

    torch.manual_seed(0)
    core = TorchRNNCore(input_size=E, rnn_type="LSTM", hidden_size=H, num_layers=L)
    x, state = torch.randn(B, T, E), (torch.randn(B, L, H), torch.randn(B, L, H))
    y32, new32 = core(x, state)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, new = core(x, state)
    for got, want in zip((y, *new), (y32, *new32)):
        if cpu_autocast_runs_lstm():
            assert torch.allclose(got.float(), want, atol=3e-2), (got - want).abs().max()
        else:
            assert got.dtype == torch.float32 and torch.equal(got, want)
