"""What a speed depends on: the device's model. `precision: auto` keys its cache by it, and every
benchmark result records it (results from different machines, an AMD EPYC one day and an Intel Xeon
another, are not comparable; only ratios measured in one run are)."""

from __future__ import annotations

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
