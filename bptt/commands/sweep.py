"""``bptt sweep``: a Ray Tune sweep whose every trial is a Ray Train data-parallel job."""

from __future__ import annotations

import sys

from bptt.commands.command import Command, CommandParser

PARSER = CommandParser(
    "bptt sweep",
    "A Ray Tune sweep; every trial a Ray Train data-parallel job of `bptt fit`, tracked as a child of the "
    "sweep's MLflow run. Starts a local Ray instance unless --address names a cluster. Dotted overrides "
    "after the options change the sweep file (num_samples, scheduler.*, resources.*, ...) or its base config "
    "(trainer.*, model.*, ...) for every trial. Ends with the leaderboard; exits 1 when a trial failed.",
    examples="  bptt sweep --config quickstart\n"
             "  bptt sweep --config conf/sweep/quickstart.yaml --num_samples 2 --trainer.max_steps 40\n"
             "  bptt sweep --config my_sweep.yaml --address auto --storage-path s3://bucket/ray\n"
             "  bptt sweep --resume ~/ray_results/quickstart-2026-12-08_01-00-00",
)
WHAT = PARSER.add_mutually_exclusive_group(required=True)
WHAT.add_argument("--config", help="a sweep file, or a shipped sweep's name (bptt configs)")
WHAT.add_argument("--resume", metavar="EXPERIMENT_DIR", help="continue a sweep whose driver stopped")
PARSER.add_argument("--address", default=None,
                    help="an existing Ray cluster: auto, or ray://HOST:10001 (default: start a local Ray instance)")
PARSER.add_argument("--storage-path", default=None,
                    help="where Tune and Train persist results and checkpoints (default: the sweep file's "
                         "storage_path, else ~/ray_results); a shared filesystem or s3://... on several nodes")


def run(args: list[str], trusted: bool) -> int:
    opts, overrides = PARSER.parse_known_args(args)
    from bptt.config.packaged import resolve_config
    from bptt.ray_jobs.sweep import sweep

    config = resolve_config(opts.config, "sweep") if opts.config else None
    board = sweep(config, resume=opts.resume, address=opts.address, storage_path=opts.storage_path,
                  overrides=overrides, trusted=trusted)
    failed = [row["trial"] for row in board if row["status"] == "ERROR"]
    if failed:
        print(f"bptt: {len(failed)} of {len(board)} trials failed ({', '.join(failed)}); Tune's output above "
              "names each one's error.txt", file=sys.stderr)
        return 1
    return 0


COMMAND = Command("a Ray Tune sweep, every trial a Ray Train data-parallel job", run)
