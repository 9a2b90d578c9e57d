"""LightningModules: the TBPTT engine and the tasks built on it."""

from bptt.lightning_modules.forecaster import ForecastTask
from bptt.lightning_modules.language_model import LanguageModelTask
from bptt.lightning_modules.speech_recognizer import CTCSpeechTask
from bptt.lightning_modules.tbptt import NonFiniteLossError, SequenceLossModule, StepLossModule, TBPTTModule

__all__ = ["CTCSpeechTask", "ForecastTask", "LanguageModelTask", "NonFiniteLossError", "SequenceLossModule",
           "StepLossModule", "TBPTTModule"]
