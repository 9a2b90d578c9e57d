"""A process's descendants, read from Linux's /proc, and whether they still run."""

from __future__ import annotations

import os
import time
from pathlib import Path

LINUX_PROC = Path("/proc/self/task").is_dir()


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat after the command name: [state, ppid, pgrp, session, ...]; starttime is [19]."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def descendants(pid: int) -> dict[tuple[int, str], str]:
    """(pid, start time) -> command line of every live process below ``pid``, children of any thread."""
    found: dict[tuple[int, str], str] = {}
    todo = [pid]
    while todo:
        parent = todo.pop()
        children: set[int] = set()
        try:
            for task in Path(f"/proc/{parent}/task").iterdir():
                children.update(map(int, (task / "children").read_text().split()))
        except OSError:
            continue
        for child in children:
            try:
                command = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found[child, _stat(child)[19]] = command
            except (OSError, IndexError):
                continue
            todo.append(child)
    return found


def identity(pid: int) -> tuple[int, str]:
    """(pid, start time): names one process even after its pid is reused."""
    return pid, _stat(pid)[19]


def alive(process: tuple[int, str]) -> bool:
    """Whether the process (pid, start time) still runs: not gone, not a zombie, its pid not reused."""
    pid, start = process
    try:
        stat = _stat(pid)
    except OSError:
        return False
    return stat[0] != "Z" and stat[19] == start


def group_gone_within(group: int, seconds: float) -> bool:
    """Whether no process of the process group ``group`` is left within ``seconds``, not even a zombie
    that its new parent has yet to reap."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
