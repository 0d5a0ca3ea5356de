"""cuda-python helpers for the TensorRT backend: device query, streams, events, device buffers,
host<->device copies and CUDA graph capture.

Everything goes through `CudaApi`, a small protocol with integer handles (device pointers,
streams, events and graphs are all plain ints, as TensorRT's `execute_async_v3` wants them).
`CudaRuntime` implements it on `cuda.bindings.runtime` (imported lazily: the runtime must import
without cuda-python); the tests implement it with host memory (tests/test_tensorrt.py).

Each cuda-python call returns `(cudaError_t, *values)`; `_check` turns a non-zero code into a
one-line DeviceError naming the call, the error and what to do. Nothing here calls the driver API
(`cuda.bindings.driver.cuInit` raises without a driver); `probe()` never raises.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Protocol

import numpy as np
from vidrt.errors import DeviceError, command_or, report_it

_DRIVER_HINT = "install or update the NVIDIA driver (`nvidia-smi` must list the GPU)"


# ---- probing (never raises) ----------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceInfo:
    index: int
    name: str
    compute_capability: str  # "8.9"
    total_bytes: int
    free_bytes: int | None = None  # None when the memory query failed

    @property
    def sm(self) -> str:
        """"89" for compute capability 8.9 (the engine folder tag)."""
        return self.compute_capability.replace(".", "")


@dataclass(frozen=True)
class Probe:
    """What `probe()` found. `ok` = at least one usable GPU; otherwise `reason` says why not."""

    ok: bool
    reason: str
    devices: tuple[DeviceInfo, ...] = ()
    driver_version: str | None = None  # "13.0" (CUDA version the driver supports)
    runtime_version: str | None = None  # CUDA runtime of cuda-python
    bindings_version: str | None = None  # cuda-python (cuda.bindings) version
    notes: tuple[str, ...] = field(default_factory=tuple)


def _version(v: int) -> str:
    """CUDA encodes 12.4 as 12040."""
    return f"{v // 1000}.{(v % 1000) // 10}"


def _load_cudart() -> ModuleType:
    from cuda.bindings import runtime

    return runtime


def probe(cudart: ModuleType | None = None) -> Probe:
    """Query the GPUs through the CUDA runtime. Never raises: returns ok=False with the reason."""
    try:
        rt = cudart if cudart is not None else _load_cudart()
    except ImportError as exc:
        return Probe(False, f"cuda-python is not installed ({exc}); pip install \"vidrt[tensorrt]\"")
    except Exception as exc:  # a broken install raises whatever its loader raises
        return Probe(False, f"cuda-python cannot be loaded ({type(exc).__name__}: {exc})")
    bindings_version: str | None = None
    try:
        import cuda.bindings

        bindings_version = str(cuda.bindings.__version__)
    except Exception:
        pass
    driver = runtime_v = None
    err, v = rt.cudaDriverGetVersion()
    if int(err) == 0 and v:
        driver = _version(int(v))
    err, v = rt.cudaRuntimeGetVersion()
    if int(err) == 0:
        runtime_v = _version(int(v))
    err, count = rt.cudaGetDeviceCount()
    if int(err) != 0:
        return Probe(False, f"no GPU (cudaGetDeviceCount: {describe(rt, err)})", (), driver, runtime_v,
                     bindings_version)
    if count == 0:
        return Probe(False, "no GPU (cudaGetDeviceCount: 0 devices)", (), driver, runtime_v, bindings_version)
    devices = []
    notes = []
    # cudaSetDevice below changes the calling thread's current device: put the caller's back after,
    # or every later CUDA call (a TensorRT Builder!) lands on the last GPU probed.
    get_device = getattr(rt, "cudaGetDevice", None)
    err_cur, current = get_device() if get_device is not None else (1, 0)
    for i in range(int(count)):
        err, prop = rt.cudaGetDeviceProperties(i)
        if int(err) != 0:
            notes.append(f"device {i}: cudaGetDeviceProperties: {describe(rt, err)}")
            continue
        free: int | None = None
        if int(rt.cudaSetDevice(i)[0]) == 0:
            err, free_b, _total = rt.cudaMemGetInfo()
            free = int(free_b) if int(err) == 0 else None
        name = prop.name.split(b"\0", 1)[0].decode(errors="replace")
        devices.append(DeviceInfo(i, name, f"{prop.major}.{prop.minor}", int(prop.totalGlobalMem), free))
    rt.cudaSetDevice(int(current) if int(err_cur) == 0 else 0)
    if not devices:
        return Probe(False, "no usable GPU (" + "; ".join(notes) + ")", (), driver, runtime_v, bindings_version,
                     tuple(notes))
    return Probe(True, "", tuple(devices), driver, runtime_v, bindings_version, tuple(notes))


def describe(rt: ModuleType, err: int) -> str:
    """'error 35 cudaErrorInsufficientDriver: CUDA driver version is insufficient ...'"""
    code = int(err)
    try:
        name = rt.cudaGetErrorName(err)[1].decode()
        text = rt.cudaGetErrorString(err)[1].decode()
    except Exception:
        return f"error {code}"
    return f"error {code} {name}: {text}"


# ---- the API the engine uses -------------------------------------------------------------------


class Kernels(Protocol):
    """Compiled CUDA kernels by name (vidrt.backends.kernels: NVRTC + the driver's library API).
    `args` are (value, kind) pairs, kind "ptr" (a device pointer), "u64" or "f32": the kernel's
    parameter types, in order. Launches are asynchronous on `stream`."""

    def launch(self, name: str, grid: int, block: int, args: tuple[tuple[int | float, str], ...],
               stream: int) -> None: ...
    def close(self) -> None: ...


class CudaApi(Protocol):
    """Integer handles throughout. Copies are asynchronous on `stream`; host arrays must stay alive
    (and, for true overlap, be pinned: see `alloc_host`) until the stream is synchronised."""

    def set_device(self, index: int) -> None: ...
    def mem_info(self) -> tuple[int, int]: ...  # (free, total) bytes
    def malloc(self, nbytes: int) -> int: ...
    def free(self, ptr: int) -> None: ...
    def alloc_host(self, nbytes: int) -> np.ndarray: ...  # page-locked uint8 buffer
    def free_host(self, array: np.ndarray) -> None: ...
    def copy_htod(self, dst: int, src: np.ndarray, stream: int) -> None: ...
    def copy_dtoh(self, dst: np.ndarray, src: int, stream: int) -> None: ...
    def copy_dtod(self, dst: int, src: int, nbytes: int, stream: int) -> None: ...
    def memset(self, dst: int, value: int, nbytes: int, stream: int) -> None: ...
    def load_kernels(self, source: str, names: tuple[str, ...]) -> Kernels: ...  # compiled for this device
    def stream_create(self) -> int: ...
    def stream_sync(self, stream: int) -> None: ...
    def stream_destroy(self, stream: int) -> None: ...
    def event_create(self, timing: bool = False) -> int: ...
    def event_record(self, event: int, stream: int) -> None: ...
    def event_sync(self, event: int) -> None: ...
    def event_elapsed_ms(self, start: int, end: int) -> float: ...
    def event_destroy(self, event: int) -> None: ...
    def graph_begin_capture(self, stream: int) -> None: ...
    def graph_end_capture(self, stream: int) -> int: ...  # -> instantiated graph exec
    def graph_launch(self, graph_exec: int, stream: int) -> None: ...
    def graph_destroy(self, graph_exec: int) -> None: ...


class CudaRuntime:
    """`CudaApi` on cuda-python's runtime bindings. Construct only after `probe()` said ok.

    Each method imports `cuda.bindings.runtime` locally (a dict lookup after the first time) so the
    module stays importable without cuda-python and mypy sees the stubbed signatures."""

    def __init__(self, device: int = 0) -> None:
        try:
            _load_cudart()
        except ImportError as exc:
            raise DeviceError(f"cuda-python is missing ({exc}); pip install \"vidrt[tensorrt]\"") from None
        self._graphs: dict[int, int] = {}  # graph exec -> the captured graph (destroyed together)
        self._host: dict[int, int] = {}  # id(array) -> pinned pointer
        self.set_device(device)

    @staticmethod
    def _check(what: str, err: int) -> None:
        if err != 0:
            # a server's client gets no `vidrt` command and no --debug (vidrt.errors: commands_shown, report_it)
            hint = _DRIVER_HINT if err in (3, 35, 100) else (
                "out of device memory: close other GPU programs or choose a smaller size / tile"
                + command_or(" (`vidrt plan` shows what fits)", "") if err == 2 else report_it())
            raise DeviceError(f"CUDA {what} failed ({describe(_load_cudart(), err)}); {hint}")

    def set_device(self, index: int) -> None:
        from cuda.bindings import runtime as rt

        self._check("cudaSetDevice", rt.cudaSetDevice(index)[0])

    def mem_info(self) -> tuple[int, int]:
        from cuda.bindings import runtime as rt

        err, free, total = rt.cudaMemGetInfo()
        self._check("cudaMemGetInfo", err)
        return free, total

    def malloc(self, nbytes: int) -> int:
        from cuda.bindings import runtime as rt

        err, ptr = rt.cudaMalloc(max(1, nbytes))
        self._check(f"cudaMalloc({nbytes} bytes)", err)
        return ptr

    def free(self, ptr: int) -> None:
        from cuda.bindings import runtime as rt

        self._check("cudaFree", rt.cudaFree(ptr)[0])

    def alloc_host(self, nbytes: int) -> np.ndarray:
        from cuda.bindings import runtime as rt

        err, ptr = rt.cudaMallocHost(max(1, nbytes))
        self._check(f"cudaMallocHost({nbytes} bytes)", err)
        buf = (ctypes.c_uint8 * max(1, nbytes)).from_address(ptr)
        arr: np.ndarray = np.frombuffer(memoryview(buf), dtype=np.uint8, count=nbytes)
        self._host[id(arr)] = ptr
        return arr

    def free_host(self, array: np.ndarray) -> None:
        from cuda.bindings import runtime as rt

        ptr = self._host.pop(id(array), None)
        if ptr is not None:
            self._check("cudaFreeHost", rt.cudaFreeHost(ptr)[0])

    def copy_htod(self, dst: int, src: np.ndarray, stream: int) -> None:
        from cuda.bindings import runtime as rt

        if not src.flags.c_contiguous:
            raise ValueError("host source must be C-contiguous")
        kind = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._check("cudaMemcpyAsync (host to device)",
                    rt.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes, kind, stream)[0])

    def copy_dtoh(self, dst: np.ndarray, src: int, stream: int) -> None:
        from cuda.bindings import runtime as rt

        if not (dst.flags.c_contiguous and dst.flags.writeable):
            raise ValueError("host destination must be C-contiguous and writeable")
        kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._check("cudaMemcpyAsync (device to host)",
                    rt.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes, kind, stream)[0])

    def copy_dtod(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        from cuda.bindings import runtime as rt

        kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        self._check("cudaMemcpyAsync (device to device)", rt.cudaMemcpyAsync(dst, src, nbytes, kind, stream)[0])

    def memset(self, dst: int, value: int, nbytes: int, stream: int) -> None:
        from cuda.bindings import runtime as rt

        self._check("cudaMemsetAsync", rt.cudaMemsetAsync(dst, value, nbytes, stream)[0])

    def load_kernels(self, source: str, names: tuple[str, ...]) -> Kernels:
        from vidrt.backends.kernels import compile_kernels

        err, device = _load_cudart().cudaGetDevice()
        self._check("cudaGetDevice", err)
        err, prop = _load_cudart().cudaGetDeviceProperties(device)
        self._check("cudaGetDeviceProperties", err)
        return compile_kernels(source, names, (int(prop.major), int(prop.minor)))

    def stream_create(self) -> int:
        from cuda.bindings import runtime as rt

        # Non-blocking: no implicit synchronisation with the legacy default stream (the anchors' trap).
        err, stream = rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking)
        self._check("cudaStreamCreateWithFlags", err)
        return int(stream)

    def stream_sync(self, stream: int) -> None:
        from cuda.bindings import runtime as rt

        self._check("cudaStreamSynchronize", rt.cudaStreamSynchronize(stream)[0])

    def stream_destroy(self, stream: int) -> None:
        from cuda.bindings import runtime as rt

        self._check("cudaStreamDestroy", rt.cudaStreamDestroy(stream)[0])

    def event_create(self, timing: bool = False) -> int:
        from cuda.bindings import runtime as rt

        err, event = rt.cudaEventCreateWithFlags(rt.cudaEventDefault if timing else rt.cudaEventDisableTiming)
        self._check("cudaEventCreateWithFlags", err)
        return int(event)

    def event_record(self, event: int, stream: int) -> None:
        from cuda.bindings import runtime as rt

        self._check("cudaEventRecord", rt.cudaEventRecord(event, stream)[0])

    def event_sync(self, event: int) -> None:
        from cuda.bindings import runtime as rt

        self._check("cudaEventSynchronize", rt.cudaEventSynchronize(event)[0])

    def event_elapsed_ms(self, start: int, end: int) -> float:
        from cuda.bindings import runtime as rt

        err, ms = rt.cudaEventElapsedTime(start, end)
        self._check("cudaEventElapsedTime", err)
        return ms

    def event_destroy(self, event: int) -> None:
        from cuda.bindings import runtime as rt

        self._check("cudaEventDestroy", rt.cudaEventDestroy(event)[0])

    def graph_begin_capture(self, stream: int) -> None:
        from cuda.bindings import runtime as rt

        # Thread-local: CUDA calls of other threads (a video writer) cannot invalidate the capture.
        mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self._check("cudaStreamBeginCapture", rt.cudaStreamBeginCapture(stream, mode)[0])

    def graph_end_capture(self, stream: int) -> int:
        from cuda.bindings import runtime as rt

        err, graph = rt.cudaStreamEndCapture(stream)
        self._check("cudaStreamEndCapture", err)
        err, exe = rt.cudaGraphInstantiate(graph, 0)
        if err != 0:
            rt.cudaGraphDestroy(graph)
        self._check("cudaGraphInstantiate", err)
        self._graphs[int(exe)] = int(graph)
        return int(exe)

    def graph_launch(self, graph_exec: int, stream: int) -> None:
        from cuda.bindings import runtime as rt

        self._check("cudaGraphLaunch", rt.cudaGraphLaunch(graph_exec, stream)[0])

    def graph_destroy(self, graph_exec: int) -> None:
        from cuda.bindings import runtime as rt

        self._check("cudaGraphExecDestroy", rt.cudaGraphExecDestroy(graph_exec)[0])
        graph = self._graphs.pop(graph_exec, None)
        if graph is not None:
            self._check("cudaGraphDestroy", rt.cudaGraphDestroy(graph)[0])


# ---- small RAII helpers on top of CudaApi ----------------------------------------------------------


class DeviceBuffer:
    """`nbytes` of device memory; freed by `close()` (idempotent)."""

    def __init__(self, cuda: CudaApi, nbytes: int) -> None:
        self.cuda = cuda
        self.nbytes = nbytes
        self.ptr: int | None = cuda.malloc(nbytes)

    def upload(self, array: np.ndarray, stream: int) -> None:
        if array.nbytes > self.nbytes:
            raise DeviceError(f"{array.nbytes} bytes do not fit a {self.nbytes}-byte device buffer "
                              f"(input larger than the engine's profile maximum)")
        self.cuda.copy_htod(self.address, np.ascontiguousarray(array), stream)

    def download(self, array: np.ndarray, stream: int) -> None:
        if array.nbytes > self.nbytes:
            raise DeviceError(f"{array.nbytes} bytes requested from a {self.nbytes}-byte device buffer")
        self.cuda.copy_dtoh(array, self.address, stream)

    @property
    def address(self) -> int:
        if self.ptr is None:
            raise DeviceError("device buffer used after close()")
        return self.ptr

    def close(self) -> None:
        if self.ptr is not None:
            self.cuda.free(self.ptr)
            self.ptr = None


class BufferPool:
    """Device buffers reused by size: an engine output kept on the device (`DeviceTensor`) takes one
    and gives it back when dropped, so a chain of calls (the VAE caches, step after step) ping-pongs
    between a few allocations instead of calling cudaMalloc/cudaFree every step."""

    def __init__(self, cuda: CudaApi) -> None:
        self.cuda = cuda
        self._free: dict[int, list[int]] = {}
        self.closed = False

    def take(self, nbytes: int) -> int:
        spare = self._free.get(nbytes)
        return spare.pop() if spare else self.cuda.malloc(nbytes)

    def give(self, nbytes: int, ptr: int) -> None:
        if self.closed:
            self.cuda.free(ptr)
        else:
            self._free.setdefault(nbytes, []).append(ptr)

    def trim(self) -> None:
        """Free the spare buffers (what is in use stays)."""
        for ptrs in self._free.values():
            for ptr in ptrs:
                self.cuda.free(ptr)
        self._free = {}

    def close(self) -> None:
        self.trim()
        self.closed = True


class DeviceTensor:
    """An engine output left on the device. Fed to a later call it is bound by address (no copy);
    `np.asarray(t)` copies it to the host (and waits for the stream). Its buffer goes back to the
    pool when it is released or garbage-collected (CPython frees it when the last reference goes).

    shape/dtype are the engine's (bf16 as uint16 bits); `to_host` converts a host copy (bf16 -> fp32)."""

    def __init__(self, pool: BufferPool, ptr: int, shape: tuple[int, ...], dtype: np.dtype[Any], stream: int,
                 to_host: Callable[[np.ndarray], np.ndarray] | None = None, base: DeviceTensor | None = None) -> None:
        self.pool, self.shape, self.dtype, self.stream = pool, shape, dtype, stream
        self.ptr: int | None = ptr
        self.nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        self._to_host = to_host
        self.base = base  # a view (rows of `base`) owns no buffer: it keeps `base`, whose buffer it points into

    def view(self, ptr: int, shape: tuple[int, ...]) -> DeviceTensor:
        """A tensor over part of this one's buffer (e.g. some leading rows); keeps this one alive."""
        return DeviceTensor(self.pool, ptr, shape, self.dtype, self.stream, self._to_host, base=self)

    def like(self, shape: tuple[int, ...] | None = None) -> DeviceTensor:
        """A new tensor of this dtype (and host conversion) from the pool, contents undefined."""
        shape = self.shape if shape is None else shape
        nbytes = int(np.prod(shape, dtype=np.int64)) * self.dtype.itemsize
        return DeviceTensor(self.pool, self.pool.take(nbytes), shape, self.dtype, self.stream, self._to_host)

    def numpy(self) -> np.ndarray:
        if self.ptr is None:
            raise DeviceError("device tensor used after release()")
        host = np.empty(self.shape, self.dtype)
        self.pool.cuda.copy_dtoh(host, self.ptr, self.stream)
        self.pool.cuda.stream_sync(self.stream)
        return self._to_host(host) if self._to_host is not None else host

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        host = self.numpy()
        return host if dtype is None else host.astype(dtype)

    def release(self) -> None:
        if self.ptr is not None:
            ptr, self.ptr = self.ptr, None
            if self.base is None:
                self.pool.give(self.nbytes, ptr)
            self.base = None

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # interpreter shutdown or a lost CUDA context: nothing left to free
            pass


class Stream:
    """A non-blocking CUDA stream and a reusable completion event."""

    def __init__(self, cuda: CudaApi) -> None:
        self.cuda = cuda
        self.handle = cuda.stream_create()
        self.done = cuda.event_create()

    def sync(self) -> None:
        """Record the completion event and wait for it (everything queued so far has finished)."""
        self.cuda.event_record(self.done, self.handle)
        self.cuda.event_sync(self.done)

    def close(self) -> None:
        if self.handle:
            self.cuda.stream_sync(self.handle)
            self.cuda.event_destroy(self.done)
            self.cuda.stream_destroy(self.handle)
            self.handle = 0


class Timer:
    """CUDA-event timing of work queued on a stream: `with Timer(cuda, s) as t: ...; t.ms`."""

    def __init__(self, cuda: CudaApi, stream: int) -> None:
        self.cuda, self.stream = cuda, stream
        self.start, self.end = cuda.event_create(timing=True), cuda.event_create(timing=True)
        self.ms = 0.0

    def __enter__(self) -> Timer:
        self.cuda.event_record(self.start, self.stream)
        return self

    def __exit__(self, *exc: object) -> None:
        self.cuda.event_record(self.end, self.stream)
        self.cuda.event_sync(self.end)
        self.ms = self.cuda.event_elapsed_ms(self.start, self.end)
        self.cuda.event_destroy(self.start)
        self.cuda.event_destroy(self.end)


__all__ = ["DeviceInfo", "Probe", "probe", "describe", "Kernels", "CudaApi", "CudaRuntime", "DeviceBuffer",
           "BufferPool", "DeviceTensor", "Stream", "Timer"]
