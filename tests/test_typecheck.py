"""mypy --strict (per-module settings in pyproject.toml) on the TensorRT / CUDA / residency modules,
against the tensorrt-stubs and the cuda-python stub in typings/; and that stub against the
installed cuda.bindings.runtime (stubtest)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typing_prep

ROOT = Path(__file__).resolve().parent.parent
MODULES = ("vidrt.backends.tensorrt", "vidrt.backends.refit", "vidrt.backends.cuda", "vidrt.backends.residency",
           "vidrt.backends.doctor", "vidrt.cli.trt", "vidrt.export.build_engines", "vidrt.export.quantize_fp8",
           "vidrt.backends.kernels", "vidrt.backends.device_ops")


def _run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def test_mypy_strict_on_the_tensorrt_modules() -> None:
    if importlib.util.find_spec("mypy") is None:
        pytest.fail("mypy is not installed: pip install -e '.[dev]'")
    typing_prep.prepare()  # raises SystemExit with the install command when tensorrt-stubs is missing
    res = _run(["-m", "mypy", *(a for m in MODULES for a in ("-m", m))])
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Success" in res.stdout


def test_cuda_stub_matches_the_installed_bindings() -> None:
    if importlib.util.find_spec("cuda.bindings") is None:
        pytest.skip("cuda-python is not installed")
    res = _run(["-m", "mypy.stubtest", "cuda.bindings.runtime", "cuda.bindings.nvrtc", "cuda.bindings.driver",
                "--ignore-missing-stub"], env={"MYPYPATH": str(ROOT / "typings")})
    assert res.returncode == 0, res.stdout + res.stderr
