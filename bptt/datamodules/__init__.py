"""LightningDataModules: token streams for TBPTT language models, utterance batches for CTC speech,
series streams for forecasting, synthetic long-dependency tasks."""

from bptt.datamodules.speech import SpeechDataModule
from bptt.datamodules.synthetic import AddingProblemDataModule, CopyMemoryDataModule
from bptt.datamodules.text import TextStreamDataModule
from bptt.datamodules.timeseries import TimeSeriesDataModule

__all__ = [
    "AddingProblemDataModule",
    "CopyMemoryDataModule",
    "SpeechDataModule",
    "TextStreamDataModule",
    "TimeSeriesDataModule",
]
