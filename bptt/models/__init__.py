"""The networks the LightningModules in ``bptt.lightning_modules`` wrap, and the recurrent cores inside them."""

from bptt.models.cores import CoreFactory, RecurrentCore, State, TorchRNNCore
from bptt.models.min_rnn import MinGRU, MinLSTM
from bptt.models.newton_rnn import DiagonalGRU
from bptt.models.rnn_acoustic_model import RNNAcousticModel
from bptt.models.rnn_forecaster import RNNForecaster
from bptt.models.rnn_language_model import RNNLanguageModel

__all__ = ["CoreFactory", "DiagonalGRU", "MinGRU", "MinLSTM", "RNNAcousticModel", "RNNForecaster", "RNNLanguageModel",
           "RecurrentCore", "State", "TorchRNNCore"]
