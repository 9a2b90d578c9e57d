"""Speech corpora as lists of ``Utterance`` records per split (train/validation/test).

Sources (the ``corpus`` argument of ``SpeechDataModule``), paths relative to the data root
(``data_dir``, else ``$BPTT_DATA_DIR``, else ``./data``):

- ``fsdd`` or another directory of its layout, ``<dir>/recordings/{digit}_{speaker}_{index}.wav``:
  the Free Spoken Digit Dataset, composed into connected-digit utterances (``compose_fsdd``);
- a LibriSpeech-layout directory, ``<dir>/<split dir>/<speaker>/<chapter>/`` holding
  ``<speaker>-<chapter>-<utt>.flac`` and ``<speaker>-<chapter>.trans.txt`` ("UTTID WORDS...");
  ``splits`` names the split directories, e.g. ``{train: train-clean-100, validation: dev-clean,
  test: test-clean}``;
- ``hf:NAME`` (``datasets.load_dataset``) or a ``save_to_disk`` directory with an audio column and
  a text column; ``splits`` names its splits. The audio column is read undecoded and decoded with
  ``soundfile`` (datasets 5 decodes through torchcodec, which we do not install).

Audio is read lazily: ``Utterance.audio(sample_rate)`` reads, mixes down and resamples.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np

from bptt.datamodules.audio import load_audio
from bptt.datamodules.sources import SPLITS, CorpusError, data_root, load_saved

FSDD_NAME = re.compile(r"^(\d)_(.+)_(\d+)\.wav$")
FSDD_TEST_INDICES = range(5)  # the official split: recordings 0-4 of every speaker and digit
LIBRISPEECH_SPLITS = {"train": "train-clean-100", "validation": "dev-clean", "test": "test-clean"}
HF_SPLITS = {"train": "train", "validation": "validation", "test": "test"}


@dataclass(frozen=True)
class Utterance:
    """One utterance of a split.

    Attributes:
        id: unique within its split.
        text: the transcript as the source gives it.
        source: the file(s) it comes from, for reports and messages.
        audio: ``audio(sample_rate)`` -> (N,) float32 mono waveform at that rate; raises
            CorpusError when the audio cannot be read.
    """

    id: str
    text: str
    source: str
    audio: Callable[[int], np.ndarray]


@dataclass(frozen=True)
class Recording:
    """One FSDD recording: ``{digit}_{speaker}_{index}.wav``."""

    path: Path
    digit: str
    speaker: str
    index: int


@dataclass(frozen=True)
class ComposedUtterance:
    """A connected-digit utterance: ``recordings`` of one speaker with ``gaps`` seconds of silence
    before, between and after them (len(gaps) = len(recordings) + 1)."""

    id: str
    speaker: str
    recordings: tuple[Recording, ...]
    gaps: tuple[float, ...]

    @property
    def text(self) -> str:
        return "".join(r.digit for r in self.recordings)


def resolve_corpus(corpus: str, data_dir: str | None = None) -> Path:
    """The directory of a path-like corpus; a one-line CorpusError when it does not exist."""
    path = data_root(data_dir) / corpus
    if not path.exists():
        raise CorpusError(
            f"speech corpus {corpus!r} not found: {path.resolve()} does not exist; set data.data_dir or "
            f"$BPTT_DATA_DIR to the directory that holds it (e.g. fsdd/recordings/*.wav), or fix data.corpus"
        )
    return path


def corpus_kind(corpus: str, data_dir: str | None = None) -> str:
    """``hf``, ``saved``, ``fsdd`` or ``librispeech``: how to read ``corpus``."""
    if corpus.startswith("hf:"):
        return "hf"
    path = resolve_corpus(corpus, data_dir)
    if (path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists():
        return "saved"
    if (path / "recordings").is_dir() or any(FSDD_NAME.match(p.name) for p in path.glob("*.wav")):
        return "fsdd"
    if path.is_dir() and any(p.is_dir() for p in path.iterdir()):
        return "librispeech"
    raise CorpusError(
        f"{path.resolve()} is neither FSDD (recordings/{{digit}}_{{speaker}}_{{index}}.wav), LibriSpeech "
        "(<split>/<speaker>/<chapter>/*.flac + *.trans.txt) nor a saved dataset; point data.corpus at one"
    )


def corpus_files(corpus: str, *, data_dir: str | None = None, splits: dict[str, str] | None = None) -> list[Path]:
    """The files a path-like corpus is read from (empty for ``hf:``), for cache keys."""
    kind = corpus_kind(corpus, data_dir)
    if kind == "hf":
        return []
    path = resolve_corpus(corpus, data_dir)
    if kind == "fsdd":
        return sorted(r.path for r in fsdd_recordings(path))
    roots = [path / d for d in (splits or LIBRISPEECH_SPLITS).values()] if kind == "librispeech" else [path]
    return sorted(p for root in roots if root.is_dir() for p in root.rglob("*") if p.is_file())


# ---------------------------------------------------------------- FSDD


def fsdd_recordings(directory: Path) -> list[Recording]:
    """Every ``{digit}_{speaker}_{index}.wav`` under ``directory/recordings`` (or ``directory``), sorted."""
    folder = directory / "recordings" if (directory / "recordings").is_dir() else directory
    found = []
    for path in sorted(folder.glob("*.wav")):
        match = FSDD_NAME.match(path.name)
        if match:
            found.append(Recording(path, match[1], match[2], int(match[3])))
    if not found:
        raise CorpusError(
            f"no {{digit}}_{{speaker}}_{{index}}.wav recordings in {folder.resolve()}; point data.corpus at a "
            "Free Spoken Digit Dataset checkout (its recordings/ folder), or set data.data_dir or $BPTT_DATA_DIR"
        )
    return found


def fsdd_split(recordings: list[Recording], validation_indices: tuple[int, int]) -> dict[str, list[Recording]]:
    """The official FSDD split: index 0-4 test; ``validation_indices`` (inclusive) validation; the rest train."""
    low, high = validation_indices
    return {
        "train": [r for r in recordings if r.index not in FSDD_TEST_INDICES and not low <= r.index <= high],
        "validation": [r for r in recordings if low <= r.index <= high],
        "test": [r for r in recordings if r.index in FSDD_TEST_INDICES],
    }


def compose_fsdd(
    recordings: list[Recording], *, split: str, count: int, seed: int, digits_per_utterance: tuple[int, int],
    gap_seconds: tuple[float, float],
) -> list[ComposedUtterance]:
    """Connected-digit utterances from one split's recordings.

    Utterance i picks a speaker, then 2-7 (``digits_per_utterance``) of that speaker's recordings
    with replacement, and silences of ``gap_seconds`` before, between and after them; all drawn from
    ``numpy.random.default_rng([seed, split number, i])``, so each utterance depends only on those.
    """
    by_speaker: dict[str, list[Recording]] = {}
    for recording in recordings:
        by_speaker.setdefault(recording.speaker, []).append(recording)
    speakers = sorted(by_speaker)
    if not speakers:
        raise CorpusError(f"the FSDD {split} split has no recordings; check data.validation_indices")
    composed = []
    for i in range(count):
        rng = np.random.default_rng([seed, SPLITS.index(split), i])
        speaker = speakers[rng.integers(len(speakers))]
        pool = by_speaker[speaker]
        picks = rng.integers(len(pool), size=int(rng.integers(digits_per_utterance[0], digits_per_utterance[1] + 1)))
        gaps = rng.uniform(gap_seconds[0], gap_seconds[1], size=len(picks) + 1)
        composed.append(ComposedUtterance(f"{split}-{i:06d}-{speaker}", speaker, tuple(pool[p] for p in picks),
                                          tuple(float(g) for g in gaps)))
    return composed


class _RecordingCache:
    """Recordings read once per sample rate; an unreadable one raises its CorpusError every time."""

    def __init__(self) -> None:
        self.waves: dict[tuple[Path, int], np.ndarray | CorpusError] = {}

    def __call__(self, path: Path, sample_rate: int) -> np.ndarray:
        key = (path, sample_rate)
        if key not in self.waves:
            try:
                self.waves[key] = load_audio(path, sample_rate)
            except CorpusError as err:
                self.waves[key] = err
        wave = self.waves[key]
        if isinstance(wave, CorpusError):
            raise wave
        return wave


def _composed_audio(utterance: ComposedUtterance, cache: _RecordingCache) -> Callable[[int], np.ndarray]:
    def audio(sample_rate: int) -> np.ndarray:
        pieces = [np.zeros(round(utterance.gaps[0] * sample_rate), np.float32)]
        for recording, gap in zip(utterance.recordings, utterance.gaps[1:]):
            pieces += [cache(recording.path, sample_rate), np.zeros(round(gap * sample_rate), np.float32)]
        return np.concatenate(pieces)  # (N,)

    return audio


def fsdd_utterances(
    directory: Path, *, seed: int, digits_per_utterance: tuple[int, int], gap_seconds: tuple[float, float],
    utterances: tuple[int, int, int], validation_indices: tuple[int, int],
) -> dict[str, list[Utterance]]:
    """Composed connected-digit utterances of every split; transcripts are the digits, e.g. ``"351"``."""
    by_split = fsdd_split(fsdd_recordings(directory), validation_indices)
    cache = _RecordingCache()
    result = {}
    for split, count in zip(SPLITS, utterances):
        composed = compose_fsdd(by_split[split], split=split, count=count, seed=seed,
                                digits_per_utterance=digits_per_utterance, gap_seconds=gap_seconds)
        result[split] = [Utterance(c.id, c.text, " ".join(r.path.stem for r in c.recordings), _composed_audio(c, cache))
                         for c in composed]
    return result


# ---------------------------------------------------------------- LibriSpeech


def librispeech_utterances(directory: Path, splits: dict[str, str]) -> dict[str, list[Utterance]]:
    """Every line of every ``*.trans.txt`` under each split directory, with its ``UTTID.flac`` beside it."""
    result = {}
    for split in SPLITS:
        root = directory / splits[split]
        if not root.is_dir():
            raise CorpusError(
                f"LibriSpeech split directory {root.resolve()} for {split} does not exist; set data.splits."
                f"{split} to one of {sorted(p.name for p in directory.iterdir() if p.is_dir())}"
            )
        records = []
        for transcript in sorted(root.rglob("*.trans.txt")):
            for line in transcript.read_text(encoding="utf-8", errors="replace").splitlines():
                if not line.strip():
                    continue
                utt_id, _, text = line.strip().partition(" ")
                path = transcript.parent / f"{utt_id}.flac"
                records.append(Utterance(utt_id, text, str(path), lambda rate, path=path: load_audio(path, rate)))
        if not records:
            raise CorpusError(f"no *.trans.txt transcripts under {root.resolve()}; "
                              "is it a LibriSpeech split directory?")
        result[split] = records
    return result


# ---------------------------------------------------------------- Hugging Face


def hf_utterances(
    corpus: str, *, data_dir: str | None, hf_config: str | None, splits: dict[str, str], audio_column: str,
    text_column: str,
) -> dict[str, list[Utterance]]:
    """Rows of a Hub dataset (``hf:NAME``) or a ``save_to_disk`` directory, audio decoded by soundfile."""
    if corpus.startswith("hf:"):
        try:
            loaded = datasets.load_dataset(corpus[3:], hf_config)
        except Exception as err:  # noqa: BLE001 (the hub or the cache; its message says which)
            raise CorpusError(
                f"could not load Hugging Face dataset {corpus[3:]!r} ({type(err).__name__}: {err})"
            ) from None
    else:
        loaded = load_saved(resolve_corpus(corpus, data_dir))
        if isinstance(loaded, datasets.Dataset):
            raise CorpusError(f"{corpus} holds a single Dataset; save a DatasetDict with train/validation/test splits")
    result = {}
    for split in SPLITS:
        name = splits[split]
        if name not in loaded:
            raise CorpusError(f"{corpus} has splits {sorted(loaded)}, not {name!r}; "
                              f"set data.splits.{split} to one of them")
        table = loaded[name]
        missing = [c for c in (audio_column, text_column) if c not in table.column_names]
        if missing:
            raise CorpusError(f"{corpus} has columns {table.column_names}, not {missing}; "
                              "set data.audio_column/text_column")
        table = table.select_columns([audio_column, text_column]).cast_column(
            audio_column, datasets.Audio(decode=False)
        )
        texts = table[text_column]
        result[split] = [
            Utterance(f"{split}-{i:06d}", text or "", f"{corpus}[{name}][{i}]", _row_audio(table, i, audio_column))
            for i, text in enumerate(texts)
        ]
    return result


def _row_audio(table: datasets.Dataset, row: int, column: str) -> Callable[[int], np.ndarray]:
    def audio(sample_rate: int) -> np.ndarray:
        value = table[row][column]  # {"bytes": ... or None, "path": ... or None}
        name = value.get("path") or f"row {row} of column {column!r}"
        if value.get("bytes"):
            return load_audio(value["bytes"], sample_rate, name=name)
        if value.get("path"):
            return load_audio(value["path"], sample_rate)
        raise CorpusError(f"{name} holds no audio bytes or path; fix the dataset")

    return audio


def load_speech_corpus(
    corpus: str, *, data_dir: str | None = None, splits: dict[str, str] | None = None, hf_config: str | None = None,
    audio_column: str = "audio", text_column: str = "text", seed: int = 0,
    digits_per_utterance: tuple[int, int] = (2, 7), gap_seconds: tuple[float, float] = (0.05, 0.3),
    utterances: tuple[int, int, int] = (4000, 300, 500), validation_indices: tuple[int, int] = (5, 9),
) -> tuple[dict[str, list[Utterance]], str]:
    """The utterances of a speech corpus.

    Returns:
        ({split: utterances} for train/validation/test, a one-line description of the source).
    """
    kind = corpus_kind(corpus, data_dir)
    if kind in ("hf", "saved"):
        names = splits or HF_SPLITS
        by_split = hf_utterances(corpus, data_dir=data_dir, hf_config=hf_config, splits=names,
                                 audio_column=audio_column, text_column=text_column)
        return by_split, corpus if kind == "hf" else os.fspath(resolve_corpus(corpus, data_dir))
    path = resolve_corpus(corpus, data_dir)
    if kind == "fsdd":
        records = fsdd_utterances(path, seed=seed, digits_per_utterance=digits_per_utterance, gap_seconds=gap_seconds,
                                  utterances=utterances, validation_indices=validation_indices)
        return records, f"FSDD {path} (connected digits, seed {seed})"
    return librispeech_utterances(path, splits or LIBRISPEECH_SPLITS), f"LibriSpeech layout {path}"
