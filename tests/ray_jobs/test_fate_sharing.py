"""Processes started inside ``FateSharing`` end with the block, and with the process that entered it
when it is SIGKILLed: children, grandchildren in sessions of their own, and orphans alike."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from bptt.ray_jobs.fate_sharing import MARK, FateSharing
from tests.conftest import PROJECT
from tests.ray_jobs.process_tree import LINUX_PROC, alive, descendants, identity

pytestmark = pytest.mark.skipif(not LINUX_PROC, reason="fate sharing reads Linux's /proc")

# a driver that starts a child, a grandchild in a session of its own, and an orphan (whose parent exits)
DRIVER = """
import json, subprocess, sys, time
from bptt.ray_jobs.fate_sharing import FateSharing

def grandchild(script, **kwargs):
    shell = subprocess.Popen(["sh", "-c", script], stdout=subprocess.PIPE, text=True, **kwargs)
    return int(shell.stdout.readline())

with FateSharing():
    pids = [subprocess.Popen(["sleep", "600"]).pid,
            grandchild("sleep 600 & echo $!; wait", start_new_session=True),
            grandchild("sleep 600 & echo $!")]
    print(json.dumps(pids), flush=True)
    time.sleep(600)
"""


def _gone_within(processes, seconds: float) -> list:
    deadline = time.time() + seconds
    while (left := [p for p in processes if alive(p)]) and time.time() < deadline:
        time.sleep(0.1)
    return left


def test_sigkill_of_the_driver_ends_every_process_it_started():
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, text=True, cwd=PROJECT,
                              start_new_session=True)
    try:
        started = [identity(pid) for pid in json.loads(driver.stdout.readline())]
        watchdog = [p for p, cmd in descendants(driver.pid).items() if "fate_sharing" in cmd]
        assert len(watchdog) == 1 and all(alive(p) for p in started)
    finally:
        driver.kill()
        driver.wait()
    assert not _gone_within(started + watchdog, 60)


def test_leaving_the_block_ends_its_processes_and_the_mark():
    before = {k: os.environ.get(k) for k in (MARK, "SPT_NOENV")}
    with FateSharing() as fate:
        assert os.environ[MARK] == fate.token and os.environ["SPT_NOENV"] == "1"
        sleeper = subprocess.Popen(["sleep", "600"])
        process = identity(sleeper.pid)
    assert {k: os.environ.get(k) for k in before} == before
    assert sleeper.wait(timeout=60) == -signal.SIGTERM
    assert not alive(process)
