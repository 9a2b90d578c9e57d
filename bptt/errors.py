"""User-facing errors: the ``bptt`` command prints their message as one line, without a traceback."""


class BpttError(Exception):
    """Bad input (config, data, checkpoint, arguments); the message names the problem and the fix."""


class ConfigError(BpttError, ValueError):
    """A config value that cannot work."""


class CheckpointError(BpttError):
    """A checkpoint that cannot be loaded."""
