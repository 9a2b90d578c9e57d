"""LightningDataModules: token streams for TBPTT language models, utterance batches for CTC speech."""

from bptt.datamodules.speech import SpeechDataModule
from bptt.datamodules.text import TextStreamDataModule

__all__ = ["SpeechDataModule", "TextStreamDataModule"]
