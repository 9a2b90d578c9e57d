"""Recurrent cores: plain ``nn.Module``s that the LightningModules in ``bptt.lightning_modules`` wrap."""

from bptt.models.rnn_acoustic_model import RNNAcousticModel
from bptt.models.rnn_forecaster import RNNForecaster
from bptt.models.rnn_language_model import RNNLanguageModel

__all__ = ["RNNAcousticModel", "RNNForecaster", "RNNLanguageModel"]
