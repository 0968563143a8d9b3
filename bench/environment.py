"""The machine and software a benchmark ran on: device name, thread count, versions and date, recorded in every
row (``report.header_line`` prints them above the tables)."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import os
import platform

import torch

__all__ = ["environment"]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: str) -> dict:
    """Device, versions and date, recorded in every row."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        name = f"{_cpu_name()} ({os.cpu_count()} CPUs)"
    try:
        import infofuse

        cpp = bool(infofuse.cpp_available())
    except Exception:
        cpp = None
    return {
        "device": device,
        "device_name": name,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "python": platform.python_version(),
        "infofuse": _version("infofuse"),
        "infofuse_cpp": cpp,
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
