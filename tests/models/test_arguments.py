"""Recurrent cores refuse sizes, dropout and cell types they cannot work with, in one line naming the key,
at construction (``bptt fit`` instantiates them before any training)."""

from __future__ import annotations

import re

import pytest

from bptt.cli import main
from bptt.errors import BpttError, ConfigError
from bptt.models import RNNAcousticModel, RNNForecaster, RNNLanguageModel
from tests.bptt_command import SMALL
from tests.conftest import PROJECT

LM = {"vocab_size": 11, "embedding_size": 4, "hidden_size": 4, "num_layers": 1}
ACOUSTIC = {"vocab_size": 11, "num_features": 5, "hidden_size": 4, "num_layers": 1}
FORECASTER = {"num_inputs": 2, "num_targets": 1, "hidden_size": 4, "num_layers": 1}
SIZE = r"must be an integer >= 1, got "
DROPOUT = r"model.dropout must be in \[0, 1\) \(the probability of zeroing a unit\), got "


@pytest.mark.parametrize(
    ("model", "base", "bad", "message"),
    [
        (RNNLanguageModel, LM, {"hidden_size": -8}, "model.hidden_size " + SIZE + "-8"),
        (RNNLanguageModel, LM, {"hidden_size": 0}, "model.hidden_size " + SIZE + "0"),
        (RNNLanguageModel, LM, {"num_layers": 0}, "model.num_layers " + SIZE + "0"),
        (RNNLanguageModel, LM, {"embedding_size": -1}, "model.embedding_size " + SIZE + "-1"),
        (RNNLanguageModel, LM, {"vocab_size": 0}, "model.vocab_size " + SIZE + "0"),
        (RNNLanguageModel, LM, {"hidden_size": 2.5}, "model.hidden_size " + SIZE + "2.5"),
        (RNNLanguageModel, LM, {"num_layers": True}, "model.num_layers " + SIZE + "True"),
        (RNNLanguageModel, LM, {"dropout": 1.5}, DROPOUT + "1.5"),
        (RNNLanguageModel, LM, {"dropout": 1.0}, DROPOUT + "1.0"),
        (RNNLanguageModel, LM, {"dropout": -0.1}, DROPOUT + "-0.1"),
        (RNNLanguageModel, LM, {"dropout": float("nan")}, DROPOUT + "nan"),
        (RNNLanguageModel, LM, {"rnn_type": "lstm"},
         r"model.rnn_type must be one of \['GRU', 'LSTM', 'RNN_RELU', 'RNN_TANH'\], got 'lstm'"),
        (RNNLanguageModel, LM, {"tie_weights": True, "embedding_size": 3},
         r"model.tie_weights needs model.embedding_size == model.hidden_size \(got 3 and 4\)"),
        (RNNAcousticModel, ACOUSTIC, {"hidden_size": -8}, "model.hidden_size " + SIZE + "-8"),
        (RNNAcousticModel, ACOUSTIC, {"num_layers": 0}, "model.num_layers " + SIZE + "0"),
        (RNNAcousticModel, ACOUSTIC, {"num_features": 0}, "model.num_features " + SIZE + "0"),
        (RNNAcousticModel, ACOUSTIC, {"subsample": 0}, "model.subsample " + SIZE + "0"),
        (RNNAcousticModel, ACOUSTIC, {"subsample": 2, "conv_channels": 0}, "model.conv_channels " + SIZE + "0"),
        (RNNAcousticModel, ACOUSTIC, {"subsample": 2, "conv_channels": -3}, "model.conv_channels " + SIZE + "-3"),
        (RNNAcousticModel, ACOUSTIC, {"dropout": 1.5}, DROPOUT + "1.5"),
        (RNNAcousticModel, ACOUSTIC, {"rnn_type": "RNN_TANH"}, r"model.rnn_type must be one of \['GRU', 'LSTM'\]"),
        (RNNForecaster, FORECASTER, {"hidden_size": 0}, "model.hidden_size " + SIZE + "0"),
        (RNNForecaster, FORECASTER, {"num_layers": -2}, "model.num_layers " + SIZE + "-2"),
        (RNNForecaster, FORECASTER, {"horizon": 0}, "model.horizon " + SIZE + "0"),
        (RNNForecaster, FORECASTER, {"num_inputs": 0}, "model.num_inputs " + SIZE + "0"),
        (RNNForecaster, FORECASTER, {"num_targets": -1}, "model.num_targets " + SIZE + "-1"),
        (RNNForecaster, FORECASTER, {"dropout": 1.0}, DROPOUT + "1.0"),
        (RNNForecaster, FORECASTER, {"rnn_type": "Transformer"}, r"model.rnn_type must be one of \['GRU', 'LSTM'\]"),
    ],
)
def test_bad_arguments_fail_at_construction_with_one_line(model, base, bad, message):
    with pytest.raises(ConfigError, match=f"^{message}") as err:
        model(**{**base, **bad})
    assert isinstance(err.value, BpttError) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("model", "base"), [(RNNLanguageModel, LM), (RNNAcousticModel, ACOUSTIC), (RNNForecaster, FORECASTER)]
)
def test_the_edges_of_each_range_are_accepted(model, base):
    smallest = {k: 1 for k in base}
    model(**smallest, dropout=0.0)
    model(**{**smallest, "num_layers": 2}, dropout=0.99)  # dropout between layers: just below 1
    if model is RNNAcousticModel:
        assert model(**base, subsample=2).front.out_channels == base["hidden_size"]  # conv_channels None: H
        assert model(**base, subsample=2, conv_channels=1).front.out_channels == 1


ASR = str(PROJECT / "conf/asr/fsdd_digits.yaml")
SUNSPOTS = str(PROJECT / "conf/forecast/sunspots.yaml")


@pytest.mark.parametrize(
    ("config", "args", "message"),
    [
        (SMALL, ["--model.hidden_size", "-8"], "model.hidden_size must be an integer >= 1, got -8"),
        (SMALL, ["--model.dropout", "1.5"], r"model.dropout must be in \[0, 1\)"),
        (SMALL, ["--model.embedding_size", "0"], "model.embedding_size must be an integer >= 1, got 0"),
        (["--config", ASR], ["--model.num_layers", "0"], "model.num_layers must be an integer >= 1, got 0"),
        (["--config", ASR], ["--model.conv_channels", "-3"], "model.conv_channels must be an integer >= 1, got -3"),
        (["--config", SUNSPOTS], ["--model.hidden_size", "0"], "model.hidden_size must be an integer >= 1, got 0"),
        (["--config", SUNSPOTS], ["--model.dropout", "1"], r"model.dropout must be in \[0, 1\)"),
    ],
    ids=["lm-hidden", "lm-dropout", "lm-embedding", "asr-layers", "asr-conv", "forecast-hidden", "forecast-dropout"],
)
def test_bptt_fit_stops_with_one_line_and_exit_2(config, args, message, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["fit", *config, *args, "--trainer.default_root_dir", str(run_dir)])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # a language model's corpus is tokenized first (its progress bars above)
    assert code == 2 and last.startswith("bptt: error: ") and re.search(message, last), err
    assert err.count("bptt: error:") == 1 and "Traceback" not in err
    assert not run_dir.exists()
