"""LoRAs at load time on TensorRT: LoRA-merged DiT weights written into an open, refittable engine in
place with `trt.Refitter` (DESIGN.md §9; fast_paths.md A.7). Not yet run on a GPU: written against the
TensorRT docs cited below and tested with fakes that enforce them (tests/trt_fakes.py FakeRefitter).

    state = EngineRefit(trt, logger, "dit", base, rebuild="vidrt build PKG --precision bf16")
    state.apply(cuda_engine, merged, stream)   # merged: ONNX initializer name -> W0 + dW (vidrt.lora)
    state.apply(cuda_engine, {}, stream)       # no LoRA: the changed weights get their base values back

Names. `vidrt build` builds the DiT plans with BuilderFlag.REFIT_INDIVIDUAL and marks the parameters the
export recorded (manifest `weights`); the ONNX parser names every weight after its ONNX initializer
(INetworkDefinition::setWeightsName: TensorRT developer guide, "Refitting an Engine"), so the refit names
are the initializer names vidrt.lora merges into. A step-caching piece holds a subset of them; its
refitter lists exactly the ones it has (get_all_weights), and the rest of the merged set is not its own.

From the base, never onto merged weights: each apply sets every weight that is merged now plus every
weight an earlier apply changed (back to its base value, read from the package's external-data file),
so a strength change or removing the LoRA never adds twice. Weights TensorRT combined with a set one
(get_missing_weights: "if some Weights have been set, but the engine was optimized in a way that
combines weights, any unsupplied Weights in the combination are considered missing") are supplied with
their current value; refit_cuda_engine fails while any is missing.

Contract followed (TensorRT python/docstrings/infer/pyCoreDoc.h RefitterDoc, NvInferRuntime.h IRefitter):
- set_named_weights rejects (returns False) an unknown name, a count or a dtype other than
  get_weights_prototype(name)'s: "The dtype and size of weights prototype is the same as weights used
  for engine building" -- a strongly typed bf16/fp16 plan takes bf16/fp16 weights, cast here.
- trt.Weights(dtype, ptr, count) holds a raw pointer ("No deep copies are made"): the arrays stay
  referenced until the refit returned; "Unset weights before releasing them" (unset_named_weights).
- refit_cuda_engine_async(stream): "The behavior is undefined if the engine has pending enqueued work on
  a different stream" -- vidrt enqueues every engine on the backend's one stream, and refits on it;
  host weights "can be unset and released ... after refit_cuda_engine_async returns". "If False is
  returned, a subset of weights may have been refitted": the next apply then resets everything it set.
- "IExecutionContexts associated with the engine remain valid for use afterwards": contexts are kept;
  CUDA graphs captured before are dropped by the caller (they replay what they captured).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
from vidrt.errors import DeviceError, UsageError, arg, command_or
from vidrt.lora.merge import bf16_to_f32, f32_to_bf16

if TYPE_CHECKING:
    import tensorrt as trt

# IRefitter::setMaxThreads: "The default value is 1 ... A value greater than 1 permits TensorRT to use
# multi-threaded algorithms"; trtexec's refitFromOnnx / timeRefit use 10 (samples/common/sampleEngines.cpp).
MAX_THREADS = 10
MISSING_ROUNDS = 4  # supplying a missing weight may reveal another one combined with it


def rebuild_fix(rebuild: str, label: str = "rebuild it", bake: bool = False) -> str:
    """The fix for a plan that must be rebuilt (or a LoRA baked in: `bake`): `LABEL: vidrt build ...` where
    the caller has the CLI (vidrt.errors.commands_shown); for a server's client, the operator's part in words
    (no command, no flag, no server path)."""
    tail = ", or bake the LoRA in: vidrt export --lora FILE, then vidrt build" if bake else ""
    return command_or(f"{label}: {rebuild}{tail}", "the server's operator must rebuild it"
                      + (" or bake the LoRA in" if bake else ""))


def not_refittable(name: str, rebuild: str, why: str = "was built without refit") -> UsageError:
    """The one-line refusal for a LoRA asked of a plan that cannot be refitted."""
    return UsageError(f"LoRAs at load time need a refittable TensorRT plan, and the {name} plan {why}; "
                      + command_or(f"rebuild it (refittable by default): {rebuild}, or bake the LoRA in: vidrt "
                                   "export --lora FILE, then vidrt build", f"leave {arg('lora')} out (the server's "
                                   "operator can rebuild it refittable or bake the LoRA in)"))


def _dtype_name(trt_dtype: Any) -> str:
    return str(getattr(trt_dtype, "name", trt_dtype)).rsplit(".", 1)[-1]


def as_prototype(array: np.ndarray, trt_dtype: Any) -> np.ndarray:
    """A merged or base array (vidrt.lora: float32, float16, or bfloat16 as its uint16 bits) as the
    contiguous bytes of the TensorRT dtype the plan was built with. DeviceError for anything else."""
    want = _dtype_name(trt_dtype)
    have = np.asarray(array)
    if want == "BF16":
        out = have if have.dtype == np.uint16 else f32_to_bf16(have.astype(np.float32))
    elif want in ("FLOAT", "HALF"):
        wide = bf16_to_f32(have) if have.dtype == np.uint16 else have
        if wide.dtype.kind != "f":
            raise DeviceError(f"cannot refit {want} weights from {have.dtype} data")
        out = wide.astype(np.float32 if want == "FLOAT" else np.float16, copy=False)
    else:
        raise DeviceError(f"cannot refit {want} weights (quantised plan?); "
                          + command_or("bake the LoRA: vidrt export --lora FILE",
                                       f"leave {arg('lora')} out (the server's operator can bake the LoRA in)"))
    return np.ascontiguousarray(out)


class EngineRefit:
    """Which weights of one open engine differ from the base now, and how to change them.

    base(initializer) -> the stored base array (vidrt.lora.base_reader over the package's DiT data file);
    KeyError for a name the package does not record."""

    def __init__(self, trt_mod: ModuleType, logger: trt.ILogger, name: str, base: Callable[[str], np.ndarray],
                 rebuild: str, whole: bool = True) -> None:
        self._trt, self._logger, self.name, self._base, self._rebuild = trt_mod, logger, name, base, rebuild
        self.whole = whole  # the whole DiT graph (every recorded weight is in it), not a step-caching piece
        self.changed: set[str] = set()  # weights whose engine value is not the base value now
        self.last_bytes = 0  # bytes of weights it set

    def apply(self, engine: trt.ICudaEngine, merged: Mapping[str, np.ndarray], stream: int) -> int:
        """Refit so the engine holds `merged` (initializer -> array) over the base weights. Returns the
        number of weights set. UsageError: the plan is not refittable; DeviceError: TensorRT refused."""
        if not engine.refittable:  # ICudaEngine::isRefittable
            raise not_refittable(self.name, self._rebuild, "is not refittable (ICudaEngine.refittable is False)")
        refitter: trt.Refitter = self._trt.Refitter(engine, self._logger)
        refitter.max_threads = min(MAX_THREADS, os.cpu_count() or 1)
        refittable = set(refitter.get_all_weights())
        target = {n: a for n, a in merged.items() if n in refittable}
        if self.whole and len(target) < len(merged):
            lost = sorted(set(merged) - refittable)
            raise DeviceError(f"the {self.name} plan cannot refit {len(lost)} weight(s) the LoRA changes "
                              f"(e.g. {lost[0]}); {rebuild_fix(self._rebuild)}")
        todo: dict[str, np.ndarray | None] = {n: None for n in self.changed - set(target)}  # back to base
        todo.update(target)
        if not todo:
            self.last_bytes = 0
            return 0
        kept: dict[str, np.ndarray] = {}  # alive until the refit returned (trt.Weights keeps a raw pointer)
        for n, value in todo.items():
            self._set(refitter, n, value, kept)
        for _ in range(MISSING_ROUNDS):  # combined with a weight set above: supply its current (base) value
            missing = [m for m in refitter.get_missing_weights() if m not in kept]
            if not missing:
                break
            for m in missing:
                self._set(refitter, m, None, kept)
        if refitter.get_missing_weights():
            still = [m or "(unnamed)" for m in refitter.get_missing_weights()]
            self._failed(kept)
            raise DeviceError(f"TensorRT still misses {len(still)} weight(s) of the {self.name} plan for the refit "
                              f"(e.g. {still[0]}); {rebuild_fix(self._rebuild)}")
        async_refit = getattr(refitter, "refit_cuda_engine_async", None)
        ok = bool(async_refit(stream)) if async_refit is not None else bool(refitter.refit_cuda_engine())
        for n in kept:
            refitter.unset_named_weights(n)
        if not ok:
            self._failed(kept)
            raise DeviceError(f"TensorRT could not refit the {self.name} plan"
                              + command_or(" (see the TensorRT log above)", "") + "; "
                              + rebuild_fix(self._rebuild, bake=True))
        self.changed = set(target)
        self.last_bytes = sum(a.nbytes for a in kept.values())
        return len(kept)

    def _failed(self, kept: Mapping[str, np.ndarray]) -> None:
        # "a subset of weights may have been refitted": every weight this apply touched may now differ
        self.changed |= set(kept)

    def _set(self, refitter: trt.Refitter, name: str, value: np.ndarray | None,
             kept: dict[str, np.ndarray]) -> None:
        if not name:
            raise DeviceError(f"TensorRT asks for an unnamed weight to refit the {self.name} plan; "
                              f"{rebuild_fix(self._rebuild)}")
        if value is None:
            try:
                value = self._base(name)
            except KeyError:
                raise DeviceError(f"the {self.name} plan needs weight {name} for the refit, which the package "
                                  "does not record; " + command_or("bake the LoRA: vidrt export --lora FILE, then "
                                                                   "vidrt build", "the server's operator can bake the "
                                                                   "LoRA in")) from None
        proto: trt.Weights = refitter.get_weights_prototype(name)
        array = as_prototype(value, proto.dtype)
        if int(proto.size) != array.size:
            raise DeviceError(f"the {self.name} plan's weight {name} has {int(proto.size)} values, the package "
                              f"{array.size}; the plan was built from another export; {rebuild_fix(self._rebuild)}")
        weights = self._trt.Weights(proto.dtype, int(array.ctypes.data), int(array.size))
        kept[name] = array
        if not refitter.set_named_weights(name, weights, self._trt.TensorLocation.HOST):
            raise DeviceError(f"TensorRT refused weight {name} for the {self.name} plan"
                              + command_or(" (see its log above)", "") + f"; {rebuild_fix(self._rebuild)}")


__all__ = ["EngineRefit", "MAX_THREADS", "as_prototype", "not_refittable", "rebuild_fix"]
