"""Audio in, log-mel features out: reading, resampling, the mel filterbank and SpecAugment.

Audio is read with ``soundfile`` and resampled with ``soxr`` (torchaudio has no wheel for
our torch pin). Features are Kaldi/HTK-style log-mel filterbanks::

    waveform (N,) --25 ms Hann windows every 10 ms, |STFT|^2--> (T, n_fft/2 + 1)
                  --HTK mel triangles--> (T, F) --log(x + 1e-6)--> features

with T = 1 + N // hop (frames centred on samples 0, hop, 2 hop, ...; zero padding at the ends).

Usable audio: a file must decode to finite samples at a rate in [``MIN_SAMPLE_RATE``,
``MAX_SAMPLE_RATE``] (1 kHz .. 384 kHz, the range of real recorders and sound cards) that last at
least one feature window (25 ms), and a WAV file must hold all the samples its header declares.
Anything else (a file cut short after its header or anywhere in its samples, one sample, NaN or Inf
in a float file, a header claiming 1 Hz) is a ``CorpusError`` naming the file: training counts such
utterances as skipped, ``bptt transcribe`` stops with that one line.
"""

from __future__ import annotations

import io
import wave
from pathlib import Path

import numpy as np
import soundfile
import soxr
import torch
from torch import Tensor

from bptt.datamodules.sources import CorpusError

WINDOW_SECONDS = 0.025
HOP_SECONDS = 0.010
LOG_FLOOR = 1e-6
MIN_SAMPLE_RATE = 1_000  # Hz
MAX_SAMPLE_RATE = 384_000


def read_audio(source: str | Path | bytes, *, name: str | None = None) -> tuple[np.ndarray, int]:
    """Decode an audio file (WAV, FLAC, ...) and mix it down to mono.

    Args:
        source: a file path or the file's bytes.
        name: what to call ``source`` in errors (default: the path).

    Returns:
        (waveform (N,) float32 in [-1, 1], its sample rate).

    Raises:
        CorpusError: the file is missing, unreadable or corrupt, or not usable audio (see the
            module docstring): a rate outside [1 kHz, 384 kHz], under 25 ms, a WAV file cut short,
            NaN or Inf samples.
    """
    name = name or str(source)
    try:
        data, rate = soundfile.read(io.BytesIO(source) if isinstance(source, bytes) else str(source),
                                    dtype="float32", always_2d=True)  # (N, channels)
    except (RuntimeError, OSError, ValueError, TypeError) as err:  # libsndfile: unknown format, truncated, missing
        raise CorpusError(f"cannot read audio {name}: {err}; replace or remove the file") from None
    if data.shape[0] == 0:
        raise CorpusError(f"audio {name} has no samples; replace or remove the file")
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise CorpusError(f"audio {name} has a sample rate of {rate} Hz, outside {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} "
                          "Hz; its header is damaged or it is not a recording: replace or remove the file")
    count, window = data.shape[0], round(WINDOW_SECONDS * rate)
    if count < window:
        raise CorpusError(f"audio {name} has {count} sample(s) at {rate} Hz ({1000 * count / rate:.1f} ms), fewer than "
                          f"one {1000 * WINDOW_SECONDS:.0f} ms feature window ({window}); it is cut short or empty: "
                          "replace or remove the file")
    declared = _declared_frames(source)
    if declared is not None and declared > count:  # libsndfile reads what is there without a word
        raise CorpusError(f"audio {name} is cut short: its header declares {declared} sample(s) "
                          f"({declared / rate:.3f} s) and it holds {count}; replace or remove the file")
    finite = np.isfinite(data).all(axis=1)  # (N,)
    if not finite.all():
        i = int(np.argmin(finite))
        raise CorpusError(f"audio {name} has a non-finite sample ({data[i][~np.isfinite(data[i])][0]}) at sample {i} "
                          f"({i / rate:.3f} s); replace or remove the file")
    return data.mean(axis=1), int(rate)  # (N,)


def _declared_frames(source: str | Path | bytes) -> int | None:
    """The sample frames a PCM WAV file's header declares (the standard library's ``wave`` reads the
    header only); None for another format or a size left unknown (0 or 0xFFFFFFFF, as streaming
    writers leave it)."""
    try:
        with wave.open(io.BytesIO(source) if isinstance(source, bytes) else str(source), "rb") as header:
            frames, frame_bytes = header.getnframes(), header.getsampwidth() * header.getnchannels()
    except (wave.Error, EOFError, OSError):
        return None
    return None if frames == 0 or frames >= 0xFFFFFFFF // max(frame_bytes, 1) else frames


def resample(waveform: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    """``waveform`` (N,) at ``rate`` as (round(N * target_rate / rate),) float32 at ``target_rate``."""
    if rate == target_rate:
        return waveform
    return soxr.resample(waveform, rate, target_rate).astype(np.float32, copy=False)


def load_audio(source: str | Path | bytes, sample_rate: int, *, name: str | None = None) -> np.ndarray:
    """A file as a mono (N,) float32 waveform at ``sample_rate``; CorpusError when unreadable."""
    waveform, rate = read_audio(source, name=name)
    return resample(waveform, rate, sample_rate)


def hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    """HTK mel scale: 2595 log10(1 + f / 700)."""
    return 2595.0 * np.log10(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


def mel_to_hz(mel: np.ndarray | float) -> np.ndarray:
    return 700.0 * (10.0 ** (np.asarray(mel, dtype=np.float64) / 2595.0) - 1.0)


def mel_centres(n_mels: int, sample_rate: int) -> np.ndarray:
    """(F,) centre frequencies in Hz of the mel filters, equally spaced in mel from 0 to Nyquist."""
    edges = mel_to_hz(np.linspace(0.0, hz_to_mel(sample_rate / 2), n_mels + 2))
    return edges[1:-1]


def mel_filterbank(*, n_mels: int, n_fft: int, sample_rate: int) -> Tensor:
    """HTK triangular mel filters (unnormalized, peak 1 at each centre).

    Returns:
        (n_fft // 2 + 1, F) weights: power spectrum (T, n_fft // 2 + 1) @ weights = mel energies (T, F).
    """
    edges = mel_to_hz(np.linspace(0.0, hz_to_mel(sample_rate / 2), n_mels + 2))  # (F + 2,)
    freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)[:, None]  # (K, 1)
    rising = (freqs - edges[:-2]) / (edges[1:-1] - edges[:-2])  # (K, F)
    falling = (edges[2:] - freqs) / (edges[2:] - edges[1:-1])  # (K, F)
    return torch.from_numpy(np.clip(np.minimum(rising, falling), 0.0, None)).float()


def num_frames(num_samples: int, sample_rate: int) -> int:
    """T, the number of feature frames of ``num_samples`` samples."""
    return 1 + num_samples // round(HOP_SECONDS * sample_rate)


class LogMel:
    """Log-mel filterbank features: 25 ms Hann windows, 10 ms hop, ``n_mels`` HTK mel bins.

    Args:
        sample_rate: of the waveforms it is given.
        n_mels: F, the number of mel bins.
    """

    def __init__(self, *, sample_rate: int, n_mels: int) -> None:
        self.sample_rate = sample_rate
        self.win_length = round(WINDOW_SECONDS * sample_rate)
        self.hop = round(HOP_SECONDS * sample_rate)
        self.n_fft = 1 << (self.win_length - 1).bit_length()  # the power of two >= the window
        self.window = torch.hann_window(self.win_length)
        self.filters = mel_filterbank(n_mels=n_mels, n_fft=self.n_fft, sample_rate=sample_rate)  # (K, F)

    def __call__(self, waveform: np.ndarray | Tensor) -> Tensor:
        """Features of one waveform.

        Args:
            waveform: (N,) mono samples at ``sample_rate``, N >= 1.

        Returns:
            (T, F) float32 log-mel features, T = 1 + N // hop.
        """
        wave = torch.as_tensor(waveform, dtype=torch.float32)
        spec = torch.stft(wave, self.n_fft, hop_length=self.hop, win_length=self.win_length, window=self.window,
                          center=True, pad_mode="constant", return_complex=True)  # (K, T)
        power = spec.abs().pow(2).T  # (T, K)
        return torch.log(power @ self.filters + LOG_FLOOR)  # (T, F)


def spec_augment(
    features: Tensor, lengths: Tensor, generator: torch.Generator, *, freq_masks: int, freq_mask_width: int,
    time_masks: int, time_mask_width: int,
) -> Tensor:
    """SpecAugment's frequency and time masks (Park et al. 2019), without time warping.

    Each row gets ``freq_masks`` bands of 0..``freq_mask_width`` mel bins and ``time_masks``
    spans of 0..``time_mask_width`` frames inside its length, set to 0 (the mean of normalized
    features). The masks depend only on ``generator``'s state.

    Args:
        features: (B, T, F) normalized features; changed in place.
        lengths: (B,) valid frames per row.
        generator: the source of the mask positions.

    Returns:
        ``features``.
    """
    num_bins = features.shape[2]

    def draw(high: int) -> int:  # uniform in [0, high]
        return int(torch.randint(0, high + 1, (), generator=generator))

    for row, length in enumerate(lengths.tolist()):
        for _ in range(freq_masks):
            width = draw(min(freq_mask_width, num_bins))
            start = draw(num_bins - width)
            features[row, :length, start : start + width] = 0
        for _ in range(time_masks):
            width = draw(min(time_mask_width, length))
            start = draw(length - width)
            features[row, start : start + width] = 0
    return features
