"""``bptt configs``: the configs that ship with bptt, by name."""

from __future__ import annotations

from bptt.commands.command import Command, CommandParser

PARSER = CommandParser(
    "bptt configs",
    "The configs that ship with bptt: name, task and description. Any command's --config takes a name.",
    examples="  bptt configs\n  bptt fit --config lm/tinyshakespeare_char",
)


def run(args: list[str], trusted: bool) -> int:
    PARSER.parse_args(args)
    from bptt.config.packaged import configs_table

    print(configs_table())
    return 0


COMMAND = Command("list the configs that ship with bptt", run)
