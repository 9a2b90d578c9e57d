"""What every command module shares: ``Command`` (a summary line and the function that runs it), a parser
that answers a bad command line with one line, and the ``CHECKPOINT [overrides]`` form."""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Callable
from dataclasses import dataclass

from bptt.errors import BpttError


@dataclass(frozen=True)
class Command:
    """One ``bptt`` command.

    Attributes:
        summary: what it does, in one line (``bptt --help``).
        run: runs it on the arguments after its name and whether ``--trust-config`` was given; returns
            the exit status.
    """

    summary: str
    run: Callable[[list[str], bool], int]


class CommandParser(argparse.ArgumentParser):
    """argparse with examples kept as written, raising one-line errors instead of printing usage and exiting."""

    def __init__(self, prog: str, description: str, examples: str = "", **kwargs: object) -> None:
        epilog = f"examples:\n{examples}" if examples else None
        super().__init__(prog=prog, description=textwrap.fill(description, 100), epilog=epilog,
                         formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)  # type: ignore[arg-type]

    def error(self, message: str) -> None:  # type: ignore[override]
        raise BpttError(f"{message}; see {self.prog} --help")

    def exit(self, status: int = 0, message: str | None = None) -> None:  # type: ignore[override]
        """After ``--help``: back to the command (``HelpShown``), not out of the process."""
        if status:
            raise BpttError((message or "").strip() or f"see {self.prog} --help")
        raise HelpShown


class HelpShown(Exception):
    """A command printed its help; ``bptt.cli`` ends it with status 0."""


def checkpoint_and_overrides(parser: CommandParser, args: list[str]) -> tuple[str, list[str]]:
    """``CHECKPOINT [--key value ...]``: the checkpoint and the dotted overrides after it.

    Raises:
        HelpShown: the help was asked for (and printed).
        BpttError: no checkpoint first.
    """
    if args and args[0] in ("-h", "--help"):
        parser.print_help()
        raise HelpShown
    if not args or args[0].startswith("-"):
        raise BpttError(f"`{parser.prog}` needs a checkpoint first, e.g. {parser.prog} "
                        "runs/lm/quickstart/checkpoints/last.ckpt; see --help")
    return args[0], args[1:]
