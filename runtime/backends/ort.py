"""ONNX Runtime backend: the one every test runs (CPU provider); the CUDA provider is selectable."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vidrt.backends.base import BackendOptions
from vidrt.contracts import Contract
from vidrt.errors import DeviceError, PackageError


def _providers(device: str) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise DeviceError("onnxruntime has no CUDA provider here; install onnxruntime-gpu or use --device cpu")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OrtEngine:
    """One InferenceSession per component, created once. Feeds are cast to the contract dtypes."""

    def __init__(self, name: str, path: Path, contract: Contract, options: BackendOptions | None = None) -> None:
        import onnxruntime as ort

        options = options or BackendOptions()
        self.name = name
        self.contract = contract
        so = ort.SessionOptions()
        so.log_severity_level = 3  # errors only: ORT's warnings about unused initialisers are noise here
        if options.threads is not None:
            so.intra_op_num_threads = options.threads
            so.inter_op_num_threads = 1
        try:
            self._session: ort.InferenceSession | None = ort.InferenceSession(
                str(path), sess_options=so, providers=_providers(options.device))
        except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PackageError(f"{path.name} cannot be loaded by onnxruntime ({first[:200]}); "
                               f"re-export the package") from None
        graph_inputs = {i.name for i in self._session.get_inputs()}
        missing = set(contract.input_names) - graph_inputs
        if missing:
            raise PackageError(f"{path.name} lacks inputs {sorted(missing)} that its manifest contract names; "
                               f"re-export the package")
        self._dtypes = {t.name: np.dtype(t.dtype) for t in contract.inputs}

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._session is None:
            raise DeviceError(f"engine {self.name} was closed")
        cast = {k: np.ascontiguousarray(v, dtype=self._dtypes[k]) for k, v in feeds.items()}
        outs = self._session.run(list(self.contract.output_names), cast)
        return dict(zip(self.contract.output_names, outs))

    def close(self) -> None:
        self._session = None


class OrtBackend:
    name = "onnxruntime"

    def __init__(self, options: BackendOptions) -> None:
        self.options = options

    def open(self, name: str, path: Path, contract: Contract) -> OrtEngine:
        return OrtEngine(name, path, contract, self.options)
