"""Run the real `bptt` command in a subprocess, on the quickstart config shrunk to seconds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import PROJECT

BPTT = str(Path(sys.executable).parent / "bptt")
QUICK = str(PROJECT / "conf/lm/quickstart.yaml")
# a few stdlib modules, a small LSTM, 12 steps, validation every 6
SMALL = ["--config", QUICK, "--data.stdlib_glob", "json/*.py", "--model.hidden_size", "32",
         "--trainer.max_steps", "12", "--trainer.val_check_interval", "6", "--trainer.enable_progress_bar", "false",
         "--data.batch_size", "4", "--data.eval_batch_size", "4", "--data.bptt", "16", "--tracking.log_model", "false"]


def bptt(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """`bptt ARGS` with the tests' own helpers importable (for callbacks named in a config)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([BPTT, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
