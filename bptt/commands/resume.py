"""``bptt resume``: continue a run from its newest checkpoint, exactly where it stopped."""

from __future__ import annotations

import json

from bptt.commands.command import Command, CommandParser, checkpoint_and_overrides

PARSER = CommandParser(
    "bptt resume",
    "Continue a run from its newest checkpoint, in the same MLflow run, exactly where it stopped (model, "
    "optimizer, carried hidden states, data position, random generators). Ends by printing the final metrics "
    "as one JSON line. Dotted overrides change the config (more steps, another number of processes: the "
    "streams are re-sharded).",
    examples="  bptt resume runs/lm/quickstart/checkpoints/last.ckpt\n"
             "  bptt resume runs/lm/quickstart/checkpoints --trainer.max_steps 2000\n"
             "  bptt resume 3f2c9d0e8a1b4c5d --tracking.tracking_uri http://mlflow:5000",
)
PARSER.add_argument("target", metavar="CHECKPOINT", help="a .ckpt file, a run's checkpoints/ directory, or an "
                                                         "MLflow run id")
PARSER.add_argument("overrides", metavar="--KEY VALUE", nargs="*", help="dotted config overrides")


def run(args: list[str], trusted: bool) -> int:
    split = checkpoint_and_overrides(PARSER, args)
    from bptt.training.run import resume

    print(json.dumps(resume(*split, trusted=trusted)))
    return 0


COMMAND = Command("continue a run from its newest checkpoint, in the same MLflow run", run)
