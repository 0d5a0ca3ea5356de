"""The bundled model's prompt grid (tests/test_default_model.py: 72 prompts x seeds 1000, 1001, colour and
direction read back from the pixels) with its default sampler and with the `fast` recipe (4 CFG-free
Euler steps + its distillation LoRA), and seconds per clip for each on this machine.

    nice -n 10 .venv/bin/python -m benchmarks.recipe_grid [--threads 1]   # -> benchmarks/results/recipe-grid.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from vidrt.export.shapes_data import classify_clip, grid, prompt_for, score
from vidrt.models import default_package
from vidrt.pipeline import Pipeline
from vidrt.request import Request

GRID_SEEDS = (1000, 1001)
RESULTS = Path(__file__).resolve().parent / "results"


def run_grid(pipe: Pipeline, recipe: str | None) -> dict[str, object]:
    results, seconds, calls = [], [], 0
    for seed in GRID_SEEDS:
        for colour, shape, direction in grid():
            t0 = time.perf_counter()
            res = pipe.run(Request(prompt=prompt_for(colour, shape, direction), seed=seed, recipe=recipe))
            seconds.append(time.perf_counter() - t0)
            calls += res.stats.dit_calls
            results.append((classify_clip(res.frames), (colour, direction)))
    seconds.sort()
    return {"recipe": recipe or "default (25 UniPC steps, CFG)", "score": score(results),
            "seconds_per_clip_median": seconds[len(seconds) // 2], "seconds_total": sum(seconds),
            "dit_calls_per_clip": calls / len(results)}


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
    rows = [run_grid(pipe, None), run_grid(pipe, "fast")]
    load = os.getloadavg()[0]
    for r in rows:
        s = r["score"]
        print(f"{r['recipe']:<32} grid both {s['both']:.1%} (colour {s['colour']:.1%}, "  # type: ignore[index]
              f"direction {s['direction']:.1%}), {r['seconds_per_clip_median']:.3f} s/clip median, "
              f"{r['dit_calls_per_clip']:.0f} DiT calls/clip")
    speedup = rows[0]["seconds_per_clip_median"] / rows[1]["seconds_per_clip_median"]  # type: ignore[operator]
    print(f"speed-up {speedup:.2f}x; load average {load:.1f} on {os.cpu_count()} cores while measuring")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "recipe-grid.json").write_text(json.dumps({"rows": rows, "speedup": speedup, "loadavg": load,
                                                          "cpus": os.cpu_count()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
