"""Host-memory stand-ins for cuda-python and TensorRT, so the TensorRT backend and the builder run
(and are tested) without a GPU. They follow the real APIs' shapes: integer handles, device pointers
into a fake address space, contexts that read their inputs from and write their outputs to the
addresses bound with set_tensor_address, stream capture that records work instead of running it.

They also enforce what the docs require of a caller (an AssertionError names the rule broken):
  - set_tensor_address: "The pointer must have at least 256-byte alignment" and "must point to a
    device buffer of sufficient size" (NvInferRuntime.h IExecutionContext::setTensorAddress): checked
    when bound (alignment, inside a live device allocation) and at enqueue (the bytes of the tensor's
    current shape fit in that allocation); pointers may point into an allocation (row views);
  - execute_async_v3 / enqueueV3: "Modifying or releasing memory that has been registered for the
    tensors before stream synchronization ... results in undefined behavior" (pyCoreDoc.h): cudaFree
    of memory that work queued on a stream still uses, before that stream (or an event recorded on it)
    is synchronised, fails;
  - work on one stream runs in issue order, so one context's output buffer can be another context's
    input on that stream; a buffer written on one stream and read on another before the writer's
    stream is synchronised fails (a cross-stream race without an event);
  - cudaMalloc returns 256-byte aligned memory (the fake's allocations are 4 KiB aligned and never
    overlap).
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
from vidrt.backends.tensorrt import from_bf16_bits, to_bf16_bits


class FakeCuda:
    """CudaApi on host memory. `allocations` records every malloc size; `calls` the API calls.
    `fail_instantiate`: cudaGraphInstantiate fails (some graphs cannot be instantiated: e.g. kernels
    with device-side launches; the capture itself then ends with an error)."""

    def __init__(self) -> None:
        self.fail_instantiate = False
        self.device = 0
        self.pinned: list[np.ndarray] = []  # alloc_host arrays not freed yet
        self.copy_kinds: list[str] = []  # per host<->device copy: "pinned" or "pageable" host memory
        self.mem: dict[int, bytearray] = {}
        self.allocations: list[int] = []
        self.calls: list[str] = []
        self._next = 0x1000
        self._next_ptr = 0x7F00_0000_0000  # device address space: allocations 4 KiB aligned, never overlapping
        self.capturing: dict[int, list[Callable[[], None]]] = {}
        self.graphs: dict[int, list[Callable[[], None]]] = {}
        self.pending: dict[int, set[int]] = {}  # stream -> allocations its unsynchronised work uses
        self.written: dict[int, int] = {}  # allocation -> the stream that last wrote it
        self.event_stream: dict[int, int] = {}  # event -> stream it was last recorded on
        self.launches: list[str] = []  # kernel names, in launch order
        self.copies: list[tuple[str, int]] = []  # ("htod" | "dtoh" | "dtod", bytes), in issue order

    def _handle(self) -> int:
        self._next += 0x1000
        return self._next

    # ---- the device address space ----

    def resolve(self, ptr: int, nbytes: int = 1) -> tuple[int, int]:
        """(allocation base, offset) of [ptr, ptr + nbytes) inside one live allocation, else AssertionError."""
        for base, buf in self.mem.items():
            if base <= ptr < base + max(len(buf), 1):
                assert ptr + nbytes <= base + len(buf), \
                    f"{nbytes} bytes at {ptr:#x} run past the end of a {len(buf)}-byte allocation"
                return base, ptr - base
        raise AssertionError(f"{ptr:#x} is not in any live device allocation (freed, or never allocated)")

    def read(self, ptr: int, nbytes: int) -> bytes:
        base, off = self.resolve(ptr, nbytes)
        return bytes(self.mem[base][off:off + nbytes])

    def write(self, ptr: int, data: bytes, stream: int | None = None) -> None:
        base, off = self.resolve(ptr, len(data))
        self.mem[base][off:off + len(data)] = data
        if stream is not None:
            self.written[base] = stream

    def use(self, stream: int, ptr: int, nbytes: int = 1, reads: bool = True) -> None:
        """Work queued on `stream` uses [ptr, ptr + nbytes): pending until the stream is synchronised.
        Reading what another stream wrote and has not synchronised is a race."""
        base, _ = self.resolve(ptr, nbytes)
        writer = self.written.get(base)
        if reads and writer is not None and writer != stream:
            assert base not in self.pending.get(writer, set()), \
                f"stream {stream:#x} reads a buffer stream {writer:#x} wrote and has not synchronised"
        self.pending.setdefault(stream, set()).add(base)

    def set_device(self, index: int) -> None:
        self.device = index
        self.calls.append(f"set_device {index}")

    def mem_info(self) -> tuple[int, int]:
        """20 GiB free at start, less what this process has allocated (cudaMemGetInfo)."""
        return 20 * 2**30 - sum(len(m) for m in self.mem.values()), 24 * 2**30

    def malloc(self, nbytes: int) -> int:
        ptr = self._next_ptr
        self._next_ptr += -(-max(nbytes, 1) // 0x1000) * 0x1000 + 0x1000  # a gap after every allocation
        self.mem[ptr] = bytearray(nbytes)
        self.allocations.append(nbytes)
        self.calls.append("malloc")
        return ptr

    def free(self, ptr: int) -> None:
        assert ptr in self.mem, f"cudaFree({ptr:#x}): not the start of a live allocation"
        for stream, used in self.pending.items():
            assert ptr not in used, (f"cudaFree of memory that work on stream {stream:#x} still uses, before the "
                                     f"stream is synchronised (execute_async_v3: undefined behaviour)")
        del self.mem[ptr]
        self.written.pop(ptr, None)
        self.calls.append("free")

    def alloc_host(self, nbytes: int) -> np.ndarray:
        arr = np.zeros(nbytes, np.uint8)
        self.pinned.append(arr)
        return arr

    def free_host(self, array: np.ndarray) -> None:
        self.pinned = [a for a in self.pinned if a is not array]

    def _kind(self, host: np.ndarray) -> str:
        return "pinned" if any(np.shares_memory(host, a) for a in self.pinned) else "pageable"

    def copy_htod(self, dst: int, src: np.ndarray, stream: int) -> None:
        assert stream not in self.capturing, "copies must stay outside the captured graph"
        self.copy_kinds.append(self._kind(src))
        self.use(stream, dst, src.nbytes, reads=False)
        self.write(dst, src.tobytes(), stream)
        self.copies.append(("htod", src.nbytes))
        self.calls.append("htod")

    def copy_dtoh(self, dst: np.ndarray, src: int, stream: int) -> None:
        self.copy_kinds.append(self._kind(dst))
        self.use(stream, src, dst.nbytes)
        dst.reshape(-1).view(np.uint8)[:] = np.frombuffer(self.read(src, dst.nbytes), np.uint8)
        self.copies.append(("dtoh", dst.nbytes))
        self.calls.append("dtoh")

    def copy_dtod(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        self.use(stream, src, nbytes)
        self.use(stream, dst, nbytes, reads=False)
        self.write(dst, self.read(src, nbytes), stream)
        self.copies.append(("dtod", nbytes))
        self.calls.append("dtod")

    def memset(self, dst: int, value: int, nbytes: int, stream: int) -> None:
        self.use(stream, dst, nbytes, reads=False)
        self.write(dst, bytes([value]) * nbytes, stream)
        self.calls.append("memset")

    def load_kernels(self, source: str, names: tuple[str, ...]) -> FakeKernels:
        self.calls.append("load_kernels")
        return FakeKernels(self, source, names)

    def stream_create(self) -> int:
        return self._handle()

    def stream_sync(self, stream: int) -> None:
        self.pending.pop(stream, None)
        self.calls.append("stream_sync")

    def stream_destroy(self, stream: int) -> None:
        pass

    def event_create(self, timing: bool = False) -> int:
        return self._handle()

    def event_record(self, event: int, stream: int) -> None:
        self.event_stream[event] = stream
        self.calls.append("event_record")

    def event_sync(self, event: int) -> None:
        # everything queued before the record has finished: in this fake, all of that stream's work so far
        self.pending.pop(self.event_stream.get(event, -1), None)
        self.calls.append("event_sync")

    def event_elapsed_ms(self, start: int, end: int) -> float:
        return 1.0

    def event_destroy(self, event: int) -> None:
        pass

    def graph_begin_capture(self, stream: int) -> None:
        self.capturing[stream] = []
        self.calls.append("begin_capture")

    def graph_end_capture(self, stream: int) -> int:
        work = self.capturing.pop(stream)
        self.calls.append("end_capture")
        if self.fail_instantiate:
            from vidrt.errors import DeviceError

            raise DeviceError("CUDA cudaGraphInstantiate failed (error 1 cudaErrorInvalidValue)")
        exe = self._handle()
        self.graphs[exe] = work
        return exe

    def graph_launch(self, graph_exec: int, stream: int) -> None:
        for kernel in self.graphs[graph_exec]:
            kernel()
        self.calls.append("graph_launch")

    def graph_destroy(self, graph_exec: int) -> None:
        del self.graphs[graph_exec]


class FakeKernels:
    """vidrt.backends.kernels' kernels, run in numpy on the fake device memory. Each launch checks what
    the real one needs: a kernel compiled from the source, the parameter kinds of its signature, whole
    warps per block (the reductions shuffle 32 lanes), pointers into live allocations big enough."""

    _STORAGE = {"f32": np.float32, "bf16": np.uint16, "f16": np.float16}
    _SIGNATURES = {"axpby": ("ptr", "ptr", "ptr", "f32", "u64"), "absdiff": ("ptr", "ptr", "ptr", "u64")}

    def __init__(self, cuda: FakeCuda, source: str, names: tuple[str, ...]) -> None:
        self.cuda, self.names = cuda, set(names)
        assert "extern \"C\" __global__" in source, "kernels need C linkage to be found by name"
        self.closed = False

    def _load(self, ptr: int, n: int, suffix: str) -> np.ndarray:
        storage = self._STORAGE[suffix]
        raw = np.frombuffer(self.cuda.read(ptr, n * np.dtype(storage).itemsize), storage)
        return from_bf16_bits(raw) if suffix == "bf16" else raw.astype(np.float32)

    def launch(self, name: str, grid: int, block: int, args: tuple[tuple[int | float, str], ...],
               stream: int) -> None:
        assert not self.closed and name in self.names, f"kernel {name} was not compiled"
        op, suffix = name.removeprefix("vidrt_").split("_")
        assert tuple(k for _, k in args) == self._SIGNATURES[op], f"{name}: parameter kinds {args}"
        assert grid >= 1 and block % 32 == 0, "whole warps per block"
        values = [v for v, _ in args]
        n = int(values[-1])
        a, b = self._load(int(values[0]), n, suffix), self._load(int(values[1]), n, suffix)
        for ptr in values[:2]:
            self.cuda.use(stream, int(ptr), n * np.dtype(self._STORAGE[suffix]).itemsize)
        if op == "axpby":
            out = (a + np.float32(values[3]) * b).astype(np.float32)
            stored = to_bf16_bits(out) if suffix == "bf16" else out.astype(self._STORAGE[suffix])
            self.cuda.use(stream, int(values[2]), stored.nbytes, reads=False)
            self.cuda.write(int(values[2]), stored.tobytes(), stream)
        else:
            sums = np.frombuffer(self.cuda.read(int(values[2]), 16), np.float64)
            self.cuda.use(stream, int(values[2]), 16)
            new = sums + np.array([np.abs(a.astype(np.float64) - b).sum(), np.abs(b.astype(np.float64)).sum()])
            self.cuda.write(int(values[2]), new.tobytes(), stream)
        self.cuda.launches.append(name)

    def close(self) -> None:
        self.closed = True


@dataclass(frozen=True)
class DType:
    name: str


FLOAT, HALF, BF16, INT64 = DType("FLOAT"), DType("HALF"), DType("BF16"), DType("INT64")
_NP = {"FLOAT": np.float32, "HALF": np.float16, "INT64": np.int64, "BF16": np.uint16}
INPUT, OUTPUT = "INPUT", "OUTPUT"


@dataclass
class FakePlan:
    """What a fake plan deserialises to. inputs: name -> (dtype, [(min, opt, max) per profile]);
    outputs: name -> (dtype, shape function of the input shapes); compute: float inputs -> float outputs."""

    inputs: dict[str, tuple[DType, list[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]]]
    outputs: dict[str, tuple[DType, Callable[[dict[str, tuple[int, ...]]], tuple[int, ...]]]]
    compute: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
    device_memory: int = 1 << 20  # scratch of every profile unless profile_memory says otherwise
    streamable: int = 0  # streamable_weights_size: > 0 for a plan built with --weight-streaming
    profile_memory: list[int] | None = None  # get_device_memory_size_for_profile_v2 per profile
    streaming_scratch: int = 0  # extra scratch once part of the weights stream (budget < streamable)
    # Refit (FakeRefitter): `weights` = the refittable weights, name -> (dtype, value as built; bf16 as
    # uint16 bits), fed to `compute` under their names; `combined` = groups TensorRT optimised together
    # (setting one makes the others "missing"); `refittable` = ICudaEngine.refittable.
    weights: dict[str, tuple[DType, np.ndarray]] = field(default_factory=dict)
    combined: tuple[frozenset[str], ...] = ()
    refittable: bool = False


class FakeContext:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.addresses: dict[str, int] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.profile = 0
        self.device_memory: tuple[int, int] | None = None
        self.profile_calls: list[int] = []

    def set_optimization_profile_async(self, index: int, stream: int) -> bool:
        self.profile = index
        self.profile_calls.append(index)
        return True

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        lo, _, hi = self.engine.plan.inputs[name][1][self.profile]
        if not all(a <= s <= b for a, s, b in zip(lo, shape, hi, strict=True)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if name in self.engine.plan.inputs:
            return self.shapes[name]
        return self.engine.plan.outputs[name][1](self.shapes)

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        assert ptr % 256 == 0, f"{name}: {ptr:#x} is not 256-byte aligned (setTensorAddress)"
        self.engine.cuda.resolve(ptr)  # a device buffer (not host memory, not freed)
        self.addresses[name] = ptr
        return True

    def set_device_memory(self, ptr: int, size: int) -> None:
        self.device_memory = (ptr, size)

    def execute_async_v3(self, stream: int) -> bool:
        cuda = self.engine.cuda
        assert self.device_memory is not None, "USER_MANAGED context without device memory"

        need = self.engine.memory_for_profile(self.profile)
        assert self.device_memory[1] >= need, f"scratch {self.device_memory[1]} < the profile's {need} bytes"
        # What the work reads is fixed now: a captured graph replays these pointers, whatever the
        # context is bound to later (CUDA graphs keep the addresses they were captured with).
        addresses, scratch, shapes = dict(self.addresses), self.device_memory[0], dict(self.shapes)
        out_shapes = {n: self.get_tensor_shape(n) for n in self.engine.plan.outputs}

        def nbytes(n: str, dt: DType) -> int:
            return math.prod((shapes | out_shapes)[n]) * np.dtype(_NP[dt.name]).itemsize

        # "a device buffer of sufficient size": every tensor's bytes at its current shape fit where it is bound
        for n, (dt, _) in {**self.engine.plan.inputs, **self.engine.plan.outputs}.items():
            assert n in addresses, f"{n} has no address (setTensorAddress before enqueueV3)"
            cuda.resolve(addresses[n], nbytes(n, dt))

        def kernel() -> None:
            assert scratch in cuda.mem, "kernel ran on freed scratch memory"
            cuda.use(stream, scratch, reads=False)
            feeds = {}
            for n, (dt, _) in self.engine.plan.inputs.items():
                cuda.use(stream, addresses[n], nbytes(n, dt))
                raw = np.frombuffer(cuda.read(addresses[n], nbytes(n, dt)), _NP[dt.name]).reshape(shapes[n])
                feeds[n] = from_bf16_bits(raw) if dt is BF16 else raw
            for n, (dt, _) in self.engine.plan.weights.items():  # what the engine holds now
                held = self.engine.weights[n]
                feeds[n] = from_bf16_bits(held) if dt is BF16 else held.astype(np.float32)
            outs = self.engine.plan.compute(feeds)
            for n, (dt, _) in self.engine.plan.outputs.items():
                arr = to_bf16_bits(outs[n]) if dt is BF16 else np.ascontiguousarray(outs[n], _NP[dt.name])
                assert arr.nbytes == nbytes(n, dt), f"{n}: computed {arr.shape}, engine shape {out_shapes[n]}"
                cuda.use(stream, addresses[n], arr.nbytes, reads=False)
                cuda.write(addresses[n], arr.tobytes(), stream)
            self.engine.executions += 1

        if stream in cuda.capturing:
            cuda.capturing[stream].append(kernel)
        else:
            kernel()
        return True


class FakeEngine:
    def __init__(self, plan: FakePlan, cuda: FakeCuda) -> None:
        self.plan, self.cuda = plan, cuda
        self.names = list(plan.inputs) + list(plan.outputs)
        self.executions = 0
        self.contexts: list[FakeContext] = []
        self.weight_streaming_budget_v2 = plan.streamable  # TensorRT's default: stream nothing
        self.weights = {n: v.copy() for n, (_, v) in plan.weights.items()}  # refittable weights, as held now
        self.refits: list[tuple[int | None, tuple[str, ...]]] = []  # (stream or None, names) per refit

    @property
    def refittable(self) -> bool:
        return self.plan.refittable
    @property
    def streamable_weights_size(self) -> int:
        return self.plan.streamable

    @property
    def num_io_tensors(self) -> int:
        return len(self.names)

    @property
    def num_optimization_profiles(self) -> int:
        return len(next(iter(self.plan.inputs.values()))[1])

    def memory_for_profile(self, index: int) -> int:
        """get_device_memory_size_for_profile_v2: "The return value will change depending on ...
        setWeightStreamingBudgetV2" (pyCoreDoc / NvInferRuntime.h): streaming adds its scratch."""
        base = self.plan.profile_memory[index] if self.plan.profile_memory else self.plan.device_memory
        streaming = self.weight_streaming_budget_v2 < self.plan.streamable
        return base + (self.plan.streaming_scratch if streaming else 0)

    def get_device_memory_size_for_profile_v2(self, index: int) -> int:
        return self.memory_for_profile(index)

    @property
    def device_memory_size_v2(self) -> int:
        """The largest profile's (TensorRT: the memory for any profile)."""
        return max(self.memory_for_profile(i) for i in range(self.num_optimization_profiles))

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str) -> str:
        return INPUT if name in self.plan.inputs else OUTPUT

    def get_tensor_dtype(self, name: str) -> DType:
        return (self.plan.inputs.get(name) or self.plan.outputs[name])[0]

    def get_tensor_profile_shape(self, name: str, index: int) -> list[tuple[int, ...]]:
        return list(self.plan.inputs[name][1][index])

    def create_execution_context(self, strategy: Any = None) -> FakeContext:
        assert strategy == "USER_MANAGED"
        ctx = FakeContext(self)
        self.contexts.append(ctx)
        return ctx


class FakeEngine11(FakeEngine):
    """TensorRT 11's form (pyCoreDoc ICudaEngine): the allocation strategy travels in an IRuntimeConfig
    made by `create_runtime_config()`; `create_execution_context(runtime_config)`."""

    def create_runtime_config(self) -> Any:
        config = SimpleNamespace(strategy="STATIC")  # IRuntimeConfig's default strategy is kSTATIC
        config.set_execution_context_allocation_strategy = lambda s: setattr(config, "strategy", s)
        return config

    def create_execution_context(self, config: Any = None) -> FakeContext:
        assert getattr(config, "strategy", None) == "USER_MANAGED", "11.x takes an IRuntimeConfig"
        ctx = FakeContext(self)
        self.contexts.append(ctx)
        return ctx


class FakeWeights:
    """trt.Weights: (dtype, ptr, count) holds a raw pointer ("No deep copies are made", pyCoreDoc
    WeightsDoc); a prototype (get_weights_prototype) has no data and size -1 for an unknown name."""

    def __init__(self, dtype: DType = FLOAT, ptr: int = 0, count: int = 0) -> None:
        self.dtype, self.ptr, self.size = dtype, ptr, count

    @property
    def nbytes(self) -> int:
        return self.size * np.dtype(_NP[self.dtype.name]).itemsize

    def read(self) -> np.ndarray:
        """The values at the pointer now (what TensorRT reads when the refit runs)."""
        raw = (ctypes.c_uint8 * self.nbytes).from_address(self.ptr)
        return np.frombuffer(bytes(raw), _NP[self.dtype.name]).copy()


class FakeRefitter:
    """trt.Refitter following pyCoreDoc RefitterDoc / NvInferRuntime.h IRefitter:
    - set_named_weights returns False for a name that "does not correspond to any refittable weights",
      a size or a dtype other than get_weights_prototype(name)'s; a location must be HOST or DEVICE
      (a host pointer claimed to be on the device is a test failure here);
    - get_missing_weights: the unset weights of every combined group one of whose weights was set;
    - refit_cuda_engine(_async) returns False while any weight is missing, else copies every set
      weight from its pointer into the engine (so an array freed or changed before the refit shows);
    - weights stay set for later refits until unset_named_weights ("False if the weights were never set");
    - max_threads >= 1 ("A value less than 1 triggers a kINVALID_ARGUMENT error")."""

    def __init__(self, engine: FakeEngine, logger: Any) -> None:
        assert engine.refittable, "createInferRefitter on an engine built without refit"
        self.engine = engine
        self._max_threads = 1
        self.set: dict[str, FakeWeights] = {}
        self.locations: dict[str, str] = {}
        self.rejected: list[str] = []
        engine.refitters = [*getattr(engine, "refitters", []), self]

    @property
    def max_threads(self) -> int:
        return self._max_threads

    @max_threads.setter
    def max_threads(self, n: int) -> None:
        assert n >= 1, "kINVALID_ARGUMENT: max_threads < 1"
        self._max_threads = n

    def get_all_weights(self) -> list[str]:
        return list(self.engine.plan.weights)

    def get_weights_prototype(self, name: str) -> FakeWeights:
        if name not in self.engine.plan.weights:
            return FakeWeights(FLOAT, 0, -1)
        dt, value = self.engine.plan.weights[name]
        return FakeWeights(dt, 0, int(value.size))

    def set_named_weights(self, name: str, weights: FakeWeights, location: str = "HOST") -> bool:
        assert location in ("HOST", "DEVICE")
        proto = self.get_weights_prototype(name)
        if proto.size < 0 or weights.dtype != proto.dtype or weights.size != proto.size:
            self.rejected.append(name)
            return False
        assert location == "HOST", "host (numpy) memory passed as TensorLocation.DEVICE"
        self.set[name], self.locations[name] = weights, location
        return True

    def unset_named_weights(self, name: str) -> bool:
        return self.set.pop(name, None) is not None

    def get_missing_weights(self) -> list[str]:
        out: list[str] = []
        for group in self.engine.plan.combined:
            if group & set(self.set):
                out += sorted(n for n in group if n not in self.set and n not in out)
        return out

    def _refit(self, stream: int | None) -> bool:
        if self.get_missing_weights():
            return False
        for name, w in self.set.items():
            self.engine.weights[name] = w.read().reshape(self.engine.weights[name].shape)
        self.engine.refits.append((stream, tuple(sorted(self.set))))
        return True

    def refit_cuda_engine(self) -> bool:
        return self._refit(None)

    def refit_cuda_engine_async(self, stream: int) -> bool:
        return self._refit(stream)


@dataclass
class FakeTensorRT:
    """The `tensorrt` module: `plans` maps plan bytes to what they deserialise to (unknown bytes ->
    None, as TensorRT does for a plan of another version or GPU). `deserialized` records how each
    plan came in ("bytes" or "reader"); `builds` records each Builder's device and config flags."""

    cuda: FakeCuda
    version: str = "10.13.0.35"
    plans: dict[bytes, FakePlan] = field(default_factory=dict)
    engines: list[FakeEngine] = field(default_factory=list)
    deserialized: list[str] = field(default_factory=list)
    builds: list[dict[str, Any]] = field(default_factory=list)
    build_result: bytes = b"plan"
    network_weights: set[str] | None = None  # names the parsed network has (None: any name)

    def module(self) -> Any:
        fake = self
        major = int(self.version.split(".")[0])

        class Logger:
            WARNING = "WARNING"

            def __init__(self, level: str) -> None:
                self.level = level

        class SeekPosition:
            SET, CUR, END = 0, 1, 2

        class IStreamReaderV2:
            """The real base class must be initialised explicitly by subclasses (pyCoreDoc)."""

            def __init__(self) -> None:
                self._base_initialised = True

        class Runtime:
            def __init__(self, logger: Logger) -> None:
                pass

            def deserialize_cuda_engine(self, data: Any) -> FakeEngine | None:
                if isinstance(data, IStreamReaderV2):
                    assert getattr(data, "_base_initialised", False), "IStreamReaderV2.__init__ not called"
                    assert data.seek(0, SeekPosition.SET)
                    chunks = []
                    while True:
                        chunk = data.read(1 << 16, 0)
                        if not chunk:
                            break
                        chunks.append(bytes(chunk))
                    raw = b"".join(chunks)
                    fake.deserialized.append("reader")
                else:
                    raw = bytes(data)
                    fake.deserialized.append("bytes")
                plan = fake.plans.get(raw)
                if plan is None:
                    return None
                engine = (FakeEngine11 if major >= 11 else FakeEngine)(plan, fake.cuda)
                fake.engines.append(engine)
                return engine

        class BuilderFlag:
            TF32, WEIGHT_STREAMING = "TF32", "WEIGHT_STREAMING"
            REFIT, REFIT_IDENTICAL, REFIT_INDIVIDUAL = "REFIT", "REFIT_IDENTICAL", "REFIT_INDIVIDUAL"

        class Config:
            def __init__(self, record: dict[str, Any]) -> None:
                self.record = record
                record["flags"] = {BuilderFlag.TF32}  # "TF32 ... Enabled by default." (pyCoreDoc BuilderFlag)
                self.builder_optimization_level = 3

            def set_memory_pool_limit(self, pool: Any, size: int) -> None:
                self.record["workspace"] = size

            def set_flag(self, flag: str) -> None:
                self.record["flags"].add(flag)
                # NvInfer.h kREFIT_INDIVIDUAL: "cannot be used together with kREFIT or kREFIT_IDENTICAL"
                assert not ({"REFIT", "REFIT_IDENTICAL"} & self.record["flags"]
                            and "REFIT_INDIVIDUAL" in self.record["flags"])

            def clear_flag(self, flag: str) -> None:
                self.record["flags"].discard(flag)

            def get_flag(self, flag: str) -> bool:
                return flag in self.record["flags"]

            def create_timing_cache(self, data: bytes) -> Any:
                return SimpleNamespace(serialize=lambda: b"timing")

            def set_timing_cache(self, cache: Any, ignore_mismatch: bool) -> bool:
                return True

            def get_timing_cache(self) -> Any:
                return SimpleNamespace(serialize=lambda: b"timing")

            def add_optimization_profile(self, profile: Any) -> int:
                self.record.setdefault("profiles", []).append(profile.shapes)
                return len(self.record["profiles"]) - 1

        class Profile:
            def __init__(self) -> None:
                self.shapes: dict[str, tuple[Any, Any, Any]] = {}

            def set_shape(self, name: str, lo: Any, opt: Any, hi: Any) -> None:
                self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

        class Builder:
            def __init__(self, logger: Logger) -> None:
                self.record: dict[str, Any] = {"device": fake.cuda.device}
                fake.builds.append(self.record)

            def create_network(self, flags: int) -> Any:
                record = self.record
                record["marked"] = []

                def mark_weights_refittable(name: str) -> bool:
                    # NvInfer.h: "false if the weights do not exist or cannot be refitted"
                    exists = fake.network_weights is None or name in fake.network_weights
                    if exists:
                        record["marked"].append(name)
                    return exists

                return SimpleNamespace(flags=flags, mark_weights_refittable=mark_weights_refittable)

            def create_builder_config(self) -> Config:
                return Config(self.record)

            def create_optimization_profile(self) -> Profile:
                return Profile()

            def build_serialized_network(self, network: Any, config: Config) -> bytes:
                return fake.build_result

        class OnnxParser:
            def __init__(self, network: Any, logger: Logger) -> None:
                self.num_errors = 0

            def parse_from_file(self, path: str) -> bool:
                return True

        return SimpleNamespace(
            __version__=self.version, Logger=Logger, Runtime=Runtime, IStreamReaderV2=IStreamReaderV2,
            SeekPosition=SeekPosition, Builder=Builder, OnnxParser=OnnxParser, BuilderFlag=BuilderFlag,
            MemoryPoolType=SimpleNamespace(WORKSPACE="WORKSPACE"), Dims=tuple,
            ExecutionContextAllocationStrategy=SimpleNamespace(USER_MANAGED="USER_MANAGED"),
            TensorIOMode=SimpleNamespace(INPUT=INPUT, OUTPUT=OUTPUT),
            NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=1), major=major,
            Refitter=FakeRefitter, Weights=FakeWeights, TensorLocation=SimpleNamespace(HOST="HOST", DEVICE="DEVICE"),
            DataType=SimpleNamespace(FLOAT=FLOAT, HALF=HALF, BF16=BF16))
