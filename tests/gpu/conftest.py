"""GPU tests run only where an NVIDIA GPU and TensorRT are both usable; elsewhere each one is
skipped with the reason (e.g. "no GPU (cudaGetDeviceCount: error 35 ...)")."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/ helpers (tiny.py, trt_fakes.py)


@functools.lru_cache(maxsize=1)
def gpu_unavailable() -> str | None:
    from vidrt.backends.cuda import probe
    from vidrt.backends.tensorrt import tensorrt_status

    gpu = probe()
    if not gpu.ok:
        return gpu.reason
    version, why = tensorrt_status()
    return None if version is not None else why


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    reason = gpu_unavailable()
    if reason is not None:
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason=f"needs a GPU with TensorRT: {reason}"))
