"""What a speed depends on: the device's model. `precision: auto` keys its cache by it, and every
benchmark result records it (results from different machines, an AMD EPYC one day and an Intel Xeon
another, are not comparable; only ratios measured in one run are)."""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path
from typing import Any

import torch


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity), else the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def device_model(accelerator: str) -> str:
    """The GPU's name, or the CPU's model name and core count."""
    if accelerator == "gpu":
        return torch.cuda.get_device_name(0)
    return f"{cpu_model()} x{os.cpu_count()}"


def hardware(**extra: Any) -> dict[str, Any]:
    """Machine, CPU model and count, torch version and threads, the GPU if torch sees one, and ``extra``."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"machine": platform.machine(), "cpu_model": cpu_model(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "gpu": gpu, **extra}


@functools.cache
def cpu_autocast_runs_lstm() -> bool:
    """Whether torch's LSTM runs under bf16 autocast on this CPU. Autocast hands it to oneDNN's bf16
    LSTM, which a CPU without native bf16 refuses ("could not create a primitive descriptor for the
    LSTM forward propagation primitive": an AVX2-only AMD EPYC, torch 2.13); ``TorchRNNCore`` then
    runs its LSTM in fp32 there, as autocast already runs torch's GRU. Asked once per process by
    running a 1-unit LSTM for one step."""
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.nn.LSTM(1, 1, batch_first=True)(torch.zeros(1, 1, 1))
    except RuntimeError:
        return False
    return True
