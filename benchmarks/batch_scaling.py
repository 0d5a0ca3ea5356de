"""Clips per hour of `vidrt batch` with 1 and with 2 workers (same 20 jobs, fresh output folders).

    python -m benchmarks.batch_scaling --model PACKAGE [--jobs 20] [--workers 1 2] [--size 128x128]
        [--frames 17] [--steps 20] [--threads 1] [--out benchmarks/results/batch_scaling.json]

Each worker is one Ray actor with its own copy of the model and `--threads` ONNX Runtime threads
(CPU mode: one CPU slot each). The rate counts from the moment every worker has loaded the model
to the last published clip (run_batch's `clips_per_hour`); startup (Ray, model load) is reported
apart. One local Ray instance for the whole run: 2 CPUs, 200 MB object store.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model package folder")
    ap.add_argument("--jobs", type=int, default=20)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--size", default="128x128")
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads per worker")
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="CPUs the local Ray may schedule")
    ap.add_argument("--out", default="benchmarks/results/batch_scaling.json")
    args = ap.parse_args(argv)

    import ray
    from vidrt.service.batch import run_batch

    work = Path(tempfile.mkdtemp(prefix="vidrt-batch-bench-"))
    jobs = work / "jobs.jsonl"
    prompts = ["a red cat walks on the beach", "a blue dog runs in snow", "a cat under a blue sky",
               "a dog in the city at night"]
    jobs.write_text("".join(json.dumps({"prompt": prompts[i % len(prompts)], "size": args.size,
                                        "frames": args.frames, "steps": args.steps, "seed": i}) + "\n"
                            for i in range(args.jobs)))
    t0 = time.monotonic()
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, object_store_memory=200 * 2**20,
             logging_level=logging.WARNING, log_to_driver=False)
    ray_start = time.monotonic() - t0
    runs = []
    try:
        for n in args.workers:
            out = work / f"out-{n}"
            s = run_batch(str(jobs), str(out), args.model, workers=n, threads=args.threads, quiet=True,
                          echo=lambda m: print(m, flush=True))
            clip_seconds = sorted(json.loads(f.read_text())["stats"]["total_seconds"] for f in out.glob("*.json")
                                  if f.name != "batch-summary.json")
            runs.append({"workers": n, "completed": s["completed"], "failed": len(s["failed"]),
                         "median_clip_seconds": round(clip_seconds[len(clip_seconds) // 2], 3) if clip_seconds
                         else None,
                         "seconds": s["seconds"], "seconds_after_start": s["seconds_after_start"],
                         "startup_seconds": round(s["seconds"] - s["seconds_after_start"], 3),
                         "clips_per_hour": s["clips_per_hour"]})
            shutil.rmtree(out)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    load = os.getloadavg()
    record = {"benchmark": "vidrt batch scaling", "model": str(args.model), "jobs": args.jobs,
              "request": {"size": args.size, "frames": args.frames, "steps": args.steps},
              "threads_per_worker": args.threads, "ray_cpus": args.cpus, "ray_start_seconds": round(ray_start, 2),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "loadavg_after": load},
              "runs": runs}
    base = runs[0]["clips_per_hour"] or 0
    for r in runs:
        speedup = f" ({r['clips_per_hour'] / base:.2f}x)" if base and r["clips_per_hour"] else ""
        print(f"{r['workers']} workers: {r['completed']} clips in {r['seconds_after_start']:.1f} s after "
              f"{r['startup_seconds']:.1f} s startup -> {r['clips_per_hour']} clips/hour{speedup}; "
              f"median {r['median_clip_seconds']} s of compute per clip")
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
