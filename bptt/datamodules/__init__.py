"""LightningDataModules that lay long sequences out as streams for TBPTT."""

from bptt.datamodules.text import TextStreamDataModule

__all__ = ["TextStreamDataModule"]
