"""The engine interface every backend implements: named numpy feeds in, named arrays out.

A backend opens each component of a model package once (session / deserialised plan) and runs
it many times. Names and dtypes come from the component's contract in the manifest, so the
pipeline never cares which backend it talks to.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from vidrt.package.contracts import Contract


class Engine(Protocol):
    name: str
    contract: Contract

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once. `feeds` holds every contract input; returns every contract output."""
        ...

    def close(self) -> None:
        """Release the session / device memory (the pipeline drops the text encoder before denoising)."""
        ...


class TensorOps(Protocol):
    """Arithmetic on the tensors engines hand to each other, done where they live: a backend's tensor
    handle is a numpy array on ONNX Runtime (`HostOps`) and, for outputs the TensorRT backend keeps on
    the device (the VAE caches, the step-caching DiT pieces' tensors), a `vidrt.backends.cuda.DeviceTensor`
    (`vidrt.backends.device_ops.DeviceOps`: CUDA kernels, nothing crosses PCIe). Step caching
    (vidrt.caching) computes its residuals through this, so the pipeline has one code path for both.
    Every op takes handles of one shape; `out` (optional) is a handle to write the result into."""

    def add(self, a: Any, b: Any, out: Any = None) -> Any:
        """a + b, element-wise."""
        ...

    def sub(self, a: Any, b: Any, out: Any = None) -> Any:
        """a - b, element-wise."""
        ...

    def rel_l1(self, a: Any, b: Any) -> float:
        """mean|a - b| / mean|b| over every element (First Block Cache's change metric)."""
        ...

    def rows(self, a: Any, start: int, stop: int) -> Any:
        """a[start:stop] along the first (batch) axis."""
        ...

    def concat(self, parts: Sequence[Any]) -> Any:
        """The parts joined along the first (batch) axis."""
        ...

    def to_host(self, a: Any) -> np.ndarray:
        """A numpy copy (or the array itself on the host); bf16 comes back as float32."""
        ...

    def nbytes(self, a: Any) -> int:
        ...


class HostOps:
    """TensorOps on numpy arrays (ONNX Runtime: every engine output is a host array)."""

    def add(self, a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        return np.add(a, b, out=out if _reusable(out, a) else None)

    def sub(self, a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        return np.subtract(a, b, out=out if _reusable(out, a) else None)

    def rel_l1(self, a: np.ndarray, b: np.ndarray) -> float:
        return float(np.abs(a - b).mean() / np.abs(b).mean())

    def rows(self, a: np.ndarray, start: int, stop: int) -> np.ndarray:
        return a[start:stop]

    def concat(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts)

    def to_host(self, a: np.ndarray) -> np.ndarray:
        return np.asarray(a)

    def nbytes(self, a: np.ndarray) -> int:
        return int(a.nbytes)


def _reusable(out: np.ndarray | None, like: np.ndarray) -> bool:
    return out is not None and out.shape == like.shape and out.dtype == like.dtype and out.flags.writeable


HOST_OPS = HostOps()


@dataclass(frozen=True)
class BackendOptions:
    """How to run. `threads` = intra-op threads for CPU execution (None: the backend's default)."""

    backend: str = "auto"  # "auto" | "onnxruntime" | "onnxruntime-cuda" | "tensorrt"
    device: str = "cpu"  # "cpu" | "cuda" (ONNX Runtime's CUDA provider; --backend onnxruntime-cuda sets it)
    threads: int | None = None


class Backend(Protocol):
    name: str
    # package CPU features (vidrt.package.manifest.CPU_FEATURES) whose component forms this backend opens
    # (Component.artifact_for): ONNX Runtime's CPU provider, this CPU's; empty elsewhere (the default forms)
    cpu_features: frozenset[str]

    def device_memory(self) -> tuple[int, str] | None:
        """(bytes this process may use on the device, DiT precision of the engines) for backends whose
        memory vidrt plans (TensorRT); None where the runtime manages it (ONNX Runtime)."""
        ...

    def stream_weights(self, streamed: dict[str, int]) -> None:
        """engine -> weight bytes to keep in host memory and stream each call (the plan's); applied
        when the engine is next opened. A no-op where nothing is planned."""
        ...

    def tensor_ops(self) -> TensorOps:
        """Arithmetic on this backend's engine outputs where they live (host or device)."""
        ...

    def open(self, name: str, path: Path, contract: Contract,
             weights: Mapping[str, np.ndarray] | None = None) -> Engine:
        """Open a component. `weights`: initializer name -> array replacing the stored one (LoRA-merged
        DiT weights, vidrt.lora; ONNX Runtime: a session made with them, TensorRT: a refit)."""
        ...
