"""ONNX Runtime backend: the one every test runs (CPU provider); the CUDA provider is selectable."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from vidrt.backends.base import HOST_OPS, BackendOptions, HostOps
from vidrt.errors import DeviceError, PackageError, UsageError, arg
from vidrt.package.contracts import Contract


def _providers(device: str) -> list[str | tuple[str, dict[str, str]]]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cuda" or device.startswith("cuda:"):  # cuda:N = GPU N
        if "CUDAExecutionProvider" not in available:
            raise DeviceError(f"onnxruntime has no CUDA provider here; install onnxruntime-gpu (in place of "
                              f"onnxruntime) or run on the CPU with {arg('backend', 'onnxruntime')}")
        index = device.partition(":")[2] or "0"
        if index != "0":  # GPU N: ONNX Runtime's CUDA provider option device_id
            return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def cpu_features() -> frozenset[str]:
    """The package CPU features (vidrt.package.manifest.CPU_FEATURES) this CPU has, as numpy's runtime
    dispatch detects them: CPUID plus the OS saving the AVX-512 registers, the test ONNX Runtime's MLAS
    makes before it uses 16-channel NCHWc blocks (onnxruntime core/mlas/lib/platform.cpp; numpy
    _core/src/common/npy_cpu_features.c). VIDRT_CPU_FEATURES overrides it: a comma-separated list of
    CPU_FEATURES, or "none" (to compare the forms, or to keep the default one); unset or empty: detected.
    Empty where numpy does not say. Raises UsageError for a name that is not a package CPU feature."""
    from vidrt.package.manifest import CPU_FEATURES

    forced = os.environ.get("VIDRT_CPU_FEATURES", "").strip()
    if forced:
        names = {f.strip().lower() for f in forced.split(",") if f.strip()} - {"none"}
        unknown = sorted(names - set(CPU_FEATURES))
        if unknown:
            raise UsageError(f"VIDRT_CPU_FEATURES={forced!r}: {', '.join(unknown)} is not a CPU feature packages have "
                             f"forms for; use {', '.join(CPU_FEATURES)} or none (or unset it to detect)")
        return frozenset(names)
    try:  # numpy's own table (private; numpy 2: numpy._core, numpy 1: numpy.core)
        from numpy._core._multiarray_umath import __cpu_features__ as found  # type: ignore[attr-defined]
    except ImportError:
        try:
            from numpy.core._multiarray_umath import __cpu_features__ as found  # type: ignore[attr-defined,no-redef]
        except ImportError:
            return frozenset()
    return frozenset(name.lower() for name in ("AVX512F",) if found.get(name))


class OrtEngine:
    """One InferenceSession per component, created once. Feeds are cast to the contract dtypes."""

    def __init__(self, name: str, path: Path, contract: Contract, options: BackendOptions | None = None,
                 weights: Mapping[str, np.ndarray] | None = None) -> None:
        import onnxruntime as ort

        options = options or BackendOptions()
        self.name = name
        self.path = path  # the file opened: the component's default form or its form for this CPU
        self.contract = contract
        so = ort.SessionOptions()
        # fatal only: ORT's warnings about unused initialisers are noise here, and its error log of a failed
        # run (a multi-line red allocator trace) would precede vidrt's own one-line error for the same thing
        so.log_severity_level = 4
        if options.threads is not None:
            so.intra_op_num_threads = options.threads
            so.inter_op_num_threads = 1
        # ORT's pool threads busy-wait between ops by default. On a CPU shared with other work (the
        # machines vidrt's CPU path runs on) the spinning threads compete for the cores the kernels
        # need: measured with benchmarks/ (2 busy cores, A/B interleaved) one Wan2.1-1.3B DiT call
        # took 9.3 s spinning vs 6.6 s not, a whole tiny-model clip 1.74 s vs 0.47 s.
        # VIDRT_ORT_SPIN=1 turns spinning back on (a dedicated, otherwise idle machine).
        if os.environ.get("VIDRT_ORT_SPIN", "0") != "1":
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        # FP8 Q/DQ graphs: ORT's QDQ propagation (level EXTENDED and up) moves a QuantizeLinear above
        # Reshape/Transpose, which then have no float8 CPU kernel ("Failed to find kernel for
        # Reshape(19)"). Graphs without Q/DQ are unaffected.
        so.add_session_config_entry("session.disable_quant_qdq", "1")
        if weights:
            # LoRA-merged initializers replace the external-data ones of the same name before graph
            # optimisation; ORT checks name, dims and dtype and copies the data (OrtApi::AddExternalInitializers,
            # fast_paths.md A.8). bf16 arrays arrive as uint16 bits: tagged with their ONNX type.
            so.add_external_initializers(list(weights), [_ortvalue(a) for a in weights.values()])
        try:
            self._session: ort.InferenceSession | None = ort.InferenceSession(
                str(path), sess_options=so, providers=_providers(options.device))
        except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PackageError(f"{path.name} cannot be loaded by onnxruntime ({first[:200]}); "
                               f"re-export the package") from None
        for kind, graph, names in (("inputs", self._session.get_inputs(), contract.input_names),
                                   ("outputs", self._session.get_outputs(), contract.output_names)):
            missing = set(names) - {t.name for t in graph}
            if missing:
                raise PackageError(f"{path.name} lacks {kind} {sorted(missing)[:4]} that its manifest contract "
                                   f"names; re-export the package")
        try:
            self._dtypes = {t.name: np.dtype(t.dtype) for t in contract.inputs}
        except TypeError:
            raise PackageError(f"{path.name}: onnxruntime cannot feed the input dtypes "
                               f"{sorted({t.dtype for t in contract.inputs})} of its contract; "
                               f"use {arg('backend', 'tensorrt')} or re-export in fp32") from None

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._session is None:
            raise DeviceError(f"engine {self.name} was closed")
        cast = {k: np.ascontiguousarray(v, dtype=self._dtypes[k]) for k, v in feeds.items()}
        try:
            outs = self._session.run(list(self.contract.output_names), cast)
        except MemoryError:
            raise DeviceError(f"{self.name}: out of memory in onnxruntime; lower {arg('size')}/{arg('num_frames')} "
                              f"or {arg('vae_memory')}") from None
        except Exception as exc:  # ORT's own types (InvalidArgument: shapes/dtypes, RuntimeException: memory)
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            wanted = re.search(r"Failed to allocate memory for requested buffer of size (\d+)", str(exc))
            if wanted:
                gib = int(wanted[1]) / 2**30
                raise DeviceError(f"{self.name}: onnxruntime ran out of host memory (a {gib:.1f} GiB buffer); "
                                  f"lower {arg('size')} or {arg('num_frames')}") from None
            if "INVALID_ARGUMENT" in first:
                raise PackageError(f"{self.name} does not accept the inputs its manifest describes ({first}); "
                                   f"re-export the package") from None
            raise DeviceError(f"{self.name} failed in onnxruntime ({first}); if memory ran out, lower "
                              f"{arg('size')}, {arg('num_frames')} or {arg('vae_memory')}") from None
        return dict(zip(self.contract.output_names, outs, strict=True))

    def close(self) -> None:
        self._session = None


def _ortvalue(array: np.ndarray) -> Any:
    import onnxruntime as ort

    array = np.ascontiguousarray(array)
    if array.dtype == np.uint16:  # bfloat16 bits (vidrt.lora.merge.f32_to_bf16)
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array, 16)  # TensorProto.BFLOAT16
    return ort.OrtValue.ortvalue_from_numpy(array)


class OrtBackend:
    """`--backend onnxruntime` (CPU provider) or `--backend onnxruntime-cuda` (options.device "cuda" or "cuda:N")."""

    def __init__(self, options: BackendOptions) -> None:
        self.options = options
        self.name = "onnxruntime-cuda" if options.device.startswith("cuda") else "onnxruntime"
        # the CPU provider opens a component's form for this CPU where the package has one (Component.cpu_artifacts)
        self.cpu_features = frozenset() if options.device.startswith("cuda") else cpu_features()
        _providers(options.device)  # no CUDA provider: refused now, before any model work

    def device_memory(self) -> tuple[int, str] | None:
        return None  # CPU RAM, or the CUDA provider's own arena: no vidrt plan

    def stream_weights(self, streamed: dict[str, int]) -> None:
        pass  # nothing is planned, so nothing is streamed

    def tensor_ops(self) -> HostOps:
        return HOST_OPS  # every output is a numpy array (ONNX Runtime's CUDA provider too: run() returns host arrays)

    def open(self, name: str, path: Path, contract: Contract,
             weights: Mapping[str, np.ndarray] | None = None) -> OrtEngine:
        return OrtEngine(name, path, contract, self.options, weights)
