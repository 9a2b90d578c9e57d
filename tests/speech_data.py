"""Synthetic speech corpora written with soundfile, for tests that must run without ../shared/data.

``make_fsdd`` writes the Free Spoken Digit Dataset layout where digit d is a pair of tones
(``DIGIT_TONES[d]``), so a model can learn to tell them apart; ``make_librispeech`` writes the
LibriSpeech layout where each character of the transcript is ``CHAR_SECONDS`` of its own tone.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import soundfile

DIGIT_TONES = {str(d): (300.0 + 110.0 * d, 1900.0 + 170.0 * d) for d in range(10)}  # Hz, all < 4 kHz
CHARS = " 'abcdefghijklmnopqrstuvwxyz"
CHAR_SECONDS = 0.08
LIBRISPEECH_SPLITS = {"train": "train-clean-100", "validation": "dev-clean", "test": "test-clean"}


def tone(frequencies: Sequence[float], seconds: float, sample_rate: int, *, seed: int = 0) -> np.ndarray:
    """(round(seconds * sample_rate),) float32: equal-amplitude sines with a Hann envelope and faint noise."""
    n = round(seconds * sample_rate)
    t = np.arange(n) / sample_rate
    wave = sum(np.sin(2 * np.pi * f * t) for f in frequencies) / len(frequencies)
    noise = np.random.default_rng(seed).normal(0.0, 1e-3, n)
    return (0.5 * np.hanning(n) * wave + noise).astype(np.float32)


def make_fsdd(
    directory: Path, *, speakers: Iterable[str] = ("alice", "bob"), indices: Iterable[int] = range(12),
    digits: str = "0123456789", seconds: float = 0.25, sample_rate: int = 8000,
) -> Path:
    """Write ``directory/recordings/{digit}_{speaker}_{index}.wav`` (16-bit PCM, mono).

    Each speaker shifts the digit's tone pair by 3% per speaker number, so speakers differ but
    digits stay apart. Every file lasts exactly ``seconds``.

    Returns:
        ``directory`` (pass it, or its name under the data root, as ``corpus``).
    """
    recordings = directory / "recordings"
    recordings.mkdir(parents=True, exist_ok=True)
    for s, speaker in enumerate(speakers):
        for index in indices:
            for digit in digits:
                freqs = [f * (1 + 0.03 * s) for f in DIGIT_TONES[digit]]
                wave = tone(freqs, seconds, sample_rate, seed=(s * 1000 + index) * 10 + int(digit))
                soundfile.write(recordings / f"{digit}_{speaker}_{index}.wav", wave, sample_rate, subtype="PCM_16")
    return directory


def char_tone(char: str) -> float:
    """The frequency (Hz) that stands for one character in ``make_librispeech`` audio (< 4 kHz);
    characters outside ``CHARS`` share one more tone."""
    return 200.0 + 120.0 * (CHARS.index(char) if char in CHARS else len(CHARS))


def speak(text: str, sample_rate: int) -> np.ndarray:
    """Audio of a lowercase transcript: ``CHAR_SECONDS`` of each character's tone in turn."""
    return np.concatenate([tone([char_tone(c)], CHAR_SECONDS, sample_rate, seed=i) for i, c in enumerate(text)])


def make_librispeech(
    directory: Path, *, transcripts: dict[str, list[str]] | None = None, speakers: Sequence[str] = ("19", "26"),
    chapter: str = "198", sample_rate: int = 16000,
) -> Path:
    """Write ``directory/<split dir>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac`` and
    ``<speaker>-<chapter>.trans.txt`` ("UTTID WORDS...", upper case as LibriSpeech has it).

    Args:
        transcripts: per split (train/validation/test), the utterances' transcripts, dealt out to the
            speakers in turn; default a few short words per split.

    Returns:
        ``directory``; the split directories are ``LIBRISPEECH_SPLITS``.
    """
    transcripts = transcripts or {
        "train": ["a cab", "bad ace", "dead bee", "faded", "a bed", "cafe", "bead", "deaf cab"],
        "validation": ["a dab", "bee", "face"],
        "test": ["cab", "a fee", "bad"],
    }
    for split, texts in transcripts.items():
        lines: dict[Path, list[str]] = {}
        for i, text in enumerate(texts):
            speaker = speakers[i % len(speakers)]
            folder = directory / LIBRISPEECH_SPLITS[split] / speaker / chapter
            folder.mkdir(parents=True, exist_ok=True)
            utt_id = f"{speaker}-{chapter}-{i:04d}"
            soundfile.write(folder / f"{utt_id}.flac", speak(text.lower(), sample_rate), sample_rate)
            lines.setdefault(folder / f"{speaker}-{chapter}.trans.txt", []).append(f"{utt_id} {text.upper()}")
        for path, content in lines.items():
            path.write_text("\n".join(content) + "\n")
    return directory


def write_speech_checkpoint(path: Path, *, n_mels: int = 40) -> Path:
    """A checkpoint as ``bptt fit`` of ``conf/asr/fsdd_digits.yaml`` writes it (run config, network weights,
    the SpeechDataModule's tokens and normalization), of an untrained one-layer network: for commands
    such as ``bptt transcribe`` that need a checkpoint, not a good one. No corpus is read.

    Returns:
        ``path``.
    """
    import torch

    from bptt.config.parser import build_parser, instantiate, parse_config
    from tests.conftest import PROJECT

    parser = build_parser()
    cfg = parse_config(["--config", str(PROJECT / "conf/asr/fsdd_digits.yaml"), "--model.hidden_size", "8",
                        "--model.num_layers", "1", "--model.num_features", str(n_mels), "--data.n_mels", str(n_mels)],
                       parser)
    init = instantiate(cfg, parser)
    data = {"tokens": init.data.tokens, "mean": [0.0] * n_mels, "std": [1.0] * n_mels, "epoch": 0, "batch": 0}
    torch.save({"state_dict": init.task.state_dict(), "bptt": {"config": parser.dump(cfg)}, "global_step": 0,
                type(init.data).__qualname__: data}, path)
    return path
