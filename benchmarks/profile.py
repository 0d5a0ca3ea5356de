"""Per-node profile of one vidrt graph call on ONNX Runtime (SessionOptions.enable_profiling).

    python -m benchmarks.profile build/bench/wan2.1-t2v-1.3b-random/package --component dit --size 128x128 --frames 5
    python -m benchmarks.profile PACKAGE --component vae_decode_step --size 256x256

Builds its own session with the same options as vidrt's ORT backend (runtime/backends/ort.py) plus
profiling, runs one warm-up and `--repeats` profiled calls, and prints the time per op type and the
slowest nodes (summed over the profiled calls), with each node's share of the kernel time.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np


def _feeds(manifest: Any, component: str, width: int, height: int, frames: int) -> dict[str, np.ndarray]:
    from vidrt.package import contracts as C

    spec = manifest.model
    rng = np.random.default_rng(0)
    if component in spec.experts:
        lat = rng.standard_normal((2, *spec.latent_shape(width, height, frames)), dtype=np.float32)
        ctx = np.zeros((2, spec.text.text_len, spec.dit.text_dim), dtype=np.float32)
        ctx[:, :16] = rng.standard_normal((2, 16, spec.dit.text_dim), dtype=np.float32)
        t_shape = (2, spec.num_tokens(width, height, frames)) if spec.per_token_timestep else (2,)
        return {C.LATENTS: lat, C.TIMESTEP: np.full(t_shape, 500.0, dtype=np.float32), C.CONTEXT: ctx}
    contract = manifest.components[component].contract
    z, _, h, w = spec.latent_shape(width, height, frames)
    sizes = {"lat_h": h, "lat_w": w, "out_h": h * spec.vae.stride[1], "out_w": w * spec.vae.stride[2]}
    feeds = {}
    for t in contract.inputs:
        shape = C.resolve_shape(t.shape, sizes)
        feeds[t.name] = rng.standard_normal(shape).astype(t.dtype) * 0.5
    return feeds


def profile(package: Path, component: str, width: int, height: int, frames: int, threads: int | None,
            repeats: int = 1, top: int = 25) -> dict[str, Any]:
    import onnxruntime as ort
    from vidrt.backends.ort import cpu_features
    from vidrt.package.manifest import artifact_path, load_manifest

    manifest = load_manifest(package, verify=False)
    # the file vidrt's ORT backend opens on this CPU (a component's AVX-512 form where the package has one)
    path = artifact_path(package, manifest.components[component].artifact_for(cpu_features()).file)
    print(f"profiling {path.name}")
    feeds = _feeds(manifest, component, width, height, frames)
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads is not None:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tmp, "prof")
        sess = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
        out_names = [o.name for o in sess.get_outputs()]
        sess.run(out_names, feeds)  # warm-up (its events are dropped below: first run = index 0)
        for _ in range(repeats):
            sess.run(out_names, feeds)
        trace = json.loads(Path(sess.end_profiling()).read_text())
    runs = [e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"]
    start = runs[1]["ts"] if len(runs) > 1 else 0  # skip the warm-up run's node events
    wall = sum(e["dur"] for e in runs[1:]) / 1e6 / max(1, repeats)
    by_type: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    by_node: dict[str, tuple[str, float, str]] = {}
    for e in trace:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["ts"] < start:
            continue
        args = e.get("args", {})
        op = args.get("op_name", "?")
        name = e["name"][: -len("_kernel_time")]
        by_type[op] += e["dur"] / 1e6 / repeats
        count[op] += 1
        shape = json.dumps(args.get("input_type_shape", ""))[:90]
        prev = by_node.get(name, (op, 0.0, shape))
        by_node[name] = (op, prev[1] + e["dur"] / 1e6 / repeats, shape)
    kernel = sum(by_type.values())
    types = sorted(by_type.items(), key=lambda kv: -kv[1])
    nodes = sorted(by_node.items(), key=lambda kv: -kv[1][1])[:top]
    return {"component": component, "size": [width, height, frames], "threads": threads, "run_seconds": wall,
            "kernel_seconds": kernel,
            "by_op_type": [{"op": k, "seconds": v, "share": v / kernel, "calls": count[k] // repeats}
                           for k, v in types],
            "top_nodes": [{"node": n, "op": op, "seconds": s, "share": s / kernel, "inputs": shp}
                          for n, (op, s, shp) in nodes]}


def table(p: dict[str, Any]) -> str:
    out = [f"{p['component']} at {'x'.join(map(str, p['size']))}: run {p['run_seconds']:.3f} s, "
           f"kernels {p['kernel_seconds']:.3f} s (threads {p['threads']})",
           f"{'op type':<28}{'seconds':>10}{'share':>8}{'nodes':>7}"]
    out += [f"{r['op']:<28}{r['seconds']:>10.3f}{100 * r['share']:>7.1f}%{r['calls']:>7}" for r in p["by_op_type"][:20]]
    out.append(f"{'slowest nodes':<60}{'op':<16}{'seconds':>9}{'share':>8}")
    out += [f"{r['node'][:58]:<60}{r['op']:<16}{r['seconds']:>9.3f}{100 * r['share']:>7.1f}%  {r['inputs']}"
            for r in p["top_nodes"]]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__.split("\n\n")[0])
    ap.add_argument("package", type=Path)
    ap.add_argument("--component", default="dit")
    ap.add_argument("--size", default="128x128", help="WIDTHxHEIGHT in pixels")
    ap.add_argument("--frames", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--json", type=Path, help="also write the profile summary here")
    args = ap.parse_args(argv)
    w, h = (int(x) for x in args.size.lower().split("x"))
    p = profile(args.package, args.component, w, h, args.frames, args.threads, args.repeats, args.top)
    print(table(p))
    if args.json:
        args.json.write_text(json.dumps(p, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
