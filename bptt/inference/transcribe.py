"""``bptt transcribe``: greedy transcripts of audio files by a speech-recognition checkpoint."""

from __future__ import annotations

from pathlib import Path

from bptt.errors import CheckpointError, ConfigError
from bptt.lightning_modules.speech_recognizer import CTCSpeechTask
from bptt.training.restore import restore


def transcribe(checkpoint_path: str | Path, audio: list[str], *, trusted: bool = False) -> list[str]:
    """Greedy transcripts of audio files by a speech-recognition checkpoint.

    Args:
        checkpoint_path: a ``.ckpt`` of a ``CTCSpeechTask`` run.
        audio: WAV or FLAC files (resampled to the run's sample rate).

    Returns:
        one transcript per file, in order.
    """
    if not audio:
        raise ConfigError("`bptt transcribe` needs audio files after the checkpoint, "
                          "e.g. bptt transcribe last.ckpt a.wav")
    _, init, checkpoint = restore(checkpoint_path, [], trusted)
    task = init.task
    if not isinstance(task, CTCSpeechTask):
        raise CheckpointError(f"{checkpoint_path} is a {type(task).__name__} checkpoint; "
                              "transcribe needs a speech model")
    features = [init.data.featurize(path) for path in audio]  # each (T, F); unreadable audio fails here
    task.load_state_dict(checkpoint["state_dict"])
    task.eval()
    return [init.data.decode(ids) for ids in task.transcribe(features)]
