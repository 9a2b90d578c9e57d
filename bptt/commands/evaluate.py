"""``bptt validate`` and ``bptt test``: a checkpoint's model on the validation or test split, state carried."""

from __future__ import annotations

import json

from bptt.commands.command import Command, CommandParser, checkpoint_and_overrides


def _parser(stage: str, split: str) -> CommandParser:
    parser = CommandParser(
        f"bptt {stage}",
        f"Run the {split} split through a checkpoint's model with hidden state carried across windows, and print "
        "its metrics as one JSON line. Dotted overrides change the config (e.g. where the data lives).",
        examples=f"  bptt {stage} runs/lm/quickstart/checkpoints/best.ckpt\n"
                 f"  bptt {stage} best.ckpt --data.data_dir /data/tinyshakespeare",
    )
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="a .ckpt written by bptt fit")
    parser.add_argument("overrides", metavar="--KEY VALUE", nargs="*", help="dotted config overrides")
    return parser


def _command(stage: str, split: str, summary: str) -> Command:
    parser = _parser(stage, split)

    def run(args: list[str], trusted: bool) -> int:
        checkpoint, overrides = checkpoint_and_overrides(parser, args)
        from bptt.training.evaluation import evaluate

        print(json.dumps(evaluate(checkpoint, stage, overrides, trusted=trusted)))  # type: ignore[arg-type]
        return 0

    return Command(summary, run)


VALIDATE = _command("validate", "validation", "a checkpoint's metrics on the validation split")
TEST = _command("test", "test", "a checkpoint's metrics on the test split")
