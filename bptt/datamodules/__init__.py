"""LightningDataModules: token streams for TBPTT language models, utterance batches for CTC speech,
series streams for forecasting."""

from bptt.datamodules.speech import SpeechDataModule
from bptt.datamodules.text import TextStreamDataModule
from bptt.datamodules.timeseries import TimeSeriesDataModule

__all__ = ["SpeechDataModule", "TextStreamDataModule", "TimeSeriesDataModule"]
