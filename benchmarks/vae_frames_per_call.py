"""Would a decoder step graph that takes several latent frames per call decode a clip faster on ONNX
Runtime CPU? The package's `vae_decode_step` takes one latent frame (-> 4 video frames) per call, so a
17-frame clip is 1 first + 4 step calls, each paying the graph's ~640 nodes of per-call overhead. The
causal decoder is exact in time chunks of any length (its caches hold the last 2 frames of every causal
conv's input), so the same VAEStepGraph traced with N latent frames must give the same frames as N
one-frame calls; this script checks that and times both, interleaved, in one run.

    nice -n 10 .venv/bin/python -m benchmarks.vae_frames_per_call [--frames-per-call 4] [--repeats 20]

Measured 2026-11-30 on the bundled tiny-shapes VAE, 8x8 latents (64x64 px), Conv2d-tap export, ORT 1 thread,
CPU time, two runs at load 1-4: 4 one-frame calls 62.8-66.9 ms vs one 4-frame call 67.5-69.2 ms, the frames
identical (max |difference| 0). No gain: the step is compute-bound in its 64x64 8-channel convs (ONNX
Runtime's NCHWc kernels pad 8 output channels to 16), not in per-call overhead, so the runtime keeps one
latent frame per step call (which also bounds a step's working set to one latent frame for the tile planner).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames-per-call", type=int, default=4, help="latent frames per step call (default 4)")
    ap.add_argument("--repeats", type=int, default=20)
    a = ap.parse_args()
    import onnxruntime as ort
    import torch
    from vidrt.export.checkpoints import open_checkpoint
    from vidrt.export.components import nearest_upsampling, vae_graph_specs
    from vidrt.export.onnx_export import export_graph
    from vidrt.package.contracts import VAE_FRAMES, VAE_LATENT, Contract, TensorSpec, cache_in

    n = a.frames_per_call
    ckpt = open_checkpoint(ROOT / "checkpoints" / "tiny-shapes")
    vae, spec = ckpt.vae().eval(), ckpt.spec
    z, stride_t = spec.vae.z_dim, spec.vae.stride[0]
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    with tempfile.TemporaryDirectory() as tmp, nearest_upsampling(vae), torch.no_grad():
        first, step = vae_graph_specs(vae, spec)
        lat = step.args[0]
        wide = replace(step, args=(torch.randn(1, z, n, *lat.shape[3:]), *step.args[1:]), contract=Contract(
            inputs=(TensorSpec(VAE_LATENT, "float32", (1, z, n, "lat_h", "lat_w")), *step.contract.inputs[1:]),
            outputs=(TensorSpec(VAE_FRAMES, "float32", (1, 3, stride_t * n, "out_h", "out_w")),
                     *step.contract.outputs[1:])))
        paths = {name: Path(tmp) / f"{name}.onnx" for name in ("first", "step", "wide")}
        for name, graph in (("first", first), ("step", step), ("wide", wide)):
            export_graph(graph, paths[name], 18, conv2d=True)
        s = {name: ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for name, p in paths.items()}
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((1, z, 1 + n, 8, 8)).astype(np.float32)
    caches = s["first"].run(None, {VAE_LATENT: latents[:, :, :1]})[1:]
    start = {cache_in(i): c for i, c in enumerate(caches)}

    def one_frame_calls() -> np.ndarray:
        feeds, out = dict(start), []
        for f in range(1, 1 + n):
            res = s["step"].run(None, {VAE_LATENT: latents[:, :, f:f + 1], **feeds})
            out.append(res[0])
            feeds = {cache_in(i): c for i, c in enumerate(res[1:])}
        return np.concatenate(out, axis=2)

    def one_wide_call() -> np.ndarray:
        return s["wide"].run(None, {VAE_LATENT: latents[:, :, 1:], **start})[0]

    diff = float(np.abs(one_frame_calls() - one_wide_call()).max())
    best = {fn.__name__: 1e9 for fn in (one_frame_calls, one_wide_call)}
    for _ in range(2):  # A, B, A, B
        for fn in (one_frame_calls, one_wide_call):
            fn()
            for _ in range(a.repeats):
                t = time.thread_time()
                fn()
                best[fn.__name__] = min(best[fn.__name__], time.thread_time() - t)
    print(f"bundled VAE, 8x8 latents, {n} latent frames after the first, ORT 1 thread, best of {2 * a.repeats}, "
          f"CPU time:\n  {n} one-frame step calls {best['one_frame_calls'] * 1e3:7.2f} ms\n"
          f"  one {n}-frame step call  {best['one_wide_call'] * 1e3:7.2f} ms\n  max |frames difference| {diff:.1e}")


if __name__ == "__main__":
    main()
