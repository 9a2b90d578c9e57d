"""The ``bptt`` command.

    bptt fit --config conf/lm/quickstart.yaml | quickstart [--model.hidden_size 512 --trainer.max_steps 100 ...]
    bptt resume CHECKPOINT | CHECKPOINT_DIR | MLFLOW_RUN_ID [--trainer.devices 1 ...]
    bptt sweep --config conf/sweep/NAME.yaml | NAME [--address auto | ray://HOST:10001] [--storage-path PATH]
    bptt sweep --resume EXPERIMENT_DIR [--address ...]
    bptt runs [--experiment NAME] [--tracking.tracking_uri URI]
    bptt configs
    bptt validate CHECKPOINT [--data.data_dir DIR ...]
    bptt test CHECKPOINT [...]
    bptt generate CHECKPOINT [--prompt TEXT] [--num-tokens N] [--temperature T] [--seed S]
    bptt transcribe CHECKPOINT AUDIO [AUDIO ...]
    bptt forecast CHECKPOINT [CHECKPOINT ...] [--series FILE] [--horizon H] [--quantiles 0.1,0.5,0.9]
                  [--out F.csv] [--plot F.png]
    bptt diagnose --config FILE | CHECKPOINT [--probe-steps K] [--eps E] [--probes N] [--out PATH] [overrides]

``--config`` takes a file or the name of a config that ships with bptt (``quickstart``,
``lm/tinyshakespeare_char``; ``bptt configs`` lists them).

``--trust-config`` (any command that reads a config) lets the config, the checkpoint's config or the
sweep state name code outside the allow-list of import paths (see ``bptt.trust``): give it only for
configs you wrote yourself.

fit, resume, validate and test end by printing their final metrics as one JSON line; sweep ends with
its leaderboard and exits 1 when a trial failed; transcribe prints one ``AUDIO<tab>TRANSCRIPT`` line per file;
forecast prints its CSV (``series,timestamp,TARGET...[,TARGET_qLEVEL...]``) unless ``--out`` names a file. Bad input ends with one
line ``bptt: error: ...`` and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from bptt import __version__
from bptt.errors import BpttError
from bptt.trust import split_trust_flag

USAGE = __doc__.split("\n\n")[1]


def _split_checkpoint(command: str, args: list[str]) -> tuple[str, list[str]]:
    if not args or args[0].startswith("-"):
        raise BpttError(
            f"`bptt {command}` needs a checkpoint first, e.g. bptt {command} runs/lm/quickstart/checkpoints/last.ckpt"
        )
    return args[0], args[1:]


class _Parser(argparse.ArgumentParser):
    """argparse that raises one-line errors instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise BpttError(f"{message}; see {self.prog} --help")


def _runs_args(args: list[str]) -> argparse.Namespace:
    parser = _Parser(prog="bptt runs")
    parser.add_argument("--experiment", default="bptt", help="experiment name (default: bptt)")
    parser.add_argument("--tracking.tracking_uri", dest="tracking_uri", default=None,
                        help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here")
    return parser.parse_args(args)


def _sweep_args(args: list[str]) -> argparse.Namespace:
    parser = _Parser(prog="bptt sweep", description="A Ray Tune sweep; every trial a Ray Train data-parallel job.")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--config", help="a sweep file, e.g. conf/sweep/quickstart.yaml")
    what.add_argument("--resume", metavar="EXPERIMENT_DIR", help="continue a sweep whose driver stopped")
    parser.add_argument("--address", default=None,
                        help="an existing Ray cluster: auto, or ray://HOST:10001 (default: start a local Ray instance)")
    parser.add_argument("--storage-path", default=None,
                        help="where Tune and Train persist results and checkpoints (default: the sweep file's "
                             "storage_path, else ~/ray_results); a shared filesystem or s3://... on several nodes")
    return parser.parse_args(args)


def _diagnose_args(args: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = _Parser(prog="bptt diagnose", description="Gradient through time, and the truncation it suggests.")
    parser.add_argument("--config", help="a run config: measure its freshly initialized network")
    parser.add_argument("--probe-steps", type=int, default=100, help="K: how many steps back (default 100)")
    parser.add_argument("--warmup-steps", type=int, default=50, help="steps before each probe, without graph")
    parser.add_argument("--probes", type=int, default=4, help="probe windows averaged (default 4)")
    parser.add_argument("--eps", type=float, default=0.01, help="suggest the tau where the gradient falls below "
                                                                 "this fraction of its tau = 0 value (default 0.01)")
    parser.add_argument("--out", help="also write the curve to this .json (and a .png beside it)")
    if args and not args[0].startswith("-"):  # a checkpoint
        opts, overrides = parser.parse_known_args(args[1:])
        opts.target = args[0]
    else:
        opts, overrides = parser.parse_known_args(args)
        opts.target = opts.config
    if opts.target is None:
        raise BpttError("`bptt diagnose` needs --config FILE or a checkpoint, e.g. bptt diagnose --config "
                        "conf/lm/quickstart.yaml")
    return opts, overrides


def _generate_args(args: list[str]) -> argparse.Namespace:
    parser = _Parser(prog="bptt generate")
    parser.add_argument("checkpoint")
    parser.add_argument("--prompt", default="\n", help="text to continue (default: a new line)")
    parser.add_argument("--num-tokens", type=int, default=500, help="tokens to sample")
    parser.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 takes the most likely")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampler")
    return parser.parse_args(args)


def _forecast_args(args: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = _Parser(prog="bptt forecast", description="The next H values past the end of a series.")
    parser.add_argument("checkpoint", nargs="+", help="a forecaster's .ckpt; several: their ensemble (the mean)")
    parser.add_argument("--series", help="a .csv/.parquet file with the run's columns (default: the run's data.source)")
    parser.add_argument("--horizon", type=int, default=None,
                        help="steps ahead, at most 10000 (default: the model's horizon)")
    parser.add_argument("--quantiles", default=None, help="levels, e.g. 0.1,0.5,0.9 (probabilistic models)")
    parser.add_argument("--out", help="write the CSV there instead of printing it")
    parser.add_argument("--plot", help="draw history and forecast into this .png")
    opts, overrides = parser.parse_known_args(args)
    unknown = [arg for arg in overrides if arg.startswith("-") and not arg.startswith("--data.")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (config overrides must be --data.*)")
    position = 0
    while position < len(overrides):  # --data.KEY VALUE or --data.KEY=VALUE pairs, nothing else
        arg = overrides[position]
        if not arg.startswith("--data."):
            parser.error(f"{arg!r} follows the config overrides; name every checkpoint before the options")
        position += 1 if "=" in arg else 2
    return opts, overrides


def run(argv: list[str]) -> int:
    """Dispatch a ``bptt`` command line; returns the exit status.

    Each command imports what it needs when it runs (torch, Lightning, Ray, MLflow take seconds),
    so that ``--help``, ``configs``, ``runs`` and bad command lines answer at once.
    """
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, (trusted, args) = argv[0], split_trust_flag(argv[1:])
    if command == "--version":
        print(__version__)
        return 0
    if command == "configs":
        from bptt.packaged_configs import configs_table

        _Parser(prog="bptt configs", description="The configs that ship with bptt.").parse_args(args)
        print(configs_table())
        return 0
    if command == "fit":
        from bptt.packaged_configs import resolve_config_args

        args = resolve_config_args(args, "train")  # a bad name fails before Lightning is imported
        from bptt.config import build_parser, parse_config

        if args and args[0] in ("-h", "--help"):
            build_parser().print_help()
            return 0
        cfg = parse_config(args, trusted=trusted)
        from bptt import training

        print(json.dumps(training.fit(cfg)))
        return 0
    if command == "resume":
        target, overrides = _split_checkpoint(command, args)
        from bptt import training

        print(json.dumps(training.resume(target, overrides, trusted=trusted)))
        return 0
    if command == "sweep":
        from bptt.packaged_configs import resolve_config

        opts = _sweep_args(args)
        from bptt.ray_jobs.sweep import sweep

        board = sweep(resolve_config(opts.config, "sweep") if opts.config else None, resume=opts.resume, address=opts.address, storage_path=opts.storage_path,
                      trusted=trusted)
        failed = [row["trial"] for row in board if row["status"] == "ERROR"]
        if failed:
            print(f"bptt: {len(failed)} of {len(board)} trials failed ({', '.join(failed)}); Tune's output above "
                  "names each one's error.txt", file=sys.stderr)
            return 1
        return 0
    if command == "runs":
        opts = _runs_args(args)
        from bptt.tracking import runs_table

        print(runs_table(opts.experiment, opts.tracking_uri))
        return 0
    if command in ("validate", "test"):
        checkpoint, overrides = _split_checkpoint(command, args)
        from bptt import training

        print(json.dumps(training.evaluate(checkpoint, command, overrides, trusted=trusted)))
        return 0
    if command == "generate":
        opts = _generate_args(args)
        from bptt import training

        print(training.generate(opts.checkpoint, prompt=opts.prompt, num_tokens=opts.num_tokens,
                                temperature=opts.temperature, seed=opts.seed, trusted=trusted))
        return 0
    if command == "diagnose":
        from pathlib import Path

        from bptt.packaged_configs import resolve_config

        opts, overrides = _diagnose_args(args)
        if opts.config is not None:
            opts.target = resolve_config(opts.config, "train")
        from bptt import training

        print(training.diagnose(opts.target, overrides, probe_steps=opts.probe_steps, warmup_steps=opts.warmup_steps,
                                probes=opts.probes, eps=opts.eps, out=Path(opts.out) if opts.out else None,
                                trusted=trusted))
        return 0
    if command == "transcribe":
        checkpoint, audio = _split_checkpoint(command, args)
        from bptt import training

        for path, text in zip(audio, training.transcribe(checkpoint, audio, trusted=trusted)):
            print(f"{path}\t{text}")
        return 0
    if command == "forecast":
        opts, overrides = _forecast_args(args)
        from pathlib import Path

        from bptt.directories import check_writable_file
        from bptt.forecasting import forecast, parse_quantiles, save

        for flag, path, suffix in (("--out", opts.out, ".csv"), ("--plot", opts.plot, ".png")):
            if path is not None and not path.endswith(suffix):
                raise BpttError(f"{path} does not end in {suffix}; name a {suffix} file")
            if path is not None:  # both destinations, before any checkpoint is read
                check_writable_file(Path(path), label=f"{flag} {path}", fix="name a file in a directory you can write")
        levels = parse_quantiles(opts.quantiles) if opts.quantiles is not None else []  # "" is refused, not ignored
        result = forecast(opts.checkpoint, series=opts.series, horizon=opts.horizon, quantiles=levels,
                          overrides=overrides, trusted=trusted)
        save(result, csv=Path(opts.out) if opts.out else None, png=Path(opts.plot) if opts.plot else None)
        if not opts.out:
            print(result.table.to_csv(index=False), end="")
        return 0
    raise BpttError(
        f"unknown command {command!r}; commands: fit, resume, sweep, runs, configs, validate, test, generate, transcribe, "
        "diagnose, forecast (see bptt --help)"
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``bptt`` console script."""
    from bptt.console import held_back

    try:
        with held_back():  # libraries' banners wait for the command's checks (bptt.console)
            return run(sys.argv[1:] if argv is None else argv)
    except BpttError as err:
        print(f"bptt: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bptt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
