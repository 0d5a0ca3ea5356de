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

from dataclasses import dataclass
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


@dataclass(frozen=True)
class _Conv3d:
    """A Conv node conv3d_as_conv2d can rewrite, and what the rewrite needs."""

    node: ir.Node
    w: np.ndarray  # [Co, Ci, kt, kh, kw]
    bias: ir.Value | None
    plan: tuple[list[tuple[int, int, int]], tuple[int, int]]  # _time_taps
    strides: list[int]
    dilations: list[int]
    t_out: int | None  # static output frame count, or None

    @property
    def frame_pairs(self) -> bool:
        """Writable as frame pairs (see _replace_conv_frame_pairs)."""
        co, ci, kt = self.w.shape[:3]
        x = self.node.inputs[0]
        return (min(co, ci) < NARROW_CHANNELS and kt >= 3 and kt % 2 == 1 and len(self.plan[0]) == kt
                and self.t_out is not None and self.t_out >= 2 and self.t_out % 2 == 0
                and x is not None and x.shape is not None and x.shape[0] == 1)


def _conv3ds(model: ir.Model) -> list[_Conv3d]:
    """Every Conv with a constant 5-D weight, group 1, time stride 1 and time dilation 1, and a tap that
    reads real frames."""
    found = []
    for node in model.graph:
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
            continue
        x, w_value = node.inputs[0], node.inputs[1]
        if x is None or w_value is None or w_value.const_value is None or len(w_value.const_value.shape) != 5:
            continue
        strides = list(_int_attr(node, "strides", [1, 1, 1]))
        dilations = list(_int_attr(node, "dilations", [1, 1, 1]))
        if _int_attr(node, "group", 1) != 1 or _int_attr(node, "auto_pad", "NOTSET") != "NOTSET" \
                or strides[0] != 1 or dilations[0] != 1:
            continue
        w = w_value.const_value.numpy()
        t_in = x.shape[2] if x.shape is not None and isinstance(x.shape[2], int) else None
        plan = _time_taps(node, w.shape[2], t_in)
        if plan is None:
            continue
        t_out = node.outputs[0].shape[2] if node.outputs[0].shape is not None else None
        found.append(_Conv3d(node, w, node.inputs[2] if len(node.inputs) > 2 else None, plan, strides, dilations,
                             t_out if isinstance(t_out, int) else None))
    return found


def conv3d_as_conv2d(model: ir.Model, frame_pairs: bool = False) -> int:
    """In place: every Conv with a constant 5-D weight [Co, Ci, kt, kh, kw], group 1, time stride 1 and
    time dilation 1 becomes kt Conv2ds over the frames folded into the batch:
    x [N, C, T, H, W] -> Transpose [N, T, C, H, W] -> (Slice frames k .. k+T', Reshape [N*T', C, H, W],
    Conv2d w[:, :, k] (+ bias once)) summed over k -> Reshape [N, T', Co, H', W'] -> Transpose
    [N, Co, T', H', W']. H/W strides, pads and dilations are kept; shapes stay dynamic (Shape ops).
    Other Conv3ds (time stride 2 in the encoder's temporal downsampling) are left as they are.
    frame_pairs: convs narrower than NARROW_CHANNELS that fit (_Conv3d.frame_pairs) become Conv2ds over
    frame pairs instead (_replace_conv_frame_pairs: the form for CPUs with AVX-512).
    Returns the number of Convs rewritten."""
    graph = model.graph
    convs = _conv3ds(model)
    for c in convs:
        w_value = c.node.inputs[1]
        assert w_value is not None
        if frame_pairs and c.frame_pairs:
            assert c.t_out is not None
            _replace_conv_frame_pairs(graph, c.node, c.w, c.bias, c.plan, c.strides, c.dilations, c.t_out)
        else:
            _replace_conv(graph, c.node, c.w, c.bias, c.plan, c.strides, c.dilations, c.t_out)
        if not w_value.uses() and w_value.name in graph.initializers:
            graph.initializers.pop(w_value.name)
    return len(convs)


def narrow_frame_pair_convs(model: ir.Model) -> int:
    """How many convs conv3d_as_conv2d(frame_pairs=True) would write as frame pairs that are narrower
    than NARROW_CHANNELS on both sides (where the tap form wastes the most: see the frame-pairs table).
    vidrt.export writes a graph's AVX-512 form only where this is > 0 (the tiny models' 8-channel VAEs;
    no conv of the real Wan VAEs is narrow on both sides)."""
    return sum(1 for c in _conv3ds(model) if c.frame_pairs and max(c.w.shape[:2]) < NARROW_CHANNELS)


class _Replacement:
    """The nodes that replace one Conv node: `op` appends a node and `const` registers an initializer,
    both named after the node; `replace(out)` inserts them and gives `out` the node's output's uses,
    shape, type and name (a graph output stays one)."""

    def __init__(self, graph: ir.Graph, node: ir.Node) -> None:
        self.graph, self.node, self.new = graph, node, []  # type: ignore[var-annotated]
        self.name = node.name or f"conv3d_{id(node)}"

    def op(self, op_type: str, inputs: list[ir.Value | None], **attrs: Any) -> ir.Value:
        n = ir.node(op_type, inputs, attrs, name=f"{self.name}/{op_type}_{len(self.new)}")
        self.new.append(n)
        return n.outputs[0]

    def const(self, suffix: str, values: Any, dtype: Any = np.int64) -> ir.Value:
        return _const(self.graph, f"{self.name}/{suffix}", np.asarray(values, dtype=dtype))

    def replace(self, out: ir.Value) -> None:
        graph, node = self.graph, self.node
        old = node.outputs[0]
        out.shape, out.type = old.shape, old.type
        graph.insert_before(node, self.new)
        ir.convenience.replace_all_uses_with(old, out)
        for i, v in enumerate(graph.outputs):
            if v is old:
                graph.outputs[i] = out
        out_name = old.name
        graph.remove(node, safe=True)
        out.name = out_name


def _replace_conv(graph: ir.Graph, node: ir.Node, w: np.ndarray, bias: ir.Value | None,
                  plan: tuple[list[tuple[int, int, int]], tuple[int, int]], strides: list[int],
                  dilations: list[int], t_out: int | None) -> None:
    """Replace `node` by its taps' Conv2ds (see conv3d_as_conv2d). The frames reach the Conv2d's batch
    dimension the cheapest way the static shapes allow (ORT's per-op cost is ~10 us, so ops count):
    one output frame: Slice + Squeeze the time axis, no transposes; batch 1: Squeeze + Transpose to
    [T, C, H, W]; otherwise Transpose to [N, T, C, H, W] and Reshape to [N*T, C, H, W] (Shape ops)."""
    taps, (pad_before, pad_after) = plan
    pads = list(_int_attr(node, "pads", [0] * 6))
    ops = _Replacement(graph, node)
    op, const = ops.op, ops.const
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
    ops.replace(out)


# ---- narrow convs: two frames per Conv2d --------------------------------------------------------
#
# MLAS's NCHWc Conv kernels work on blocks of 16 channels on AVX-512 (8 on AVX2): a Conv2d with fewer
# than 16 output channels computes 16 and drops the rest, and one with fewer than 16 input channels
# takes the plain-NCHW input path, which does ~35 % less per FLOP here. The bundled model's decoder
# spends ~40 % of a step in such convs (8 channels at 64x64). Folding each pair of frames into the
# channels makes them 16 wide: x [T, C, H, W] is, without a copy, xp [T/2, 2C, H, W] (frames 2p, 2p+1 of
# pair p side by side); output pair j (frames 2j, 2j+1) reads input frames 2j .. 2j+kt, i.e. the
# (kt+1)/2 pairs j .. j+(kt-1)/2, and a 3-tap conv is 2 Conv2ds of [2Co, 2Ci] pair weights:
#   W_m[a*Co:(a+1)*Co, f*Ci:(f+1)*Ci] = w[:, :, 2m + f - a]   (zero where 2m + f - a is not a tap)
# out frame 2j + a = sum over k of w_k * x[2j + a + k]; with k = 2m + f - a that is input frame
# 2(j + m) + f, frame f of pair j + m. A quarter of each pair weight is zero (2 x 16 x 16 multiply-adds
# per output pixel pair, 8 x 8 x 3 x 2 of them useful), but every operand is a full 16-channel block.
# One conv, 1 thread, ms of CPU time, best of 50, input [1, Ci, 6, H, W] (AVX-512; `python -m
# benchmarks.conv3d_as_conv2d --variants`):
#   weight [Co, Ci, 3, 3, 3], H x W         kt Conv2ds   frame pairs
#   [8, 8],   64x64                         1.40         0.66
#   [3, 8],   64x64 (conv_out)              1.31         0.64
#   [8, 16],  64x64                         2.24         1.39
#   [16, 8],  64x64                         1.44         1.20
#   [16, 16], 32x32                         0.48         0.48   (not folded: both sides are full blocks)
# The bundled decoder (`python -m benchmarks.conv3d_as_conv2d`, best of 20, 1 thread, CPU time): step
# call 14.8 -> 11.1 ms, a 17-frame clip's decode 63.4 -> 49.3 ms.
# Applied (conv3d_as_conv2d(frame_pairs=True)) where a conv is narrower than 16 channels on either side,
# its batch is 1, its output frame count is even and static, and every tap reads real frames (the
# decoder/encoder step graphs; the 1-frame `first` graphs keep the tap form).
# Only for CPUs with AVX-512: on AVX2 MLAS's block is 8 channels, an 8->8 conv is already two full
# blocks, and the pair form's zero quarter makes it 4/3 the FLOPs of the tap form (expected slower, not
# measured: no AVX2 CPU here); ARM has no NCHWc kernels; TensorRT's GPU kernels are another matter. So
# vidrt.export writes it as a second file of the same component (manifest Component.cpu_artifacts, key
# "avx512f"), which only ONNX Runtime's CPU provider on a CPU with AVX-512F opens (vidrt.backends.ort).

# MLAS's NCHWc block on AVX-512 (onnxruntime core/mlas/lib/platform.cpp: NchwcBlockSize = 16 where CPUID
# has AVX512F and the OS saves the ZMM state; 8 with AVX2)
NARROW_CHANNELS = 16


def pair_weights(w: np.ndarray) -> list[np.ndarray]:
    """[Co, Ci, kt, kh, kw] -> (kt+1)/2 pair weights [2Co, 2Ci, kh, kw] (see the table above)."""
    co, ci, kt = w.shape[:3]
    out = []
    for m in range((kt + 1) // 2):
        wm = np.zeros((2 * co, 2 * ci, *w.shape[3:]), w.dtype)
        for a in range(2):
            for f in range(2):
                k = 2 * m + f - a
                if 0 <= k < kt:
                    wm[a * co:(a + 1) * co, f * ci:(f + 1) * ci] = w[:, :, k]
        out.append(wm)
    return out


def _replace_conv_frame_pairs(graph: ir.Graph, node: ir.Node, w: np.ndarray, bias: ir.Value | None,
                              plan: tuple[list[tuple[int, int, int]], tuple[int, int]], strides: list[int],
                              dilations: list[int], t_out: int) -> None:
    """Replace `node` (batch 1, an even static output frame count, every tap on real frames) by
    (kt+1)/2 Conv2ds over frame pairs: [1, Ci, T, H, W] -> (Pad) -> Squeeze + Transpose [T, Ci, H, W] ->
    Reshape [T/2, 2Ci, H, W] -> per pair tap m: Slice pairs m .. m + T'/2, Conv2d W_m (+ bias twice, once)
    -> summed -> Reshape [T', Co, H', W'] -> Transpose + Unsqueeze [1, Co, T', H', W']."""
    _, (pad_before, pad_after) = plan
    pads = list(_int_attr(node, "pads", [0] * 6))
    co, ci = w.shape[:2]
    pairs_out = t_out // 2
    ops = _Replacement(graph, node)
    op, const = ops.op, ops.const
    src = node.inputs[0]
    assert src is not None
    if pad_before or pad_after:
        src = op("Pad", [src, const("time_pads", [0, 0, pad_before, 0, 0, 0, 0, pad_after, 0, 0])])
    frames = op("Transpose", [op("Squeeze", [src, const("axis0", [0])])], perm=[1, 0, 2, 3])  # [T, Ci, H, W]
    # a 0 in Reshape's shape copies the input's dim (ONNX Reshape, allowzero=0), so H, W stay symbolic;
    # TensorRT's Shuffle reads it the same way (IShuffleLayer zero_is_placeholder, default true)
    pairs_in = (t_out + w.shape[2] - 1) // 2
    pairs = op("Reshape", [frames, const("pair_shape", [pairs_in, 2 * ci, 0, 0])])  # [T/2, 2Ci, H, W]
    axis0 = const("pair_axis", [0])
    old_shape = node.outputs[0].shape
    shape4 = None if old_shape is None else ir.Shape([pairs_out, 2 * co, old_shape[3], old_shape[4]])
    conv_attrs = dict(kernel_shape=list(w.shape[3:]), strides=strides[1:], dilations=dilations[1:],
                      pads=[pads[1], pads[2], pads[4], pads[5]], group=1)
    bias2 = None
    if bias is not None:
        if bias.const_value is None:
            bias2 = op("Concat", [bias, bias], axis=0)
        else:
            bias2 = const("bias_pair", np.tile(bias.const_value.numpy(), 2), bias.const_value.numpy().dtype)
    total = None
    for m, wm in enumerate(pair_weights(w)):
        piece = op("Slice", [pairs, const(f"pair_start{m}", [m]), const(f"pair_end{m}", [m + pairs_out]), axis0])
        bias_in = [bias2] if bias2 is not None and m == 0 else []
        y = op("Conv", [piece, const(f"weight_pair{m}", wm, w.dtype), *bias_in], **conv_attrs)
        total = y if total is None else op("Add", [total, y])
        y.shape = total.shape = shape4  # named H/W: lets ORT fuse the Add into the Conv (see _replace_conv)
        y.type = total.type = node.outputs[0].type
    assert total is not None
    frames_out = op("Reshape", [total, const("frame_shape", [t_out, co, 0, 0])])  # [T', Co, H', W']
    out = op("Unsqueeze", [op("Transpose", [frames_out], perm=[1, 0, 2, 3]), const("axis0_out", [0])])
    ops.replace(out)

