"""`make gpu-check`: what a person with an NVIDIA RTX card runs once, to put the first GPU figures on
the TensorRT path (none of it has run on a GPU yet; see the README's "What was verified").

    .venv/bin/python -m benchmarks.gpu_check [--precision fp32] [--frames 17] [--keep DIR]

1. `vidrt doctor`'s checks: without a GPU and TensorRT it prints why and exits 0 (skipped);
2. builds the bundled tiny model's engines into a copy of its package (`vidrt build --check`: every
   engine compared with ONNX Runtime by polygraphy, the verdicts printed);
3. runs the GPU tests (tests/gpu);
4. runs one clip on TensorRT and one on ONNX Runtime (same request): PSNR between them, and a
   table of GPU seconds per stage (CUDA events) and the peak device memory against `vidrt plan`'s.
Writes benchmarks/results/gpu-check.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"


def skip_reason() -> str | None:
    from vidrt.backends.cuda import probe
    from vidrt.backends.doctor import missing_pieces
    from vidrt.backends.tensorrt import tensorrt_status

    gpu = probe()
    version, why = tensorrt_status()
    if gpu.ok and version is not None:
        return None
    missing = "; ".join(missing_pieces(gpu, version)[:2])
    return f"{gpu.reason if not gpu.ok else why} ({missing})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--precision", default="fp32", help="engine precision (the bundled package is fp32)")
    ap.add_argument("--keep", type=Path, help="build into this folder and keep it")
    args = ap.parse_args(argv)
    why = skip_reason()
    if why is not None:
        print(f"gpu-check skipped: {why}")
        return 0

    from vidrt.export.build_engines import BuildOptions, build_package
    from vidrt.models import default_package
    from vidrt.pipeline import Pipeline
    from vidrt.request import Request

    source = default_package()
    assert source is not None, "the bundled model is missing: make default-model"
    work = args.keep or Path(tempfile.mkdtemp(prefix="vidrt-gpu-check-"))
    package = work / source.name
    if not package.exists():
        shutil.copytree(source, package)
    build_package(package, BuildOptions(args.precision, check=True), log=print)

    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", str(ROOT / "tests" / "gpu")], cwd=ROOT)

    req = Request(prompt="a red circle moving left", seed=1000)
    trt = Pipeline.load(package, backend="tensorrt")
    trt.run(req)  # warm-up: lazy TensorRT setup, CUDA graph capture
    on_gpu = trt.run(req)
    on_cpu = Pipeline.load(package, backend="onnxruntime").run(req)
    assert on_gpu.frames is not None and on_cpu.frames is not None
    mse = float(np.mean((on_gpu.frames.astype(np.float64) - on_cpu.frames.astype(np.float64)) ** 2))
    psnr = float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
    gpu: dict[str, Any] = dict(on_gpu.stats.gpu)
    print(f"\n{'stage':<10}{'wall s':>10}{'GPU s':>10}")
    for stage in ("text", "denoise", "decode"):
        print(f"{stage:<10}{on_gpu.stats.seconds.get(stage, 0.0):>10.3f}"
              f"{dict(gpu.get('gpu_seconds', {})).get(stage, 0.0):>10.3f}")
    peak, planned = int(gpu.get("peak_device_bytes", 0)), int(gpu.get("planned_peak_bytes", 0))
    print(f"peak device memory {peak / 2**30:.2f} GiB, planned {planned / 2**30:.2f} GiB; "
          f"TensorRT vs ONNX Runtime frames {psnr:.1f} dB PSNR; GPU tests exit {tests.returncode}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gpu-check.json").write_text(json.dumps({
        "stats": on_gpu.stats.to_dict(), "psnr_vs_onnxruntime_db": psnr, "gpu_tests_exit": tests.returncode,
        "package": str(package)}, indent=1) + "\n")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if tests.returncode == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
