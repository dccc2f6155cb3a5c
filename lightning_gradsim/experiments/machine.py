"""What a table's numbers were computed with: torch and Python, the CPU and its instruction set, the GPU, threads."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["machine_info"]


def machine_info(device: str | torch.device = "cpu") -> dict[str, Any]:
    """What a table's numbers depend on beyond the seeds: torch and its BLAS, the CPU, the GPU, threads.

    Two machines with the same values here give the same table bitwise; another torch, BLAS, CPU
    instruction set or GPU can change the last bits of a run, and so a few gate decisions and test
    predictions (see the README's main-job paragraph).

    >>> sorted(machine_info())
    ['cpu', 'cpu_capability', 'gpu', 'python', 'threads', 'torch']
    """
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    dev = torch.device(device)
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" and torch.cuda.is_available() else None
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "gpu": gpu,
        "threads": torch.get_num_threads(),
    }
