"""How cost grows with tokens: seconds and peak RSS of one DiT step (batch 2 = cond + uncond, the
call the pipeline makes per step) and of the whole VAE decode (untiled, and tiled by a memory budget
through vae_decode.choose_tile), on vidrt's ONNX Runtime sessions.

Every point runs in a fresh process: ONNX Runtime's CPU arena keeps what it grew for an earlier,
larger shape, so in one process the peak of a point would depend on the points before it.
Peak RSS includes the loaded weights; `above_load` subtracts the RSS right after the session(s)
were created (weights + arena as created), which is the activation/caches part that grows.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.memory import PeakRSS, rss_bytes


def _dit_point(package: str, width: int, height: int, frames: int, threads: int | None, repeats: int,
               backend: str) -> dict[str, Any]:
    from vidrt.package import contracts as C
    from vidrt.pipeline import Pipeline

    pipe = Pipeline.load(package, backend=backend, threads=threads, verify=False, warn=lambda m: None)
    spec = pipe.manifest.model
    engine = pipe.engine(spec.experts[0])
    loaded = rss_bytes()
    rng = np.random.default_rng(0)
    lat = rng.standard_normal((2, *spec.latent_shape(width, height, frames)), dtype=np.float32)
    ctx = np.zeros((2, spec.text.text_len, spec.dit.text_dim), dtype=np.float32)
    ctx[:, :16] = rng.standard_normal((2, 16, spec.dit.text_dim), dtype=np.float32)  # a prompt, then zero rows
    if spec.per_token_timestep:
        t = np.full((2, spec.num_tokens(width, height, frames)), 500.0, dtype=np.float32)
    else:
        t = np.full((2,), 500.0, dtype=np.float32)
    feeds = {C.LATENTS: lat, C.TIMESTEP: t, C.CONTEXT: ctx}
    t0 = time.perf_counter()
    with PeakRSS() as first:
        engine.run(feeds)  # warm-up: allocation plan for this shape
    warm = time.perf_counter() - t0
    secs = []
    with PeakRSS() as mem:
        for _ in range(repeats):
            t0 = time.perf_counter()
            engine.run(feeds)
            secs.append(time.perf_counter() - t0)
    peak = max(mem.peak_bytes, first.peak_bytes)
    return {"seconds": float(np.median(secs)), "seconds_all": secs, "warmup_seconds": warm,
            "tokens": spec.num_tokens(width, height, frames), "peak_rss": peak, "rss_after_load": loaded,
            "above_load": peak - loaded}


def _vae_point(package: str, width: int, height: int, frames: int, threads: int | None, tiled: bool,
               repeats: int, backend: str) -> dict[str, Any]:
    from vidrt.package import contracts as C
    from vidrt.pipeline import Pipeline
    from vidrt.vae_decode import DEFAULT_OVERLAP, choose_tile, estimate_memory, iter_decode, plan_tiles, untiled_plan

    pipe = Pipeline.load(package, backend=backend, threads=threads, verify=False, warn=lambda m: None)
    spec = pipe.manifest.model
    first, step = pipe.engine(C.VAE_FIRST), pipe.engine(C.VAE_STEP)
    loaded = rss_bytes()
    z, f, h, w = spec.latent_shape(width, height, frames)
    scale = spec.vae.stride[1]
    full = untiled_plan(h, w, scale=scale)
    untiled_need = estimate_memory(step.contract, full).total(True)
    budget, plan = untiled_need, full
    if tiled:
        # the budget of a 2 x 2 tiling (tiles of half the frame + the overlap), handed to the memory
        # planner, which picks the cheapest tiling that fits it
        def half(n: int) -> int:
            return min(n, max(2 * DEFAULT_OVERLAP, (n + DEFAULT_OVERLAP + 1) // 2))

        target = plan_tiles(h, w, half(h), half(w), scale=scale)
        budget = estimate_memory(step.contract, target).total(True)
        plan = choose_tile(step.contract, h, w, budget, scale=scale)
    lat = np.random.default_rng(0).standard_normal((z, f, h, w), dtype=np.float32)
    # warm-up on one latent frame pair at the same tile shape (allocation plans of both graphs)
    for _ in iter_decode(lat[:, :2], first, step, plan, mean=spec.vae.latents_mean, std=spec.vae.latents_std):
        pass
    secs = []
    with PeakRSS() as mem:
        for _ in range(repeats):
            t0 = time.perf_counter()
            n = 0
            for chunk in iter_decode(lat, first, step, plan, mean=spec.vae.latents_mean, std=spec.vae.latents_std):
                n += len(chunk)
            secs.append(time.perf_counter() - t0)
    est = estimate_memory(step.contract, plan)
    return {"seconds": float(np.median(secs)), "seconds_all": secs, "frames_out": n, "tiles": plan.count,
            "tile_shape": list(plan.tile_shape),
            "budget_bytes": budget, "estimate_bytes": est.total(True), "untiled_estimate_bytes": untiled_need,
            "peak_rss": mem.peak_bytes, "rss_after_load": loaded, "above_load": mem.peak_bytes - loaded,
            "latent": [z, f, h, w], "tokens": spec.num_tokens(width, height, frames)}


def _fresh(fn: Any, *args: Any) -> dict[str, Any]:
    with cf.ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as ex:
        return ex.submit(fn, *args).result()


def run(package: Path, sizes: list[tuple[int, int, int]], *, threads: int | None, repeats: int = 2,
        backend: str = "auto", log: Any = print,
        dit_sizes: list[tuple[int, int, int]] | None = None) -> list[dict[str, Any]]:
    """One row per (size, what): what in dit_step, vae_untiled, vae_tiled."""
    rows = []
    for w, h, frames in sizes:
        for tiled in (False, True):
            r = _fresh(_vae_point, str(package), w, h, frames, threads, tiled, repeats, backend)
            if tiled and r["tiles"] == 1:
                log(f"  vae {w}x{h}x{frames}: too small to tile (a tile needs >= 16 latent cells a side)")
                continue
            what = "vae_tiled" if tiled else "vae_untiled"
            rows.append({"what": what, "width": w, "height": h, "frames": frames, **r})
            log(f"  vae {'tiled  ' if tiled else 'untiled'} {w}x{h}x{frames}: {r['seconds']:.2f} s, "
                f"{r['tiles']} tile(s) {r['tile_shape']}, peak RSS {r['peak_rss'] / 2**20:.0f} MiB "
                f"(+{r['above_load'] / 2**20:.0f} over load)")
    for w, h, frames in (dit_sizes if dit_sizes is not None else sizes):
        r = _fresh(_dit_point, str(package), w, h, frames, threads, repeats, backend)
        rows.append({"what": "dit_step", "width": w, "height": h, "frames": frames, **r})
        log(f"  dit step {w}x{h}x{frames} ({r['tokens']} tokens): {r['seconds']:.2f} s, "
            f"peak RSS {r['peak_rss'] / 2**20:.0f} MiB (+{r['above_load'] / 2**20:.0f} over load)")
    return rows
