"""Backend selection. `auto` takes TensorRT when a GPU, TensorRT and matching plans are all present,
else ONNX Runtime."""

from __future__ import annotations

from vidrt.backends.base import Backend, BackendOptions
from vidrt.errors import UsageError
from vidrt.manifest import Manifest

BACKENDS = ("auto", "onnxruntime", "tensorrt")


def open_backend(options: BackendOptions, manifest: Manifest) -> Backend:
    if options.backend not in BACKENDS:
        raise UsageError(f"unknown backend {options.backend!r}; use one of {', '.join(BACKENDS)}")
    if options.backend == "tensorrt":
        from vidrt.errors import DeviceError

        raise DeviceError("the TensorRT backend is not available in this build; use --backend onnxruntime")
    from vidrt.backends.ort import OrtBackend

    return OrtBackend(options)
