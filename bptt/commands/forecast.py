"""``bptt forecast``: the next H values past the end of a series, from forecaster checkpoints."""

from __future__ import annotations

from pathlib import Path

from bptt.commands.command import Command, CommandParser
from bptt.errors import BpttError

PARSER = CommandParser(
    "bptt forecast",
    "The next H values past the end of a series (default: the run's own data.source), from one forecaster "
    "checkpoint or the mean of several. Prints the CSV series,timestamp,TARGET...[,TARGET_qLEVEL...] unless "
    "--out names a file. Options come before any --data.* overrides.",
    examples="  bptt forecast runs/forecast/co2/checkpoints/best.ckpt --horizon 52\n"
             "  bptt forecast a.ckpt b.ckpt c.ckpt --series new.csv --quantiles 0.1,0.5,0.9 --out f.csv --plot f.png",
)
PARSER.add_argument("checkpoint", nargs="+", help="a forecaster's .ckpt; several: their ensemble (the mean)")
PARSER.add_argument("--series", help="a .csv/.parquet file with the run's columns (default: the run's data.source)")
PARSER.add_argument("--horizon", type=int, default=None, help="steps ahead, at most 10000 (default: the model's)")
PARSER.add_argument("--quantiles", default=None, help="levels, e.g. 0.1,0.5,0.9 (probabilistic models)")
PARSER.add_argument("--out", help="write the CSV there instead of printing it")
PARSER.add_argument("--plot", help="draw history and forecast into this .png")


def _data_overrides(overrides: list[str]) -> list[str]:
    """``--data.KEY VALUE`` or ``--data.KEY=VALUE`` pairs, nothing else."""
    unknown = [arg for arg in overrides if arg.startswith("-") and not arg.startswith("--data.")]
    if unknown:
        PARSER.error(f"unrecognized arguments: {' '.join(unknown)} (config overrides must be --data.*)")
    position = 0
    while position < len(overrides):
        arg = overrides[position]
        if not arg.startswith("--data."):
            PARSER.error(f"{arg!r} follows the config overrides; name every checkpoint before the options")
        position += 1 if "=" in arg else 2
    return overrides


def run(args: list[str], trusted: bool) -> int:
    opts, overrides = PARSER.parse_known_args(args)
    overrides = _data_overrides(overrides)
    from bptt.directories import check_writable_file
    from bptt.inference.forecasting import forecast, parse_quantiles, save

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


COMMAND = Command("forecast the next values of a series with forecaster checkpoints", run)
