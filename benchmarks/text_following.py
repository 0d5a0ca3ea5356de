"""Text-only prompt following of model packages on fresh noise seeds (issue 16 item 5: the image-mode
fine-tune must not cost text-only following). Each package runs every grid prompt
(`shapes_data.grid`: 72 colour x shape x direction prompts) at its own sampling defaults for each seed,
and the pixel judge (`shapes_data.classify_clip`) reads colour and direction back; the share of clips
with both right is printed per package, on the same seeds.

    nice -n 10 python -m benchmarks.text_following --package before=PKG --package after=PKG[@RECIPE] \
        --seeds 6000,6001,6002,6003 [--threads 1] [--out benchmarks/results/text-following.json]

Choose the seeds before looking at any result, and never the grid test's (1000, 1001), the held-out
seeds of TRAINING.md (5000, 5001) or any seed a model was tuned on.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vidrt.export.shapes_data import classify_clip, grid, prompt_for, score
from vidrt.pipeline import Pipeline
from vidrt.request import Request


def grid_score(package: str, seeds: list[int], threads: int | None, recipe: str | None = None) -> dict[str, float]:
    pipe = Pipeline.load(package, threads=threads)
    results = []
    for seed in seeds:
        for colour, shape, direction in grid():
            clip = pipe.run(Request(prompt=prompt_for(colour, shape, direction), seed=seed, recipe=recipe)).frames
            results.append((classify_clip(clip), (colour, direction)))
    return score(results)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--package", action="append", required=True,
                    help="NAME=PACKAGE_FOLDER[@RECIPE] (repeatable; RECIPE e.g. fast: the package's named recipe)")
    ap.add_argument("--seeds", required=True, help="comma-separated noise seeds, e.g. 6000,6001")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    out: dict[str, object] = {"seeds": seeds}
    for item in args.package:
        name, _, package = item.partition("=")
        package, _, recipe = package.partition("@")
        out[name] = grid_score(package, seeds, args.threads, recipe or None)
        print(f"{name}: {out[name]}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
