"""The hand-offs of a sweep trial are typed, picklable, and fit what Ray Train calls."""

from __future__ import annotations

import functools
import inspect

import cloudpickle

from bptt.ray_jobs.sweep_config import load_sweep
from bptt.ray_jobs.sweep_tracking import SweepRuns
from bptt.ray_jobs.trial import SweepContext, WorkerJob
from bptt.ray_jobs.worker import run_worker
from tests.conftest import PROJECT


def test_hand_offs_survive_pickling_with_the_trust_flag():
    spec, base = load_sweep(PROJECT / "conf/sweep/quickstart.yaml", trusted=True)
    runs = SweepRuns("http://127.0.0.1:5000", "quickstart-sweep", "1", "parent", "quickstart-1")
    context = cloudpickle.loads(cloudpickle.dumps(SweepContext(base_yaml="x: 1", spec=spec, runs=runs,
                                                               storage_path="/tmp/r", cwd="/tmp")))
    assert context.runs == runs and context.spec.trusted  # --trust-config reaches every trial
    job = WorkerJob(args=["--config", base], run_id="r", start=None, cwd="/tmp", use_gpu=False, trusted=True)
    entry = cloudpickle.loads(cloudpickle.dumps(functools.partial(run_worker, job)))
    assert entry.args == (job,) and entry.args[0].trusted
    # Ray Train calls a per-worker function with no argument (or a config dict): the job is bound
    assert not [p for p in inspect.signature(entry).parameters.values() if p.default is inspect.Parameter.empty]
