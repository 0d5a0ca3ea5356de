"""The causal VAE's Conv3ds exported as Conv2ds (vidrt.export.onnx_optimize.conv3d_as_conv2d) vs ONNX
Conv3d, on ONNX Runtime's CPU provider: per graph call and per clip (the runtime's streamed decoder,
vidrt.vae_decode, untiled), both exports of the same VAE timed in one run, A/B interleaved.

    nice -n 10 .venv/bin/python -m benchmarks.conv3d_as_conv2d                       # the bundled model's VAE
    nice -n 10 .venv/bin/python -m benchmarks.conv3d_as_conv2d --wan21 --size 128x128 --frames 5
    nice -n 10 .venv/bin/python -m benchmarks.conv3d_as_conv2d --variants            # one conv, 5 forms

--wan21: the real Wan2.1 VAE architecture (diffusers AutoencoderKLWan defaults, base dim 96, z 16)
with random weights. The "pairs" row (a VAE with 8-channel convs, like the bundled one's): the step
graph's AVX-512 form, its narrow convs as frame pairs (onnx_optimize). --variants: the tables in
onnx_optimize.py (one Conv3d vs kt Conv2ds vs the taps stacked on the output or input channels vs frame
pairs folded into the channels, on the bundled decoder's shapes). Times are the minimum over --repeats
runs of the calling thread's CPU time (threads 1, the default) or of the wall clock.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _clock(threads: int) -> Callable[[], float]:
    """With 1 thread ONNX Runtime runs every kernel on the calling thread, so that thread's CPU time is
    the work done, without the time the 2 shared cores gave to other processes (wall-clock minima
    moved by 2x between runs on a loaded machine, CPU time by ~2%). More threads: wall clock."""
    return time.thread_time if threads == 1 else time.perf_counter


def _best(fn: Callable[[], Any], repeats: int, clock: Callable[[], float] = time.perf_counter) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = clock()
        fn()
        times.append(clock() - t)
    return min(times)


def _vae_and_spec(wan21: bool) -> tuple[Any, Any]:
    if wan21:
        import torch
        from diffusers import AutoencoderKLWan
        from vidrt.package.registry import VARIANTS

        torch.manual_seed(0)
        return AutoencoderKLWan().eval(), VARIANTS["wan2.1-t2v-1.3b"]
    from vidrt.export.checkpoints import open_checkpoint

    ckpt = open_checkpoint(ROOT / "checkpoints" / "tiny-shapes")
    return ckpt.vae(), ckpt.spec


def vae_ab(wan21: bool, width: int, height: int, frames: int, threads: int, repeats: int) -> None:
    from vidrt.backends.base import BackendOptions
    from vidrt.backends.ort import OrtEngine
    from vidrt.export.onnx_export import export_vae_decoder
    from vidrt.package.contracts import cache_in, resolve_shape
    from vidrt.vae_decode import decode, untiled_plan

    vae, spec = _vae_and_spec(wan21)
    z, st, sh, sw = spec.vae.z_dim, *spec.vae.stride
    lat_f, lat_h, lat_w = (frames - 1) // st + 1, height // sh, width // sw
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((z, lat_f, lat_h, lat_w)).astype(np.float32)
    options = BackendOptions(threads=threads)
    with tempfile.TemporaryDirectory() as tmp:
        engines = {}
        for label, conv2d in (("Conv3d", False), ("Conv2d", True)):
            t = time.perf_counter()
            pairs = Path(tmp) / "pairs_step.onnx" if conv2d else None  # the AVX-512 form, if the VAE has one
            first_c, step_c = export_vae_decoder(vae, Path(tmp) / f"{label}_first.onnx",
                                                 Path(tmp) / f"{label}_step.onnx", spec, conv2d=conv2d,
                                                 step_avx512_path=pairs)
            print(f"exported {label} in {time.perf_counter() - t:.0f} s", flush=True)
            engines[label] = (OrtEngine("first", Path(tmp) / f"{label}_first.onnx", first_c, options),
                              OrtEngine("step", Path(tmp) / f"{label}_step.onnx", step_c, options))
            if pairs is not None and pairs.exists():  # same first graph; step with frame pairs
                engines["pairs"] = (engines[label][0], OrtEngine("step", pairs, step_c, options))
        sizes = {"lat_h": lat_h, "lat_w": lat_w}
        step_feeds = {t.name: rng.standard_normal(resolve_shape(t.shape, sizes)).astype(np.float32) * 0.5
                      for t in step_c.inputs}
        first_feeds = {n: step_feeds[n][:, :, :1] for n in first_c.input_names}
        assert all(cache_in(i) in step_feeds for i in range(len(step_c.inputs) - 1))
        plan = untiled_plan(lat_h, lat_w, scale=sh)
        norm = dict(mean=spec.vae.latents_mean, std=spec.vae.latents_std)
        rows: dict[str, dict[str, float]] = {k: {} for k in engines}
        clock = _clock(threads)
        clips = {}
        for _ in range(2):  # A, B, A, B: a load change on the shared machine hits both
            for label, (first, step) in engines.items():
                r = rows[label]
                r["first"] = min(r.get("first", 1e9), _best(partial(first.run, first_feeds), repeats, clock))
                r["step"] = min(r.get("step", 1e9), _best(partial(step.run, step_feeds), repeats, clock))
                r["clip"] = min(r.get("clip", 1e9), _best(partial(decode, latents, first, step, plan, **norm),
                                                        max(1, repeats // 4), clock))
                clips[label] = decode(latents, first, step, plan, **norm)
    name = "Wan2.1 VAE (random weights)" if wan21 else "bundled tiny-shapes VAE"
    print(f"{name}, decode {width}x{height}, {frames} frames = 1 first + {lat_f - 1} step calls, "
          f"ORT {threads} thread(s), best of {repeats}, {'CPU' if threads == 1 else 'wall'} time:")
    for label, r in rows.items():
        print(f"  {label:7s} first {r['first'] * 1e3:8.2f} ms   step {r['step'] * 1e3:8.2f} ms   "
              f"clip {r['clip'] * 1e3:8.2f} ms")
    a = rows["Conv3d"]
    for label in [k for k in rows if k != "Conv3d"]:
        b = rows[label]
        print(f"  {label} vs Conv3d: first {a['first'] / b['first']:.2f}x, step {a['step'] / b['step']:.2f}x, "
              f"clip {a['clip'] / b['clip']:.2f}x; max |frames difference| "
              f"{float(np.abs(clips['Conv3d'] - clips[label]).max()):.1e}")


# ---- one conv, five forms (the tables in onnx_optimize.py) ---------------------------------------

VARIANT_SHAPES = [((8, 8, 3, 3, 3), (1, 8, 6, 64, 64)), ((3, 8, 3, 3, 3), (1, 8, 6, 64, 64)),
                  ((8, 16, 3, 3, 3), (1, 16, 6, 64, 64)), ((16, 8, 3, 3, 3), (1, 8, 6, 64, 64)),
                  ((16, 16, 3, 3, 3), (1, 16, 6, 32, 32)), ((32, 32, 3, 3, 3), (1, 32, 4, 16, 16)),
                  ((32, 32, 3, 3, 3), (1, 32, 3, 8, 8))]


def _variant_models(w: np.ndarray, b: np.ndarray, x_shape: tuple[int, ...]) -> dict[str, Any]:
    """Single-conv graphs, input x [1, Ci, T, H, W] (spatial pads 1, no time pads) -> y [1, Co, T', H, W]."""
    from onnx import TensorProto, helper, numpy_helper

    co, ci, kt, kh, kw = w.shape
    end = [k - (kt - 1) or 2**62 for k in range(kt)]

    def model(nodes: list[Any], inits: dict[str, Any]) -> Any:
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])

    N = helper.make_node
    base = {"ax0": [0], "ax1": [1], "b": b, **{f"s{k}": [k] for k in range(kt)},
            **{f"e{k}": [end[k]] for k in range(kt)}}
    # [1, C, T, H, W] -> xt [T, C, H, W]; slices sl{k} = frames k .. k + T'
    head = [N("Squeeze", ["x", "ax0"], ["x4"]), N("Transpose", ["x4"], ["xt"], perm=[1, 0, 2, 3]),
            *(N("Slice", ["xt", f"s{k}", f"e{k}", "ax0"], [f"sl{k}"]) for k in range(kt))]
    tail = [N("Transpose", ["yt"], ["y4"], perm=[1, 0, 2, 3]), N("Unsqueeze", ["y4", "ax0"], ["y"])]
    conv3d = model([N("Conv", ["x", "w", "b"], ["y"], pads=[0, 1, 1, 0, 1, 1])], {"w": w, "b": b})
    separate = model(head + [N("Conv", [f"sl{k}", f"w{k}"] + (["b"] if k == 0 else []), [f"c{k}"], pads=[1, 1, 1, 1])
                             for k in range(kt)]
                     + [N("Sum", [f"c{k}" for k in range(kt)], ["yt"])] + tail,
                     {**base, **{f"w{k}": np.ascontiguousarray(w[:, :, k]) for k in range(kt)}})
    on_ci = model(head + [N("Concat", [f"sl{k}" for k in range(kt)], ["cat"], axis=1),
                          N("Conv", ["cat", "wc", "b"], ["yt"], pads=[1, 1, 1, 1])] + tail,
                  {**base, "wc": w.transpose(0, 2, 1, 3, 4).reshape(co, kt * ci, kh, kw)})
    # taps on Co: one Conv2d over all T frames -> [T, kt*Co, H, W]; out[t] = sum_k Y[t + k, k] + b
    on_co = model(head[:2] + [N("Conv", ["xt", "wo"], ["Y"], pads=[1, 1, 1, 1]),
                              *(N("Slice", ["Y", f"st{k}", f"en{k}", "ax01"], [f"p{k}"]) for k in range(kt)),
                              N("Sum", [f"p{k}" for k in range(kt)] + ["b4"], ["yt"])] + tail,
                  {**base, "wo": w.transpose(2, 0, 1, 3, 4).reshape(kt * co, ci, kh, kw), "ax01": [0, 1],
                   "b4": b.reshape(1, co, 1, 1), **{f"st{k}": [k, k * co] for k in range(kt)},
                   **{f"en{k}": [end[k], (k + 1) * co] for k in range(kt)}})
    forms = {"Conv3d": conv3d, "kt Conv2ds": separate, "taps on Co": on_co, "taps on Ci": on_ci}
    t, h, w_ = x_shape[2:]
    if kt % 2 and t % 2 == 0:  # frame pairs (onnx_optimize._replace_conv_frame_pairs): xt [T, Ci, H, W] seen
        # as [T/2, 2Ci, H, W]; pair tap m reads pairs m .. m + T'/2; the sum is [T'/2, 2Co, H, W] = [T', Co, H, W]
        from vidrt.export.onnx_optimize import pair_weights

        pairs_out = (t - kt + 1) // 2
        taps = pair_weights(w)
        forms["frame pairs"] = model(
            head[:2] + [N("Reshape", ["xt", "pshape"], ["xp"]),
                        *(N("Slice", ["xp", f"s{m}", f"pe{m}", "ax0"], [f"pp{m}"]) for m in range(len(taps))),
                        *(N("Conv", [f"pp{m}", f"wp{m}"] + (["b2"] if m == 0 else []), [f"q{m}"], pads=[1, 1, 1, 1])
                          for m in range(len(taps))),
                        N("Sum", [f"q{m}" for m in range(len(taps))], ["yp"]),
                        N("Reshape", ["yp", "fshape"], ["yt"])] + tail,
            {**base, "pshape": [t // 2, 2 * ci, h, w_], "fshape": [2 * pairs_out, co, h, w_], "b2": np.tile(b, 2),
             **{f"pe{m}": [m + pairs_out] for m in range(len(taps))}, **{f"wp{m}": v for m, v in enumerate(taps)}})
    return forms


def variants(threads: int, repeats: int) -> None:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.log_severity_level = 3  # the unused constants of the simpler forms
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as vidrt's ORT backend
    rng = np.random.default_rng(0)
    print(f"one conv, ms (best of {repeats}, {threads} thread(s), {'CPU' if threads == 1 else 'wall'} time); "
          f"max |difference| vs Conv3d in brackets")
    for w_shape, x_shape in VARIANT_SHAPES:
        w = (rng.standard_normal(w_shape) / np.sqrt(np.prod(w_shape[1:]))).astype(np.float32)
        b = rng.standard_normal(w_shape[0]).astype(np.float32)
        x = rng.standard_normal(x_shape).astype(np.float32)
        cells, ref = [], None
        for label, m in _variant_models(w, b, x_shape).items():
            s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
            y = s.run(None, {"x": x})[0]
            ref = y if ref is None else ref
            cells.append(f"{label} {_best(partial(s.run, None, {'x': x}), repeats, _clock(threads)) * 1e3:6.3f} "
                         f"[{float(np.abs(y - ref).max()):.0e}]")
        print(f"  w {w_shape} x {x_shape}: " + " | ".join(cells), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wan21", action="store_true", help="the real Wan2.1 VAE architecture, random weights")
    ap.add_argument("--variants", action="store_true", help="one conv in five forms (onnx_optimize.py's tables)")
    ap.add_argument("--size", default="64x64", help="WIDTHxHEIGHT in pixels (default 64x64, the bundled model's)")
    ap.add_argument("--frames", type=int, default=17, help="video frames (default 17 = 5 latent frames)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=20)
    a = ap.parse_args()
    if a.variants:
        variants(a.threads, max(a.repeats, 50))
        return
    width, height = (int(v) for v in a.size.lower().split("x"))
    vae_ab(a.wan21, width, height, a.frames, a.threads, a.repeats)


if __name__ == "__main__":
    main()
