"""Step caching on the bundled model: block-stack runs and seconds per clip, and the prompt-following
grid score of tests/test_default_model.py, per `--cache` method against no cache. Also the published
MagCache masks on the Wan2.1 1.3B / 14B tables at 50 steps (their counts depend on the table only).

    nice -n 10 .venv/bin/python -m benchmarks.cache_methods            # -> results/cache-methods.{txt,json}
    nice -n 10 .venv/bin/python -m benchmarks.cache_methods --seeds 1000 --methods none,magcache

The grid is 72 prompts x the seeds (test_default_model.py uses 1000 and 1001); each clip at the
manifest's defaults (25 UniPC steps, 64x64x17). Seconds are wall-clock per clip on ONNX Runtime CPU,
on whatever else the machine runs (the load average is printed with them).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from vidrt import cache_tables as T
from vidrt.caching import magcache_mask, magcache_ratios, mask_string
from vidrt.export.shapes_data import classify_clip, grid, prompt_for, score
from vidrt.models import default_package
from vidrt.pipeline import Pipeline
from vidrt.request import Request

METHODS = ("none", "teacache", "magcache", "fbcache", "easycache")
RESULTS = Path(__file__).parent / "results"


def bundled_rows(methods: list[str], seeds: list[int]) -> list[dict]:
    package = default_package()
    assert package is not None, "no bundled model"
    pipe = Pipeline.load(package, warn=lambda msg: None)
    rows = []
    for method in methods:
        cache = None if method == "none" else method
        results, runs, skips, seconds = [], [], [], []
        for seed in seeds:
            for colour, shape, direction in grid():
                t0 = time.perf_counter()
                r = pipe.run(Request(prompt=prompt_for(colour, shape, direction), seed=seed, cache=cache))
                seconds.append(time.perf_counter() - t0)
                runs.append(r.stats.cache.block_stack_runs)
                skips.append(r.stats.cache.block_stack_skips)
                results.append((classify_clip(r.frames), (colour, direction)))
        s = score(results)
        mask = pipe.cache_mask(Request(prompt="-", cache=method)) \
            if method.partition(":")[0] in ("teacache", "magcache") else ""
        rows.append({"method": method, "clips": len(results), "block_stack_runs": float(np.mean(runs)),
                     "block_stack_skips": float(np.mean(skips)), "seconds_per_clip": float(np.median(seconds)),
                     "grid_both": s["both"], "grid_colour": s["colour"], "grid_direction": s["direction"],
                     "mask": mask, "load": os.getloadavg()[0]})
        print(_line(rows[-1]), flush=True)
    return rows


def pieces_overhead(package: Path, width: int, height: int, frames: int, pairs: int = 10) -> dict:
    """One batch-2 DiT call as the whole graph vs as its pieces chained (embed, block0, blocks_rest,
    head; the text embedding and RoPE once per clip as in a run), A/B interleaved, ONNX Runtime CPU."""
    from vidrt.caching import ExpertDiT
    from vidrt.package import contracts as C

    pipe = Pipeline.load(package, warn=lambda msg: None)
    spec = pipe.manifest.model
    rng = np.random.default_rng(0)
    x = rng.standard_normal(spec.latent_shape(width, height, frames), dtype=np.float32)
    ctx = rng.standard_normal((2, spec.text.text_len, spec.dit.text_dim), dtype=np.float32)
    t = np.full((), 900.0, np.float32)
    dit = ExpertDiT(pipe.engine, spec.experts[0], ctx, 2)

    def pieces() -> np.ndarray:
        emb = dit.embed(x, t)
        return dit.head(dit.blocks(C.BLOCKS_REST, dit.blocks(C.BLOCK0, emb[C.TOKENS], emb), emb), emb)

    diff = float(np.abs(pieces() - dit.whole(x, t)).max())  # warm-up of both, and their agreement
    whole_s, pieces_s = [], []
    for _ in range(pairs):
        t0 = time.perf_counter()
        dit.whole(x, t)
        whole_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        pieces()
        pieces_s.append(time.perf_counter() - t0)
    return {"package": str(package), "size": f"{width}x{height}x{frames}", "tokens": spec.num_tokens(width, height,
            frames), "whole_s": float(np.median(whole_s)), "pieces_s": float(np.median(pieces_s)),
            "max_abs_diff": diff, "load": os.getloadavg()[0]}


def published_rows() -> list[dict]:
    """MagCache at the published settings (fast_paths.md C.2), Wan2.1 T2V, 50 steps."""
    out = []
    for model, settings in (("wan2.1-t2v-1.3b", ((0.12, 2, 0.2), (0.12, 4, 0.2))),
                            ("wan2.1-t2v-14b", ((0.24, 6, 0.2),))):
        for thresh, k, rr in settings:
            mask = magcache_mask(magcache_ratios(T.MAGCACHE_RATIOS[model], 50), thresh, k, rr)
            out.append({"model": model, "setting": f"E{round(thresh * 100):03d}K{k}R{round(rr * 10):02d}",
                        "block_stack_runs": sum(mask), "steps": 50, "mask": mask_string(mask)})
    return out


def _line(r: dict) -> str:
    return (f"{r['method']:<10} {r['block_stack_runs']:>5.1f} runs {r['block_stack_skips']:>5.1f} skips  "
            f"{r['seconds_per_clip']:.3f} s/clip  grid both {r['grid_both']:.1%} (colour {r['grid_colour']:.1%}, "
            f"direction {r['grid_direction']:.1%})  load {r['load']:.1f}  {r['mask']}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", default="1000,1001")
    ap.add_argument("--tag", default="cache-methods")
    ap.add_argument("--overhead", nargs="*", metavar="PACKAGE:WxHxF",
                    help="only time the whole DiT graph against its pieces (default: the bundled model)")
    args = ap.parse_args(argv)
    if args.overhead is not None:
        for item in args.overhead or [f"{default_package()}:64x64x17"]:
            pkg, _, shape = item.rpartition(":")
            w, h, f = (int(v) for v in shape.split("x"))
            r = pieces_overhead(Path(pkg), w, h, f)
            print(f"{r['package']} {r['size']} ({r['tokens']} tokens): whole {r['whole_s'] * 1e3:.1f} ms, "
                  f"pieces {r['pieces_s'] * 1e3:.1f} ms per batch-2 DiT call "
                  f"({r['pieces_s'] / r['whole_s']:.2f}x), max |diff| {r['max_abs_diff']:.1e}, load {r['load']:.1f}")
        return
    rows = bundled_rows(args.methods.split(","), [int(s) for s in args.seeds.split(",")])
    base = next((r for r in rows if r["method"] == "none"), None)
    lines = ["bundled model (vidrt-tiny-shapes, calibrated tables), 25 steps, grid of tests/test_default_model.py"]
    for r in rows:
        extra = ""
        if base is not None and r is not base:
            extra = (f"  [{base['block_stack_runs'] / max(r['block_stack_runs'], 1e-9):.2f}x fewer runs, "
                     f"{base['seconds_per_clip'] / r['seconds_per_clip']:.2f}x speed, "
                     f"grid {100 * (r['grid_both'] - base['grid_both']):+.1f} points]")
        lines.append(_line(r) + extra)
    lines.append("MagCache published settings, 50 steps (counts depend on the table only):")
    pub = published_rows()
    lines += [f"  {p['model']} {p['setting']}: {p['block_stack_runs']}/50  {p['mask']}" for p in pub]
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.tag}.txt").write_text(text + "\n")
    (RESULTS / f"{args.tag}.json").write_text(json.dumps({"bundled": rows, "published": pub}, indent=1) + "\n")


if __name__ == "__main__":
    main()
