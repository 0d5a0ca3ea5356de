"""`vidrt doctor`: what this machine can run, and why not. Never raises; every probe is guarded
(no driver API call: `cuInit` raises without a driver)."""

from __future__ import annotations

import importlib.util
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path

from vidrt.backends.cuda import Probe, probe
from vidrt.backends.tensorrt import INSTALL_TENSORRT, availability, tensorrt_status


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing_pieces(gpu: Probe, tensorrt_version: str | None) -> tuple[str, ...]:
    """What the TensorRT path lacks on this machine, each with the exact command that adds it."""
    out = []
    if not gpu.ok and "cuda-python" not in gpu.reason:
        out.append("NVIDIA driver: none usable (`nvidia-smi` must list the GPU); install R525 or newer "
                   "(cuda-python 12, which vidrt[tensorrt] pins, runs on R525+)")
    if not _installed("cuda.bindings"):
        out.append(f"cuda-python: {INSTALL_TENSORRT}")
    if tensorrt_version is None:
        out.append(f"TensorRT: {INSTALL_TENSORRT}  (its libraries come from NVIDIA's index, pypi.nvidia.com)")
    if not _installed("polygraphy"):
        out.append(f"polygraphy (vidrt build --check): {INSTALL_TENSORRT}")
    if not _installed("modelopt"):
        out.append(f"nvidia-modelopt (vidrt export --precision fp8): {INSTALL_TENSORRT}")
    return tuple(out)


@dataclass(frozen=True)
class BackendStatus:
    name: str
    usable: bool
    why: str


@dataclass(frozen=True)
class Report:
    gpu: Probe
    tensorrt_version: str | None
    tensorrt_why: str
    onnxruntime_version: str | None
    onnxruntime_providers: tuple[str, ...]
    backends: tuple[BackendStatus, ...]
    package_lines: tuple[str, ...] = field(default_factory=tuple)
    missing: tuple[str, ...] = field(default_factory=tuple)
    package_exit: int = 0  # the exit code of the package's problem (PackageError: 3); 0 = readable or not asked

    def lines(self) -> list[str]:
        g = self.gpu
        out = [f"python        {sys.version.split()[0]} on {platform.platform(terse=True)}"]
        if g.ok:
            for d in g.devices:
                free = f", {d.free_bytes / 2**30:.1f} GiB free" if d.free_bytes is not None else ""
                out.append(f"GPU {d.index}         {d.name}, compute capability {d.compute_capability} (sm_{d.sm}), "
                           f"{d.total_bytes / 2**30:.1f} GiB{free}")
        else:
            out.append(f"GPU           {g.reason}")
        out.append(f"driver        {'CUDA ' + g.driver_version if g.driver_version else 'none found'}")
        bindings = g.bindings_version or "not installed"
        out.append(f"CUDA runtime  {g.runtime_version or 'unknown'} (cuda-python {bindings})")
        out.extend(f"              {n}" for n in g.notes)
        out.append(f"TensorRT      {self.tensorrt_version or self.tensorrt_why}")
        if self.onnxruntime_version is None:
            out.append("onnxruntime   not installed (pip install onnxruntime)")
        else:
            out.append(f"onnxruntime   {self.onnxruntime_version}, providers: {', '.join(self.onnxruntime_providers)}")
        out.append("backends:")
        for b in self.backends:
            out.append(f"  {b.name:<20}{'yes' if b.usable else 'no '}  {b.why}")
        out.extend(self.package_lines)
        if self.missing:
            out.append("missing for the TensorRT path:")
            out.extend(f"  {m}" for m in self.missing)
        return out


def _onnxruntime() -> tuple[str | None, tuple[str, ...]]:
    try:
        import onnxruntime as ort
    except Exception:
        return None, ()
    return str(ort.__version__), tuple(str(p) for p in ort.get_available_providers())


def diagnose(package: Path | str | None = None) -> Report:
    gpu = probe()
    trt_version, trt_why = tensorrt_status()
    ort_version, providers = _onnxruntime()
    backends = [BackendStatus("onnxruntime (cpu)", ort_version is not None,
                              "runs every package on the CPU" if ort_version else "onnxruntime is not installed")]
    if "CUDAExecutionProvider" not in providers:
        cuda_ep = BackendStatus("onnxruntime (cuda)", False, "onnxruntime has no CUDA provider (onnxruntime-gpu)")
    elif not gpu.ok:
        cuda_ep = BackendStatus("onnxruntime (cuda)", False, gpu.reason)
    else:
        cuda_ep = BackendStatus("onnxruntime (cuda)", True, "--backend onnxruntime-cuda")
    backends.append(cuda_ep)
    if trt_version is None:
        backends.append(BackendStatus("tensorrt", False, trt_why))
    elif not gpu.ok:
        backends.append(BackendStatus("tensorrt", False, gpu.reason))
    else:
        backends.append(BackendStatus("tensorrt", True, f"TensorRT {trt_version} on {gpu.devices[0].name} "
                                                        f"(needs plans: vidrt build PACKAGE --precision P)"))
    package_lines: list[str] = []
    package_exit = 0
    if package is not None:
        try:
            from vidrt.package.manifest import load_manifest

            m = load_manifest(package, verify=False)
            ok, why = availability(m)
            refittable = sum(1 for e in m.engines if e.refit)  # LoRAs at load time (vidrt.backends.refit)
            package_lines.append(f"package       {package}: {len(m.engines)} plan(s), {refittable} refittable; "
                                 f"--backend auto uses {'tensorrt' if ok else 'onnxruntime'} ({why})")
        except Exception as exc:
            package_lines.append(f"package       {package}: {exc}")
            package_exit = getattr(exc, "exit_code", 1)
    return Report(gpu, trt_version, trt_why, ort_version, providers, tuple(backends), tuple(package_lines),
                  missing_pieces(gpu, trt_version), package_exit)


__all__ = ["BackendStatus", "Report", "diagnose", "missing_pieces"]
