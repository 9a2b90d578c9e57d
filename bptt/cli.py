"""The ``bptt`` command: a registry of the commands in ``bptt.commands``, one module each.

Bad input ends with one line ``bptt: error: ...`` and exit status 2.
"""

from __future__ import annotations

import sys

from bptt import __version__
from bptt.commands import configs, diagnose, evaluate, fit, forecast, generate, resume, runs, sweep, transcribe
from bptt.commands.command import Command, HelpShown
from bptt.config.trust import TRUST_FLAG, split_trust_flag
from bptt.errors import BpttError

COMMANDS: dict[str, Command] = {
    "fit": fit.COMMAND,
    "resume": resume.COMMAND,
    "sweep": sweep.COMMAND,
    "runs": runs.COMMAND,
    "configs": configs.COMMAND,
    "validate": evaluate.VALIDATE,
    "test": evaluate.TEST,
    "generate": generate.COMMAND,
    "transcribe": transcribe.COMMAND,
    "forecast": forecast.COMMAND,
    "diagnose": diagnose.COMMAND,
}


def usage() -> str:
    """``bptt --help``: the commands, a line each, and the options every command takes."""
    width = max(map(len, COMMANDS))
    table = "\n".join(f"  {name.ljust(width)}  {command.summary}" for name, command in COMMANDS.items())
    return (f"usage: bptt COMMAND [ARGS ...]   (bptt COMMAND --help: its options and examples)\n\n"
            f"Train recurrent networks with truncated backpropagation through time.\n\ncommands:\n{table}\n\n"
            f"options:\n  {TRUST_FLAG}  let a config, checkpoint or sweep name code outside bptt's allow-list "
            "(only what you wrote)\n  --version       bptt's version\n\n"
            "examples:\n  bptt fit --config quickstart\n  bptt sweep --config quickstart\n  bptt runs")


def run(argv: list[str]) -> int:
    """Run a ``bptt`` command line; returns the exit status."""
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] == "--version":
        print(__version__)
        return 0
    command = COMMANDS.get(argv[0])
    if command is None:
        raise BpttError(f"unknown command {argv[0]!r}; commands: {', '.join(COMMANDS)} (see bptt --help)")
    trusted, args = split_trust_flag(argv[1:])
    try:
        return command.run(args, trusted)
    except HelpShown:
        return 0


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
