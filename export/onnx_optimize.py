"""Graph clean-up after tracing: what torch's `ONNXProgram.optimize()` does (onnxscript's
`optimize_ir`, then its ONNX fusions), minus rewrite rules whose matcher is quadratic in graph size.

Why: onnxscript's multi-output-node rules (today only `SlicesSplit`, two Slices -> one Split) are
matched by listing every node of the graph for every candidate node (onnxscript 0.7,
`rewriter/_matcher.py`, "potentially expensive"). On the 30-block Wan2.1-1.3B DiT (~15k nodes) that
one rule was 329 of the export's 480 s on 2 cores; on a 40-block 14B DiT it grows with the square.
It does not fire on the Wan graphs: `tests/test_export.py` checks that this function gives the same
graph as torch's own `optimize()` on the tiny DiT, umT5 and VAE graphs, so a change in onnxscript
that breaks the equivalence is caught there.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript import rewriter
from onnxscript.optimizer import _constant_folding
from onnxscript.rewriter import onnx_fusions


def cheap_rules() -> list[Any]:
    """onnxscript's default rewrite rules that match one output node (linear-time matching)."""
    return [r for r in rewriter._DEFAULT_REWRITE_RULES if r._target_pattern.has_single_output_node]


def optimize_model(model: ir.Model, num_iterations: int = 2, dedupe_initializers: bool = True) -> None:
    """In place: inline, fold constants + rewrite (to a fixed point, at most `num_iterations`), drop
    unused nodes/functions/opsets, lift constants, dedupe initializers, CSE, name fixes, ONNX fusions
    (the pass list of onnxscript.optimizer.optimize_ir with `cheap_rules()`).

    dedupe_initializers=False keeps one initializer per model parameter even where two hold the same
    values (DeduplicateInitializersPass would give both modules one shared tensor): a LoRA merged by
    initializer name must change one module's weight, not every module whose weights happened to be
    equal (the bundled model's zero, frozen text-path biases were ten modules on one initializer)."""
    loop = ir.passes.PassManager(
        [_constant_folding.FoldConstantsPass(
            shape_inference=True, input_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
            output_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT,
            should_fold=lambda node: None),
         rewriter.RewritePass(cheap_rules()),
         common_passes.RemoveUnusedNodesPass(), common_passes.RemoveUnusedFunctionsPass(),
         common_passes.RemoveUnusedOpsetsPass()],
        steps=num_iterations, early_stop=True)
    passes = ir.passes.Sequential(
        common_passes.InlinePass(), loop, common_passes.RemoveUnusedNodesPass(),
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common_passes.LiftSubgraphInitializersToMainGraphPass(),
        *([common_passes.DeduplicateInitializersPass()] if dedupe_initializers else []),
        common_passes.CommonSubexpressionEliminationPass(), common_passes.OutputFixPass(),
        common_passes.NameFixPass())
    passes(model)
    onnx_fusions.fuse(model)


# ---- Conv3d -> Conv2d ---------------------------------------------------------------------------
#
# ONNX Runtime's CPU Conv on 5-D tensors is a generic im2col + GEMM; its 2-D Conv goes through MLAS's
# NCHWc kernels. A Conv3d with time stride 1 is a sum of kt Conv2ds over shifted frames:
# out[t] = sum_k conv2d(x[t + k], w[:, :, k]) + bias, every frame of the batch in the Conv2d's batch
# dimension. Three ways to write that sum, on the bundled model's decoder shapes (ORT 1.32, 1 thread,
# AVX-512, ms of CPU time, best of 50, transposes included; `python -m benchmarks.conv3d_as_conv2d
# --variants`):
#   weight [Co,Ci,3,3,3], input [1,Ci,T,H,W]  Conv3d  kt Conv2ds  taps on Co (1 Conv2d)  taps on Ci (1 Conv2d)
#   8->8,   [1,8,6,64,64]                      1.64    1.45       1.32                   1.74
#   8->3,   [1,8,6,64,64]                      1.35    1.58       0.81                   1.64
#   16->16, [1,16,6,32,32]                     1.08    0.66       0.77                   0.69
#   32->32, [1,32,4,16,16]                     0.44    0.25       0.42                   0.25
#   32->32, [1,32,3,8,8]                       0.086   0.045      0.092                  0.041
# kt separate Conv2ds do exactly the Conv3d's FLOPs and keep its channel counts. Taps on Ci (one Conv2d
# over the frames concatenated on channels) is as fast where Ci is a multiple of 16 but falls off MLAS's
# NCHWc path where it is not (24 = 3 x 8 channels); in the whole step graphs it was no faster (taps on
# Ci vs kt Conv2ds: tiny decoder step 17.0 vs 17.2 ms, Wan2.1 decoder step at 64x64 px 1140 vs 1043 ms).
# Taps on Co computes every tap for all T input frames, T / (T - kt + 1) times the FLOPs (3x for a
# 1-frame step), and wins only where Co is far below MLAS's 16-channel block (the 3-channel conv_out).
# So: kt Conv2ds, summed with Add. (NCHWc: onnxruntime core/optimizer/nchwc_transformer.cc, TransformConv
# takes Ci < block as plain NCHW input and leaves a Conv with Ci >= block, Ci % block != 0, unconverted;
# it pads Co up to the block.)
# Measured whole graphs (benchmarks/conv3d_as_conv2d.py): the gain is in the convs with >= 16 channels;
# the bundled decoder spends most of its time in 8-channel convs at 64x64, which gain little.
# Memory: the rewritten graphs hold more activations at once (the frames transposed, each tap's slice,
# the NCHWc outputs padded to 16 channels): the bundled decoder step at 256x256 px, ORT arena off, peak
# RSS of one call 92 -> 145 MiB with glibc's mmap threshold pinned (MALLOC_MMAP_THRESHOLD_=131072; 137
# -> 363 MiB without it: more, smaller intermediates fragment the heap). vae_decode.ACTIVATION_SLOTS
# (48) was measured on the Conv3d graphs and undercounts these on ONNX Runtime CPU.
#
# TensorRT reads the same files. Every op the rewrite emits (Transpose, Squeeze, Unsqueeze with constant
# axes, Slice, Reshape, Shape, Concat, Pad, Conv, Add) is in onnx-tensorrt's supported-operator list
# (onnx/onnx-tensorrt docs/operators.md, TensorRT 10.15), which lists Conv itself without a 2-D/3-D
# restriction (older versions of that table: "2D or 3D convolutions only"), so TensorRT parsed the Conv3d
# graphs too. Which form is faster on a GPU is not measured; export_vae_decoder/encoder(conv2d=False)
# keeps the Conv3ds.
#
# Not applied to the DiT's patch embedding (Conv3d (1,2,2) stride (1,2,2)): one conv per DiT call, and
# LoRAs address the DiT's initializers by name (a rewrite would rename patch_embedding.weight).

_INT64_MAX = 2**63 - 1


def _int_attr(node: ir.Node, name: str, default: Any) -> Any:
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _const(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name), shape=ir.Shape(array.shape),
                     type=ir.TensorType(ir.DataType.from_numpy(array.dtype)))
    graph.register_initializer(value)
    return value


def _time_taps(node: ir.Node, kt: int, t_in: int | None) -> tuple[list[tuple[int, int, int]], tuple[int, int]] | None:
    """The taps that read real frames: (k, first input frame, end frame) each, and the time padding still
    to apply with a Pad op. With a static frame count, a tap that reads only padding (the causal convs
    of the 1-frame `first` graphs: pads (2, 0), kt 3) is dropped, and no Pad is needed when every other
    tap reads only real frames. None: nothing to rewrite (every tap reads padding)."""
    pads = list(_int_attr(node, "pads", [0] * 6))
    before, after = pads[0], pads[3]
    if t_in is not None:
        t_out = t_in + before + after - kt + 1
        spans = [(k, k - before, k - before + t_out) for k in range(kt)]
        if all(lo >= 0 and hi <= t_in or hi <= 0 or lo >= t_in for _, lo, hi in spans):
            real = [(k, lo, _INT64_MAX if (lo, hi) == (0, t_in) else hi)  # the whole input: no Slice
                    for k, lo, hi in spans if lo >= 0 and hi <= t_in]
            return (real, (0, 0)) if real else None
    # dynamic (or partly padded) frames: Pad first, then tap k reads frames k .. T - (kt - 1 - k)
    return [(k, k, k - (kt - 1) or _INT64_MAX) for k in range(kt)], (before, after)


def conv3d_as_conv2d(model: ir.Model) -> int:
    """In place: every Conv with a constant 5-D weight [Co, Ci, kt, kh, kw], group 1, time stride 1 and
    time dilation 1 becomes kt Conv2ds over the frames folded into the batch:
    x [N, C, T, H, W] -> Transpose [N, T, C, H, W] -> (Slice frames k .. k+T', Reshape [N*T', C, H, W],
    Conv2d w[:, :, k] (+ bias once)) summed over k -> Reshape [N, T', Co, H', W'] -> Transpose
    [N, Co, T', H', W']. H/W strides, pads and dilations are kept; shapes stay dynamic (Shape ops).
    Other Conv3ds (time stride 2 in the encoder's temporal downsampling) are left as they are.
    Returns the number of Convs rewritten."""
    graph = model.graph
    rewritten = 0
    for node in list(graph):
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
            continue
        x, w_value = node.inputs[0], node.inputs[1]
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if x is None or w_value is None or w_value.const_value is None or len(w_value.const_value.shape) != 5:
            continue
        strides = list(_int_attr(node, "strides", [1, 1, 1]))
        dilations = list(_int_attr(node, "dilations", [1, 1, 1]))
        if _int_attr(node, "group", 1) != 1 or _int_attr(node, "auto_pad", "NOTSET") != "NOTSET" \
                or strides[0] != 1 or dilations[0] != 1:
            continue
        w = w_value.const_value.numpy()
        kt = w.shape[2]
        t_in = x.shape[2] if x.shape is not None and isinstance(x.shape[2], int) else None
        plan = _time_taps(node, kt, t_in)
        if plan is None:
            continue
        t_out = node.outputs[0].shape[2] if node.outputs[0].shape is not None else None
        _replace_conv(graph, node, w, bias, plan, strides, dilations, t_out if isinstance(t_out, int) else None)
        if not w_value.uses() and w_value.name in graph.initializers:
            graph.initializers.pop(w_value.name)
        rewritten += 1
    return rewritten


def _replace_conv(graph: ir.Graph, node: ir.Node, w: np.ndarray, bias: ir.Value | None,
                  plan: tuple[list[tuple[int, int, int]], tuple[int, int]], strides: list[int],
                  dilations: list[int], t_out: int | None) -> None:
    """Replace `node` by its taps' Conv2ds (see conv3d_as_conv2d). The frames reach the Conv2d's batch
    dimension the cheapest way the static shapes allow (ORT's per-op cost is ~10 us, so ops count):
    one output frame: Slice + Squeeze the time axis, no transposes; batch 1: Squeeze + Transpose to
    [T, C, H, W]; otherwise Transpose to [N, T, C, H, W] and Reshape to [N*T, C, H, W] (Shape ops)."""
    taps, (pad_before, pad_after) = plan
    pads = list(_int_attr(node, "pads", [0] * 6))
    name = node.name or f"conv3d_{id(node)}"
    new: list[ir.Node] = []

    def op(op_type: str, inputs: list[ir.Value | None], **attrs: Any) -> ir.Value:
        n = ir.node(op_type, inputs, attrs, name=f"{name}/{op_type}_{len(new)}")
        new.append(n)
        return n.outputs[0]

    def const(suffix: str, values: Any, dtype: Any = np.int64) -> ir.Value:
        return _const(graph, f"{name}/{suffix}", np.asarray(values, dtype=dtype))

    src = node.inputs[0]
    assert src is not None
    batch1 = src.shape is not None and src.shape[0] == 1
    if pad_before or pad_after:
        src = op("Pad", [src, const("time_pads", [0, 0, pad_before, 0, 0, 0, 0, pad_after, 0, 0])])
    if t_out == 1:  # [N, C, T, H, W] -> per tap [N, C, H, W]
        frames, axis = src, 2
        taps = [(k, start, _INT64_MAX if (start, end) == (0, _INT64_MAX) else start + 1) for k, start, end in taps]
    elif batch1:  # -> [T, C, H, W]
        frames, axis = op("Transpose", [op("Squeeze", [src, const("axis0", [0])])], perm=[1, 0, 2, 3]), 0
    else:  # -> [N, T, C, H, W]; each tap's frames Reshape to [N*T', C, H, W]
        frames, axis = op("Transpose", [src], perm=[0, 2, 1, 3, 4]), 1
        batch_shape = op("Concat", [const("minus_one", [-1]), op("Shape", [frames], start=2)], axis=0)
    time_axis = const("time_axis", [axis])
    # The Conv2d/Add outputs' shapes, with the Conv3d output's symbolic H/W names: ORT's NCHWc transformer
    # fuses an Add into the Conv2d before it (its `Sum` input: the accumulation in place, no separate
    # Add pass over memory) only where it can show both addends have the same shape, and ONNX shape
    # inference leaves a Conv's symbolic H/W unnamed (onnxruntime core/optimizer/nchwc_transformer.cc,
    # TransformBinary).
    old_shape = node.outputs[0].shape
    shape4 = None
    if old_shape is not None and t_out is not None and (t_out == 1 or batch1):
        n4 = old_shape[0] if t_out == 1 else t_out
        shape4 = ir.Shape([n4, old_shape[1], old_shape[3], old_shape[4]])
    conv_attrs = dict(kernel_shape=list(w.shape[3:]), strides=strides[1:], dilations=dilations[1:],
                      pads=[pads[1], pads[2], pads[4], pads[5]], group=1)
    total = first_piece = None
    for i, (k, start, end) in enumerate(taps):
        piece = frames if (start, end) == (0, _INT64_MAX) else \
            op("Slice", [frames, const(f"start{k}", [start]), const(f"end{k}", [end]), time_axis])
        first_piece = piece if first_piece is None else first_piece
        x4 = op("Squeeze", [piece, time_axis]) if t_out == 1 else piece if batch1 \
            else op("Reshape", [piece, batch_shape])
        weight = const(f"weight_tap{k}", np.ascontiguousarray(w[:, :, k]), w.dtype)
        y = op("Conv", [x4, weight, *([bias] if bias is not None and i == 0 else [])], **conv_attrs)
        total = y if total is None else op("Add", [total, y])
        y.shape = total.shape = shape4
        y.type = total.type = node.outputs[0].type
    assert total is not None and first_piece is not None
    if t_out == 1:
        out = op("Unsqueeze", [total, time_axis])
    elif batch1:
        out = op("Unsqueeze", [op("Transpose", [total], perm=[1, 0, 2, 3]), time_axis])
    else:
        out_shape = op("Concat", [op("Shape", [first_piece], start=0, end=2), op("Shape", [total], start=1)], axis=0)
        out = op("Transpose", [op("Reshape", [total, out_shape])], perm=[0, 2, 1, 3, 4])  # [N, Co, T', H', W']
    old = node.outputs[0]
    out.shape, out.type = old.shape, old.type
    graph.insert_before(node, new)
    ir.convenience.replace_all_uses_with(old, out)
    for i, v in enumerate(graph.outputs):
        if v is old:
            graph.outputs[i] = out
    out_name = old.name
    graph.remove(node, safe=True)
    out.name = out_name
