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

A server that a driver (or a test) starts and stops itself, such as the sweep's ``mlflow server``,
is started by ``start_group`` as the leader of a process group of its own, and ``end_group`` ends
that group as a whole: SIGTERM, then SIGKILL for what still runs after a grace period, returning
once nothing in it runs. Its own group spares it a signal meant for the driver's (a terminal's
Ctrl-C); its environment still carries the mark, so it ends with the driver on ``kill -9`` too.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MARK = "BPTT_FATE"
KEEP_ENVIRON = {"SPT_NOENV": "1"}  # setproctitle leaves /proc/PID/environ (and the mark) as it is
POLL_S = 0.5  # how often the watchdog looks for the driver
GRACE_S = 3.0  # between SIGTERM and SIGKILL
KILLED_S = 5.0  # how long end_group waits for a SIGKILLed group (a process in uninterruptible sleep)
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


def start_group(command: list[str], **popen: Any) -> subprocess.Popen:
    """``subprocess.Popen(command, **popen)`` as the leader of a session and process group of its own,
    for ``end_group`` to end with every process it starts."""
    return subprocess.Popen(command, start_new_session=True, **popen)


def end_group(process: subprocess.Popen, grace: float = GRACE_S) -> None:
    """End the process group that ``process`` leads (``start_group``): SIGTERM to all of it, SIGKILL
    to whatever still runs after ``grace`` seconds (a child that outlives its leader, such as a
    server's worker, included), then reap the leader. Returns once nothing in the group runs, or
    after ``KILLED_S`` more seconds with a warning naming what does."""
    group = process.pid  # reaped only at the end: till then no other group can take this id
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, KILLED_S)):
        if not _running_in_group(process):
            break
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while _running_in_group(process) and time.monotonic() < deadline:
            time.sleep(0.05)
    else:
        if left := _running_in_group(process):
            log.warning("processes %s of process group %d still run after SIGKILL", left, group)
    process.wait()


def _running_in_group(process: subprocess.Popen) -> list[int]:
    """The processes of the group ``process`` leads that still run (not zombies), its leader included.
    Where ``/proc`` is missing: ``[group]`` while the leader runs or the group has members left."""
    group = process.pid
    if not (PROC / "self" / "stat").is_file():
        if process.poll() is None:
            return [group]
        try:
            os.killpg(group, 0)  # the leader is reaped: the group's id stays taken only while it has members
        except ProcessLookupError:
            return []
        return [group]
    running = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:  # after the command name: state, ppid, pgrp, ...
            state, _, pgrp = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):  # gone meanwhile
            continue
        if int(pgrp) == group and state != "Z":
            running.append(int(entry.name))
    return running


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
