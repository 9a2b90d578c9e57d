"""Processes started inside ``FateSharing`` end with the block, and with the process that entered it
when it is SIGKILLed: children, grandchildren in sessions of their own, and orphans alike; a process
group that ``start_group`` started ends as a whole with ``end_group``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from bptt.ray_jobs.fate_sharing import MARK, FateSharing, end_group, start_group
from tests.conftest import PROJECT
from tests.ray_jobs.process_tree import LINUX_PROC, alive, descendants, group_gone_within, identity

pytestmark = pytest.mark.skipif(not LINUX_PROC, reason="fate sharing reads Linux's /proc")

# a driver that starts a child, a grandchild in a session of its own, and an orphan (whose parent exits)
DRIVER = """
import json, subprocess, sys, time
from bptt.ray_jobs.fate_sharing import FateSharing, start_group

def grandchild(script, **kwargs):
    shell = subprocess.Popen(["sh", "-c", script], stdout=subprocess.PIPE, text=True, **kwargs)
    return int(shell.stdout.readline())

with FateSharing():
    pids = [subprocess.Popen(["sleep", "600"]).pid,
            grandchild("sleep 600 & echo $!; wait", start_new_session=True),
            grandchild("sleep 600 & echo $!"),
            start_group(["sleep", "600"]).pid]
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


# in a group of its own, a leader that SIGTERM ends and a child that it does not (as a server's worker
# that outlives its launcher); the child prints its pid once its trap is set
STUBBORN = """sh -c 'trap "" TERM; echo $$; exec sleep 600' & wait"""
# ... a child that takes a second to finish after SIGTERM, and a leader that does not wait for it
GRACEFUL = """sh -c 'trap "sleep 1; echo done > {done}; exit 0" TERM; echo $$; while :; do sleep 0.1; done' & wait"""


def test_end_group_kills_what_outlives_sigterm_after_the_grace():
    with start_group(["sh", "-c", STUBBORN], stdout=subprocess.PIPE, text=True) as leader:
        child = identity(int(leader.stdout.readline()))
        started = time.monotonic()
        end_group(leader, grace=0.5)
        assert 0.5 <= time.monotonic() - started < 3.0
    assert leader.returncode == -signal.SIGTERM and not alive(child)
    assert group_gone_within(leader.pid, 10)


def test_end_group_waits_the_grace_for_the_whole_group_not_its_leader_alone(tmp_path):
    done = tmp_path / "done"
    with start_group(["sh", "-c", GRACEFUL.format(done=done)], stdout=subprocess.PIPE, text=True) as leader:
        child = identity(int(leader.stdout.readline()))
        end_group(leader, grace=20)
    assert leader.returncode == -signal.SIGTERM and not alive(child)
    assert done.read_text() == "done\n"  # not SIGKILLed when its leader had gone
    assert group_gone_within(leader.pid, 10)
