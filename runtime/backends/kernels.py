"""The few element-wise CUDA kernels the TensorRT path needs between engines (step caching's residual
arithmetic on device tensors), compiled at run time with NVRTC and launched through the driver API.
Not yet run on a GPU.

    kernels = compile_kernels(SOURCE, NAMES, (8, 9))       # NVRTC -> cubin for sm_89, loaded once
    kernels.launch("vidrt_axpby_f32", grid, 256, ((a, "ptr"), (b, "ptr"), (out, "ptr"), (-1.0, "f32"),
                   (n, "u64")), stream)                     # out = a - b, asynchronous on `stream`

Why NVRTC and not a library: TensorRT has no element-wise API outside a network, cuda-python wraps
no cuBLAS, and torch/CuPy are not runtime dependencies. The source is a few lines of CUDA C with
no headers; it is compiled once per process for the device's own architecture (a cubin, so no PTX
JIT whose ISA version the driver might not know), from the `nvidia-cuda-nvrtc-cu12` wheel that the
`vidrt[tensorrt]` extra installs.

Calls and their documentation (cuda-python 12.x `cuda.bindings`, read from the modules' own
docstrings, which are the CUDA API reference's):
  nvrtcCreateProgram(src, name, numHeaders, headers, includeNames) -> (nvrtcResult, prog)
  nvrtcCompileProgram(prog, numOptions, options) -> (nvrtcResult,); options `--gpu-architecture=sm_XY`:
      a real architecture, so nvrtcGetCUBIN has the code ("cubinSizeRet is set to 0 if the value specified
      to -arch is a virtual architecture")
  nvrtcGetCUBINSize(prog) -> (nvrtcResult, size); nvrtcGetCUBIN(prog, buffer) fills `buffer` (bytes of
      that size), as nvrtcGetPTX does in cuda-python's overview example
  cuInit(0): "must be called before any other function from the driver API" (the runtime API that
      vidrt.backends.cuda uses has initialised the driver already; a second call is a no-op)
  cuLibraryLoadData(code, ...) -> (CUresult, library): "The `code` may be a `cubin`"; context-less
  cuLibraryGetKernel(library, name) -> (CUresult, kernel)
  cuLaunchKernel(f, gx, gy, gz, bx, by, bz, sharedMem, hStream, kernelParams, extra): "the API can also
      be used to launch context-less kernel CUkernel ... passing it to the API by casting to CUfunction.
      Here, the context to launch the kernel on will ... be taken from the specified stream" (our stream,
      made by the runtime API on the device's primary context); kernelParams = "an array of N pointers.
      Each ... must point to a region of memory from which the actual kernel parameter will be copied"
      (copied at launch: the ctypes values need to live through the call only). cuda-python takes that
      array as an integer address.
"""

from __future__ import annotations

import ctypes
from typing import Any

from vidrt.errors import DeviceError, report_it

INSTALL_NVRTC = 'pip install "vidrt[tensorrt]" (it brings nvidia-cuda-nvrtc-cu12)'
BLOCK = 256  # threads per block: a multiple of the warp size (the reductions shuffle whole warps)
MAX_GRID = 4096  # blocks per launch; each thread strides over the rest (grid-stride loops)

# float32, bfloat16 (bit patterns in uint16, as numpy carries them: vidrt.backends.tensorrt.to_bf16_bits'
# rounding, NaN kept), float16 (PTX ISA `cvt.f32.f16` / `cvt.rn.f16.f32`). Accumulation is fp32 per
# element and fp64 in the reductions (atomicAdd on double: compute capability >= 6.0; TensorRT 10 needs 7.5).
SOURCE = r"""
typedef unsigned long long u64;
__device__ __forceinline__ float ld_f32(const float* p, u64 i) { return p[i]; }
__device__ __forceinline__ void st_f32(float* p, u64 i, float v) { p[i] = v; }
__device__ __forceinline__ float ld_bf16(const unsigned short* p, u64 i) {
    return __uint_as_float(((unsigned int)p[i]) << 16);
}
__device__ __forceinline__ void st_bf16(unsigned short* p, u64 i, float v) {
    unsigned int u = __float_as_uint(v);
    p[i] = (u & 0x7fffffffu) > 0x7f800000u ? (unsigned short)0x7fc0
                                           : (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
__device__ __forceinline__ float ld_f16(const unsigned short* p, u64 i) {
    float f; unsigned short h = p[i]; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f;
}
__device__ __forceinline__ void st_f16(unsigned short* p, u64 i, float v) {
    unsigned short h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v)); p[i] = h;
}

/* out[i] = a[i] + alpha * b[i]  (alpha = 1: add, -1: subtract); out may alias a or b */
#define AXPBY(SUFFIX, T)                                                                         \
extern "C" __global__ void vidrt_axpby_##SUFFIX(const T* a, const T* b, T* out, float alpha, u64 n) { \
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)blockDim.x * gridDim.x) \
        st_##SUFFIX(out, i, ld_##SUFFIX(a, i) + alpha * ld_##SUFFIX(b, i));                        \
}

/* sums[0] += sum |a - b|, sums[1] += sum |b|  (sums: two doubles, zeroed by the caller) */
#define ABSDIFF(SUFFIX, T)                                                                       \
extern "C" __global__ void vidrt_absdiff_##SUFFIX(const T* a, const T* b, double* sums, u64 n) {   \
    double d = 0.0, m = 0.0;                                                                     \
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)blockDim.x * gridDim.x) { \
        float x = ld_##SUFFIX(a, i), y = ld_##SUFFIX(b, i);                                      \
        d += fabs((double)x - (double)y); m += fabs((double)y);                                  \
    }                                                                                            \
    for (int o = 16; o > 0; o >>= 1) {                                                           \
        d += __shfl_down_sync(0xffffffffu, d, o); m += __shfl_down_sync(0xffffffffu, m, o);      \
    }                                                                                            \
    if ((threadIdx.x & 31) == 0) { atomicAdd(&sums[0], d); atomicAdd(&sums[1], m); }             \
}

AXPBY(f32, float) AXPBY(bf16, unsigned short) AXPBY(f16, unsigned short)
ABSDIFF(f32, float) ABSDIFF(bf16, unsigned short) ABSDIFF(f16, unsigned short)
"""
SUFFIXES = ("f32", "bf16", "f16")
NAMES = tuple(f"vidrt_{op}_{s}" for op in ("axpby", "absdiff") for s in SUFFIXES)

_KINDS: dict[str, Any] = {"ptr": ctypes.c_void_p, "u64": ctypes.c_uint64, "f32": ctypes.c_float}


def grid_for(n: int) -> int:
    """Blocks for `n` elements: enough for one element per thread, at most MAX_GRID (grid-stride loops)."""
    return max(1, min(MAX_GRID, -(-n // BLOCK)))


def _nvrtc_check(nvrtc: Any, what: str, err: Any, log: str = "") -> None:
    if int(err) != 0:
        try:
            text = nvrtc.nvrtcGetErrorString(err)[1].decode()
        except Exception:
            text = f"error {int(err)}"
        raise DeviceError(f"NVRTC {what} failed ({text}){': ' + log[:300] if log else ''}; "
                          f"reinstall the CUDA runtime compiler: {INSTALL_NVRTC}")


def _cu_check(driver: Any, what: str, err: Any) -> None:
    if int(err) != 0:
        try:
            name = driver.cuGetErrorName(err)[1].decode()
        except Exception:
            name = f"error {int(err)}"
        raise DeviceError(f"CUDA {what} failed ({name}); {report_it()}")


def compile_cubin(source: str, capability: tuple[int, int]) -> bytes:
    """NVRTC: CUDA C -> a cubin for sm_<major><minor>. DeviceError when NVRTC is missing or fails."""
    try:
        from cuda.bindings import nvrtc
    except ImportError as exc:
        raise DeviceError(f"cuda-python is missing ({exc}); {INSTALL_NVRTC}") from None
    try:
        err, prog = nvrtc.nvrtcCreateProgram(source.encode(), b"vidrt_kernels.cu", 0, [], [])
    except Exception as exc:  # libnvrtc.so not found: cuda-python raises when it loads it lazily
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise DeviceError(f"the CUDA runtime compiler (NVRTC) cannot be loaded ({type(exc).__name__}: "
                          f"{first}); {INSTALL_NVRTC}") from None
    _nvrtc_check(nvrtc, "nvrtcCreateProgram", err)
    try:
        arch = f"--gpu-architecture=sm_{capability[0]}{capability[1]}".encode()
        (err,) = nvrtc.nvrtcCompileProgram(prog, 1, [arch])
        if int(err) != 0:
            err_log, size = nvrtc.nvrtcGetProgramLogSize(prog)
            log = b" " * int(size)
            nvrtc.nvrtcGetProgramLog(prog, log)
            _nvrtc_check(nvrtc, f"compile for sm_{capability[0]}{capability[1]}", err,
                         log.decode(errors="replace").strip())
        err, size = nvrtc.nvrtcGetCUBINSize(prog)
        _nvrtc_check(nvrtc, "nvrtcGetCUBINSize", err)
        cubin = b" " * int(size)
        (err,) = nvrtc.nvrtcGetCUBIN(prog, cubin)
        _nvrtc_check(nvrtc, "nvrtcGetCUBIN", err)
        return cubin
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


class DriverKernels:
    """`vidrt.backends.cuda.Kernels` on a cubin loaded with cuLibraryLoadData (context-less)."""

    def __init__(self, cubin: bytes, names: tuple[str, ...]) -> None:
        from cuda.bindings import driver

        _cu_check(driver, "cuInit", driver.cuInit(0)[0])
        err, library = driver.cuLibraryLoadData(cubin, None, None, 0, None, None, 0)
        _cu_check(driver, "cuLibraryLoadData", err)
        self._library: Any = library
        self._kernels: dict[str, Any] = {}
        for name in names:
            err, kernel = driver.cuLibraryGetKernel(library, name.encode())
            _cu_check(driver, f"cuLibraryGetKernel({name})", err)
            self._kernels[name] = kernel

    def launch(self, name: str, grid: int, block: int, args: tuple[tuple[int | float, str], ...],
               stream: int) -> None:
        from cuda.bindings import driver

        values = [_KINDS[kind](value) for value, kind in args]
        params = (ctypes.c_void_p * len(values))(*(ctypes.addressof(v) for v in values))
        (err,) = driver.cuLaunchKernel(int(self._kernels[name]), grid, 1, 1, block, 1, 1, 0, stream,
                                       ctypes.addressof(params), 0)
        _cu_check(driver, f"cuLaunchKernel({name})", err)

    def close(self) -> None:
        if self._library is not None:
            from cuda.bindings import driver

            driver.cuLibraryUnload(self._library)
            self._library = None
            self._kernels = {}


def compile_kernels(source: str, names: tuple[str, ...], capability: tuple[int, int]) -> DriverKernels:
    return DriverKernels(compile_cubin(source, capability), names)


__all__ = ["SOURCE", "NAMES", "SUFFIXES", "BLOCK", "MAX_GRID", "grid_for", "compile_cubin", "compile_kernels",
           "DriverKernels", "INSTALL_NVRTC"]
