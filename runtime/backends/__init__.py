"""Backend selection. `auto` takes TensorRT when a GPU, TensorRT and matching plans are all present,
else ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

from vidrt.backends.base import Backend, BackendOptions
from vidrt.errors import UsageError
from vidrt.manifest import Manifest

BACKENDS = ("auto", "onnxruntime", "tensorrt")


def open_backend(options: BackendOptions, manifest: Manifest, package: Path | str | None = None) -> Backend:
    """`package` (optional) only makes TensorRT's rebuild hints name the real folder."""
    if options.backend not in BACKENDS:
        raise UsageError(f"unknown backend {options.backend!r}; use one of {', '.join(BACKENDS)}")
    if options.backend == "tensorrt":
        from vidrt.backends.tensorrt import TrtBackend

        return TrtBackend(options, manifest, package)  # DeviceError says why not (no GPU, no plans, ...)
    if options.backend == "auto" and manifest.engines:  # no plans: no TensorRT/CUDA import at all
        from vidrt.backends.tensorrt import TrtBackend, availability

        ok, _why = availability(manifest)
        if ok:
            return TrtBackend(options, manifest, package)
    from vidrt.backends.ort import OrtBackend

    return OrtBackend(options)
