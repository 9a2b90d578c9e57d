"""Run the real `bptt` command in a subprocess, on the quickstart config shrunk to seconds."""

from __future__ import annotations

import json
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

# SMALL's model with a minGRU core (2 x 32, no dropout, as SMALL's LSTM) in place of the LSTM shorthand
MIN_GRU = ["--model.rnn_type", "null", "--model.hidden_size", "null", "--model.num_layers", "null", "--model.core",
           json.dumps({"class_path": "bptt.models.MinGRU", "init_args": {"hidden_size": 32, "num_layers": 2}})]


# Only there to stop a run that hangs, never to fail a slow one: the longest command here (the speech
# fit of tests/commands/test_transcribe.py) takes about 20 s on 2 idle cores and 85 s on 2 cores at load 5 to 10.
TIMEOUT = 1800


def bptt(*args: str, cwd: Path, timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
    """`bptt ARGS` with the tests' own helpers importable (for callbacks named in a config).

    One intra-op thread unless OMP_NUM_THREADS says otherwise: the tests' models are tiny, and on
    a machine whose cores are taken torch's second thread spins for them (measured on 2 busy cores:
    sunspots 30 epochs, 22 s of CPU with 2 threads, 10 s with 1; results identical).
    """
    env = {"OMP_NUM_THREADS": "1", **os.environ,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([BPTT, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
