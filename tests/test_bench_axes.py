"""The bench's recipe and cache axes (benchmarks/axes.py): what each row runs and what its table counts,
on the bundled model, vidrt side only (seconds are printed by the bench, never asserted here)."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `benchmarks` lives in the source checkout
from vidrt.package.manifest import load_manifest
from vidrt.package.recipes import all_recipes
from vidrt.pipeline import Pipeline
from vidrt.request import Request

from benchmarks import axes, workloads  # noqa: E402


@pytest.fixture(scope="module")
def bundled():
    if workloads.tiny_real() is None:
        pytest.skip("no bundled model with its checkpoint in this build")
    wl = workloads.tiny()
    return wl, load_manifest(wl.package, verify=False)


def test_rows_run_like_for_like(bundled, tmp_path):
    """The 4-step row is the package's own recipe on both sides; a 50-step 'none' row is the recipe axis's
    50-step run (not run twice); diffusers gets the same MagCache table and no row for TeaCache/EasyCache."""
    wl, manifest = bundled
    rec = axes.recipe_variants(wl, manifest, tmp_path)
    assert [v.clip.guidance for v in rec[:2]] == [wl.clip.guidance, 1.0] and rec[0].clip.steps == 50
    fast = all_recipes(manifest.model.recipes)["fast"]
    clip = rec[2].clip
    assert (clip.scheduler, clip.steps, clip.shift, clip.guidance, clip.recipe) == \
        ("euler", len(fast.timesteps), fast.shift, 1.0, "fast")
    assert clip.sigmas == tuple(t / 1000 for t in fast.timesteps)
    assert clip.loras == () and clip.reference_loras == tuple(
        (str(wl.package / s.file), s.strength) for s in fast.loras)  # vidrt: from its recipe; diffusers: the file
    assert rec[2].group != rec[0].group  # a LoRA set gets its own processes

    cache = axes.cache_variants(wl, manifest, axes.CACHE_METHODS, rec)
    steps = manifest.cache_table.steps
    assert all(v.clip.steps == steps and v.same_as is None for v in cache)  # calibrated at 25 steps: own runs
    mag = next(v for v in cache if v.label == "magcache").clip.reference_cache
    assert mag["kind"] == "magcache" and len(mag["mag_ratios"]) == mag["num_inference_steps"] == steps
    assert {v.label for v in cache if v.no_reference} == {"teacache", "easycache"}
    published = axes.cache_variants(wl, replace(manifest, cache_table=None), ("none", "fbcache"), rec)
    assert published[0].same_as == rec[0].label and published[1].same_as is None


def test_tables_count_dit_calls_and_block_stack_runs(bundled, tmp_path):
    wl, manifest = bundled
    res = axes.run_axes(wl, ("recipe", "cache"), pairs=1, threads=1, reference=False,
                        cache_methods=("none", "magcache", "teacache"), lora_dir=tmp_path, log=lambda *a: None,
                        recipe_steps=3)
    rec = res["rows"]["recipe"]
    assert [r["sides"]["vidrt"]["dit_calls"] for r in rec] == [6, 3, 4]  # CFG: 2 per step; CFG off and 4-step: 1
    assert all(set(r["sides"]) == {"vidrt"} and "ratio_median" not in r for r in rec)
    assert rec[2]["sides"]["vidrt"]["first_clip_seconds"] > 0  # the LoRA group's first clip is the recipe itself
    assert all(r["sides"]["vidrt"]["cpu_seconds_median"] > 0 for r in rec)

    pipe = Pipeline.load(wl.package, warn=lambda m: None)
    steps = manifest.cache_table.steps
    rows = {r["label"]: r["sides"]["vidrt"] for r in res["rows"]["cache"]}
    assert rows["none"]["block_stack_runs"] == steps
    for method in ("magcache", "teacache"):  # counted by the run = planned before it
        mask = pipe.cache_mask(Request(prompt="-", steps=steps, cache=method))
        assert rows[method]["cache_mask"] == mask
        assert rows[method]["block_stack_runs"] == mask.count("C") < steps

    planned = axes.run_axes(wl, ("cache",), pairs=1, threads=1, reference=False,  # counted, not run
                            cache_methods=("none", "magcache", "teacache"), lora_dir=tmp_path,
                            log=lambda *a: None, cache_timed=False)["rows"]["cache"]
    assert [(r["label"], r["sides"]["vidrt"]["block_stack_runs"]) for r in planned] == \
        [(label, rows[label]["block_stack_runs"]) for label in ("none", "magcache", "teacache")]
    assert all(r["sides"]["vidrt"]["seconds_median"] is None and set(r["sides"]) == {"vidrt"} for r in planned)

    table = axes.axis_markdown(res, "cache").splitlines()
    body = [line for line in table if line.startswith("| ") and not line.startswith("| cache")]
    assert len(body) == 3 and all(line.count("|") == table[2].count("|") for line in body)
    assert "diffusers has no TeaCache hook" in body[2]
    recipe_table = axes.axis_markdown(res, "recipe")
    assert "| 3 steps + CFG" in recipe_table and "load average" in recipe_table
