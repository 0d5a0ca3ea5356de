"""vidrt.export.onnx_optimize.conv3d_as_conv2d: a Conv3d with time stride 1 exported as Conv2ds over the
frames computes what ONNX Runtime's own Conv3d computes, on hand-built graphs that reach every path
(time padding kept / dropped / as a Pad, batch 1 / 2, one output frame, 1-tap kernels, H/W stride and
dilation, a dynamic frame count, convs narrower than 16 channels as frame pairs) and on the tiny Wan2.1
VAE's real step graph with random caches; and a wrong rewrite (two taps swapped, the bias dropped, two
pair weights swapped) fails the same comparison. The VAE's parity with
diffusers through the rewritten graphs is tests/test_vae_decode.py / test_vae_encode.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from vidrt.export.onnx_optimize import conv3d_as_conv2d, narrow_frame_pair_convs

# max |difference| allowed, relative to max |output|: float32 sums in another order measure 1e-7 to 4e-7
# on one conv and 2e-6 through the tiny Wan2.1 VAE's whole step graph; two taps of one conv swapped
# measure 0.88 there, one bias dropped 0.14
REL_TOL = 2e-5
# what the rewrite may emit: each is in onnx-tensorrt's supported-operator list (docs/operators.md)
TENSORRT_PARSER_OPS = {"Add", "Concat", "Conv", "Pad", "Reshape", "Shape", "Slice", "Squeeze", "Transpose", "Unsqueeze"}


def _run(model: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    s = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s.run(None, feeds)


def _rel_err(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.abs(x - y).max()) / max(float(np.abs(x).max()), 1e-6) for x, y in zip(a, b, strict=True))


def _conv_model(x_shape: list[Any], w: np.ndarray, bias: bool, **attrs: Any) -> Any:
    """x -> Conv(w, b) -> Relu -> y (the Relu: the conv's output is not the graph output itself)."""
    inits = [numpy_helper.from_array(w, "w")]
    if bias:
        inits.append(numpy_helper.from_array(np.linspace(-1, 1, w.shape[0], dtype=np.float32), "b"))
    nodes = [helper.make_node("Conv", ["x", "w", *(["b"] if bias else [])], ["c"], name="conv", **attrs),
             helper.make_node("Relu", ["c"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _rewritten(proto: Any) -> ir.Model:
    """The graph as onnx_ir, with inferred shapes (the exporter's graphs carry them: a static frame count
    is what lets the rewrite drop taps that read only padding)."""
    return ir.from_proto(onnx.shape_inference.infer_shapes(proto))


CASES = {  # name: (input shape as declared, actual input shape, weight shape, Conv attributes)
    # narrower than 16 channels on one side, batch 1, an even static output frame count: frame pairs
    "narrow, frame pairs": ([1, 8, 6, 6, 7], (1, 8, 6, 6, 7), (8, 8, 3, 3, 3), dict(pads=[0, 1, 1, 0, 1, 1])),
    "narrow output, frame pairs": ([1, 16, 4, 5, 6], (1, 16, 4, 5, 6), (3, 16, 3, 3, 3),
                                   dict(pads=[0, 1, 1, 0, 1, 1])),
    "16 channels, taps": ([1, 16, 6, 5, 5], (1, 16, 6, 5, 5), (16, 16, 3, 3, 3), dict(pads=[0, 1, 1, 0, 1, 1])),
    "kt 5, frame pairs": ([1, 4, 8, 5, 6], (1, 4, 8, 5, 6), (4, 4, 5, 3, 3), dict(pads=[0, 1, 1, 0, 1, 1])),
    "kt 5, causal pad, frame pairs": ([1, 4, 4, 5, 6], (1, 4, 4, 5, 6), (4, 4, 5, 3, 3), dict(pads=[4, 1, 1, 0, 1, 1])),
    "causal pad (2, 0), 2 frames, frame pairs": ([1, 4, 2, 5, 6], (1, 4, 2, 5, 6), (4, 4, 3, 3, 3),
                                                 dict(pads=[2, 1, 1, 0, 1, 1])),
    "batch 2, even frames, taps": ([2, 4, 6, 5, 6], (2, 4, 6, 5, 6), (4, 4, 3, 3, 3), dict(pads=[0, 1, 1, 0, 1, 1])),
    "causal pad, 1 frame (drops 2 taps)": ([1, 4, 1, 6, 7], (1, 4, 1, 6, 7), (5, 4, 3, 3, 3),
                                           dict(pads=[2, 1, 1, 0, 1, 1])),
    "cached frames, batch 1": ([1, 4, 6, 6, 7], (1, 4, 6, 6, 7), (5, 4, 3, 3, 3), dict(pads=[0, 1, 1, 0, 1, 1])),
    "one output frame": ([1, 4, 3, 6, 7], (1, 4, 3, 6, 7), (5, 4, 3, 3, 3), dict(pads=[0, 1, 1, 0, 1, 1])),
    "batch 2, H/W stride + dilation": ([2, 4, 5, 9, 8], (2, 4, 5, 9, 8), (3, 4, 3, 3, 3),
                                       dict(pads=[0, 2, 1, 0, 2, 1], strides=[1, 2, 1], dilations=[1, 2, 1])),
    "time pad on both sides (Pad op)": ([1, 4, 4, 6, 6], (1, 4, 4, 6, 6), (5, 4, 3, 3, 3),
                                        dict(pads=[1, 1, 1, 1, 1, 1])),
    "dynamic frames and size": ([1, 4, "t", "h", "w"], (1, 4, 5, 6, 7), (5, 4, 3, 3, 3),
                                dict(pads=[0, 1, 1, 0, 1, 1])),
    "1x1x1": ([1, 4, 3, 6, 7], (1, 4, 3, 6, 7), (6, 4, 1, 1, 1), {}),
    "time-only 3x1x1": ([1, 4, 5, 6, 7], (1, 4, 5, 6, 7), (8, 4, 3, 1, 1), {}),
}


# the cases written as frame pairs (onnx_optimize._replace_conv_frame_pairs); the rest as kt Conv2ds
PAIR_CASES = {"narrow, frame pairs", "narrow output, frame pairs", "cached frames, batch 1",
              "time pad on both sides (Pad op)", "kt 5, frame pairs", "kt 5, causal pad, frame pairs",
              "causal pad (2, 0), 2 frames, frame pairs"}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("frame_pairs", [False, True], ids=["taps", "pairs"])
def test_rewrite_equals_conv3d(case: str, bias: bool, frame_pairs: bool) -> None:
    declared, actual, w_shape, attrs = CASES[case]
    rng = np.random.default_rng(0)
    w = rng.standard_normal(w_shape).astype(np.float32)
    proto = _conv_model(declared, w, bias, **attrs)
    feeds = {"x": rng.standard_normal(actual).astype(np.float32)}
    model = _rewritten(proto)
    assert conv3d_as_conv2d(model, frame_pairs=frame_pairs) == 1
    assert not [n for n in model.graph if n.op_type == "Conv" and len(n.inputs[1].shape) == 5]
    assert {n.op_type for n in model.graph} <= TENSORRT_PARSER_OPS | {"Relu"}
    assert any("weight_pair" in k for k in model.graph.initializers) == (frame_pairs and case in PAIR_CASES)
    err = _rel_err(_run(proto, feeds), _run(model, feeds))
    print(f"{case}: {err:.1e}")
    assert err < REL_TOL


def test_time_strided_and_grouped_conv3d_are_left_alone() -> None:
    w = np.ones((4, 4, 3, 1, 1), np.float32)
    for attrs in (dict(strides=[2, 1, 1]), dict(dilations=[2, 1, 1])):
        model = _rewritten(_conv_model([1, 4, 7, 4, 4], w, True, **attrs))
        assert conv3d_as_conv2d(model) == 0
    model = _rewritten(_conv_model([1, 4, 7, 4, 4], np.ones((4, 2, 3, 1, 1), np.float32), True, group=2))
    assert conv3d_as_conv2d(model) == 0


def _tamper(model: ir.Model, how: str) -> None:
    """Make the rewrite wrong in one place: swap the first and last taps of one conv, or drop its bias,
    or swap the two pair weights of one conv written as frame pairs."""
    if how == "swap pair taps":
        first = next(v for k, v in model.graph.initializers.items() if k.endswith("weight_pair0"))
        second = model.graph.initializers[first.name[:-1] + "1"]
        wa, wb = first.const_value.numpy(), second.const_value.numpy()
        first.const_value, second.const_value = ir.tensor(wb, name=first.name), ir.tensor(wa, name=second.name)
        return
    node = next(n for n in model.graph if n.op_type == "Conv" and n.inputs[1].name.endswith("weight_tap0")
                and n.inputs[1].name[:-1] + "2" in model.graph.initializers and len(n.inputs) > 2)  # 3 taps, a bias
    prefix = node.inputs[1].name[: -len("weight_tap0")]
    if how == "drop bias":
        node.resize_inputs(2)
        return
    taps = sorted((v for k, v in model.graph.initializers.items() if k.startswith(prefix + "weight_tap")),
                  key=lambda v: v.name)
    a, b = taps[0], taps[-1]
    wa, wb = a.const_value.numpy(), b.const_value.numpy()
    a.const_value, b.const_value = ir.tensor(wb, name=a.name), ir.tensor(wa, name=b.name)


@pytest.fixture(scope="module")
def tiny_vae_step(tiny_t2v: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    """The tiny Wan2.1 VAE's decoder step graph exported with ONNX Conv3ds (conv2d=False) + random feeds
    (latent and every 2-frame cache) at a 4x5 latent frame."""
    import copy

    from tiny import TINY_VARIANT
    from vidrt.export.components import nearest_upsampling, vae_graph_specs
    from vidrt.export.onnx_export import export_graph
    from vidrt.package.contracts import resolve_shape
    from vidrt.package.registry import VARIANTS

    out = tmp_path_factory.mktemp("conv3d")
    vae = copy.deepcopy(tiny_t2v.vae).eval()
    with nearest_upsampling(vae):  # as export_vae_decoder, the step graph only
        step = export_graph(vae_graph_specs(vae, VARIANTS[TINY_VARIANT["t2v"]])[1], out / "step.onnx")
    rng = np.random.default_rng(1)
    feeds = {t.name: rng.standard_normal(resolve_shape(t.shape, {"lat_h": 4, "lat_w": 5})).astype(np.float32)
             for t in step.inputs}
    return out / "step.onnx", feeds


@pytest.mark.parametrize("frame_pairs,tamper", [(False, None), (True, None), (False, "swap taps"),
                                               (False, "drop bias"), (True, "swap pair taps")])
def test_tiny_vae_step_graph(tiny_vae_step: tuple[Path, dict[str, np.ndarray]], frame_pairs: bool,
                             tamper: str | None) -> None:
    path, feeds = tiny_vae_step
    model = ir.load(path)
    n = sum(1 for node in model.graph if node.op_type == "Conv" and len(node.inputs[1].shape) == 5)
    if frame_pairs:  # the tiny Wan2.1 VAE (dim 8, tests/tiny.py): 8-channel convs, narrow on both sides
        assert narrow_frame_pair_convs(model) > 0
    assert conv3d_as_conv2d(model, frame_pairs=frame_pairs) == n > 10  # every causal conv (none time-strided)
    assert any("weight_pair" in k for k in model.graph.initializers) == frame_pairs
    if tamper:
        _tamper(model, tamper)
    err = _rel_err(_run(ir.load(path), feeds), _run(model, feeds))
    print(f"{tamper}: max |difference| / max |output| = {err:.1e}")
    if tamper:
        assert err > 100 * REL_TOL, f"{tamper}: {err:.1e}"
    else:
        assert err < REL_TOL
