"""``SpeechDataModule``: utterances -> cached log-mel features -> bucketed CTC batches.

From corpus to batch: ``load_speech_corpus`` gives ``Utterance`` records per split ->
each is read, resampled and featurized once (``LogMel``); bad ones are skipped and counted ->
the rows are cached with ``datasets`` under ``cache_dir/speech/<key>/`` -> per-bin mean/std
fitted on the train split -> ``SpeechBatches`` normalizes, pads and shards them (see
``bptt.datamodules.utterance_batches`` for the order).

Tokens: id 0 is the CTC blank; token i of ``digits`` ("0123456789") or ``chars``
(" 'abcdefghijklmnopqrstuvwxyz", transcripts lowercased) has id i + 1.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import datasets
import numpy as np
import torch
from filelock import FileLock
from pytorch_lightning.utilities.rank_zero import rank_zero_only
from torch import Tensor

from bptt.datamodules.audio import MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, LogMel, load_audio
from bptt.datamodules.resumable import BatchOrder, ResumableDataModule, SplitReader
from bptt.datamodules.sources import SPLITS, CorpusError, check_writable, default_cache_dir, reading_cache
from bptt.datamodules.speech_corpora import (
    Utterance,
    corpus_files,
    corpus_kind,
    load_speech_corpus,
)
from bptt.datamodules.utterance_batches import SpeechBatches
from bptt.errors import ConfigError

TOKEN_SETS = {"digits": "0123456789", "chars": " 'abcdefghijklmnopqrstuvwxyz"}
SKIP_REASONS = ("unreadable audio", "empty transcript", "characters outside the token set",
                "too short for its transcript")
FEATURE_VERSION = 1  # bump when the features of the same audio and settings change
STD_FLOOR = 1e-2  # a bin that never varies in train must not blow up later inputs
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpeechData:
    """What a speech task needs from its data, handed over once (``CTCSpeechTask.use_data``).

    Args:
        tokens: the token string; token i has id i + 1 (0 is the CTC blank).
        num_features: F, features per frame.
    """

    tokens: str
    num_features: int

    def decode(self, ids: list[int]) -> str:
        """The text of token ids; blanks (0) and ids out of range are dropped, repeats are kept."""
        return "".join(self.tokens[i - 1] for i in ids if 1 <= i <= len(self.tokens))


def normalize_transcript(text: str, tokens: Literal["digits", "chars"]) -> str:
    """Lowercase, collapse whitespace to single spaces; digits drop spaces altogether."""
    words = text.lower().split()
    return "".join(words) if tokens == "digits" else " ".join(words)


def ctc_min_frames(labels: list[int]) -> int:
    """The fewest frames CTC can align ``labels`` to: one per label, plus a blank between repeats."""
    return len(labels) + sum(a == b for a, b in itertools.pairwise(labels))


class SpeechDataModule(ResumableDataModule):
    """Utterances as padded log-mel batches with CTC targets.

    Args:
        corpus: ``fsdd`` (composed connected digits), another directory of FSDD layout, a
            LibriSpeech-layout directory, ``hf:NAME`` or a ``save_to_disk`` directory; see
            ``bptt.datamodules.speech_corpora``.
        splits: the split directories (LibriSpeech) or split names (Hugging Face) of train,
            validation and test, e.g. ``{train: train-clean-100, validation: dev-clean, test: test-clean}``;
            default: those for LibriSpeech, ``train``/``validation``/``test`` for Hugging Face.
        hf_config: configuration name of a Hugging Face dataset.
        audio_column: the audio column of a Hugging Face or saved dataset.
        text_column: its transcript column.
        tokens: ``digits`` or ``chars``.
        sample_rate: every waveform is resampled to this rate (Hz), in [1000, 384000].
        n_mels: F, mel bins per frame.
        spec_augment: mask training batches with SpecAugment.
        freq_masks: frequency masks per utterance.
        freq_mask_width: the widest frequency mask, in mel bins.
        time_masks: time masks per utterance.
        time_mask_width: the widest time mask, in frames.
        batch_size: B_global, training utterances per step over all ranks.
        eval_batch_size: utterances per validation/test batch.
        batches_per_bucket: batches' worth of training utterances sorted by length together.
        seed: seed of the FSDD composition, the training order and SpecAugment; >= 0.
        digits_per_utterance: [min, max] FSDD recordings per composed utterance.
        gap_seconds: [min, max] silence before, between and after them.
        utterances: composed FSDD utterances of train, validation and test.
        validation_indices: [first, last] FSDD recording index of the validation split (0-4 is test).
        data_dir: the data root; default ``$BPTT_DATA_DIR``, else ``./data``.
        cache_dir: where features are cached; default ``$BPTT_CACHE_DIR``, else ``~/.cache/bptt``.
        num_workers: DataLoader worker processes.
    """

    position_key = "batch"

    def __init__(
        self,
        *,
        corpus: str = "fsdd",
        splits: dict[str, str] | None = None,
        hf_config: str | None = None,
        audio_column: str = "audio",
        text_column: str = "text",
        tokens: Literal["digits", "chars"] = "digits",
        sample_rate: int = 8000,
        n_mels: int = 40,
        spec_augment: bool = False,
        freq_masks: int = 2,
        freq_mask_width: int = 8,
        time_masks: int = 2,
        time_mask_width: int = 20,
        batch_size: int = 32,
        eval_batch_size: int = 32,
        batches_per_bucket: int = 20,
        seed: int = 0,
        digits_per_utterance: tuple[int, int] = (2, 7),
        gap_seconds: tuple[float, float] = (0.05, 0.3),
        utterances: tuple[int, int, int] = (4000, 300, 500),
        validation_indices: tuple[int, int] = (5, 9),
        data_dir: str | None = None,
        cache_dir: str | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if tokens not in TOKEN_SETS:
            raise ConfigError(f"data.tokens must be one of {sorted(TOKEN_SETS)}, got {tokens!r}")
        self.check_at_least(1, batch_size=batch_size, eval_batch_size=eval_batch_size,
                            batches_per_bucket=batches_per_bucket, sample_rate=sample_rate, n_mels=n_mels)
        self.check_at_least(0, freq_masks=freq_masks, freq_mask_width=freq_mask_width, time_masks=time_masks,
                            time_mask_width=time_mask_width, num_workers=num_workers)
        if seed < 0:
            raise ConfigError(f"data.seed must be >= 0 (numpy seeds the composition and the order), got {seed}")
        if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
            raise ConfigError(f"data.sample_rate must be in [{MIN_SAMPLE_RATE}, {MAX_SAMPLE_RATE}] (Hz), "
                              f"got {sample_rate}")
        if n_mels > LogMel(sample_rate=sample_rate, n_mels=1).n_fft // 2 + 1:
            raise ConfigError(f"data.n_mels={n_mels} is more than the FFT bins of a 25 ms window at {sample_rate} Hz; "
                              "lower n_mels or raise sample_rate")
        _check_range("digits_per_utterance", digits_per_utterance, 1)
        _check_range("gap_seconds", gap_seconds, 0)
        _check_range("validation_indices", validation_indices, 5, " (0-4 is the test split)")
        if len(utterances) != 3 or min(utterances) < 1:
            raise ConfigError("data.utterances must be 3 counts >= 1 (train, validation, test), "
                              f"got {list(utterances)}")
        if splits is not None and sorted(splits) != sorted(SPLITS):
            raise ConfigError(f"data.splits must name exactly train, validation and test, got {sorted(splits)}")
        self.corpus = corpus
        self.splits = dict(splits) if splits else None
        self.hf_config = hf_config
        self.audio_column = audio_column
        self.text_column = text_column
        self.token_set = tokens
        self.sample_rate = sample_rate
        self.n_mels = n_mels
        self.spec_augment = spec_augment
        self.augment = {"freq_masks": freq_masks, "freq_mask_width": freq_mask_width, "time_masks": time_masks,
                        "time_mask_width": time_mask_width}
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.batches_per_bucket = batches_per_bucket
        self.seed = seed
        self.digits_per_utterance = (int(digits_per_utterance[0]), int(digits_per_utterance[1]))
        self.gap_seconds = (float(gap_seconds[0]), float(gap_seconds[1]))
        self.utterances = tuple(int(n) for n in utterances)
        self.validation_indices = (int(validation_indices[0]), int(validation_indices[1]))
        self.data_dir = data_dir
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.num_workers = num_workers
        self.logmel = LogMel(sample_rate=sample_rate, n_mels=n_mels)
        self.data: dict[str, datasets.Dataset] = {}
        self.report: dict[str, Any] = {}
        self.stats: tuple[Tensor, Tensor] | None = None  # (F,) mean, (F,) std of the train split

    # ------------------------------------------------------------ tokens

    @property
    def tokens(self) -> str:
        """The token string; token i has id i + 1 (0 is the blank)."""
        return TOKEN_SETS[self.token_set]

    @property
    def vocab_size(self) -> int:
        """V = len(tokens) + 1 (the blank)."""
        return len(self.tokens) + 1

    @property
    def num_features(self) -> int:
        """F, features per frame."""
        return self.n_mels

    def encode(self, text: str) -> list[int]:
        """Token ids of a transcript (normalized first); CorpusError naming characters outside the token set."""
        text = normalize_transcript(text, self.token_set)
        outside = sorted(set(text) - set(self.tokens))
        if outside:
            raise CorpusError(f"characters {''.join(outside)!r} of {text!r} are not in the {self.token_set} token set "
                              f"{self.tokens!r}; use tokens: chars or clean the transcript")
        return [self.tokens.index(c) + 1 for c in text]

    def decode(self, ids: list[int]) -> str:
        """The text of token ids; blanks (0) and ids out of range are dropped, repeats are kept."""
        return self.speech_data().decode(ids)

    def speech_data(self) -> SpeechData:
        """What ``CTCSpeechTask`` needs: tokens and features per frame (both set by the config; nothing is read)."""
        return SpeechData(tokens=self.tokens, num_features=self.num_features)

    # ------------------------------------------------------------ features and cache

    def load(self) -> None:
        """Featurize every split and fit the normalization, or load both from the cache; idempotent.

        A corpus seen before (same files, sizes and times, same settings) is not read again:
        its features come memory-mapped from ``cache_dir/speech/<key>/``.

        Raises:
            ConfigError: the cache directory cannot be written (and the corpus is not cached yet).
            CorpusError: the corpus cannot be read or leaves a split empty, or the cache entry is corrupt.
        """
        if self.data:
            return
        entry = self._cache_entry()
        manifest = entry / "manifest.json"

        def complete() -> bool:
            return manifest.exists() and all((entry / split).is_dir() for split in SPLITS)

        if not complete():
            check_writable(entry.parent)
            entry.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(entry) + ".lock"):  # DDP ranks on one machine featurize once
                if not complete():
                    self._build(entry)
        with reading_cache(manifest, remove=entry):
            cached = json.loads(manifest.read_text())
            report, mean, std = cached["report"], torch.tensor(cached["mean"]), torch.tensor(cached["std"])
            if mean.shape != (self.n_mels,) or std.shape != (self.n_mels,) or not torch.isfinite(mean + std).all():
                raise ValueError(f"the normalization is not {self.n_mels} finite means and stds")
            skipped = {split: (dict(report["splits"][split]["skipped"]), report["splits"][split]["skipped_example"])
                       for split in SPLITS}
        data = {}
        for split in SPLITS:
            with reading_cache(entry / split, remove=entry):
                data[split] = datasets.load_from_disk(str(entry / split))
                shape = data[split].features["features"].shape
                if shape[1:] != (self.n_mels,) or not {"labels", "num_frames"} <= set(data[split].column_names):
                    raise ValueError(f"its rows are not utterances of {self.n_mels} mel bins")
        self.report, self.data = report, data
        if self.stats is None:  # else restored by load_state_dict
            self.stats = (mean, std)
        self._warn_skips(skipped)

    def _cache_entry(self) -> Path:
        """``cache_dir/speech/<key>``: the key hashes the corpus's files (paths, sizes, mtimes) and
        every setting that changes the cached rows."""
        kind = corpus_kind(self.corpus, self.data_dir)
        files = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns)
                 for p in corpus_files(self.corpus, data_dir=self.data_dir, splits=self.splits)]
        settings: dict[str, Any] = {"version": FEATURE_VERSION, "kind": kind, "corpus": self.corpus,
                                    "tokens": self.token_set, "sample_rate": self.sample_rate, "n_mels": self.n_mels}
        if kind == "fsdd":
            settings |= {"seed": self.seed, "digits_per_utterance": self.digits_per_utterance,
                         "gap_seconds": self.gap_seconds, "utterances": self.utterances,
                         "validation_indices": self.validation_indices}
        else:
            settings |= {"splits": self.splits, "hf_config": self.hf_config, "audio_column": self.audio_column,
                         "text_column": self.text_column}
        key = hashlib.sha256(json.dumps([settings, files]).encode()).hexdigest()[:20]
        return self.cache_dir / "speech" / key

    def _build(self, entry: Path) -> None:
        records, origin = load_speech_corpus(
            self.corpus, data_dir=self.data_dir, splits=self.splits, hf_config=self.hf_config,
            audio_column=self.audio_column, text_column=self.text_column, seed=self.seed,
            digits_per_utterance=self.digits_per_utterance, gap_seconds=self.gap_seconds,
            utterances=self.utterances, validation_indices=self.validation_indices,
        )
        features = datasets.Features({
            "id": datasets.Value("string"), "text": datasets.Value("string"), "source": datasets.Value("string"),
            "labels": datasets.Sequence(datasets.Value("int64")), "num_frames": datasets.Value("int64"),
            "features": datasets.Array2D(shape=(None, self.n_mels), dtype="float32"),
        })
        report: dict[str, Any] = {"source": origin, "tokens": self.token_set, "sample_rate": self.sample_rate,
                                  "n_mels": self.n_mels, "splits": {}}
        build = entry / "build"
        for split in SPLITS:
            skipped: Counter[str] = Counter()
            examples: list[str] = []
            rows = self._rows(records[split], skipped, examples)
            try:  # fingerprint: datasets would otherwise hash the generator and everything it holds
                table = datasets.Dataset.from_generator(lambda rows=rows: rows, features=features, cache_dir=str(build),
                                                        fingerprint=f"{entry.name}-{split}", writer_batch_size=16)
            except ValueError:  # no rows at all
                table = None
            if table is None or len(table) == 0:
                counts = ", ".join(f"{reason} {n}" for reason, n in skipped.items()) or "no utterances"
                raise CorpusError(
                    f"the {split} split of {origin} has no usable utterances ({counts}; e.g. "
                    f"{examples[0] if examples else '-'}); "
                    "fix or replace that data, or check data.tokens and data.splits"
                )
            table.save_to_disk(str(entry / split))
            report["splits"][split] = {"utterances": len(table), "frames": int(np.sum(table["num_frames"])),
                                       "skipped": dict(skipped), "skipped_example": examples[0] if examples else None}
            if split == "train":
                mean, std = _fit_normalization(table, self.n_mels)
        shutil.rmtree(build, ignore_errors=True)
        partial = entry / f"manifest.{os.getpid()}.partial"
        partial.write_text(json.dumps({"report": report, "mean": mean.tolist(), "std": std.tolist()}))
        os.replace(partial, entry / "manifest.json")

    def _rows(self, records: list[Utterance], skipped: Counter[str], examples: list[str]) -> Iterator[dict[str, Any]]:
        """Featurized rows of usable utterances; the others counted in ``skipped`` by reason (``SKIP_REASONS``)."""
        for record in records:
            reason, row = self._row(record)
            if row is not None:
                yield row
                continue
            skipped[reason] += 1
            if not examples:
                examples.append(record.source)

    def _row(self, record: Utterance) -> tuple[str, dict[str, Any] | None]:
        text = normalize_transcript(record.text, self.token_set)
        if not text:
            return "empty transcript", None
        if set(text) - set(self.tokens):
            return "characters outside the token set", None
        try:
            feats = self._features(record.audio(self.sample_rate), record.source)  # (T, F)
        except CorpusError:
            return "unreadable audio", None
        labels = self.encode(text)
        if len(feats) < ctc_min_frames(labels):
            return "too short for its transcript", None
        return "", {"id": record.id, "text": text, "source": record.source, "labels": labels,
                    "num_frames": len(feats), "features": feats.numpy()}

    def _warn_skips(self, skipped: dict[str, tuple[dict[str, int], str | None]]) -> None:
        """Log, per split, the utterances skipped by reason and an example: {split: (counts, example)}."""
        for split, (counts, example) in skipped.items():
            if counts and rank_zero_only.rank == 0:
                listed = ", ".join(f"{reason} {n}" for reason, n in counts.items())
                log.warning(f"{sum(counts.values())} utterances skipped in split {split}: {listed}; e.g. {example}")

    def _features(self, waveform: np.ndarray, name: str) -> Tensor:
        """Log-mel features (T, F) of a waveform at ``sample_rate``; CorpusError naming ``name`` when they
        are not finite (samples so large that their power overflows float32)."""
        feats = self.logmel(waveform)  # (T, F)
        if not torch.isfinite(feats).all():
            raise CorpusError(f"audio {name} gives non-finite features (peak sample {np.abs(waveform).max():.3g}, "
                              "audio lies in [-1, 1]); replace or remove the file")
        return feats

    def featurize(self, path: str | Path) -> Tensor:
        """Normalized features of an audio file (WAV, FLAC, ...), as the batches hold them.

        Uses the train split's statistics, or those from ``load_state_dict`` (no corpus needed then).

        Returns:
            (T, F) float32.

        Raises:
            CorpusError: naming the file: unreadable, or not usable audio (``bptt.datamodules.audio``:
                a rate outside [1 kHz, 384 kHz], under one 25 ms window, NaN or Inf samples).
        """
        if self.stats is None:
            self.load()
        assert self.stats is not None
        mean, std = self.stats
        return (self._features(load_audio(Path(path), self.sample_rate), str(path)) - mean) / std  # (T, F)

    def save_artifacts(self, directory: Path) -> list[Path]:
        """Write ``data_report.json``: the source, tokens, features, and utterances, frames and skips per split."""
        self.load()
        path = directory / "data_report.json"
        path.write_text(json.dumps(self.report, indent=2))
        return [path]

    # ------------------------------------------------------------ batches

    def readers(self, rank: int, world_size: int) -> dict[str, SplitReader]:
        assert self.stats is not None
        self.check_divides(world_size, "utterances", batch_size=self.batch_size)
        if len(self.data["train"]) < self.batch_size:
            raise ConfigError(f"data.batch_size={self.batch_size} is more than the {len(self.data['train'])} usable "
                              "train utterances; lower it or use more utterances")
        for split in ("validation", "test"):
            if len(self.data[split]) < world_size:
                raise ConfigError(f"the {split} split has {len(self.data[split])} usable utterances, fewer than the "
                                  f"{world_size} processes; use more utterances or fewer processes")
        mean, std = self.stats
        readers = {}
        for split in SPLITS:
            training = split == "train"
            batches = SpeechBatches(
                self.data[split], mean=mean, std=std, rank=rank, world_size=world_size, training=training,
                batch_size=self.batch_size if training else self.eval_batch_size,
                batches_per_bucket=self.batches_per_bucket, seed=self.seed,
                augment=self.augment if training and self.spec_augment else None,
            )
            readers[split] = SplitReader(batches, BatchOrder(len(batches)))
        return readers

    def data_state(self) -> dict[str, Any]:
        """The tokens and the normalization statistics; the skeleton adds the read position (epoch, next batch)."""
        if self.stats is None:
            self.load()
        assert self.stats is not None
        return {"tokens": self.tokens, "mean": self.stats[0].tolist(), "std": self.stats[1].tolist()}

    def check_data_state(self, state: dict[str, Any]) -> None:
        tokens, mean = state.get("tokens"), state.get("mean")
        if tokens != self.tokens:
            raise ConfigError(f"the checkpoint was trained with tokens {tokens!r}, but data.tokens is "
                              f"{self.token_set} ({self.tokens!r}); set data.tokens to match the checkpoint")
        bins = len(mean) if isinstance(mean, list) else None
        if bins != self.n_mels:
            raise ConfigError(f"the checkpoint has {bins} mel bins, but data.n_mels is {self.n_mels}; "
                              "set data.n_mels to match the checkpoint")

    def load_data_state(self, state: dict[str, Any]) -> None:
        self.check_data_state(state)
        self.stats = (torch.tensor(state["mean"]), torch.tensor(state["std"]))
        for reader in self._readers.values():
            reader.batches.mean, reader.batches.std = self.stats


def _check_range(name: str, value: tuple[float, float], minimum: float, why: str = "") -> None:
    if len(value) != 2 or value[0] < minimum or value[0] > value[1]:
        raise ConfigError(f"data.{name} must be [min, max] with {minimum} <= min <= max{why}, got {list(value)}")


def _fit_normalization(table: datasets.Dataset, n_mels: int) -> tuple[Tensor, Tensor]:
    """Per-bin mean and std (floored at STD_FLOOR) over every frame of ``table``: (F,), (F,)."""
    total, squares, count = np.zeros(n_mels), np.zeros(n_mels), 0
    rows = table.with_format("numpy", columns=["features"])
    for start in range(0, len(rows), 256):
        for feats in rows[start : start + 256]["features"]:
            feats = np.asarray(feats, dtype=np.float64)  # (T, F)
            total += feats.sum(axis=0)
            squares += (feats**2).sum(axis=0)
            count += len(feats)
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(np.maximum(std, STD_FLOOR), dtype=torch.float32)
