"""TensorRT backend: deserialised plans behind the Engine interface (numpy in, numpy out).

    backend = TrtBackend(options, manifest, package)        # picks this GPU's / TensorRT's plans
    engine = backend.open("dit", package / "dit.onnx", contract)
    out = engine.run({"hidden_states": x, "timestep": t, "encoder_hidden_states": ctx})

`import tensorrt` happens lazily (the runtime must import without it) and is checked for being the
real library: with only `tensorrt-stubs` installed, `import tensorrt` succeeds as an empty
namespace package.

Per engine: one execution context with USER_MANAGED device memory taken from one scratch arena the
backend shares between its engines (the pipeline runs them one after another on one stream, so
their activations never live at the same time); one preallocated device buffer per I/O tensor,
sized for the largest shape any of the plan's optimisation profiles allows; `execute_async_v3` on
one non-blocking cuda-python stream; a completion event to wait on. Fully static engines (every
profile min == max: the fixed-tile VAE step) replay a CUDA graph captured on their second call.

Boundary: what goes from one engine to another stays on the device as a `DeviceTensor` (bound by
address as the next call's input, no copies): the VAE decoder's and encoder's causal caches, and every
tensor the step-caching DiT pieces hand each other (tokens, block outputs, time/context embeddings,
RoPE; the cached residual too, computed by `tensor_ops()`'s kernels). What the numpy side needs crosses
PCIe through page-locked buffers: the latents and timesteps in, noise_pred out (a few MB per
multi-second DiT step; the scheduler stays in numpy on the host: its state is the latents and a few
past model outputs, latent-sized, and the solver's arithmetic is microseconds against the DiT's
seconds), the VAE's latent tile in and frames out.

Plans are tied to a TensorRT version and a GPU (compute capability). The manifest records both;
a mismatch is refused with the command that rebuilds them (`vidrt build PACKAGE --precision P`).
"""

from __future__ import annotations

import importlib
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
from vidrt.backends.base import BackendOptions
from vidrt.backends.cuda import BufferPool, CudaApi, CudaRuntime, DeviceBuffer, DeviceTensor, Stream, probe
from vidrt.backends.device_ops import DeviceOps
from vidrt.backends.refit import EngineRefit, not_refittable, rebuild_fix
from vidrt.errors import DeviceError, PackageError, arg, command_or, flags_shown
from vidrt.package import contracts as C
from vidrt.package.contracts import Contract
from vidrt.package.manifest import Engine as EngineEntry
from vidrt.package.manifest import Manifest

if TYPE_CHECKING:
    import tensorrt as trt

MIN_VERSION = (10, 1)  # execute_async_v3, device_memory_size_v2, set_device_memory
# The one command that installs the TensorRT path (pyproject.toml's `tensorrt` extra: the TensorRT wheel,
# cuda-python of the same CUDA major, polygraphy, nvidia-modelopt). tests/test_trt_defects.py checks it.
INSTALL_TENSORRT = 'pip install "vidrt[tensorrt]"'
PRECISION_PREFERENCE = ("fp8", "fp16", "bf16", "fp32")  # when a package has plans at several precisions


# ---- TensorRT import and versions ------------------------------------------------------------------


def version_tuple(version: str) -> tuple[int, ...]:
    out = []
    for part in version.split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def run_elsewhere() -> str:
    """What a run can do instead, as the caller spells it: `--backend onnxruntime` / backend='onnxruntime'."""
    return f"or use {arg('backend', 'onnxruntime')}"


# `vidrt build` has no --backend: it only exists to make TensorRT engines
BUILD_ELSEWHERE = ("TensorRT is needed to build engines; without them `vidrt run` runs the package on ONNX "
                   "Runtime, no build needed")


def load_tensorrt(instead: str | None = None) -> ModuleType:
    """The real `tensorrt` module, or DeviceError saying why not and `instead` (the caller's alternative;
    default: run_elsewhere())."""
    instead = instead or run_elsewhere()
    try:
        mod = importlib.import_module("tensorrt")
    except ImportError as exc:
        raise DeviceError(f"TensorRT is not installed ({exc}); {INSTALL_TENSORRT}, {instead}") from None
    except Exception as exc:  # a wheel whose native libraries are missing fails with OSError and others
        raise DeviceError(f"TensorRT cannot be loaded ({type(exc).__name__}: {str(exc)[:200]}); reinstall it, "
                          f"{instead}") from None
    version = getattr(mod, "__version__", None)
    if not isinstance(version, str) or not hasattr(mod, "Runtime"):
        raise DeviceError("TensorRT is not installed (`import tensorrt` finds only type stubs, no library); "
                          f"{INSTALL_TENSORRT}, {instead}")
    if version_tuple(version) < MIN_VERSION:
        raise DeviceError(f"TensorRT {version} is too old: vidrt needs {'.'.join(map(str, MIN_VERSION))} or newer")
    return mod


def tensorrt_status() -> tuple[str | None, str]:
    """(version, "") when TensorRT loads, else (None, why). Never raises."""
    try:
        mod = load_tensorrt()
    except DeviceError as exc:
        return None, str(exc)
    return str(mod.__version__), ""


def engine_dir_name(trt_version: str, compute_capability: str, precision: str) -> str:
    """trt-10.13.0.35-sm89-fp8: one folder per TensorRT version, GPU and build precision."""
    return f"trt-{trt_version}-sm{compute_capability.replace('.', '')}-{precision}"


def engine_dir_precision(entry: EngineEntry) -> str:
    """The build precision of a plan: the suffix of its folder (the plan's own `precision` is the
    component's, e.g. a bf16 text encoder inside an fp8 build)."""
    return Path(entry.artifact.file).parts[0].rsplit("-", 1)[-1]


def rebuild_command(package: Path | str | None, precision: str) -> str:
    return f"vidrt build {package if package is not None else 'PACKAGE'} --precision {precision}"


def required_components(manifest: Manifest) -> tuple[str, ...]:
    """Every graph a clip without step caching needs: the manifest's components but the DiT's
    step-caching pieces ("<expert>.<piece>", built with `vidrt build --cache-pieces`)."""
    return tuple(n for n in manifest.components if n.partition(".")[0] not in manifest.model.experts)


def select_engines(manifest: Manifest, trt_version: str, compute_capability: str, precision: str | None = None,
                   package: Path | str | None = None) -> tuple[str, dict[str, EngineEntry]]:
    """(build precision, component -> plan) for this TensorRT version and GPU; DeviceError otherwise."""
    need = required_components(manifest)
    here = [e for e in manifest.engines
            if e.tensorrt_version == trt_version and e.compute_capability == compute_capability]
    by_precision: dict[str, dict[str, EngineEntry]] = {}
    for e in here:
        by_precision.setdefault(engine_dir_precision(e), {})[e.component] = e
    order = [precision] if precision else list(PRECISION_PREFERENCE) + sorted(set(by_precision) -
                                                                               set(PRECISION_PREFERENCE))
    for p in order:
        found = by_precision.get(p, {})
        if all(c in found for c in need):  # + the caching pieces built at this precision, if any
            return p, {c: e for c, e in found.items() if c in manifest.components}
    built_precisions = {engine_dir_precision(e) for e in manifest.engines}
    want = precision or next((p for p in order if p in built_precisions), "bf16")
    hint = rebuild_command(package, want)
    if not manifest.engines:
        raise DeviceError(f"the package has no TensorRT plans; build them: {hint}")
    if not here:
        built = sorted({f"TensorRT {e.tensorrt_version} on sm_{e.compute_capability.replace('.', '')}"
                        for e in manifest.engines})
        raise DeviceError(f"the package's plans were built for {', '.join(built)}; this machine has TensorRT "
                          f"{trt_version} on sm_{compute_capability.replace('.', '')}; rebuild them: {hint}")
    missing = sorted(set(need) - set(by_precision.get(want, {})))
    raise DeviceError(f"the package's {want} plans for this GPU lack {', '.join(missing)}; rebuild them: {hint}")


def availability(manifest: Manifest, device: int = 0) -> tuple[bool, str]:
    """Can `auto` use TensorRT for this package on GPU `device`? (GPU + TensorRT + matching plans).
    Never raises."""
    if not manifest.engines:
        return False, "the package has no TensorRT plans (vidrt build)"
    version, why = tensorrt_status()
    if version is None:
        return False, why
    gpu = probe()
    if not gpu.ok:
        return False, gpu.reason
    if not 0 <= device < len(gpu.devices):
        return False, f"no GPU cuda:{device} (this machine has {len(gpu.devices)})"
    try:
        select_engines(manifest, version, gpu.devices[device].compute_capability)
    except DeviceError as exc:
        return False, str(exc)
    return True, f"TensorRT {version} on {gpu.devices[device].name}"


# ---- dtypes --------------------------------------------------------------------------------------------

# TensorRT DataType name -> numpy dtype of the host/device bytes (bf16 travels as its uint16 bits,
# fp8 as uint8: numpy has neither).
_NUMPY: dict[str, np.dtype[Any]] = {
    "FLOAT": np.dtype(np.float32), "HALF": np.dtype(np.float16), "BF16": np.dtype(np.uint16),
    "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64), "INT8": np.dtype(np.int8),
    "UINT8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_), "FP8": np.dtype(np.uint8)}


def numpy_dtype(trt_dtype: Any) -> np.dtype[Any]:
    name = str(getattr(trt_dtype, "name", trt_dtype)).rsplit(".", 1)[-1]
    try:
        return _NUMPY[name]
    except KeyError:
        raise DeviceError(f"engine tensor dtype {name} is not supported by vidrt's TensorRT backend") from None


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float -> bfloat16 bit patterns (uint16), round to nearest even; NaN stays NaN."""
    f = np.ascontiguousarray(x, dtype=np.float32)
    u = f.view(np.uint32)
    rounded: np.ndarray = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
                           ).astype(np.uint16)
    nan = np.isnan(f)
    if nan.any():
        rounded[nan] = np.uint16(0x7FC0)
    return rounded


def from_bf16_bits(b: np.ndarray) -> np.ndarray:
    out: np.ndarray = (np.ascontiguousarray(b, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)
    return out


def _is_bf16(trt_dtype: Any) -> bool:
    return str(getattr(trt_dtype, "name", trt_dtype)).endswith("BF16")


# ---- shared activation memory ---------------------------------------------------------------------------


class ScratchArena:
    """One device allocation for the execution contexts of every open engine (USER_MANAGED memory),
    always exactly as large as the largest need of the engines bound to it now: it grows when an
    engine needs more and shrinks when the largest user leaves (the DiT's scratch is not carried
    through decode). A reallocation waits for the stream, frees the old block, rebinds every context
    and calls each user's `moved` hook: a CUDA graph captured on the old pointer replays that pointer
    (graphs keep the addresses they were captured with), so its owner must drop it."""

    def __init__(self, cuda: CudaApi, stream: Stream) -> None:
        self.cuda, self.stream = cuda, stream
        self.ptr: int | None = None
        self.size = 0
        # id -> (context, bytes it needs now, called when the block moves)
        self._users: dict[int, tuple[trt.IExecutionContext, int, Callable[[], None] | None]] = {}

    def bind(self, key: int, context: trt.IExecutionContext, nbytes: int,
             moved: Callable[[], None] | None = None) -> None:
        self._users[key] = (context, nbytes, moved)
        if not self._fit():
            assert self.ptr is not None
            _set_device_memory(context, self.ptr, self.size)

    def unbind(self, key: int) -> None:
        if self._users.pop(key, None) is not None:
            self._fit()

    def _fit(self) -> bool:
        """Reallocate when the need changed; True when it did (every context rebound)."""
        need = max((n for _, n, _ in self._users.values()), default=0)
        if need == self.size and (self.ptr is not None or need == 0):
            return False
        self.stream.sync()
        if self.ptr is not None:
            self.cuda.free(self.ptr)
            self.ptr, self.size = None, 0
        for _, _, moved in self._users.values():
            if moved is not None:
                moved()
        if need > 0:
            self.ptr = self.cuda.malloc(need)
            self.size = need
            for ctx, _, _ in self._users.values():
                _set_device_memory(ctx, self.ptr, self.size)
        return True

    def close(self) -> None:
        self._users = {}
        if self.ptr is not None:
            self.stream.sync()
            self.cuda.free(self.ptr)
            self.ptr, self.size = None, 0


def _set_device_memory(context: trt.IExecutionContext, ptr: int, size: int) -> None:
    # TensorRT >= 10.1, sized (setDeviceMemoryV2). With weight streaming the size must include the
    # streaming scratch, which getDeviceMemorySizeForProfileV2 reports once the budget is set
    # (NvInferRuntime.h / pyCoreDoc: weight_streaming_scratch_memory_size "may change based on the
    # current weight streaming budget. Please use the V2 memory APIs").
    context.set_device_memory(ptr, size)


# ---- one engine -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Profile:
    index: int
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]  # input -> (min, opt, max)

    def admits(self, shapes: dict[str, tuple[int, ...]]) -> bool:
        for name, shape in shapes.items():
            lo, _, hi = self.shapes[name]
            if len(shape) != len(lo) or any(not a <= s <= b for a, s, b in zip(lo, shape, hi, strict=True)):
                return False
        return True

    @property
    def static(self) -> bool:
        return all(lo == hi for lo, _, hi in self.shapes.values())


def _dims(dims: Any) -> tuple[int, ...]:
    """TensorRT Dims -> tuple of ints (Dims indexes but, per its stubs, does not iterate)."""
    return tuple(int(dims[i]) for i in range(len(dims)))


def _read_profile(engine: trt.ICudaEngine, index: int, inputs: tuple[str, ...]) -> _Profile:
    shapes = {}
    for n in inputs:
        lo, opt, hi = (_dims(dims) for dims in engine.get_tensor_profile_shape(n, index))
        shapes[n] = (lo, opt, hi)
    return _Profile(index, shapes)


MAX_GRAPHS = 64  # captured CUDA graphs kept per engine (one per set of bound addresses)


def _create_context(trt_mod: ModuleType, engine: trt.ICudaEngine) -> trt.IExecutionContext | None:
    """An execution context whose device memory the application supplies (USER_MANAGED).
    TensorRT 10.x: `create_execution_context(strategy)`; from 10.11 the strategy can also travel in an
    IRuntimeConfig (`create_runtime_config()`), the form TensorRT 11 documents (pyCoreDoc ICudaEngine)."""
    strategy = trt_mod.ExecutionContextAllocationStrategy.USER_MANAGED
    make_config = getattr(engine, "create_runtime_config", None)
    if make_config is not None:
        config = make_config()
        config.set_execution_context_allocation_strategy(strategy)
        ctx: trt.IExecutionContext | None = engine.create_execution_context(config)
        return ctx
    return engine.create_execution_context(strategy)


class TrtEngine:
    """One deserialised plan. See the module docstring for the memory and stream layout.

    `resident_outputs`: outputs returned as `DeviceTensor`s (left on the device; the VAE caches, the DiT
    pieces' tensors). A DeviceTensor fed as an input is bound by its address (set_tensor_address on the
    producer's output buffer), so a chain never crosses PCIe; `device_inputs`: inputs expected that way.
    Two engines' contexts share such buffers safely because every enqueue and copy goes to one stream
    (work on a stream runs in issue order) and the buffer of a released DeviceTensor is only reused
    by later work on that stream (BufferPool); nothing is freed before the stream is synchronised
    (execute_async_v3: "Modifying or releasing memory that has been registered for the tensors before
    stream synchronization ... results in undefined behavior", pyCoreDoc.h)."""

    def __init__(self, name: str, plan: bytes | Any, contract: Contract, *, trt_mod: ModuleType,
                 runtime: trt.Runtime, cuda: CudaApi, stream: Stream, arena: ScratchArena, cuda_graph: bool = True,
                 rebuild: str = "vidrt build PACKAGE --precision P", plan_path: str = "",
                 streamed_bytes: int = 0, resident_outputs: frozenset[str] = frozenset(),
                 pool: BufferPool | None = None, on_run: Callable[[str, float], None] | None = None,
                 device_inputs: frozenset[str] = frozenset()) -> None:
        self.name = name
        self.contract = contract
        self._trt, self._cuda, self._stream, self._arena = trt_mod, cuda, stream, arena
        self._rebuild = rebuild
        self._pool = pool if pool is not None else BufferPool(cuda)
        self._on_run = on_run  # (engine name, GPU milliseconds of the enqueued work), after each call
        self._events: tuple[int, int] | None = None  # CUDA timing events around the enqueue
        engine: trt.ICudaEngine | None = runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise DeviceError(f"TensorRT {trt_mod.__version__} cannot load the {name} plan {plan_path} (built by "
                              f"another TensorRT version or for another GPU, or damaged); "
                              f"{rebuild_fix(rebuild, 'rebuild')}")
        self._engine: trt.ICudaEngine | None = engine
        if streamed_bytes > 0:  # the residency plan keeps part of the weights in host memory
            streamable = int(engine.streamable_weights_size)
            if streamable <= 0:
                raise DeviceError(f"{streamed_bytes / 2**30:.1f} GiB of the {name} weights do not fit on this GPU "
                                  f"and its plan cannot stream weights; "
                                  f"{rebuild_fix(rebuild + ' --weight-streaming', 'rebuild')}")
            # bytes of streamable weights kept on the device; set before the context sizes its scratch
            engine.weight_streaming_budget_v2 = max(0, streamable - streamed_bytes)
        ctx = _create_context(trt_mod, engine)
        if ctx is None:
            raise DeviceError(f"TensorRT could not create an execution context for {name} (device memory?); "
                              + command_or("see `vidrt plan` for what fits",
                                           f"lower {arg('size')} or {arg('num_frames')}"))
        self._ctx: trt.IExecutionContext | None = ctx
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        input_mode = trt_mod.TensorIOMode.INPUT
        self.inputs = tuple(n for n in names if engine.get_tensor_mode(n) == input_mode)
        self.outputs = tuple(n for n in names if engine.get_tensor_mode(n) != input_mode)
        missing = (set(contract.input_names) ^ set(self.inputs)) | (set(contract.output_names) - set(self.outputs))
        if missing:
            raise PackageError(f"the {name} plan's tensors do not match its contract ({', '.join(sorted(missing))}); "
                               f"{rebuild_fix(rebuild, 'rebuild')}")
        self.resident = frozenset(resident_outputs) & set(self.outputs)
        self._trt_dtypes = {n: engine.get_tensor_dtype(n) for n in names}
        self._dtypes = {n: numpy_dtype(d) for n, d in self._trt_dtypes.items()}
        self.profiles = tuple(_read_profile(engine, p, self.inputs) for p in range(engine.num_optimization_profiles))
        self._profile = -1
        self._graphs: dict[tuple[int, ...], int] = {}  # bound addresses + scratch -> captured graph exec
        self._bound: dict[str, int] = {}  # tensor -> address set on the context
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._out_shapes: dict[str, tuple[int, ...]] = {}
        self.buffers: dict[str, DeviceBuffer] = {}
        self._pinned: dict[str, np.ndarray] = {}  # page-locked staging per I/O tensor (cudaMallocHost)
        # Capacity per tensor: the largest shape any profile allows (outputs: as TensorRT infers them).
        capacity: dict[str, int] = {}
        for prof in self.profiles:
            self._select_profile(prof.index, bind=False)
            for n in self.inputs:
                ctx.set_input_shape(n, prof.shapes[n][2])
                capacity[n] = max(capacity.get(n, 0), self._nbytes(n, prof.shapes[n][2]))
            for n in self.outputs:
                shape = _dims(ctx.get_tensor_shape(n))
                if any(v < 0 for v in shape):
                    raise PackageError(f"{name}: output {n} has no bounded shape {shape}; "
                                       f"{rebuild_fix(rebuild, 'rebuild')}")
                capacity[n] = max(capacity.get(n, 0), self._nbytes(n, shape))
        self.capacity = capacity
        # Inputs that usually arrive as DeviceTensors (cache_in_*, fed from cache_out_*; the DiT pieces'
        # tensors) get a buffer only if a host array comes instead (e.g. the first call of a cache chain).
        chained = {n for n in self.inputs if n.replace("cache_in_", "cache_out_") in self.resident} | \
            (set(device_inputs) & set(self.inputs))
        try:
            for n in names:
                if n not in self.resident and n not in chained:
                    self.buffers[n] = DeviceBuffer(cuda, capacity[n])
            self._bind_scratch()
        except BaseException:
            self.close()
            raise
        self._graph_ok = cuda_graph and len(self.profiles) == 1 and self.profiles[0].static
        self._eager_runs = 0

    def _nbytes(self, name: str, shape: tuple[int, ...]) -> int:
        return math.prod(shape) * self._dtypes[name].itemsize

    def scratch_bytes(self) -> int:
        """Activation memory of the profile in use: getDeviceMemorySizeForProfileV2 (TensorRT >= 10.1),
        which follows the weight-streaming budget; CFG as batch-1 calls thus needs the batch-1 profile's
        scratch only, not the largest profile's (device_memory_size_v2)."""
        assert self._engine is not None
        by_profile = getattr(self._engine, "get_device_memory_size_for_profile_v2", None)
        if by_profile is not None and self._profile >= 0:
            return int(by_profile(self._profile))
        return int(self._engine.device_memory_size_v2)

    def _bind_scratch(self) -> None:
        assert self._ctx is not None
        self._arena.bind(id(self), self._ctx, self.scratch_bytes(), moved=self._drop_graphs)

    def _select_profile(self, index: int, bind: bool = True) -> None:
        if index != self._profile:
            assert self._ctx is not None
            if not self._ctx.set_optimization_profile_async(index, self._stream.handle):
                raise DeviceError(f"{self.name}: TensorRT refused optimisation profile {index}")
            self._profile = index
            self._shapes = {}
            self._drop_graphs()
            if bind:
                self._bind_scratch()

    def _drop_graphs(self) -> None:
        for graph in self._graphs.values():
            self._cuda.graph_destroy(graph)
        self._graphs = {}

    @property
    def device_bytes(self) -> int:
        """Preallocated I/O bytes (the activation arena is shared and counted by the backend)."""
        return sum(self.capacity.values())

    def _bind(self, name: str, address: int) -> None:
        if self._bound.get(name) != address:
            assert self._ctx is not None
            self._ctx.set_tensor_address(name, address)
            self._bound[name] = address

    def run(self, feeds: dict[str, Any]) -> dict[str, Any]:
        """numpy arrays (or DeviceTensors of a previous call) in; numpy arrays out, except the
        `resident` outputs, which come back as DeviceTensors."""
        ctx = self._ctx
        if ctx is None:
            raise DeviceError(f"engine {self.name} was closed")
        missing = set(self.inputs) - set(feeds)
        if missing:
            raise DeviceError(f"{self.name}: missing inputs {sorted(missing)}")
        shapes = {n: tuple(int(v) for v in feeds[n].shape) for n in self.inputs}
        if shapes != self._shapes:
            prof = next((p for p in self.profiles if p.admits(shapes)), None)
            if prof is None:
                built = "; ".join(f"{n} {list(p.shapes[n][0])}..{list(p.shapes[n][2])}"
                                  for p in self.profiles for n in self.inputs)
                raise DeviceError(f"{self.name}: input shapes {shapes} are outside the plan's profiles ({built}); "
                                  + command_or(f"rebuild for this size: {self._rebuild} --sizes WxH --frames N",
                                               f"use a {arg('size')} and {arg('num_frames')} this server's plans "
                                               "were built for"))
            self._select_profile(prof.index)
            for n in self.inputs:
                if not ctx.set_input_shape(n, shapes[n]):
                    raise DeviceError(f"{self.name}: TensorRT rejected shape {shapes[n]} for {n}")
            self._out_shapes = {n: _dims(ctx.get_tensor_shape(n)) for n in self.outputs}
            self._shapes = shapes
            self._drop_graphs()
            self._eager_runs = 0
        s = self._stream.handle
        for n in self.inputs:
            value = feeds[n]
            if isinstance(value, DeviceTensor) and value.ptr is not None and value.dtype == self._dtypes[n]:
                self._bind(n, value.ptr)  # a previous call's output, still on the device: no copy
                continue
            host = self._to_engine(n, np.asarray(value))
            if n not in self.buffers:
                self.buffers[n] = DeviceBuffer(self._cuda, self.capacity[n])
            self._bind(n, self.buffers[n].address)
            # through a page-locked staging buffer: a copy from pageable memory is staged by the driver
            # and is not asynchronous (CUDA programming guide, "Page-Locked Host Memory")
            pinned = self._pinned_for(n)[:host.nbytes]
            pinned[:] = host.reshape(-1).view(np.uint8)
            self.buffers[n].upload(pinned, s)
        kept: dict[str, DeviceTensor] = {}
        for n in self.outputs:
            if n in self.resident:
                nbytes = self._nbytes(n, self._out_shapes[n])
                kept[n] = DeviceTensor(self._pool, self._pool.take(nbytes), self._out_shapes[n], self._dtypes[n], s,
                                       from_bf16_bits if _is_bf16(self._trt_dtypes[n]) else None)
                self._bind(n, kept[n].ptr or 0)
            else:
                self._bind(n, self.buffers[n].address)
        if self._on_run is not None and self._events is None:
            self._events = (self._cuda.event_create(timing=True), self._cuda.event_create(timing=True))
        if self._events is not None:
            self._cuda.event_record(self._events[0], s)
        self._execute(ctx, s)
        if self._events is not None:
            self._cuda.event_record(self._events[1], s)
        outs: dict[str, Any] = {}
        for n in self.outputs:
            if n in kept:
                continue
            pinned = self._pinned_for(n)[:self._nbytes(n, self._out_shapes[n])]
            self.buffers[n].download(pinned, s)
            outs[n] = pinned
        self._stream.sync()
        for n, pinned in outs.items():  # out of the staging buffer (reused by the next call)
            outs[n] = pinned.view(self._dtypes[n]).reshape(self._out_shapes[n]).copy()
        if self._events is not None and self._on_run is not None:
            self._on_run(self.name, self._cuda.event_elapsed_ms(*self._events))
        return {n: kept[n] if n in kept else self._from_engine(n, outs[n]) for n in self.contract.output_names}

    def _pinned_for(self, name: str) -> np.ndarray:
        """The page-locked host staging buffer of one I/O tensor (uint8, its capacity), made once."""
        buf = self._pinned.get(name)
        if buf is None:
            buf = self._pinned[name] = self._cuda.alloc_host(self.capacity[name])
        return buf

    def _execute(self, ctx: trt.IExecutionContext, stream: int) -> None:
        key = (*(self._bound[n] for n in self.inputs + self.outputs), self._arena.ptr or 0)
        graph = self._graphs.get(key)
        if graph is not None:
            self._cuda.graph_launch(graph, stream)
            return
        if self._graph_ok and self._eager_runs >= 1:
            # Capture after one eager run (TensorRT finishes lazy setup on the first enqueue). The
            # graph replays the addresses bound now (tensors and scratch), hence one graph per set of
            # addresses. Captured work does not execute, so launch the graph right after.
            graph = self._capture(ctx, stream)
            if graph is not None:
                if len(self._graphs) >= MAX_GRAPHS:
                    self._cuda.graph_destroy(self._graphs.pop(next(iter(self._graphs))))
                self._graphs[key] = graph
                self._cuda.graph_launch(graph, stream)
                return
            self._graph_ok = False  # fall through to an eager run, and stay eager
        if not ctx.execute_async_v3(stream):
            raise DeviceError(f"TensorRT could not enqueue {self.name} (see the TensorRT log above)")
        self._eager_runs += 1

    def _capture(self, ctx: trt.IExecutionContext, stream: int) -> int | None:
        """A graph of one enqueue, or None when capture or instantiation fails (some engines cannot be
        captured: TensorRT's developer guide, "CUDA Graphs", lists the cases). Never leaves the stream
        capturing: cudaStreamEndCapture ends a capture even when it reports an error."""
        try:
            self._cuda.graph_begin_capture(stream)
        except DeviceError:
            return None
        ok = False
        graph: int | None = None
        try:
            ok = bool(ctx.execute_async_v3(stream))
        finally:
            try:
                graph = self._cuda.graph_end_capture(stream)
            except DeviceError:
                graph = None
        if graph is not None and not ok:
            self._cuda.graph_destroy(graph)
            graph = None
        return graph

    def _to_engine(self, name: str, value: np.ndarray) -> np.ndarray:
        if _is_bf16(self._trt_dtypes[name]):
            return to_bf16_bits(value)
        return np.ascontiguousarray(value, dtype=self._dtypes[name])

    def _from_engine(self, name: str, value: np.ndarray) -> np.ndarray:
        if _is_bf16(self._trt_dtypes[name]):
            return from_bf16_bits(value)  # numpy has no bfloat16: float32 (exact)
        want = self.contract.output(name).dtype
        try:
            return value.astype(np.dtype(want), copy=False)
        except TypeError:
            return value

    def refit(self, state: EngineRefit, weights: Mapping[str, np.ndarray]) -> int:
        """Write LoRA-merged weights into this engine in place (vidrt.backends.refit), on the engine's
        stream, and wait for it. CUDA graphs captured before replay what they captured: dropped."""
        if self._engine is None:
            raise DeviceError(f"engine {self.name} was closed")
        self._drop_graphs()
        count = state.apply(self._engine, weights, self._stream.handle)
        self._stream.sync()
        return count

    def close(self) -> None:
        if self._ctx is None and self._engine is None:
            return
        try:
            self._stream.sync()
        finally:
            self._drop_graphs()
            self._arena.unbind(id(self))
            self._pool.trim()  # spare buffers of device tensors (synchronised above): freed with the engine
            if self._events is not None:
                for event in self._events:
                    self._cuda.event_destroy(event)
                self._events = None
            for buf in self.buffers.values():
                buf.close()
            self.buffers = {}
            for pinned in self._pinned.values():
                self._cuda.free_host(pinned)
            self._pinned = {}
            self._ctx = None
            self._engine = None


# ---- the backend ------------------------------------------------------------------------------------------


PLAN_READ_CHUNK = 64 * 2**20  # bytes per read while TensorRT deserialises from the file


def plan_source(trt_mod: ModuleType, path: Path) -> Any:
    """What `Runtime.deserialize_cuda_engine` reads a plan from: an IStreamReaderV2 over the file
    where TensorRT has it (10.7+; reads `PLAN_READ_CHUNK` at a time, so host RAM never holds the
    whole plan), else the file's bytes (dropped by the caller once the engine exists).

    pyCoreDoc IStreamReaderV2: subclasses must call the base __init__ explicitly; read(num_bytes,
    stream) returns bytes, and "if N bytes are requested but only M bytes (M < N) are read,
    additional read requests will be made"; seek(offset, SeekPosition) -- END offsets backwards."""
    base: Any = getattr(trt_mod, "IStreamReaderV2", None)
    if base is None:
        return path.read_bytes()
    where = {trt_mod.SeekPosition.SET: 0, trt_mod.SeekPosition.CUR: 1, trt_mod.SeekPosition.END: 2}

    class PlanReader(base):  # type: ignore[misc]
        def __init__(self) -> None:
            base.__init__(self)
            self.file = open(path, "rb")  # noqa: SIM115 (closed when the engine is built)

        def read(self, num_bytes: int, stream: int) -> bytes:
            return self.file.read(min(int(num_bytes), PLAN_READ_CHUNK))

        def seek(self, offset: int, position: Any) -> bool:
            whence = where.get(position, 0)
            self.file.seek(-offset if whence == 2 else offset, whence)
            return True

    return PlanReader()


def built_vae_tile(plans: dict[str, EngineEntry], scale: int) -> tuple[int, int] | None:
    """(tile_h, tile_w) latent cells the VAE plans were built for: `vidrt build` records the tile
    in pixels as the VAE entries' one profile (width, height, 1). None when not recorded."""
    for name in (C.VAE_STEP, C.VAE_FIRST):
        entry = plans.get(name)
        if entry is not None and entry.profiles:
            w_px, h_px, _ = entry.profiles[0]
            return h_px // scale, w_px // scale
    return None


_CACHE_CHAINS = (C.VAE_FIRST, C.VAE_STEP, C.VAE_ENCODE_FIRST, C.VAE_ENCODE_STEP)
# What the step-caching DiT pieces hand to each other (vidrt.caching.ExpertDiT): device tensors end to end.
_PIECE_TENSORS = frozenset({C.TOKENS, C.BLOCK_OUT, C.TEMB, C.TIMESTEP_PROJ, C.CONTEXT_EMB, C.ROPE_COS, C.ROPE_SIN})


def _is_piece(name: str) -> bool:
    return name.partition(".")[2] in C.DIT_PIECES


def resident_outputs(name: str, contract: Contract) -> frozenset[str]:
    """The outputs of `name` that stay on the device as DeviceTensors (fed to a later call by address):
    the VAE decoder's and encoder's causal caches (cache_out_i -> the next step's cache_in_i), and every
    tensor a step-caching DiT piece hands to another (only noise_pred, out of the head, comes back)."""
    if name in _CACHE_CHAINS:
        return frozenset(n for n in contract.output_names if n.startswith("cache_out_"))
    if _is_piece(name):
        return frozenset(contract.output_names) & _PIECE_TENSORS
    return frozenset()


def device_inputs(name: str, contract: Contract) -> frozenset[str]:
    """Inputs that arrive as another engine's DeviceTensor: no buffer is preallocated for them (one is
    made if a host array comes instead). A DiT piece's residual stream [2, L, dim] is GBs at 720p."""
    if name in _CACHE_CHAINS:
        return frozenset(n for n in contract.input_names if n.startswith("cache_in_"))
    if _is_piece(name):
        return frozenset(contract.input_names) & _PIECE_TENSORS
    return frozenset()


def _no_base(initializer: str) -> np.ndarray:
    raise KeyError(initializer)  # no weight records: EngineRefit names the weight it cannot restore


def device_index(options: BackendOptions) -> int:
    """--device cuda:N (or N) -> N; cpu/cuda -> 0."""
    tail = str(options.device).rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else 0


class TrtBackend:
    """Opens the plans of one package for this GPU and TensorRT version."""

    name = "tensorrt"
    cpu_features: frozenset[str] = frozenset()  # the default graph forms: the ones the plans were built from

    def __init__(self, options: BackendOptions, manifest: Manifest, package: Path | str | None = None, *,
                 precision: str | None = None, trt_mod: ModuleType | None = None, cuda: CudaApi | None = None,
                 compute_capability: str | None = None, cuda_graphs: bool = True) -> None:
        self.options = options
        self.manifest = manifest
        self.package = Path(package) if package is not None else None
        self._trt = trt_mod if trt_mod is not None else load_tensorrt()
        self.device = device_index(options)
        if cuda is None:
            gpu = probe()
            if not gpu.ok:
                raise DeviceError(f"the TensorRT backend needs an NVIDIA GPU: {gpu.reason}; "
                                  f"use {arg('backend', 'onnxruntime')}")
            if not 0 <= self.device < len(gpu.devices):
                # `vidrt --device` takes the index (click.IntRange), Pipeline.load(device=) "cuda:N"
                given = self.device if flags_shown() else f"cuda:{self.device}"
                raise DeviceError(f"{arg('device', given)}: this machine has {len(gpu.devices)} GPU(s) "
                                  f"(cuda:0..cuda:{len(gpu.devices) - 1}); `vidrt doctor` lists them")
            cuda = CudaRuntime(gpu.devices[self.device].index)  # current device before any TensorRT call
            compute_capability = compute_capability or gpu.devices[self.device].compute_capability
        if compute_capability is None:
            raise DeviceError("compute capability unknown (pass compute_capability with a custom CudaApi)")
        self.cuda = cuda
        self.version = str(self._trt.__version__)
        self.compute_capability = compute_capability
        self.precision, self.plans = select_engines(manifest, self.version, compute_capability, precision,
                                                    self.package)
        self._logger: trt.Logger = self._trt.Logger(self._trt.Logger.WARNING)
        self._runtime: trt.Runtime = self._trt.Runtime(self._logger)
        self.stream = Stream(cuda)
        self.arena = ScratchArena(cuda, self.stream)
        self.pool = BufferPool(cuda)  # device buffers of outputs kept on the device (VAE caches)
        self.cuda_graphs = cuda_graphs
        self._open: dict[str, TrtEngine] = {}
        self._ops: DeviceOps | None = None  # arithmetic on device tensors between engines (tensor_ops)
        # What the GPU has for this process before any engine is opened: the residency plan's budget.
        self.free_bytes_at_start = cuda.mem_info()[0]
        self.streamed: dict[str, int] = {}  # engine -> weight bytes the plan streams per call
        self._refits: dict[str, EngineRefit] = {}  # engine -> which of its weights a LoRA changed now
        self.reset_gpu_stats()

    # ---- per-stage GPU time and peak memory (--stats-json) ----

    def reset_gpu_stats(self) -> None:
        self._gpu_ms: dict[str, float] = {}
        self._gpu_calls: dict[str, int] = {}
        self._min_free = self.free_bytes_at_start
        self._refit_stats = [0.0, 0]  # LoRA refits since: seconds (set + refit + sync), bytes of weights set

    def _ran(self, engine: str, ms: float) -> None:
        """After every engine call: its CUDA-event time, and the device memory in use now."""
        self._gpu_ms[engine] = self._gpu_ms.get(engine, 0.0) + ms
        self._gpu_calls[engine] = self._gpu_calls.get(engine, 0) + 1
        self._min_free = min(self._min_free, self.cuda.mem_info()[0])

    def gpu_stats(self) -> dict[str, object]:
        """GPU seconds per stage (CUDA events around each enqueue: kernel time, not the host copies)
        and per engine, and the peak device memory this process used since the backend opened
        (cudaMemGetInfo's free bytes after each call, against the free bytes at start)."""
        stage = {C.TEXT_ENCODER: "text", C.VAE_FIRST: "decode", C.VAE_STEP: "decode", C.VAE_ENCODE_FIRST: "image",
                 C.VAE_ENCODE_STEP: "image", C.IMAGE_ENCODER: "image"}
        by_stage: dict[str, float] = {}
        for name, ms in self._gpu_ms.items():
            key = stage.get(name, "denoise")
            by_stage[key] = by_stage.get(key, 0.0) + ms / 1000
        return {"gpu_seconds": by_stage, "gpu_seconds_by_engine": {n: ms / 1000 for n, ms in self._gpu_ms.items()},
                "engine_calls": dict(self._gpu_calls),
                "peak_device_bytes": self.free_bytes_at_start - self._min_free,
                "free_bytes_at_start": self.free_bytes_at_start} | \
            ({"lora_refit_seconds": self._refit_stats[0], "lora_refit_bytes": int(self._refit_stats[1])}
             if self._refit_stats[1] else {})

    def device_memory(self) -> tuple[int, str] | None:
        return self.free_bytes_at_start, self.precision

    @property
    def vae_tile(self) -> tuple[int, int] | None:
        """The tile the VAE plans were built for: on TensorRT the decode uses exactly this tile."""
        return built_vae_tile(self.plans, self.manifest.model.vae.stride[1])

    def stream_weights(self, streamed: dict[str, int]) -> None:
        """The plan's streamed bytes per engine, applied when each engine is next opened."""
        self.streamed = dict(streamed)

    def _package_of(self, path: Path, name: str) -> Path:
        if self.package is not None:
            return self.package
        comp = self.manifest.components.get(name)
        depth = len(Path(comp.artifact.file).parts) if comp is not None else 1
        return path.parents[depth - 1]

    def open(self, name: str, path: Path, contract: Contract,
             weights: Mapping[str, np.ndarray] | None = None) -> TrtEngine:
        """`path` is the component's ONNX file (what the pipeline passes); its plan is opened instead.
        The plan is deserialised from its file each time (no copy kept in host RAM: an A14B expert's
        plan is ~14-28 GB; re-opening the other expert at the boundary re-reads it from the page cache).
        `weights` (LoRA-merged initializers, vidrt.lora) are refitted into the fresh engine (`refit`); a
        plan built without refit refuses them with one line, before it is read."""
        entry = self.plans.get(name)
        package = self._package_of(Path(path), name)
        rebuild = rebuild_command(package, self.precision)
        self.package = self.package or package  # where refit reads base weights (and hints name)
        if weights:
            self.check_refit(name, package)
        if entry is None:
            pieces = " --cache-pieces" if name.partition(".")[0] in self.manifest.model.experts else ""
            raise DeviceError(f"no TensorRT plan for {name}; {rebuild_fix(rebuild + pieces, 'rebuild')}")
        plan_path = package / entry.artifact.file
        try:
            source = plan_source(self._trt, plan_path)
        except OSError as exc:
            raise PackageError(command_or(f"cannot read {plan_path} ({exc.strerror}); rebuild: {rebuild}",
                                          f"cannot read the {name} plan ({exc.strerror}); the server's operator "
                                          "must rebuild it")) from None
        resident, chained = resident_outputs(name, contract), device_inputs(name, contract)
        try:
            # The fixed-tile VAE step is the engine worth a CUDA graph (many small kernels per tile).
            engine = TrtEngine(name, source, contract, trt_mod=self._trt, runtime=self._runtime, cuda=self.cuda,
                               stream=self.stream, arena=self.arena, cuda_graph=self.cuda_graphs and name == C.VAE_STEP,
                               rebuild=rebuild, plan_path=entry.artifact.file,
                               streamed_bytes=self.streamed.get(name, 0), resident_outputs=resident, pool=self.pool,
                               on_run=self._ran, device_inputs=chained)
        finally:
            file = getattr(source, "file", None)
            if file is not None:
                file.close()
            del source
        self._open[name] = engine
        self._refits.pop(name, None)  # a fresh engine holds its plan's (base) weights
        if weights:
            try:
                self.refit(engine, weights)
            except BaseException:
                engine.close()
                self._open.pop(name, None)
                raise
        return engine

    def tensor_ops(self) -> DeviceOps:
        """Arithmetic on the engines' device tensors, on this backend's stream (vidrt.backends.device_ops)."""
        if self._ops is None:
            self._ops = DeviceOps(self.cuda, self.pool, self.stream)
        return self._ops

    # ---- LoRAs at load time: refit (vidrt.backends.refit) ----

    def check_refit(self, name: str, package: Path | None = None) -> None:
        """UsageError (one line, the rebuild command) unless `name`'s plan was built refittable."""
        entry = self.plans.get(name)
        if entry is not None and not entry.refit:
            where = package if package is not None else self.package
            why = "was built without refit" + (" (TensorRT 11.3 builds none: a known issue)"
                                               if version_tuple(entry.tensorrt_version)[:2] == (11, 3) else "")
            pieces = " --cache-pieces" if "." in name else ""  # a step-caching piece's plan
            raise not_refittable(name, rebuild_command(where, self.precision) + pieces, why)

    def refit(self, engine: TrtEngine, weights: Mapping[str, np.ndarray]) -> None:
        """Put an open DiT engine (the whole graph or a step-caching piece) on these LoRA-merged weights,
        in place: the plan stays loaded, its context valid. Every call starts from the base weights (an
        empty `weights` restores them). Seconds and bytes go to gpu_stats()."""
        name = engine.name
        state = self._refits.get(name)
        if not weights and (state is None or not state.changed):
            return  # holds its base weights already (a piece no LoRA weight reaches)
        self.check_refit(name)
        if state is None:
            expert = name.partition(".")[0]
            state = self._refits[name] = EngineRefit(self._trt, self._logger, name, self._base_weights(expert),
                                                     rebuild_command(self.package, self.precision),
                                                     whole=name == expert)
        t0 = time.perf_counter()
        engine.refit(state, weights)
        self._refit_stats[0] += time.perf_counter() - t0
        self._refit_stats[1] += state.last_bytes

    def _base_weights(self, expert: str) -> Callable[[str], np.ndarray]:
        """initializer -> the base array of `expert`, memory-mapped from its external-data file (its
        step-caching pieces share that file and its names)."""
        from vidrt.lora import base_reader  # numpy only

        comp = self.manifest.components.get(expert)
        if comp is None or not comp.weights or comp.artifact.data_file is None or self.package is None:
            return _no_base
        return base_reader(self.package / comp.artifact.data_file, comp.weights)

    def forget(self, name: str) -> None:
        """Kept for callers of the earlier API: plans are no longer cached in host RAM."""

    def close(self) -> None:
        for engine in self._open.values():
            engine.close()
        self._open = {}
        if self._ops is not None:
            self._ops.close()
            self._ops = None
        self.stream.sync()  # queued copies/kernels on pooled buffers finish before they are freed
        self.arena.close()
        self.pool.close()
        self.stream.close()


__all__ = ["INSTALL_TENSORRT", "run_elsewhere", "BUILD_ELSEWHERE",
           "MIN_VERSION", "version_tuple", "load_tensorrt", "tensorrt_status", "engine_dir_name",
           "engine_dir_precision", "rebuild_command", "select_engines", "availability", "numpy_dtype",
           "to_bf16_bits", "from_bf16_bits", "ScratchArena", "TrtEngine", "TrtBackend", "plan_source", "built_vae_tile",
           "device_index", "PLAN_READ_CHUNK", "MAX_GRAPHS", "resident_outputs", "device_inputs"]
