"""`TensorOps` on the device for the TensorRT backend: the arithmetic between engines (step caching's
residuals, First Block Cache's change metric, CFG rows split and joined) on `DeviceTensor`s, so a
chain of engines never moves its tensors through the host. Not yet run on a GPU.

    ops = backend.tensor_ops()
    residual = ops.sub(x_last, x0, out=residual)      # CUDA kernel on the backend's stream
    change = ops.rel_l1(r1, r1_prev)                   # two fp64 sums copied back (16 bytes)

Everything is queued on the backend's one stream, in order with the engines' enqueues (CUDA stream
semantics: work on one stream runs in issue order), so an engine's output buffer can be the next
engine's input (`set_tensor_address` on the same pointer) and a kernel's input the moment the enqueue
returns. Row views keep TensorRT's alignment rule: "The pointer must have at least 256-byte alignment"
(NvInferRuntime.h, IExecutionContext::setTensorAddress); a slice that would start off it is copied
(cudaMemcpyAsync device to device) into a buffer of its own (cudaMalloc returns 256-byte aligned
memory, CUDA programming guide "Device Memory Accesses").
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
from vidrt.backends.cuda import BufferPool, CudaApi, DeviceTensor, Kernels, Stream
from vidrt.backends.kernels import BLOCK, NAMES, SOURCE, grid_for
from vidrt.errors import DeviceError

ALIGNMENT = 256  # bytes: IExecutionContext::setTensorAddress


def kernel_suffix(dtype: np.dtype[Any]) -> str:
    """The kernel variant of a device tensor's storage dtype: bf16 travels as uint16 bits (vidrt's
    TensorRT backend maps TensorRT BF16 to numpy uint16), fp16 as float16."""
    if dtype == np.float32:
        return "f32"
    if dtype == np.uint16:
        return "bf16"
    if dtype == np.float16:
        return "f16"
    raise DeviceError(f"no device kernel for {dtype} tensors (float32, bfloat16, float16 only)")


class DeviceOps:
    """TensorOps on DeviceTensors; numpy arrays are accepted too (uploaded first, or handled on the host
    when every operand is a host array). Kernels are compiled on first use (a run that never caches
    never needs NVRTC)."""

    def __init__(self, cuda: CudaApi, pool: BufferPool, stream: Stream) -> None:
        self.cuda, self.pool, self.stream = cuda, pool, stream
        self._kernels: Kernels | None = None
        self._sums: int | None = None  # two doubles on the device: rel_l1's partial sums
        self._sums_host: np.ndarray | None = None  # page-locked 16 bytes they are copied into

    @property
    def kernels(self) -> Kernels:
        if self._kernels is None:
            self._kernels = self.cuda.load_kernels(SOURCE, NAMES)
        return self._kernels

    # ---- handles ----

    def _device(self, a: Any) -> DeviceTensor:
        if isinstance(a, DeviceTensor):
            if a.ptr is None:
                raise DeviceError("device tensor used after release()")
            return a
        host = np.ascontiguousarray(a)
        t = DeviceTensor(self.pool, self.pool.take(host.nbytes), tuple(host.shape), host.dtype, self.stream.handle)
        self.cuda.copy_htod(t.ptr or 0, host, self.stream.handle)
        self.stream.sync()  # `host` may be a temporary: the copy must be done before it goes
        return t

    def _pair(self, a: Any, b: Any) -> tuple[DeviceTensor, DeviceTensor]:
        da, db = self._device(a), self._device(b)
        if da.shape != db.shape or da.dtype != db.dtype:
            raise DeviceError(f"device tensors differ: {da.shape} {da.dtype} vs {db.shape} {db.dtype}")
        return da, db

    def _axpby(self, a: Any, b: Any, alpha: float, out: Any) -> Any:
        if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
            return a + b if alpha == 1.0 else a - b
        da, db = self._pair(a, b)
        reuse = isinstance(out, DeviceTensor) and out.ptr is not None and out.base is None \
            and out.shape == da.shape and out.dtype == da.dtype
        res = out if reuse else da.like()
        n = da.nbytes // da.dtype.itemsize
        self.kernels.launch(f"vidrt_axpby_{kernel_suffix(da.dtype)}", grid_for(n), BLOCK,
                            ((da.ptr or 0, "ptr"), (db.ptr or 0, "ptr"), (res.ptr or 0, "ptr"), (alpha, "f32"),
                             (n, "u64")), self.stream.handle)
        return res

    # ---- TensorOps ----

    def add(self, a: Any, b: Any, out: Any = None) -> Any:
        return self._axpby(a, b, 1.0, out)

    def sub(self, a: Any, b: Any, out: Any = None) -> Any:
        return self._axpby(a, b, -1.0, out)

    def rel_l1(self, a: Any, b: Any) -> float:
        if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
            return float(np.abs(a - b).mean() / np.abs(b).mean())
        da, db = self._pair(a, b)
        if self._sums is None:
            self._sums = self.cuda.malloc(16)
            self._sums_host = self.cuda.alloc_host(16)
        assert self._sums_host is not None
        n = da.nbytes // da.dtype.itemsize
        s = self.stream.handle
        self.cuda.memset(self._sums, 0, 16, s)
        self.kernels.launch(f"vidrt_absdiff_{kernel_suffix(da.dtype)}", grid_for(n), BLOCK,
                            ((da.ptr or 0, "ptr"), (db.ptr or 0, "ptr"), (self._sums, "ptr"), (n, "u64")), s)
        self.cuda.copy_dtoh(self._sums_host, self._sums, s)
        self.stream.sync()
        diff, mag = struct.unpack("<2d", self._sums_host.tobytes())
        if mag == 0.0:  # numpy: x / 0.0 -> inf (nan for 0 / 0), with a warning
            return float("nan") if diff == 0.0 else float("inf")
        return float(diff) / float(mag)  # the means' common 1/n cancels

    def rows(self, a: Any, start: int, stop: int) -> Any:
        if not isinstance(a, DeviceTensor):
            return a[start:stop]
        da = self._device(a)
        row = da.nbytes // da.shape[0]
        shape = (stop - start, *da.shape[1:])
        offset = start * row
        if offset % ALIGNMENT == 0:
            return da.view((da.ptr or 0) + offset, shape)
        out = da.like(shape)  # setTensorAddress needs 256-byte aligned pointers: a copy of its own
        self.cuda.copy_dtod(out.ptr or 0, (da.ptr or 0) + offset, out.nbytes, self.stream.handle)
        return out

    def concat(self, parts: Sequence[Any]) -> Any:
        if all(isinstance(p, np.ndarray) for p in parts):
            return np.concatenate(list(parts))
        ds = [self._device(p) for p in parts]
        first = ds[0]
        if any(d.shape[1:] != first.shape[1:] or d.dtype != first.dtype for d in ds):
            raise DeviceError("device tensors to join differ in shape or dtype")
        out = first.like((sum(d.shape[0] for d in ds), *first.shape[1:]))
        offset = 0
        for d in ds:
            self.cuda.copy_dtod((out.ptr or 0) + offset, d.ptr or 0, d.nbytes, self.stream.handle)
            offset += d.nbytes
        return out

    def to_host(self, a: Any) -> np.ndarray:
        if isinstance(a, DeviceTensor):
            return a.numpy()
        return np.asarray(a)

    def nbytes(self, a: Any) -> int:
        return int(a.nbytes)

    def close(self) -> None:
        self.stream.sync()
        if self._sums is not None:
            self.cuda.free(self._sums)
            self._sums = None
        if self._sums_host is not None:
            self.cuda.free_host(self._sums_host)
            self._sums_host = None
        if self._kernels is not None:
            self._kernels.close()
            self._kernels = None


__all__ = ["DeviceOps", "kernel_suffix", "ALIGNMENT"]
