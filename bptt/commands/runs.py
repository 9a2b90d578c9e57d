"""``bptt runs``: an experiment's MLflow runs as a table."""

from __future__ import annotations

from bptt.commands.command import Command, CommandParser

PARSER = CommandParser(
    "bptt runs",
    "An experiment's runs in the MLflow store: final metrics, status and the params that differ; a sweep's "
    "trials under their parent run.",
    examples="  bptt runs\n  bptt runs --experiment sweeps --tracking.tracking_uri http://127.0.0.1:5000",
)
PARSER.add_argument("--experiment", default="bptt", help="experiment name (default: bptt)")
PARSER.add_argument("--tracking.tracking_uri", dest="tracking_uri", default=None,
                    help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here")


def run(args: list[str], trusted: bool) -> int:
    opts = PARSER.parse_args(args)
    from bptt.tracking.runs_table import runs_table

    print(runs_table(opts.experiment, opts.tracking_uri))
    return 0


COMMAND = Command("list an experiment's MLflow runs, a sweep's trials under their parent", run)
