"""The recipe axis and the cache axis of the bench (issue 12 item 5; issue 13 "the bench table gains the
cache axis"), side by side with diffusers running the same thing.

    python -m benchmarks.run --quick --axes recipe,cache      # both axes, tiny + wan1.3b -> results/cpu-quick-axes.*
    python -m benchmarks.run --quick --axes recipe --workloads tiny --pairs 1

Recipe axis, per workload (seconds per clip, DiT calls per clip, PSNR of vidrt's frames against diffusers'):
  * 50 steps + CFG: the official sampler (wan22's FlowUniPC on both sides), the workload's guidance;
  * the same with CFG off (guidance 1: vidrt makes one batch-1 DiT call per step, diffusers' WanPipeline
    skips its unconditional pass too);
  * the 4-step distilled recipe: flow-matching Euler over the explicit timesteps, guidance 1, with its
    LoRA. The bundled model: its own `fast` recipe and the LoRA it ships. Models without one (wan1.3b):
    the `lightx2v-4step` recipe with a random LoRA in LightX2V's format (`diffusion_model.blocks.N.*`
    lora_down/lora_up, no alpha, `diff_b` bias deltas) written here, so the LoRA's load and merge cost
    are real. diffusers runs `FlowMatchEulerDiscreteScheduler(shift)` over the recipe's sigmas and
    `load_lora_weights` + `set_adapters`. The LoRA group runs in fresh processes whose first clip is
    the recipe itself: "first clip" = LoRA load/merge + sessions + the clip, on both sides.

Cache axis: each `--cache` method at its defaults (vidrt.cache_tables) against no cache, at the
package's calibrated step count (the bundled model: 25) or at 50 steps for the published Wan2.1 tables.
Block-stack runs are counted, not timed (vidrt's stats; diffusers: real runs of the last block, per step).
diffusers has MagCache (`MagCacheConfig`, fed the same table's cond ratios) and First Block Cache
(`FirstBlockCacheConfig`) hooks; it has no TeaCache and no EasyCache, and the table says so.

Variants that would share a worker with a different weight set run in their own group of processes
(one per side), so each side's memory is its own and a parked LoRA session does not sit beside the base
one. Within a group: a warm-up of every variant (2 steps; the LoRA recipe: the whole clip), then
`pairs` rounds, each variant alternating which side runs first.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import report
from benchmarks.workers import Worker
from benchmarks.workloads import Clip, Workload, _rel

AXES = ("recipe", "cache")
CACHE_METHODS = ("none", "magcache", "teacache", "easycache", "fbcache")
NO_REFERENCE = {"teacache": "diffusers has no TeaCache hook", "easycache": "diffusers has no EasyCache hook"}
LORA_RANK = 32  # LightX2V's Wan2.1 distill LoRAs are rank 32-128
# LightX2V / original Wan module names of a block's Linears (fast_paths.md A.1) -> (in, out) by config
BLOCK_LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                 "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")


@dataclass(frozen=True)
class Variant:
    axis: str  # "recipe" | "cache"
    label: str
    group: str  # variants of a group share one worker process per side
    clip: Clip
    no_reference: str = ""  # why diffusers does not run this one ("" = it does)
    same_as: str | None = None  # the recipe-axis label of the identical run (counted once, not run again)


# ---- the variants ---------------------------------------------------------------------------------


def write_lightx2v_lora(checkpoint: Path, path: Path, rank: int = LORA_RANK, seed: int = 0) -> Path:
    """A random LoRA in LightX2V's key format for every block Linear of the checkpoint's DiT, with
    `diff_b` bias deltas (what LightX2V's extractor writes for 1-D tensors); float32, no alpha (scale 1).
    Norm `.diff` and `diff_m` are left out: diffusers ignores them (fast_paths.md A.3), and both sides
    must run the same weights. Rewritten only when missing."""
    if path.is_file():
        return path
    from safetensors.numpy import save_file

    cfg = json.loads((checkpoint / "transformer" / "config.json").read_text())
    dim, ffn = cfg["num_attention_heads"] * cfg["attention_head_dim"], cfg["ffn_dim"]
    shapes = {name: (dim, dim) for name in BLOCK_LINEARS[:8]} | {"ffn.0": (dim, ffn), "ffn.2": (ffn, dim)}
    rng = np.random.default_rng(seed)
    sd: dict[str, np.ndarray] = {}
    for b in range(cfg["num_layers"]):
        for name, (n_in, n_out) in shapes.items():
            stem = f"diffusion_model.blocks.{b}.{name}"
            sd[f"{stem}.lora_down.weight"] = (rng.standard_normal((rank, n_in), np.float32) / np.sqrt(n_in))
            sd[f"{stem}.lora_up.weight"] = rng.standard_normal((n_out, rank), np.float32) * np.float32(0.02)
            sd[f"{stem}.diff_b"] = rng.standard_normal(n_out, np.float32) * np.float32(0.01)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(sd, str(tmp))
    tmp.replace(path)
    return path


def recipe_variants(wl: Workload, manifest: Any, lora_dir: Path, steps: int = 50) -> list[Variant]:
    """50 steps + CFG, the same with CFG off, the 4-step recipe with its LoRA (`steps`: tests use fewer)."""
    from vidrt.package.recipes import all_recipes

    base = wl.clip
    cfg = replace(base, steps=steps)
    out = [Variant("recipe", f"{steps} steps + CFG {base.guidance:g}", "plain", cfg),
           Variant("recipe", f"{steps} steps, CFG off", "plain", replace(cfg, guidance=1.0))]
    recipes = all_recipes(manifest.model.recipes)
    own = recipes.get("fast")
    if own is not None and own.timesteps and any(s.file for s in own.loras):
        recipe, extra = own, ()
        shipped = tuple((str(wl.package / s.file), s.strength) for s in own.loras if s.file)
        label = "4-step `fast` + its LoRA"
    else:
        recipe = recipes["lightx2v-4step"]
        lora = write_lightx2v_lora(wl.checkpoint, lora_dir / f"lightx2v-random-r{LORA_RANK}.safetensors")
        extra = shipped = ((str(lora), 1.0),)
        label = f"4-step `lightx2v-4step` + random LoRA r{LORA_RANK}"
    assert recipe.timesteps is not None and recipe.shift is not None and recipe.guidance is not None
    clip = replace(base, steps=len(recipe.timesteps), guidance=recipe.guidance, shift=recipe.shift,
                   scheduler="euler", sigmas=tuple(t / 1000.0 for t in recipe.timesteps), recipe=recipe.name,
                   loras=extra, reference_loras=shipped)
    out.append(Variant("recipe", label, "lora", clip))
    return out


def cache_variants(wl: Workload, manifest: Any, methods: tuple[str, ...],
                   recipe_rows: list[Variant]) -> list[Variant]:
    """Each method at its defaults; the step count the package's tables are for (calibrated: theirs;
    published Wan2.1 tables: 50)."""
    from vidrt import cache_tables as T
    from vidrt.caching import magcache_ratios, magcache_table

    steps = manifest.cache_table.steps if manifest.cache_table is not None else 50
    base = replace(wl.clip, steps=steps)
    out = []
    for method in methods:
        clip, note = replace(base, cache=None if method == "none" else method), NO_REFERENCE.get(method, "")
        if method == "magcache":
            thresh, k, rr = T.MAGCACHE_DEFAULTS
            cond = magcache_ratios(magcache_table(manifest), steps)[0::2]  # diffusers: one ratio per step
            clip = replace(clip, reference_cache={"kind": "magcache", "threshold": thresh, "max_skip_steps": k,
                                                  "retention_ratio": rr, "num_inference_steps": steps,
                                                  "mag_ratios": [float(x) for x in cond]})
        elif method == "fbcache":
            clip = replace(clip, reference_cache={"kind": "fbcache", "threshold": T.FBCACHE_DEFAULT_THRESHOLD})
        same = next((r.label for r in recipe_rows if r.clip == clip), None)
        out.append(Variant("cache", method, "cache", clip, note, same))
    return out


# ---- running --------------------------------------------------------------------------------------


def _warm_clip(clip: Clip) -> Clip:
    """A short clip that opens the same sessions: 2 steps (an explicit timestep list: the whole clip)."""
    if clip.sigmas:
        return clip
    steps = min(2, clip.steps)
    ref = clip.reference_cache
    if ref is not None and "num_inference_steps" in ref:
        ref = {**ref, "num_inference_steps": steps}
    return replace(clip, steps=steps, reference_cache=ref)


def _load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def _open(side: str, wl: Workload, threads: int | None) -> Worker:
    if side == "vidrt":  # sessions open on the warm-up: a group opens only what its variants use
        return Worker("vidrt", wl.package, threads, backend="onnxruntime", device="cpu", open_all=False)
    return Worker("diffusers", wl.checkpoint, threads, device="cpu")


def run_group(wl: Workload, variants: list[Variant], pairs: int, threads: int | None, reference: bool,
              noise: np.ndarray, log: Any) -> dict[str, dict[str, Any]]:
    """label -> {"vidrt": [runs], "diffusers": [runs], "warm": {side: run}, "load": [start, end]}.

    Two timed pairs or more: both sides' processes live together and alternate (A B, B A, ...). One pair:
    the sides run one after the other, each process alone in memory (the 1.3B architecture with a merged
    LoRA beside diffusers' would not fit 24 GB with anything else running)."""
    names = ["vidrt"] + (["diffusers"] if reference and any(not v.no_reference for v in variants) else [])
    out: dict[str, dict[str, Any]] = {v.label: {"vidrt": [], "diffusers": [], "warm": {}} for v in variants}
    load0 = _load()
    loads: dict[str, list[float]] = {}

    def runs_on(name: str, v: Variant) -> bool:
        return not (name == "diffusers" and v.no_reference)

    def warm_up(name: str, w: Worker) -> None:
        for v in variants:
            if runs_on(name, v):
                out[v.label]["warm"][name] = {k: r for k, r in w.run(_warm_clip(v.clip), noise).items()
                                              if k != "frames"}

    def timed(name: str, w: Worker, v: Variant) -> str:
        r = w.run(v.clip, noise)
        out[v.label][name].append(r)
        loads.setdefault(v.label, []).append(_load())  # 1-min load average after each timed run
        return f"{name} {r['seconds']:.2f} s"

    sides: dict[str, Worker] = {}
    try:
        if pairs == 1:
            for name in names:
                sides[name] = _open(name, wl, threads)
                warm_up(name, sides[name])
                for v in variants:
                    if runs_on(name, v):
                        log(f"  [1/1] {v.axis} {v.label}: {timed(name, sides[name], v)} (load {_load():.1f})")
                sides.pop(name).close()
        else:
            for name in names:
                sides[name] = _open(name, wl, threads)
                warm_up(name, sides[name])
            for i in range(pairs):
                for j, v in enumerate(variants):
                    order = [n for n in names if runs_on(n, v)]
                    order = order if (i + j) % 2 == 0 else order[::-1]
                    msg = [timed(name, sides[name], v) for name in order]
                    log(f"  [{i + 1}/{pairs}] {v.axis} {v.label}: {', '.join(msg)} (load {_load():.1f})")
    finally:
        for w in sides.values():
            w.close()
    for v in variants:
        out[v.label]["load"] = [load0, *loads.get(v.label, []), _load()]
    return out


def _side(runs: list[dict[str, Any]], warm: dict[str, Any] | None) -> dict[str, Any]:
    secs = [r["seconds"] for r in runs]
    last = runs[-1]
    return {"runs": len(runs), "seconds_median": float(np.median(secs)), "seconds_min": min(secs),
            "seconds_max": max(secs), "seconds_all": secs, "dit_calls": last.get("dit_calls"),
            "cpu_seconds_median": float(np.median([r["cpu_seconds"] for r in runs])) if all(
                "cpu_seconds" in r for r in runs) else None,
            "block_stack_runs": float(np.mean([r.get("block_stack_runs", 0) for r in runs])),
            "cache_mask": last.get("cache_mask", ""), "peak_rss_bytes": max(r["peak_rss"] for r in runs),
            "step_median": float(np.median([s for r in runs for s in r["step_seconds"]] or [np.nan])),
            "stages_median": {k: float(np.median([r["stages"].get(k, 0.0) for r in runs])) for k in report.STAGE_ORDER},
            "first_clip_seconds": warm.get("seconds") if warm else None,
            "lora_seconds_first_clip": warm.get("lora_seconds") if warm else None,
            "lora_bytes": warm.get("lora_bytes") if warm else None}


def _psnr(a: np.ndarray, b: np.ndarray) -> float | None:
    v = report.psnr(a, b)
    return None if v == float("inf") else v  # identical frames: JSON null, shown as "identical"


def planned_rows(wl: Workload, variants: list[Variant]) -> list[dict[str, Any]]:
    """Cache rows counted from vidrt's plan, not run: TeaCache and MagCache decide from the timesteps
    alone (`vidrt cache plan`), so the block-stack runs of a clip are known before it (the tests check
    that a run counts exactly its planned mask). No seconds, no diffusers side."""
    from vidrt.pipeline import Pipeline
    from vidrt.request import Request

    pipe = Pipeline.load(wl.package, verify=False, threads=1, warn=lambda m: None)
    rows = []
    for v in variants:
        c = v.clip
        mask = "C" * c.steps if c.cache is None else pipe.cache_mask(Request(
            prompt=c.prompt, width=c.width, height=c.height, num_frames=c.frames, steps=c.steps,
            guidance=c.guidance, shift=c.shift, scheduler=c.scheduler, cache=c.cache))
        rows.append({"label": v.label, "planned": True, "clip": _clip_row(c), "same_as": None,
                     "no_reference": "not run (counted from the plan)", "load": [_load(), _load()],
                     "sides": {"vidrt": {"block_stack_runs": mask.count("C"), "seconds_median": None,
                                         "cache_mask": "" if c.cache is None else mask}}})
    return rows


def _clip_row(c: Clip) -> dict[str, Any]:
    return {k: val for k, val in vars(c).items() if k not in ("prompt", "negative_prompt")}


def run_axes(wl: Workload, axes: tuple[str, ...], pairs: int, threads: int | None, reference: bool,
             cache_methods: tuple[str, ...], lora_dir: Path, log: Any, recipe_steps: int = 50,
             cache_timed: bool = True) -> dict[str, Any]:
    """Both axes of one workload: the variants, their runs (grouped), and the rows of each table.
    cache_timed False: the cache rows are counted from the plan (TeaCache/MagCache/none only), not run."""
    from vidrt.package.manifest import load_manifest

    manifest = load_manifest(wl.package, verify=False)
    spec = manifest.model
    c = wl.clip
    noise = np.random.default_rng(0).standard_normal(spec.latent_shape(c.width, c.height, c.frames), dtype=np.float32)
    rec = recipe_variants(wl, manifest, lora_dir, recipe_steps)
    variants = list(rec) if "recipe" in axes else []
    planned: list[Variant] = []
    if "cache" in axes:
        cached = cache_variants(wl, manifest, cache_methods, rec if "recipe" in axes else [])
        if cache_timed:
            variants += cached
        else:
            planned = [replace(v, same_as=None) for v in cached]
    runs: dict[str, dict[str, Any]] = {}
    for group in dict.fromkeys(v.group for v in variants):
        todo = [v for v in variants if v.group == group and v.same_as is None]
        if todo:
            log(f"  {wl.name}: group {group!r} ({', '.join(v.label for v in todo)}) in fresh processes ...")
            runs.update(run_group(wl, todo, pairs, threads, reference, noise, log))
    rows: dict[str, list[dict[str, Any]]] = {a: [] for a in axes}
    for v in variants:
        got = runs[v.same_as or v.label]
        row: dict[str, Any] = {"label": v.label, "clip": _clip_row(v.clip),
                               "no_reference": v.no_reference, "same_as": v.same_as, "load": got["load"],
                               "sides": {s: _side(got[s], got["warm"].get(s)) for s in ("vidrt", "diffusers")
                                         if got[s]}}
        a, b = got["vidrt"], got["diffusers"]
        if b:
            row["ratio_per_pair"] = [y["seconds"] / x["seconds"] for x, y in zip(a, b, strict=True)]
            row["ratio_median"] = float(np.median(row["ratio_per_pair"]))
            if all("cpu_seconds" in x for x in a + b):
                row["cpu_ratio_median"] = float(np.median([y["cpu_seconds"] / x["cpu_seconds"]
                                                           for x, y in zip(a, b, strict=True)]))
            values = [report.psnr(x["frames"], y["frames"]) for x, y in zip(a, b, strict=True)]
            row["psnr_vs_diffusers_db"] = None if min(values) == float("inf") else min(values)
        rows[v.axis].append(row)
    for axis in rows:  # speed and quality against the axis's first row (50 steps + CFG; no cache)
        if not rows[axis] or axis == "cache" and planned:
            continue
        first = rows[axis][0]
        base = runs[first["same_as"] or first["label"]]
        for row in rows[axis]:
            got = runs[row["same_as"] or row["label"]]
            for s in row["sides"]:
                if base[s]:
                    row["sides"][s]["speedup_vs_first"] = (first["sides"][s]["seconds_median"]
                                                           / row["sides"][s]["seconds_median"])
                    row["sides"][s]["psnr_vs_first_db"] = _psnr(got[s][-1]["frames"], base[s][-1]["frames"])
    if planned:
        rows["cache"] = planned_rows(wl, planned)
    return {"workload": wl.name, "note": wl.note, "pairs": pairs, "threads": threads,
            "size": f"{c.width}x{c.height}x{c.frames}", "tokens": spec.num_tokens(c.width, c.height, c.frames),
            "package": _rel(wl.package), "rows": rows}


# ---- tables ---------------------------------------------------------------------------------------


def _sec(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def _wall_cpu(s: dict[str, Any]) -> str:
    """Wall seconds, and the process's CPU seconds where the run recorded them."""
    cpu = s.get("cpu_seconds_median")
    return _sec(s["seconds_median"]) + (f" ({_sec(cpu)} CPU)" if cpu is not None else "")


def _db(x: float | None, present: bool = True) -> str:
    if not present:
        return "-"
    return "identical" if x is None else f"{x:.1f} dB"


def _both(row: dict[str, Any], fn: Any) -> tuple[str, str]:
    v, d = row["sides"]["vidrt"], row["sides"].get("diffusers")
    return fn(v), (fn(d) if d else "-")


def axis_markdown(res: dict[str, Any], axis: str) -> str:
    """One axis of one workload as a markdown table (README and results/*.txt)."""
    rows = res["rows"][axis]
    loads = [x for r in rows for x in r["load"]]
    head = (f"**{res['workload']}** ({res['size']}, {res['tokens']} tokens; {res['pairs']} timed pair(s) per row, "
            f"median; load average {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} cores)")
    if axis == "recipe":
        lines = [head, "",
                 "| recipe | DiT calls per clip | vidrt s/clip | diffusers s/clip | diffusers / vidrt "
                 "| median step s, vidrt / diffusers | vidrt speed-up vs row 1 | PSNR vidrt vs diffusers "
                 "| first clip incl. LoRA load, vidrt / diffusers |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            calls = _both(r, lambda s: str(s["dit_calls"]))
            step = _both(r, lambda s: _sec(s["step_median"]))
            secs = _both(r, _wall_cpu)
            first = "-"
            if r["clip"]["reference_loras"] or r["clip"]["recipe"]:
                f = _both(r, lambda s: _sec(s["first_clip_seconds"]))
                merge = _both(r, lambda s: _sec(s["lora_seconds_first_clip"]))
                first = f"{f[0]} / {f[1]} s (LoRA {merge[0]} / {merge[1]} s)"
            lines.append(f"| {r['label']} | {calls[0]}" + (f" / {calls[1]}" if calls[1] != calls[0] else "")
                         + f" | {secs[0]} | {secs[1]} | {_ratio(r)} | {step[0]} / {step[1]} | "
                         f"{r['sides']['vidrt'].get('speedup_vs_first', 1.0):.2f}x | "
                         f"{_db(r.get('psnr_vs_diffusers_db'), 'ratio_median' in r)} | {first} |")
    else:
        lines = [head, "",
                 "| cache | block-stack runs vidrt / diffusers | vidrt s/clip | diffusers s/clip | diffusers / vidrt "
                 "| vidrt speed-up vs none | PSNR vidrt vs diffusers | PSNR vs uncached (vidrt) | vidrt's mask |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            runs = _both(r, lambda s: f"{s['block_stack_runs']:g}")
            secs = _both(r, _wall_cpu)
            v = r["sides"]["vidrt"]
            same = f" (the run above: {r['same_as']})" if r["same_as"] else ""
            ref = r["no_reference"] or secs[1]
            speedup = f"{v['speedup_vs_first']:.2f}x" if "speedup_vs_first" in v else "-"
            lines.append(f"| {r['label']}{same} | {runs[0]} / {runs[1] if not r['no_reference'] else '-'} | "
                         f"{secs[0] if not r.get('planned') else 'not timed'} | {ref} | {_ratio(r)} | {speedup} | "
                         f"{_db(r.get('psnr_vs_diffusers_db'), 'ratio_median' in r)} | "
                         f"{_db(v['psnr_vs_first_db']) if 'psnr_vs_first_db' in v and r is not rows[0] else '-'} | "
                         f"`{v['cache_mask'] or '-'}` |")
    return "\n".join(lines)


def _ratio(r: dict[str, Any]) -> str:
    if "ratio_median" not in r:
        return "-"
    cpu = f" ({r['cpu_ratio_median']:.2f}x CPU)" if "cpu_ratio_median" in r else ""
    return f"{r['ratio_median']:.2f}x{cpu}"
