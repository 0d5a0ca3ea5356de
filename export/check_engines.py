"""`vidrt build --check`: every built engine against ONNX Runtime (CPU) on the same random inputs,
with polygraphy's Comparator (reference/tensorrt_anchors.md §5.3: "use it; do not hand-write
these"). The result goes into the build's report.json.

    report = check_engine(onnx_path, plan_bytes, shapes, precision, val_range)

Tolerances per engine precision, on the *mean* error (`check_error_stat="mean"`: fp16/bf16 outliers
do not fail a correct engine, the trt-onnx-quickstart advice): fp32 1e-3, fp16/bf16 2e-2, fp8 1e-1
(absolute and relative). The reference runs ONNX Runtime's CPU provider; for the full-size DiT that
takes minutes per call, so --check is opt-in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

TOLERANCES = {"fp32": 1e-3, "fp16": 2e-2, "bf16": 2e-2, "fp8": 1e-1}
SEED = 14


def _onnx_runner(path: Path) -> Any:
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    return OnnxrtRunner(SessionFromOnnx(str(path), providers=["cpu"]))


def trt_runner(plan: bytes | memoryview) -> Any:
    """polygraphy's TensorRT runner over a serialised plan (needs TensorRT and the GPU)."""
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    return TrtRunner(EngineFromBytes(bytes(plan)))


def check_engine(onnx_path: Path, runner: Any, shapes: dict[str, tuple[tuple[int, ...], str]], precision: str,
                 val_range: dict[str, tuple[float, float]] | None = None) -> dict[str, Any]:
    """Run `runner` (the engine's; `trt_runner(plan)`) and ONNX Runtime on the ONNX file with the same
    seeded inputs of `shapes` (input -> (shape, numpy dtype name)); compare every output. Returns
    {"passed", "precision", "atol", "rtol", "outputs": {name: {"max_abs", "mean_abs"}}}."""
    import polygraphy.comparator as pc
    from polygraphy.common import TensorMetadata
    from polygraphy.comparator import Comparator, DataLoader

    tol = TOLERANCES[precision]
    meta = TensorMetadata()
    for name, (shape, dtype) in shapes.items():
        meta.add(name, np.dtype(dtype), shape)
    from polygraphy.logger import G_LOGGER

    loader = DataLoader(seed=SEED, iterations=1, input_metadata=meta, val_range=val_range)
    with G_LOGGER.verbosity(G_LOGGER.ERROR):  # polygraphy prints per-output histograms otherwise
        results = Comparator.run([_onnx_runner(onnx_path), runner], data_loader=loader)
        simple = getattr(pc, "SimpleCompareFunc", None) or pc.CompareFunc.simple  # the name changed in 0.5x
        accuracy = Comparator.compare_accuracy(results, compare_func=simple(atol=tol, rtol=tol,
                                                                              check_error_stat="mean"))
    (ref_name, ref), (_, test) = results[0], results[1]
    outputs = {}
    for name, a in ref[0].items():
        b = np.asarray(test[0][name], dtype=np.float64)
        err = np.abs(np.asarray(a, dtype=np.float64) - b)
        outputs[name] = {"max_abs": float(err.max()), "mean_abs": float(err.mean())}
    return {"passed": bool(accuracy), "precision": precision, "atol": tol, "rtol": tol, "reference": ref_name,
            "outputs": outputs}


Shapes = dict[str, tuple[tuple[int, ...], str]]
Ranges = dict[str, tuple[float, float]]


def check_inputs(contract: Any, profile: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]],
                 vocab_size: int) -> tuple[Shapes, Ranges] | None:
    """(input -> (opt shape, dtype), value ranges) for a profile, or None when an input is bfloat16
    (numpy has no bf16: compare those on the GPU with `polygraphy run X.onnx --trt --onnxrt`)."""
    shapes = {}
    for t in contract.inputs:
        if t.dtype == "bfloat16":
            return None
        shapes[t.name] = (tuple(profile[t.name][1]), t.dtype)
    ranges = {"input_ids": (0.0, float(vocab_size - 1)), "attention_mask": (1.0, 1.0), "timestep": (0.0, 999.0)}
    return shapes, {k: v for k, v in ranges.items() if k in shapes}


__all__ = ["TOLERANCES", "check_engine", "check_inputs", "trt_runner"]
