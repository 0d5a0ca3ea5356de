"""The engine interface every backend implements: named numpy feeds in, named arrays out.

A backend opens each component of a model package once (session / deserialised plan) and runs
it many times. Names and dtypes come from the component's contract in the manifest, so the
pipeline never cares which backend it talks to.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

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


@dataclass(frozen=True)
class BackendOptions:
    """How to run. `threads` = intra-op threads for CPU execution (None: the backend's default)."""

    backend: str = "auto"  # "auto" | "onnxruntime" | "onnxruntime-cuda" | "tensorrt"
    device: str = "cpu"  # "cpu" | "cuda" (ONNX Runtime's CUDA provider; --backend onnxruntime-cuda sets it)
    threads: int | None = None


class Backend(Protocol):
    name: str

    def device_memory(self) -> tuple[int, str] | None:
        """(bytes this process may use on the device, DiT precision of the engines) for backends whose
        memory vidrt plans (TensorRT); None where the runtime manages it (ONNX Runtime)."""
        ...

    def stream_weights(self, streamed: dict[str, int]) -> None:
        """engine -> weight bytes to keep in host memory and stream each call (the plan's); applied
        when the engine is next opened. A no-op where nothing is planned."""
        ...

    def open(self, name: str, path: Path, contract: Contract,
             weights: Mapping[str, np.ndarray] | None = None) -> Engine:
        """Open a component. `weights`: initializer name -> array replacing the stored one (LoRA-merged
        DiT weights, vidrt.lora; ONNX Runtime: a session made with them, TensorRT: a refit)."""
        ...
