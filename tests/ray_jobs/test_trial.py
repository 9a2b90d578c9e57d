"""The hand-offs of a sweep trial are typed, picklable, and fit what Ray Train calls; the worker's side imports
nothing of the trial's; reports lead with the swept metric."""

from __future__ import annotations

import functools
import inspect
import subprocess
import sys

import cloudpickle

from bptt.ray_jobs.sweep_config import load_sweep
from bptt.ray_jobs.sweep_tracking import SweepRuns
from bptt.ray_jobs.trial import SweepContext, swept_metric_first
from bptt.ray_jobs.worker import WorkerJob, run_worker
from tests.conftest import PROJECT


def test_hand_offs_survive_pickling_with_the_trust_flag():
    spec, base = load_sweep(PROJECT / "conf/sweep/quickstart.yaml", trusted=True)
    runs = SweepRuns("http://127.0.0.1:5000", "quickstart-sweep", "1", "parent", "quickstart-1")
    context = cloudpickle.loads(cloudpickle.dumps(SweepContext(base_yaml="x: 1", spec=spec, runs=runs,
                                                               storage_path="/tmp/r", cwd="/tmp",
                                                               run_tags={"command": "bptt sweep"})))
    assert context.runs == runs and context.spec.trusted  # --trust-config reaches every trial
    assert context.run_tags == {"command": "bptt sweep"}
    job = WorkerJob(args=["--config", base], runs=runs, run_id="r", start=None, cwd="/tmp", use_gpu=False,
                    trusted=True)
    entry = cloudpickle.loads(cloudpickle.dumps(functools.partial(run_worker, job)))
    assert entry.args == (job,) and entry.args[0].trusted
    # Ray Train calls a per-worker function with no argument (or a config dict): the job is bound
    assert not [p for p in inspect.signature(entry).parameters.values() if p.default is inspect.Parameter.empty]


def test_the_worker_side_imports_nothing_of_the_trial_side():
    """worker.py holds the workers' contract (WorkerJob, CHECKPOINT_FILE): trial.py imports it, never the reverse."""
    code = "import sys, bptt.ray_jobs.worker; print(sorted(m for m in sys.modules if m.startswith('bptt.ray_jobs')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "bptt.ray_jobs.trial" not in loaded and "bptt.ray_jobs.sweep'" not in loaded, loaded


def test_reports_lead_with_the_swept_metric():
    """Tune's live table shows the first metrics of a report: the swept one is among them."""
    report = swept_metric_first({"train/loss": 1.0, "lr-Adam": 0.01, "val/loss": 2.0}, "val/loss")
    assert list(report) == ["val/loss", "train/loss", "lr-Adam"] and report["val/loss"] == 2.0
    assert swept_metric_first({"train/loss": 1.0}, "val/loss") == {"train/loss": 1.0}
