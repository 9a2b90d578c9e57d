"""Which code a config may name: the allow-list of import paths, checked before anything is imported.

A run config names code twice over: every ``class_path`` is imported and instantiated, and a
string given where a callable is expected (``lr_lambda: os.system``) is imported and called.
Configs travel inside checkpoints, sweep state and MLflow artifacts, so a config from elsewhere
must never choose what runs. Every import path in a config must therefore start with one of
``ALLOWED_PREFIXES``; anything else is refused, before any import, unless the user passes
``--trust-config`` (a config they wrote themselves).

The check reads the raw YAML and the command-line overrides, never the parsed config (parsing
imports). It looks at every ``class_path`` value and at every other string that reads as a
dotted import path of an importable module (``os.system``, ``this.Model``).
"""

from __future__ import annotations

import importlib.util
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from bptt.errors import ConfigError

TRUST_FLAG = "--trust-config"

# The project's own code, torch's optimizers, schedulers and layers, Lightning's callbacks and loggers.
ALLOWED_PREFIXES = (
    "bptt.",
    "torch.optim.",
    "torch.nn.",
    "pytorch_lightning.callbacks.",
    "pytorch_lightning.loggers.",
    "lightning.pytorch.callbacks.",
    "lightning.pytorch.loggers.",
)

_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")


class UntrustedConfigError(ConfigError):
    """A config names code outside the allow-list."""


def is_allowed(path: str) -> bool:
    """Whether the import path ``path`` is on the allow-list."""
    return path.startswith(ALLOWED_PREFIXES)


def _names_code(text: str) -> bool:
    """A string that jsonargparse would import: a dotted path whose top-level module exists.

    A module already imported is followed attribute by attribute (``json.txt`` names nothing in
    ``json``); one not yet imported cannot be looked into without running it, so any path under
    it counts. ``find_spec`` locates a module without running it.
    """
    if not _DOTTED.match(text):
        return False
    parts = text.split(".")
    if parts[0] not in sys.modules:
        try:
            return importlib.util.find_spec(parts[0]) is not None
        except (ImportError, ValueError):
            return False
    node: Any = sys.modules[parts[0]]
    for i, part in enumerate(parts[1:], start=1):
        if hasattr(node, part):
            node = getattr(node, part)
            continue
        if not hasattr(node, "__path__"):  # not a package: nothing more to import below it
            return False
        try:
            return importlib.util.find_spec(".".join(parts[: i + 1])) is not None
        except (ImportError, ValueError):
            return False
    return True


def _config_file(text: str, base: Path | None) -> Path | None:
    """A YAML/JSON file that the string names (jsonargparse reads such a value as a nested config)."""
    if not text.endswith((".yaml", ".yml", ".json")):
        return None
    for path in ([base / text] if base is not None else []) + [Path(text)]:
        try:
            if path.is_file():
                return path
        except OSError:
            continue
    return None


def import_paths(node: Any, key: str = "", base: Path | None = None, depth: int = 0) -> Iterator[tuple[str, str]]:
    """Every ``(dotted key, import path)`` in a config tree: ``class_path`` values, strings that
    read as import paths, and those inside config files that a value names (relative to ``base``)."""
    if isinstance(node, dict):
        for name, value in node.items():
            child = f"{key}.{name}" if key else str(name)
            if name == "class_path" and isinstance(value, str):
                yield child, value
            else:
                yield from import_paths(value, child, base, depth)
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from import_paths(value, f"{key}[{i}]", base, depth)
    elif isinstance(node, str) and _names_code(node):
        yield key, node
    elif isinstance(node, str) and depth < 8 and (path := _config_file(node, base)) is not None:
        try:
            nested = yaml.safe_load(path.read_text(errors="replace"))
        except (OSError, yaml.YAMLError):
            return
        yield from import_paths(nested, key, path.parent, depth + 1)


def check_config(config: Any, *, source: str, trusted: bool = False, base: Path | None = None) -> None:
    """Refuse a config tree that names code outside the allow-list.

    Args:
        config: the config as plain data (from ``yaml.safe_load``).
        source: where it came from, for the message (a file, "checkpoint X", "sweep state X").
        trusted: the user vouches for it (``--trust-config``): nothing is refused.
        base: the directory relative paths of nested config files start from.

    Raises:
        UntrustedConfigError: the first refused path.
    """
    if trusted:
        return
    for key, path in import_paths(config, base=base):
        if not is_allowed(path):
            raise UntrustedConfigError(
                f"{source} names code outside the allow-list at {key}: {path!r} (allowed: "
                f"{', '.join(p + '*' for p in ALLOWED_PREFIXES)}); if you wrote it yourself, pass {TRUST_FLAG}"
            )


def check_yaml(text: str, *, source: str, trusted: bool = False, base: Path | None = None) -> None:
    """``check_config`` on YAML text; YAML that does not parse is left to the config parser."""
    if trusted:
        return
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError:
        return
    check_config(config, source=source, base=base)


def _is_file(value: str) -> bool:
    try:
        return Path(value).is_file()
    except (OSError, ValueError):  # inline YAML: too long, or NUL bytes, for a path
        return False


def check_args(args: list[str], *, trusted: bool = False, source: str | None = None) -> None:
    """``check_config`` on a command line of config files and dotted overrides, before it is parsed.

    ``--config FILE`` (or inline YAML, named ``source`` in the message) is read as YAML; every
    override value is read as YAML too (``--trainer.callbacks '[{"class_path": ...}]'``), and a
    value that is a config file is read.
    """
    if trusted:
        return
    values: list[tuple[str, str]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--") and "=" in arg:
            values.append(tuple(arg[2:].split("=", 1)))  # type: ignore[arg-type]
        elif arg.startswith("--") and i + 1 < len(args) and not args[i + 1].startswith("--"):
            values.append((arg[2:], args[i + 1]))
            i += 1
        i += 1
    for key, value in values:
        path = Path(value)
        if (key == "config" or path.suffix in (".yaml", ".yml", ".json")) and _is_file(value):
            check_yaml(path.read_text(errors="replace"), source=f"config file {value}", base=path.parent)
            continue
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        if key == "config":
            check_config(parsed, source=source or "the --config YAML")
        else:
            tree = {key.removesuffix(".class_path"): {"class_path": parsed}} if key.endswith("class_path") else {key: parsed}
            check_config(tree, source="the command line")


def split_trust_flag(args: list[str]) -> tuple[bool, list[str]]:
    """(whether ``--trust-config`` is among ``args``, ``args`` without it)."""
    return TRUST_FLAG in args, [a for a in args if a != TRUST_FLAG]
