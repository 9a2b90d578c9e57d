"""``bptt transcribe``: audio files to text by a speech-recognition checkpoint."""

from __future__ import annotations

from bptt.commands.command import Command, CommandParser

PARSER = CommandParser(
    "bptt transcribe",
    "Greedy CTC transcripts of audio files (WAV or FLAC, resampled to the run's rate) by a speech-recognition "
    "checkpoint; prints one AUDIO<tab>TRANSCRIPT line per file.",
    examples="  bptt transcribe runs/asr/fsdd/checkpoints/best.ckpt a.wav b.flac",
)
PARSER.add_argument("checkpoint", metavar="CHECKPOINT", help="a CTCSpeechTask run's .ckpt")
PARSER.add_argument("audio", metavar="AUDIO", nargs="*", help="audio files")


def run(args: list[str], trusted: bool) -> int:
    opts = PARSER.parse_args(args)
    from bptt.inference.transcribe import transcribe

    for path, text in zip(opts.audio, transcribe(opts.checkpoint, opts.audio, trusted=trusted)):
        print(f"{path}\t{text}")
    return 0


COMMAND = Command("transcribe audio files with a speech-recognition checkpoint", run)
