"""Shared fixtures: the data root, a per-session token cache, and a tiny in-memory harness for the engine."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

from bptt.tracking.mlflow_tracking import MlflowTracking, TrackingError

# Every Ray instance the tests start (local or a simulated multi-node cluster) binds and talks on the
# loopback address only, never on this machine's network interface. Read when ray is imported, so set
# here, before any test module imports it; subprocesses (the `bptt sweep` drivers) inherit it.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PROJECT = Path(__file__).resolve().parents[1]

# The longest modules, longest first (measured: the Ray sweeps about 6 minutes, the speech and resume
# runs about 2.5 each). `make test` runs the suite on two processes, a module at a time
# (pytest-xdist --dist loadscope): started first, these no longer leave one process finishing alone.
LONGEST_FIRST = ("ray_jobs/test_sweep.py", "commands/test_transcribe.py", "training/test_resume.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        path = item.path.relative_to(PROJECT / "tests").as_posix()
        return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within a module, and of the other modules, stays


@pytest.fixture(scope="session", autouse=True)
def _data_env(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Point the data root at ../shared/data when it exists and keep token caches out of $HOME."""
    if SHARED_DATA.is_dir():
        os.environ.setdefault("BPTT_DATA_DIR", str(SHARED_DATA))
    os.environ["BPTT_CACHE_DIR"] = str(tmp_path_factory.mktemp("bptt-cache"))
    warnings.filterwarnings("ignore", ".*IterableDataset.*__len__.*")


@pytest.fixture
def shakespeare() -> Path:
    """The tiny Shakespeare file, or a skip when ../shared/data is absent (a fresh clone)."""
    path = SHARED_DATA / "tinyshakespeare" / "input.txt"
    if not path.is_file():
        pytest.skip(f"reference data absent: {path} (only in the workspace that has ../shared/data)")
    return path


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """A real `mlflow server` on 127.0.0.1 (sqlite backend, served artifacts), stopped after the session."""
    from bptt.ray_jobs.sweep_tracking import ServedStore  # a sweep's served store; imports Ray only here

    root = tmp_path_factory.mktemp("mlflow-server")
    with ServedStore(MlflowTracking(tracking_uri=f"sqlite:///{root}/mlflow.db"), log=root / "server.log") as store:
        try:
            store.wait(timeout=300)
        except TrackingError:
            pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
        yield store.uri
