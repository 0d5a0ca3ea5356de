"""What the numbers were measured on: CPU model and cores, memory, GPU + driver, library versions, load."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from typing import Any


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _physical_cores() -> int | None:
    try:
        import psutil

        return psutil.cpu_count(logical=False)
    except ImportError:
        return None


def _mem_total() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def gpus() -> list[dict[str, str]]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return []
    if out.returncode != 0:
        return []
    keys = ("name", "driver", "memory", "compute_capability")
    return [dict(zip(keys, (p.strip() for p in line.split(",")), strict=False)) for line in out.stdout.splitlines()
            if line.strip()]


def tensorrt_version() -> str | None:
    try:
        import tensorrt  # type: ignore[import-not-found]

        return str(tensorrt.__version__)
    except Exception:  # ImportError, or the PyPI stub wheel that raises on import
        return None


def describe(threads: int | None = None) -> dict[str, Any]:
    import onnxruntime as ort

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "physical_cores": _physical_cores(),
        "threads_used": threads,
        "memory_bytes": _mem_total(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "gpus": gpus(),
        "tensorrt": tensorrt_version(),
        "onnxruntime": ort.__version__,
        "onnxruntime_providers": ort.get_available_providers(),
        "torch": _version("torch"),
        "diffusers": _version("diffusers"),
        "transformers": _version("transformers"),
        "numpy": _version("numpy"),
        "vidrt": _version("vidrt"),
        "loadavg_at_start": [round(x, 2) for x in load] if load else None,
    }


def one_line(m: dict[str, Any]) -> str:
    gpu = "; ".join(f"{g.get('name')} (driver {g.get('driver')})" for g in m["gpus"]) or "no GPU"
    return (f"{m['cpu']}, {m['logical_cores']} logical cores, {(m['memory_bytes'] or 0) / 2**30:.0f} GiB; {gpu}; "
            f"onnxruntime {m['onnxruntime']}, TensorRT {m['tensorrt'] or 'absent'}, torch {m['torch']}, "
            f"diffusers {m['diffusers']}; load avg at start {m['loadavg_at_start']}")
