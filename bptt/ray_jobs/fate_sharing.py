"""Every process a ``bptt sweep`` driver starts ends when the driver ends, however it ends (``kill -9``
included).

Inside ``with FateSharing():`` the driver's environment holds ``BPTT_FATE=<token>``, which every
process started in the block inherits, and every process those start::

    bptt sweep (driver) ─┬─ mlflow server ── python -m uvicorn          (the served store)
      BPTT_FATE=t        ├─ gcs_server, raylet ─┬─ ray::DashboardAgent  (a local Ray instance)
                         ├─ dashboard, monitors │  ray::RuntimeEnvAgent
                         │                      └─ ray::IDLE, trials, Train workers
                         └─ watchdog (a session of its own; not marked)

The watchdog (``python -m bptt.ray_jobs.fate_sharing DRIVER_PID TOKEN``) polls for the driver's
death, then ends every process that carries the mark: SIGTERM, then SIGKILL for those left after a
grace period. Leaving the block ends them the same way. The block also sets ``SPT_NOENV=1``:
setproctitle, with which Ray's agents retitle themselves, would otherwise write the title over
``/proc/PID/environ``, mark included. A process that empties its environment escapes.

Without it, ``kill -9`` of the driver leaves ``mlflow server`` and its uvicorn child running for
good (the launcher forwards only signals it receives). Ray ends most of a local instance itself
(GCS, raylet and dashboard are started with the kernel's parent-death signal; workers exit with
their raylet), but its two agents outlive the raylet by a minute, waiting to report its death to
the dead GCS.

Linux only (the mark is read from ``/proc/PID/environ``); elsewhere the block only runs its body.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

MARK = "BPTT_FATE"
KEEP_ENVIRON = {"SPT_NOENV": "1"}  # setproctitle leaves /proc/PID/environ (and the mark) as it is
POLL_S = 0.5  # how often the watchdog looks for the driver
GRACE_S = 3.0  # between SIGTERM and SIGKILL
PROC = Path("/proc")


class FateSharing:
    """Marks every process started inside the block; they all end when the block ends or when this
    process dies."""

    def __init__(self) -> None:
        self.token = uuid.uuid4().hex
        self._watchdog: subprocess.Popen | None = None
        self._previous: dict[str, str | None] = {}

    def __enter__(self) -> FateSharing:
        if not (PROC / "self" / "environ").is_file():
            return self
        env = {k: v for k, v in os.environ.items() if k != MARK}  # the watchdog must outlive the marked
        self._watchdog = subprocess.Popen(
            [sys.executable, "-m", __name__, str(os.getpid()), self.token], env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,  # spared by a signal to the driver's process group or terminal
        )
        self._previous = {k: os.environ.get(k) for k in (MARK, *KEEP_ENVIRON)}
        os.environ.update({MARK: self.token, **KEEP_ENVIRON})
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._watchdog is None:
            return
        for key, value in self._previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._watchdog.kill()
        self._watchdog.wait()
        end_marked(self.token)


def marked(token: str) -> list[int]:
    """The live processes that carry ``token`` (this one excepted)."""
    mark, found = f"{MARK}={token}".encode(), []
    for entry in PROC.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()  # empty for a zombie
        except OSError:  # gone, or another user's
            continue
        if mark in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def end_marked(token: str, grace: float = GRACE_S) -> None:
    """SIGTERM every process that carries ``token``; SIGKILL those left after ``grace`` seconds, and
    any started meanwhile (a dying raylet may still start a worker)."""
    for pid in marked(token):
        _send(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while (left := marked(token)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for _ in range(20):
        if not left:
            return
        for pid in left:
            _send(pid, signal.SIGKILL)
        time.sleep(0.1)
        left = marked(token)


def _send(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _watch(driver: int, token: str) -> None:
    """The watchdog: once ``driver`` is gone (this process then has another parent), end its processes."""
    while os.getppid() == driver:
        time.sleep(POLL_S)
    end_marked(token)


if __name__ == "__main__":
    _watch(int(sys.argv[1]), sys.argv[2])
