"""``bptt diagnose``: the gradient through time of a run's network, and the truncation it suggests."""

from __future__ import annotations

from pathlib import Path

from bptt.commands.command import Command, CommandParser
from bptt.errors import BpttError

PARSER = CommandParser(
    "bptt diagnose",
    "How strongly the loss at a step depends on the state tau steps back, per layer, on the run's training "
    "data: a table of g(tau) / g(0) and the smallest truncation k at which it falls below --eps. Takes a "
    "config (a freshly initialized network) or a checkpoint (its trained network), and dotted overrides.",
    examples="  bptt diagnose --config quickstart --probe-steps 200\n"
             "  bptt diagnose runs/lm/quickstart/checkpoints/best.ckpt --out runs/diagnose/curve.json",
)
PARSER.add_argument("--config", help="a run config: measure its freshly initialized network")
PARSER.add_argument("--probe-steps", type=int, default=100, help="K: how many steps back (default 100)")
PARSER.add_argument("--warmup-steps", type=int, default=50, help="steps before each probe, without graph")
PARSER.add_argument("--probes", type=int, default=4, help="probe windows averaged (default 4)")
PARSER.add_argument("--eps", type=float, default=0.01, help="suggest the tau where the gradient falls below "
                                                             "this fraction of its tau = 0 value (default 0.01)")
PARSER.add_argument("--out", help="also write the curve to this .json (and a .png beside it)")


def run(args: list[str], trusted: bool) -> int:
    if args and not args[0].startswith("-"):  # a checkpoint
        opts, overrides = PARSER.parse_known_args(args[1:])
        target = args[0]
    else:
        opts, overrides = PARSER.parse_known_args(args)
        target = opts.config
    if target is None:
        raise BpttError("`bptt diagnose` needs --config FILE or a checkpoint, e.g. bptt diagnose --config "
                        "conf/lm/quickstart.yaml")
    from bptt.config.packaged import resolve_config
    from bptt.gradient_diagnostics import diagnose_run

    if opts.config is not None:
        target = resolve_config(opts.config, "train")
    print(diagnose_run(target, overrides, probe_steps=opts.probe_steps, warmup_steps=opts.warmup_steps,
                       probes=opts.probes, eps=opts.eps, out=Path(opts.out) if opts.out else None, trusted=trusted))
    return 0


COMMAND = Command("the gradient through time of a run's network, and the truncation it suggests", run)
