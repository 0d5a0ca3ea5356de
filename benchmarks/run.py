"""The benchmark suite's entry point.

    python -m benchmarks.run --quick          # what `make bench` runs (< 15 min on a busy 2-core CPU)
    python -m benchmarks.run                  # the full suite (more pairs, larger cost-growth sizes)
    python -m benchmarks.run --workloads tiny --pairs 5 --no-scaling
    python -m benchmarks.run --gpu            # TensorRT backend vs diffusers on CUDA (skips where absent)
    python -m benchmarks.run --quick --axes recipe,cache   # the recipe and cache axes (benchmarks/axes.py)
    vidrt bench [same options]

For each workload: one process per side (vidrt on ONNX Runtime or TensorRT, diffusers' WanPipeline
on torch), each loads its model once and runs one warm-up clip (1 step, same size); then `--pairs`
timed pairs, alternating which side runs first (A B, B A, ...), same noise, prompt, steps, guidance,
shift and the official FlowUniPC scheduler on both. Reports seconds per clip (median, min, max), the per-stage
split, peak memory, the diffusers/vidrt ratio of every pair and its median, PSNR of the frames.
Then the cost growth of the DiT step and the VAE decode (benchmarks/scaling.py), the FLOP table and
the machine's measured GEMM peak (benchmarks/flops.py). Writes <out>/<tag>.json, <tag>.txt and
<tag>-scaling.png.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import sys
import time
from contextlib import redirect_stdout
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import axes as axes_mod
from benchmarks import flops, machine, report, scaling, workloads
from benchmarks.workers import Worker

RESULTS = Path(__file__).resolve().parent / "results"

# The cache axis: every method on a package with calibrated tables (the bundled model), the methods with
# published Wan2.1 tables on the others (issue 13: the 1.3B architecture at 50 steps, MagCache and TeaCache).
CACHE_METHODS = {"tiny": axes_mod.CACHE_METHODS, "wan1.3b": ("none", "magcache", "teacache")}
# wan1.3b's cache rows are counted from the plan, not run: 50 steps + CFG of the 1.3B DiT per method do not
# fit a shared 2-core machine's evening (`--cache-timed` runs them anyway)
CACHE_TIMED = {"tiny": True, "wan1.3b": False}

# (workload sizes, cost-growth sizes) per preset. The 1.3B DiT on 2 cores does ~30-50 GFLOP/s and one
# CFG step at 128x128x5 is ~1 TFLOP, so the sizes stay small; the VAE grows further (cheap per token).
PRESETS: dict[str, dict[str, Any]] = {
    "quick": {"pairs": {"tiny": 3, "wan1.3b": 2}, "wan13b_clip": dict(width=64, height=64, frames=5, steps=2),
              "axis_pairs": {"tiny": 3, "wan1.3b": 1}, "cache_methods": CACHE_METHODS, "cache_timed": CACHE_TIMED,
              "vae_sizes": [(128, 128, 5), (256, 256, 5)], "dit_sizes": [(64, 64, 5), (128, 128, 5)],
              "repeats": 1, "gemm_n": 2048},
    "full": {"pairs": {"tiny": 5, "wan1.3b": 3}, "wan13b_clip": dict(width=128, height=128, frames=5, steps=2),
             "axis_pairs": {"tiny": 5, "wan1.3b": 2}, "cache_methods": CACHE_METHODS, "cache_timed": CACHE_TIMED,
             "vae_sizes": [(128, 128, 5), (256, 256, 5), (256, 256, 9), (384, 384, 9)],
             "dit_sizes": [(64, 64, 5), (128, 128, 5), (128, 128, 9), (192, 192, 9)],
             "repeats": 2, "gemm_n": 3072},
}


class Tee:
    """Print to the screen and keep a copy for <tag>.txt."""

    def __init__(self) -> None:
        self.buf = io.StringIO()
        self.out = sys.stdout  # the real one, also while the exporter's chatter is redirected

    def __call__(self, *parts: Any) -> None:
        text = " ".join(str(p) for p in parts)
        print(text, file=self.out, flush=True)
        self.buf.write(text + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


def _finite(x: float) -> float | None:
    return None if x != x or x in (float("inf"), float("-inf")) else x


def _spec(package: Path) -> Any:
    from vidrt.package.manifest import load_manifest

    p = package if package.is_absolute() else workloads.REPO / package
    return load_manifest(p, verify=False).model


def gpu_check(package: Path) -> tuple[bool, str]:
    """Can the GPU mode run here? (GPU + TensorRT + plans in the package); never raises."""
    try:
        from vidrt.backends.tensorrt import availability, tensorrt_status
        from vidrt.package.manifest import load_manifest
    except ImportError as exc:
        return False, f"vidrt's TensorRT backend cannot be imported ({exc})"
    if not machine.gpus():
        return False, "no NVIDIA GPU (nvidia-smi finds none)"
    version, why = tensorrt_status()
    if version is None:
        return False, f"TensorRT is not importable: {why}"
    ok, why = availability(load_manifest(package, verify=False))
    return ok, why


def side_by_side(wl: workloads.Workload, pairs: int, threads: int | None, reference: bool, gpu: bool,
                 peak: dict[str, float] | None, log: Tee) -> dict[str, Any]:
    from vidrt.package.manifest import load_manifest

    spec = load_manifest(wl.package, verify=False).model
    clip = wl.clip
    noise = np.random.default_rng(0).standard_normal(spec.latent_shape(clip.width, clip.height, clip.frames),
                                                     dtype=np.float32)
    backend, device = ("tensorrt", "cuda") if gpu else ("onnxruntime", "cpu")
    sides: dict[str, Worker] = {}
    reference_error = None
    try:
        sides["vidrt"] = Worker("vidrt", wl.package, threads, backend=backend, device=device)
        if reference:
            try:
                sides["diffusers"] = Worker("diffusers", wl.checkpoint, threads, device=device)
            except RuntimeError as exc:  # e.g. a checkpoint diffusers cannot load: vidrt alone, said loudly
                first = str(exc).splitlines()[0]
                log(f"  diffusers side unavailable, vidrt only: {first}")
                reference_error = first
        warm = replace(clip, steps=1)
        for w in sides.values():  # warm-up: sessions/allocators/thread pools at this shape
            w.run(warm, noise)
        runs: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
        for i in range(pairs):
            # A B, B A, A B, ...: which side runs first alternates, so neither always gets the caches,
            # the turbo budget or the quieter moment of a shared machine
            order = list(sides) if i % 2 == 0 else list(reversed(sides))
            for name in order:
                runs[name].append(sides[name].run(clip, noise))
            msg = "  ".join(f"{n} {runs[n][-1]['seconds']:.2f} s" for n in order)
            log(f"  pair {i + 1}/{pairs} ({' first, '.join(order)} second): {msg}" if len(order) > 1
                else f"  pair {i + 1}/{pairs}: {msg}")
        infos = {n: w.info for n, w in sides.items()}
    finally:
        for w in sides.values():
            w.close()
    fl = flops.dit_flops(spec, clip.width, clip.height, clip.frames)
    text_kv = fl.layers * fl.per_block["cross_attn_proj_kv_text"] / fl.forward
    out: dict[str, Any] = {
        **wl.to_dict(), "tokens": spec.num_tokens(clip.width, clip.height, clip.frames), "threads": threads,
        "pairs": pairs, "backend": backend,
        "labels": {"vidrt": f"vidrt ({'TensorRT' if gpu else 'ONNX Runtime'})",
                   "diffusers": f"diffusers ({'torch CUDA' if gpu else 'torch CPU'})"},
        "flops": {**fl.to_dict(), "text_kv_share": text_kv},
        "sides": {}, "runs": {}}
    for name in runs:
        s = report.summarize(runs[name], infos[name])
        step = s["denoise_step_median"]
        s["achieved_flops"] = fl.step / step if step else None
        ok = peak and s["achieved_flops"] and not gpu
        s["peak_fraction"] = s["achieved_flops"] / peak["peak_flops"] if ok else None
        out["sides"][name] = s
        out["runs"][name] = [{k: v for k, v in r.items() if k != "frames"} for r in runs[name]]
    if reference_error:
        out["reference_error"] = reference_error
    if "diffusers" in runs:
        a, b = runs["vidrt"], runs["diffusers"]
        ratio = [y["seconds"] / x["seconds"] for x, y in zip(a, b, strict=True)]
        step_ratio = [np.median(y["step_seconds"]) / np.median(x["step_seconds"]) for x, y in zip(a, b, strict=True)]
        dec_ratio = [y["stages"]["decode"] / x["stages"]["decode"] for x, y in zip(a, b, strict=True)]
        out["ratios"] = {"per_pair": ratio, "median": float(np.median(ratio)),
                         "step_per_pair": [float(x) for x in step_ratio], "step_median": float(np.median(step_ratio)),
                         "decode_per_pair": dec_ratio, "decode_median": float(np.median(dec_ratio)),
                         "meaning": "diffusers seconds / vidrt seconds: > 1 means vidrt is faster"}
        values = [report.psnr(x["frames"], y["frames"]) for x, y in zip(a, b, strict=True)]
        out["psnr_db"] = _finite(min(values)) if min(values) != float("inf") else float("inf")
        out["psnr_db_per_pair"] = [_finite(v) for v in values]
        out["frame_std"] = float(a[-1]["frames"].std())
        out["vidrt_deterministic"] = all(np.array_equal(a[0]["frames"], r["frames"]) for r in a)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the `make bench` preset (default: the full one)")
    ap.add_argument("--workloads", default="tiny,wan1.3b", help="comma list of: " + ", ".join(workloads.WORKLOADS))
    ap.add_argument("--pairs", type=int, help="timed A/B pairs per workload (default: the preset's)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for both sides (default: all)")
    ap.add_argument("--no-reference", action="store_true", help="vidrt only (no diffusers side)")
    ap.add_argument("--no-scaling", action="store_true", help="skip the cost-growth section")
    ap.add_argument("--recipe-steps", type=int, default=50,
                    help="steps of the recipe axis's guided and CFG-off rows (default: 50, the official sampler's)")
    ap.add_argument("--cache-timed", action="store_true",
                    help="run and time the cache rows on every workload (default: wan1.3b's are counted from the plan)")
    ap.add_argument("--axes", default="main",
                    help="comma list of: main (the side-by-side table, cost growth, FLOPs), recipe (50 steps + CFG, "
                         "CFG off, the 4-step recipe), cache (each --cache method); default: main")
    ap.add_argument("--scaling-package", help="package for the cost growth (default: the wan1.3b workload's)")
    ap.add_argument("--gpu", action="store_true", help="TensorRT backend vs diffusers on CUDA (skipped when absent)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder (default: benchmarks/results)")
    ap.add_argument("--tag", help="file stem of the results (default: <cpu|gpu>-<quick|full>)")
    ap.add_argument("--cache", type=Path, default=workloads.CACHE, help="exported packages (default: build/bench)")
    args = ap.parse_args(argv)

    preset_name = "quick" if args.quick else "full"
    preset = PRESETS[preset_name]
    axes = tuple(a.strip() for a in args.axes.split(",") if a.strip())
    bad = sorted(set(axes) - {"main", *axes_mod.AXES})
    if bad or not axes:
        ap.error(f"--axes: unknown {', '.join(bad) or 'empty list'}; choose from main, {', '.join(axes_mod.AXES)}")
    if args.gpu and axes != ("main",):
        ap.error("--axes recipe/cache run on the CPU (ONNX Runtime vs torch CPU); drop --gpu or use --axes main")
    extra = [a for a in axes if a != "main"]
    main_table = "main" in axes
    tag = args.tag or f"{'gpu' if args.gpu else 'cpu'}-{preset_name}" + ("" if main_table else "-axes")
    log = Tee()
    t_start = time.perf_counter()
    m = machine.describe(args.threads)
    log(f"vidrt bench ({preset_name}) {dt.datetime.now().isoformat(timespec='seconds')}")
    log(f"machine: {machine.one_line(m)}")
    log(f"command: python -m benchmarks.run {' '.join(sys.argv[1:] if argv is None else argv)}")
    record: dict[str, Any] = {"schema": 1, "tag": tag, "preset": preset_name,
                              "argv": sys.argv[1:] if argv is None else argv,
                              "started": dt.datetime.now().isoformat(timespec="seconds"), "machine": m,
                              "workloads": [], "scaling": None, "flops": None, "gpu": None}
    names = [n.strip() for n in args.workloads.split(",") if n.strip()]
    unknown = sorted(set(names) - set(workloads.WORKLOADS))
    if unknown:
        ap.error(f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(workloads.WORKLOADS)}")

    peak = None
    if not args.gpu and main_table:
        log(f"measuring the fp32 GEMM peak ({preset['gemm_n']}^3, numpy and ONNX Runtime) ...")
        peak = flops.measured_peak(preset["gemm_n"], threads=args.threads)
        log(f"  numpy {peak['numpy_gemm_flops'] / 1e9:.1f} GFLOP/s, "
            f"ONNX Runtime {peak['ort_gemm_flops'] / 1e9:.1f} GFLOP/s")
    record["peak"] = peak

    built: dict[str, workloads.Workload] = {}
    for name in names:
        t0 = time.perf_counter()
        log(f"preparing workload {name} (cached under {args.cache}) ...")
        with redirect_stdout(sys.stderr):  # exporter chatter off the table
            if name == "wan1.3b":
                wl = workloads.wan13b(args.cache, **preset["wan13b_clip"], log=log)
            else:
                wl = workloads.tiny(args.cache, log=log)
        built[name] = wl
        log(f"  ready in {time.perf_counter() - t0:.0f} s: {wl.note}")

    if args.gpu:
        ok, why = gpu_check(next(iter(built.values())).package) if built else (False, "no workload")
        record["gpu"] = {"ran": ok, "reason": why}
        if not ok:
            log(f"GPU mode: skipped: {why}")
            names = []

    for name in names if main_table else ():
        wl = built[name]
        pairs = args.pairs or preset["pairs"][name]
        log(f"side by side: {name}, {pairs} pair(s) ...")
        res = side_by_side(wl, pairs, args.threads, not args.no_reference, args.gpu, peak, log)
        record["workloads"].append(res)
        log(report.workload_table(res))

    record["axes"] = []
    for name in names if extra else ():
        pairs = args.pairs or preset["axis_pairs"][name]
        log(f"axes {', '.join(extra)}: {name}, {pairs} pair(s) per row ...")
        res = axes_mod.run_axes(built[name], tuple(extra), pairs, args.threads, not args.no_reference,
                                tuple(preset["cache_methods"][name]), args.cache / "loras" / name, log,
                                recipe_steps=args.recipe_steps,
                                cache_timed=args.cache_timed or preset["cache_timed"][name])
        record["axes"].append(res)
        for axis in extra:
            log(f"\n{axis} axis, {name}:\n" + axes_mod.axis_markdown(res, axis) + "\n")

    if not args.no_scaling and not args.gpu and main_table:
        pkg = Path(args.scaling_package) if args.scaling_package else (
            built["wan1.3b"].package if "wan1.3b" in built else workloads.wan13b(args.cache, log=log).package)
        log(f"cost growth on {workloads._rel(pkg)} (one fresh process per point) ...")
        rows = scaling.run(pkg, preset["vae_sizes"], dit_sizes=preset["dit_sizes"], threads=args.threads,
                           repeats=preset["repeats"], log=log)
        record["scaling"] = {"package": workloads._rel(pkg), "rows": rows}
        log(report.scaling_table(rows))
        png = report.plot_scaling(rows, args.out / f"{tag}-scaling.png",
                                  f"vidrt cost growth, {workloads._rel(pkg)}, {m['cpu']} x{args.threads} threads")
        if png:
            record["scaling"]["plot"] = workloads._rel(png)
            log(f"plot: {workloads._rel(png)}")

    if peak is not None:  # the peak again: on a shared machine one measurement can land in a busy moment
        again = flops.measured_peak(preset["gemm_n"], threads=args.threads)
        peak = {k: max(peak[k], again[k]) for k in peak}
        record["peak"] = peak
        log(f"fp32 GEMM peak, best of start and end: {peak['peak_flops'] / 1e9:.1f} GFLOP/s")
        log("distance to the limit (DiT step, achieved / measured peak):")
        for w in record["workloads"]:
            for side, s in w["sides"].items():
                if s.get("achieved_flops"):
                    s["peak_fraction"] = s["achieved_flops"] / peak["peak_flops"]
                    flag = ("  <- above the measured peak: the machine's load changed during the run; "
                            "do not trust this row" if s["peak_fraction"] > 1.1 else "")
                    log(f"  {w['name']:<8} {side:<10} {s['achieved_flops'] / 1e9:7.1f} GFLOP/s = "
                        f"{100 * s['peak_fraction']:.0f} % of {peak['peak_flops'] / 1e9:.1f}{flag}")
        for r in (record["scaling"] or {}).get("rows", []):
            if r["what"] == "dit_step":
                spec = _spec(Path(record["scaling"]["package"]))
                fl = flops.dit_flops(spec, r["width"], r["height"], r["frames"])
                r["flops"], r["achieved_flops"] = fl.step, fl.step / r["seconds"]
                r["peak_fraction"] = r["achieved_flops"] / peak["peak_flops"]
                log(f"  dit step {r['width']}x{r['height']}x{r['frames']} ({r['tokens']} tokens): {fl.step:.3g} FLOP, "
                    f"{r['achieved_flops'] / 1e9:.1f} GFLOP/s = {100 * r['peak_fraction']:.0f} %")

    if main_table:
        table = flops.standard_table()
        record["flops"] = {"standard": table, "model": flops.__doc__}
        log("DiT FLOPs at the models' standard sizes (benchmarks/flops.py::dit_flops; CFG = 2 forwards per step):")
        log(report.flops_table(table, peak))

    record["seconds_total"] = time.perf_counter() - t_start
    log(f"done in {record['seconds_total'] / 60:.1f} min")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{tag}.json").write_text(json.dumps(record, indent=1, default=_json_default) + "\n")
    (args.out / f"{tag}.txt").write_text(log.buf.getvalue())
    print(f"wrote {workloads._rel(args.out / f'{tag}.json')} and {tag}.txt", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
