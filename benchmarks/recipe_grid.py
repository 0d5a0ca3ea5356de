"""The bundled model's prompt grid (tests/test_default_model.py: 72 prompts x seeds 1000, 1001, colour and
direction read back from the pixels) with its default sampler and with the `fast` recipe (4 CFG-free
Euler steps + its distillation LoRA), and seconds per clip for each on this machine; then the image mode
(TI2V-style first frame) over 18 centred pictures (every colour x shape, `shapes_data.picture`) x 4 directions,
prompt = the picture's colour and shape + the direction: right = the picture's colour and the prompt's
direction, and frame 0 within 20 dB PSNR of the picture (the VAE round trip measures 21.4-27 dB).

    nice -n 10 .venv/bin/python -m benchmarks.recipe_grid [--threads 1]   # -> benchmarks/results/recipe-grid.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
from vidrt.export.shapes_data import COLOURS, DIRECTIONS, SHAPES, classify_clip, grid, picture, prompt_for, score
from vidrt.models import default_package
from vidrt.pipeline import Pipeline
from vidrt.request import Request

GRID_SEEDS = (1000, 1001)
RESULTS = Path(__file__).resolve().parent / "results"


def run_grids(pipe: Pipeline, recipes: list[str | None]) -> list[dict[str, object]]:
    """Every recipe on the same clips, interleaved clip by clip (so a load change on this shared machine
    hits all of them alike): score, median wall and CPU seconds per clip, DiT calls per clip."""
    results: dict[str | None, list] = {r: [] for r in recipes}
    wall: dict[str | None, list[float]] = {r: [] for r in recipes}
    cpu: dict[str | None, list[float]] = {r: [] for r in recipes}
    stages: dict[str | None, dict[str, list[float]]] = {r: {"denoise": [], "decode": []} for r in recipes}
    calls = dict.fromkeys(recipes, 0)
    for seed in GRID_SEEDS:
        for colour, shape, direction in grid():
            for recipe in recipes:
                t0, c0 = time.perf_counter(), time.process_time()
                res = pipe.run(Request(prompt=prompt_for(colour, shape, direction), seed=seed, recipe=recipe))
                wall[recipe].append(time.perf_counter() - t0)
                cpu[recipe].append(time.process_time() - c0)
                calls[recipe] += res.stats.dit_calls
                for stage, seconds in stages[recipe].items():  # the pipeline's own wall time per stage
                    seconds.append(res.stats.seconds[stage])
                results[recipe].append((classify_clip(res.frames), (colour, direction)))
    return [{"recipe": r or "default (25 UniPC steps, CFG)", "score": score(results[r]),
             "seconds_per_clip_median": statistics.median(wall[r]), "seconds_total": sum(wall[r]),
             "cpu_seconds_per_clip_median": statistics.median(cpu[r]),
             "stage_seconds_median": {k: statistics.median(v) for k, v in stages[r].items()},
             "dit_calls_per_clip": calls[r] / len(results[r])} for r in recipes]


IMAGE_SEED = 4000
FIRST_FRAME_PSNR_DB = 20.0


def run_image_grid(pipe: Pipeline, recipe: str | None) -> dict[str, object]:
    results, seconds, psnrs = [], [], []
    for i, (colour, shape, direction) in enumerate((c, s, d) for c in COLOURS for s in SHAPES for d in DIRECTIONS):
        pic = picture(colour, shape)
        t0 = time.perf_counter()
        res = pipe.run(Request(prompt=prompt_for(colour, shape, direction), image=pic, seed=IMAGE_SEED + i,
                               recipe=recipe))
        seconds.append(time.perf_counter() - t0)
        mse = float(np.mean((res.frames[0].astype(np.float32) - pic.astype(np.float32)) ** 2))
        psnrs.append(10 * np.log10(255.0**2 / max(mse, 1e-6)))
        results.append((classify_clip(res.frames), (colour, direction)))
    seconds.sort()
    good = sum(p >= FIRST_FRAME_PSNR_DB and g == w for p, (g, w) in zip(psnrs, results, strict=True))
    return {"recipe": (recipe or "default (25 UniPC steps, CFG)") + " + image", "score": score(results),
            "first_frame_psnr_min": min(psnrs), "first_frame_psnr_mean": float(np.mean(psnrs)),
            "first_frame_and_motion_right": good / len(results),
            "seconds_per_clip_median": seconds[len(seconds) // 2]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--model", default=None, help="package folder (default: the bundled model)")
    args = ap.parse_args(argv)
    package = args.model or default_package()
    if package is None:
        raise SystemExit("no bundled model package")
    pipe = Pipeline.load(package, threads=args.threads)
    pipe.run(Request(prompt="a red circle moving left", seed=0, recipe="fast"))  # sessions open, LoRA merged
    pipe.run(Request(prompt="a red circle moving left", seed=0))
    rows = run_grids(pipe, [None, "fast"])
    load = os.getloadavg()[0]
    for r in rows:
        s = r["score"]
        print(f"{r['recipe']:<32} grid both {s['both']:.1%} (colour {s['colour']:.1%}, "  # type: ignore[index]
              f"direction {s['direction']:.1%}), {r['seconds_per_clip_median']:.3f} s/clip median "
              f"({r['cpu_seconds_per_clip_median']:.3f} CPU), {r['dit_calls_per_clip']:.0f} DiT calls/clip; "
              + ", ".join(f"{k} {v:.3f} s" for k, v in r["stage_seconds_median"].items()))  # type: ignore[attr-defined]
    speedup = rows[0]["seconds_per_clip_median"] / rows[1]["seconds_per_clip_median"]  # type: ignore[operator]
    cpu_speedup = rows[0]["cpu_seconds_per_clip_median"] / rows[1]["cpu_seconds_per_clip_median"]  # type: ignore[operator]
    print(f"speed-up {speedup:.2f}x wall, {cpu_speedup:.2f}x CPU (clips interleaved); load average {load:.1f} "
          f"on {os.cpu_count()} cores while measuring")
    image_rows = [run_image_grid(pipe, None), run_image_grid(pipe, "fast")]
    for r in image_rows:
        s = r["score"]
        print(f"{r['recipe']:<40} first frame + motion right {r['first_frame_and_motion_right']:.1%} "
              f"(colour {s['colour']:.1%}, direction {s['direction']:.1%}; frame-0 PSNR min "  # type: ignore[index]
              f"{r['first_frame_psnr_min']:.1f} dB), {r['seconds_per_clip_median']:.3f} s/clip median")
    RESULTS.mkdir(exist_ok=True)
    summary = {"rows": rows, "image_rows": image_rows, "speedup": speedup, "cpu_speedup": cpu_speedup,
               "loadavg": load, "cpus": os.cpu_count()}
    (RESULTS / "recipe-grid.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
