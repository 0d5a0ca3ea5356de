"""vidrt.backends: engines and everything device-specific.

    base.py       the Engine / Backend interface every stage calls; TensorOps (arithmetic on engine outputs
                  where they live) and its numpy implementation
    ort.py        ONNX Runtime (CPU; the CUDA provider selectable)
    tensorrt.py   TensorRT plans: buffers, streams, CUDA graphs, weight streaming (not yet run on a GPU)
    cuda.py       the cuda-python calls TensorRT needs, typed; device tensors
    device_ops.py TensorOps on device tensors (step caching's residuals between the DiT pieces)
    kernels.py    the element-wise CUDA kernels behind it, compiled with NVRTC
    residency.py  the GPU memory plan: what is resident per stage, the VAE tile, the peak
    doctor.py     what this machine can run, and why not

Backend selection (below): `auto` takes TensorRT when a GPU, TensorRT and matching plans are all
present, else ONNX Runtime. Imports vidrt.package and vidrt.errors, never the CLI or the job service.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from vidrt.backends.base import Backend, BackendOptions
from vidrt.errors import UsageError
from vidrt.package.manifest import Manifest

BACKENDS = ("auto", "onnxruntime", "onnxruntime-cuda", "tensorrt")


def open_backend(options: BackendOptions, manifest: Manifest, package: Path | str | None = None) -> Backend:
    """`package` (optional) only makes TensorRT's rebuild hints name the real folder."""
    if options.backend not in BACKENDS:
        raise UsageError(f"unknown backend {options.backend!r}; use one of {', '.join(BACKENDS)}")
    if options.backend == "tensorrt":
        from vidrt.backends.tensorrt import TrtBackend

        return TrtBackend(options, manifest, package)  # DeviceError says why not (no GPU, no plans, ...)
    if options.backend == "auto" and manifest.engines:  # no plans: no TensorRT/CUDA import at all
        from vidrt.backends.tensorrt import TrtBackend, availability, device_index

        ok, _why = availability(manifest, device_index(options))
        if ok:
            return TrtBackend(options, manifest, package)
    from vidrt.backends.ort import OrtBackend

    # options.device "cuda:N" picks the GPU of a GPU backend; plain onnxruntime stays on the CPU
    gpu = options.device if options.device.startswith("cuda") else "cuda"
    if options.backend == "onnxruntime-cuda":  # ONNX Runtime's CUDA provider (onnxruntime-gpu); no vidrt memory plan
        return OrtBackend(replace(options, device=gpu))
    return OrtBackend(replace(options, device="cpu") if options.device.startswith("cuda:") else options)
