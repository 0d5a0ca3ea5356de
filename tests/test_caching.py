"""Step caching (vidrt.caching) against the reference implementations, on tiny random checkpoints.

- the DiT pieces chained = the whole DiT graph (same initializers, <= 1e-5)
- TeaCache's skip mask = TeaCache4Wan2.1 `teacache_forward`'s decisions, driven by e0 from diffusers'
  WanTransformer3DModel of the same checkpoint (the decision function is ported below, test-only)
- MagCache's mask = MagCache4Wan2.1 `magcache_forward`'s decisions (ported below) on its published
  tables, and the clip with MagCache = diffusers' WanPipeline with its MagCacheConfig hook
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from vidrt import cache_tables as T
from vidrt.caching import magcache_mask, magcache_ratios, parse_cache
from vidrt.errors import UsageError
from vidrt.package import contracts as C
from vidrt.pipeline import Pipeline
from vidrt.request import Request, resolve

PROMPT, NEGATIVE = "a red cat walks on the beach", "blue sky night"
WIDTH, HEIGHT, FRAMES = 64, 64, 9


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


# ---- the reference decision functions, ported (test-only) -------------------------------------


class RefTeaCache:
    """ali-vilab/TeaCache TeaCache4Wan2.1/teacache_generate.py `teacache_forward` (L519-550): the
    even (cond) / odd (uncond) call state machine; `decide` takes the modulated input of one call."""

    def __init__(self, steps: int, coefficients, thresh: float, use_ret_steps: bool) -> None:
        self.cnt, self.num_steps = 0, 2 * steps
        self.ret_steps = 5 * 2 if use_ret_steps else 1 * 2
        self.cutoff_steps = steps * 2 if use_ret_steps else steps * 2 - 2
        self.coefficients, self.thresh = coefficients, thresh
        self.acc = {True: 0.0, False: 0.0}
        self.prev = {True: None, False: None}

    def decide(self, modulated_inp: torch.Tensor) -> bool:
        even = self.cnt % 2 == 0
        if self.cnt < self.ret_steps or self.cnt >= self.cutoff_steps:
            calc = True
            self.acc[even] = 0
        else:
            rescale = np.poly1d(self.coefficients)
            prev = self.prev[even]
            self.acc[even] += rescale(((modulated_inp - prev).abs().mean() / prev.abs().mean()).cpu().item())
            if self.acc[even] < self.thresh:
                calc = False
            else:
                calc = True
                self.acc[even] = 0
        self.prev[even] = modulated_inp.clone()
        self.cnt += 1
        return calc


def ref_magcache_calls(mag_ratios: np.ndarray, steps: int, thresh: float, k: int, rr: float) -> list[bool]:
    """Zehong-Ma/MagCache MagCache4Wan2.1/magcache_generate.py: nearest_interp when the table does not
    have 2*steps entries (L914-919), then `magcache_forward`'s decision per call (L279-292).
    Returns 'blocks computed' per call, cond/uncond interleaved."""
    def nearest_interp(src, n):
        if n == 1:
            return np.array([src[-1]])
        scale = (len(src) - 1) / (n - 1)
        return src[np.round(np.arange(n) * scale).astype(int)]

    if len(mag_ratios) != steps * 2:
        con, ucon = nearest_interp(mag_ratios[0::2], steps), nearest_interp(mag_ratios[1::2], steps)
        mag_ratios = np.concatenate([con.reshape(-1, 1), ucon.reshape(-1, 1)], axis=1).reshape(-1)
    num_steps = steps * 2
    acc_ratio, acc_steps, acc_err = [1.0, 1.0], [0, 0], [0.0, 0.0]
    out = []
    for cnt in range(num_steps):
        skip = False
        if cnt >= int(num_steps * rr):
            acc_ratio[cnt % 2] = acc_ratio[cnt % 2] * mag_ratios[cnt]
            acc_steps[cnt % 2] += 1
            acc_err[cnt % 2] += np.abs(1 - acc_ratio[cnt % 2])
            if acc_err[cnt % 2] < thresh and acc_steps[cnt % 2] <= k:
                skip = True
            else:
                acc_err[cnt % 2], acc_steps[cnt % 2], acc_ratio[cnt % 2] = 0, 0, 1.0
        out.append(not skip)
    return out


# ---- tests -----------------------------------------------------------------------------------


def test_pieces_equal_the_whole_dit(tiny_t2v_package):
    """embed -> block0 -> blocks_rest -> head on ONNX Runtime = the monolithic graph (<= 1e-5), and
    the pieces' initializers are the whole graph's, by name and value (LoRA keys apply unchanged)."""
    pkg = tiny_t2v_package

    def session(name):
        return ort.InferenceSession(str(pkg / f"{name}.onnx"), providers=["CPUExecutionProvider"])

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 16, 3, 8, 12), dtype=np.float32)
    t = np.array([937.5, 937.5], np.float32)
    ctx = rng.standard_normal((2, 512, 64), dtype=np.float32)
    whole = session("dit").run(None, {C.LATENTS: x, C.TIMESTEP: t, C.CONTEXT: ctx})[0]
    p = {piece: session(f"dit.{piece}") for piece in C.DIT_PIECES}
    ce = p[C.TEXT_EMBED].run(None, {C.CONTEXT: ctx})[0]
    temb, e0 = p[C.TIME_EMBED].run(None, {C.TIMESTEP: t})
    tokens, cos, sin = p[C.PATCH_EMBED].run(None, {C.LATENTS: x})
    side = {C.TIMESTEP_PROJ: e0, C.CONTEXT_EMB: ce, C.ROPE_COS: cos, C.ROPE_SIN: sin, C.LATENTS: x}
    x1 = p[C.BLOCK0].run(None, {C.TOKENS: tokens, **side})[0]
    x_last = p[C.BLOCKS_REST].run(None, {C.TOKENS: x1, **side})[0]
    out = p[C.HEAD].run(None, {C.TOKENS: x_last, C.TEMB: temb, C.LATENTS: x})[0]
    err = float(np.abs(out - whole).max())
    print(f"pieces vs whole DiT: max |diff| = {err:.2e} (max |out| {np.abs(whole).max():.2f})")
    assert err <= 1e-5

    def inits(name):
        return {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(pkg / f"{name}.onnx")).graph.initializer
                if i.name.startswith("model.")}

    whole_w = inits("dit")
    piece_w = {}
    for piece in C.DIT_PIECES:
        piece_w.update(inits(f"dit.{piece}"))
    assert set(piece_w) == set(whole_w)
    assert all(np.array_equal(piece_w[k], whole_w[k]) for k in whole_w)


def test_no_cache_and_none_agree_and_pieces_run_the_same_clip(tiny_t2v_package):
    """The no-cache run (whole graph) and a MagCache run with a threshold of 0 (never skips, pieces)
    make the same clip; stats count every block-stack run."""
    pipe = Pipeline.load(tiny_t2v_package)
    req = Request(prompt=PROMPT, width=WIDTH, height=HEIGHT, num_frames=FRAMES, steps=5, seed=2)
    plain = pipe.run(req)
    pieces = pipe.run(replace(req, cache="magcache:0"))
    assert plain.stats.cache.block_stack_runs == 5 and pieces.stats.cache.block_stack_runs == 5
    assert pieces.stats.cache.block_stack_skips == 0
    assert psnr(plain.frames, pieces.frames) >= 70.0


def test_teacache_mask_matches_reference(tiny_t2v_checkpoint, tiny_t2v_package):
    """vidrt's precomputed TeaCache mask = the reference's per-call decisions (cond and uncond),
    driven by e0 / e from diffusers' WanTransformer3DModel of the same checkpoint."""
    from diffusers import WanTransformer3DModel
    from vidrt.pipeline import plan_steps

    model = WanTransformer3DModel.from_pretrained(tiny_t2v_checkpoint / "transformer").eval()
    pipe = Pipeline.load(tiny_t2v_package)
    coeffs = T.TEACACHE_COEFFICIENTS["wan2.1-t2v-1.3b"]  # the tiny package is a 1.3B variant
    seen = set()
    for steps, use_ret, thresh in ((20, True, 0.3), (20, False, 0.08), (12, True, 1.0), (30, False, 0.5)):
        req = Request(prompt=PROMPT, steps=steps, width=WIDTH, height=HEIGHT, num_frames=FRAMES,
                      cache=f"teacache:{thresh}")
        ref = RefTeaCache(steps, coeffs["e0" if use_ret else "e"], thresh, use_ret)
        want = []
        for p in plan_steps(pipe.manifest, resolve(req, pipe.manifest.model)):
            with torch.no_grad():
                temb, proj, _, _ = model.condition_embedder(torch.tensor([p.step.timestep]), torch.zeros(1, 1, 64))
            inp = proj if use_ret else temb
            cond, uncond = ref.decide(inp), ref.decide(inp)
            assert cond == uncond  # identical e for both halves: one decision serves the batch
            want.append("C" if cond else "s")
        if use_ret:
            got = pipe.cache_mask(req)
        else:  # the e variant: the calibrated-table path with the published `e` coefficients
            pipe.manifest = replace(pipe.manifest, cache_table=_table(steps, teacache_e=coeffs["e"]))
            got = pipe.cache_mask(req)
            pipe.manifest = replace(pipe.manifest, cache_table=None)
        print(f"teacache steps {steps} use_ret_steps {use_ret} thresh {thresh}: {got}")
        assert got == "".join(want)
        seen |= set(got)
    assert seen == {"C", "s"}  # the cases skip some steps and run others


def _table(steps: int, **kw):
    from vidrt.package.manifest import CacheTable

    return CacheTable(steps=steps, shift=5.0, scheduler="unipc", mag_ratios=kw.pop("mag_ratios", ()), **kw)


@pytest.mark.parametrize("model", ["wan2.1-t2v-1.3b", "wan2.1-t2v-14b"])
def test_magcache_mask_matches_reference(model):
    """The published tables at the published and other step counts / settings: vidrt's one decision
    per batch-2 call runs the blocks where the reference's cond or uncond call does; at the published
    settings the two coincide (fast_paths.md C.6), so it is exactly the reference's mask."""
    table = np.asarray(T.MAGCACHE_RATIOS[model])
    for steps, thresh, k, rr in ((50, 0.12, 2, 0.2), (50, 0.12, 4, 0.2), (50, 0.24, 6, 0.2), (25, 0.12, 2, 0.2),
                                 (17, 0.06, 3, 0.1), (8, 0.2, 2, 0.25)):
        calls = ref_magcache_calls(table, steps, thresh, k, rr)
        cond, uncond = calls[0::2], calls[1::2]
        ours = magcache_mask(magcache_ratios(tuple(table), steps), thresh, k, rr)
        assert ours == [c or u for c, u in zip(cond, uncond, strict=True)], (steps, thresh, k, rr)
        if steps == 50:
            assert cond == uncond and ours == cond, (thresh, k)
    # fast_paths.md C.2 (simulated from the reference): 1.3B E012K4R02 runs the blocks 21 of 50 steps
    if model == "wan2.1-t2v-1.3b":
        mask = magcache_mask(magcache_ratios(tuple(table), 50), 0.12, 4, 0.2)
        assert "".join("C" if m else "s" for m in mask) == "CCCCCCCCCCssssCssssCssssCssssCssssCsssCssCssCsCsCC"


def test_magcache_clip_matches_diffusers_hook(tiny_t2v_checkpoint, tiny_t2v_package, tmp_path):
    """MagCache end to end: vidrt with --cache magcache = diffusers' WanPipeline with
    `MagCacheConfig` on its WanTransformer3DModel, same table, same noise (>= 70 dB)."""
    from diffusers import WanPipeline
    from diffusers.hooks import MagCacheConfig
    from test_pipeline import official_unipc

    # 10 steps: the retention window is 2 steps in both (reference: int(2*10*0.2) calls; diffusers:
    # int(0.2*10 + 0.5) steps). Per-step ratios, the same for both halves; skips with K=2, thresh 0.12.
    steps, shift, guidance = 10, 5.0, 5.0
    cond_ratios = [1.0, 0.97, 0.985, 0.99, 0.96, 0.99, 0.995, 0.97, 0.95, 0.99]
    pkg = tmp_path / "pkg"
    shutil.copytree(tiny_t2v_package, pkg)
    manifest = json.loads((pkg / "manifest.json").read_text())
    manifest["cache_table"] = {"steps": steps, "shift": shift, "scheduler": "unipc",
                               "mag_ratios": [r for v in cond_ratios for r in (v, v)]}
    (pkg / "manifest.json").write_text(json.dumps(manifest))

    pipe = Pipeline.load(pkg)
    noise = np.random.default_rng(7).standard_normal(pipe.manifest.model.latent_shape(WIDTH, HEIGHT, FRAMES),
                                                     dtype=np.float32)
    req = Request(prompt=PROMPT, negative_prompt=NEGATIVE, width=WIDTH, height=HEIGHT, num_frames=FRAMES,
                  steps=steps, shift=shift, guidance=guidance, cache="magcache:0.12")
    mask = pipe.cache_mask(req)
    assert "s" in mask and mask.count("C") < steps, mask
    ours = pipe.run(req, noise=noise)
    assert ours.stats.cache.block_stack_skips == mask.count("s")

    ref = WanPipeline.from_pretrained(tiny_t2v_checkpoint, scheduler=official_unipc(shift))
    ref.text_encoder.config._attn_implementation = "eager"
    ref.set_progress_bar_config(disable=True)
    ref.transformer.enable_cache(MagCacheConfig(threshold=0.12, max_skip_steps=2, retention_ratio=0.2,
                                                num_inference_steps=steps, mag_ratios=cond_ratios))
    frames = ref(prompt=PROMPT, negative_prompt=NEGATIVE, height=HEIGHT, width=WIDTH, num_frames=FRAMES,
                 num_inference_steps=steps, guidance_scale=guidance, latents=torch.from_numpy(noise)[None],
                 output_type="np").frames[0]
    ref_u8 = np.clip(np.rint(frames * 255.0), 0, 255).astype(np.uint8)
    uncached = pipe.run(replace(req, cache=None), noise=noise).frames
    value = psnr(ours.frames, ref_u8)
    print(f"MagCache {mask}: vidrt vs diffusers MagCacheConfig {value:.1f} dB; "
          f"vs uncached {psnr(ours.frames, uncached):.1f} dB")
    assert value >= 70.0
    assert psnr(ours.frames, uncached) < value  # the skips changed the clip the same way in both


def test_dynamic_methods_skip_and_stay_close(run_package, tmp_path):
    """FBCache and EasyCache skip steps on the bundled model and stay near the uncached clip."""
    pkg = tmp_path / "pkg"
    shutil.copytree(run_package, pkg)
    if "dit.block0" not in json.loads((pkg / "manifest.json").read_text())["components"]:
        from vidrt.export.package import add_dit_pieces

        add_dit_pieces(pkg)
    pipe = Pipeline.load(pkg)
    req = Request(prompt="a red circle moving left", seed=1)
    base = pipe.run(req)
    for method in ("fbcache:0.1", "easycache:0.1"):
        r = pipe.run(replace(req, cache=method))
        c = r.stats.cache
        print(f"{method}: {c.block_stack_runs} runs, {c.block_stack_skips} skips, "
              f"{psnr(base.frames, r.frames):.1f} dB vs uncached")
        assert c.block_stack_skips > 0 and c.block_stack_runs + c.block_stack_skips == base.settings.steps
        assert c.residual_bytes > 0
        assert psnr(base.frames, r.frames) >= 25.0


def test_calibrate_writes_tables_that_magcache_uses(tiny_t2v_package, tmp_path):
    from vidrt.cache_calibrate import calibrate
    from vidrt.package.manifest import load_manifest

    pkg = tmp_path / "pkg"
    shutil.copytree(tiny_t2v_package, pkg)
    table = calibrate(pkg, [PROMPT], [0], steps=5, log=lambda m: None, size=(WIDTH, HEIGHT), frames=FRAMES)
    assert table.steps == 5 and len(table.mag_ratios) == 10 and table.mag_ratios[:2] == (1.0, 1.0)
    assert all(0.2 < r < 5 for r in table.mag_ratios)
    assert load_manifest(pkg).cache_table == table  # stored; the hashes still verify
    assert table.teacache_e0 == ()  # 4 step-to-step changes cannot fix a degree-4 polynomial: none stored


def test_bad_cache_requests_are_one_line_errors(tiny_t2v_package):
    with pytest.raises(UsageError, match="unknown method"):
        parse_cache("tea")
    with pytest.raises(UsageError, match="threshold"):
        parse_cache("magcache:lots")
    pipe = Pipeline.load(tiny_t2v_package)
    with pytest.raises(UsageError, match="guided, undistilled runs"):
        pipe.run(Request(prompt=PROMPT, steps=2, guidance=1.0, cache="magcache"))
    with pytest.raises(UsageError, match="decide per step"):
        pipe.cache_mask(Request(prompt=PROMPT, cache="fbcache"))


def _lora_over_every_piece(pipe: Pipeline, path) -> None:
    """A rank-4 LoRA (original key format, fast_paths.md A.2) whose keys land in every DiT piece:
    text_embed, time_embed, patch_embed (a bias diff), block0 (+ its modulation), blocks_rest, head."""
    from safetensors.numpy import save_file

    weights = pipe.manifest.components["dit"].weights
    rng = np.random.default_rng(12)
    tensors = {}
    for orig, param in (("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
                        ("time_projection.1", "condition_embedder.time_proj"),
                        ("blocks.0.self_attn.q", "blocks.0.attn1.to_q"),
                        ("blocks.0.cross_attn.k", "blocks.0.attn2.to_k"),
                        ("blocks.1.self_attn.v", "blocks.1.attn1.to_v"), ("blocks.1.ffn.0", "blocks.1.ffn.net.0.proj"),
                        ("head.head", "proj_out")):
        ref = weights[f"{param}.weight"]
        n_out, n_in = ref.shape[::-1] if ref.transposed else ref.shape
        down = rng.standard_normal((4, n_in)) / n_in**0.5
        tensors[f"diffusion_model.{orig}.lora_down.weight"] = down.astype(np.float32)
        tensors[f"diffusion_model.{orig}.lora_up.weight"] = rng.standard_normal((n_out, 4)).astype(np.float32)
        tensors[f"diffusion_model.{orig}.alpha"] = np.array(2.0, np.float32)
    tensors["diffusion_model.patch_embedding.diff_b"] = rng.standard_normal(weights["patch_embedding.bias"].shape
                                                                            ).astype(np.float32) * 0.3
    tensors["diffusion_model.blocks.0.diff_m"] = rng.standard_normal(weights["blocks.0.scale_shift_table"].shape
                                                                     ).astype(np.float32) * 0.3
    save_file(tensors, str(path))


def test_loras_merge_into_the_pieces(tiny_t2v_package, tmp_path):
    """Issue 13 item 4: a LoRA with a piece-based cache method. Each piece gets only the merged
    initializers it holds (its manifest `weights`). Nothing skipped (magcache:0): the same clip as the
    whole graph with the LoRA; with skips: the same clip as the LoRA baked into a copy of the package."""
    from vidrt.errors import PackageError
    from vidrt.export.package import add_dit_pieces
    from vidrt.export.package_extras import bake_loras
    from vidrt.package.manifest import load_manifest, write_manifest
    from vidrt.package.recipes import LoraRef

    pipe = Pipeline.load(tiny_t2v_package)
    comps = pipe.manifest.components
    pieces = [f"dit.{p}" for p in C.DIT_PIECES]
    held = [set(comps[p].weights) for p in pieces]
    assert all(held) and set().union(*held) == set(comps["dit"].weights)  # every weight is in one piece
    assert sum(map(len, held)) == len(comps["dit"].weights)
    lora = tmp_path / "every_piece.safetensors"
    _lora_over_every_piece(pipe, lora)
    loras = (LoraRef(str(lora), 0.8),)
    noise = np.random.default_rng(3).standard_normal(pipe.manifest.model.latent_shape(WIDTH, HEIGHT, FRAMES),
                                                     dtype=np.float32)
    req = Request(prompt=PROMPT, width=WIDTH, height=HEIGHT, num_frames=FRAMES, steps=6, seed=2, loras=loras)
    whole = pipe.run(req, noise=noise)
    cached = pipe.run(replace(req, cache="magcache:0"), noise=noise)
    plain = pipe.run(replace(req, loras=(), cache="magcache:0"), noise=noise)
    assert cached.stats.cache.block_stack_skips == 0 and cached.stats.lora_merge_bytes > 0
    same, changed = psnr(cached.frames, whole.frames), psnr(cached.frames, plain.frames)
    print(f"LoRA, pieces (nothing skipped) vs whole graph: {same:.1f} dB; vs the pieces without the LoRA: "
          f"{changed:.1f} dB")
    assert same >= 70.0
    assert changed < 40.0, "the LoRA must change the clip, or this shows nothing"

    baked = tmp_path / "baked"
    shutil.copytree(tiny_t2v_package, baked)
    m = load_manifest(baked, verify=False)
    write_manifest(baked, replace(m, components={**m.components, **bake_loras(baked, m.components, "dit", loras)}))
    skipping = replace(req, cache="magcache:0.5")
    at_load = pipe.run(skipping, noise=noise)
    assert at_load.stats.cache.block_stack_skips > 0
    assert np.array_equal(at_load.frames, Pipeline.load(baked).run(replace(skipping, loras=()), noise=noise).frames)

    # pieces cut before vidrt recorded their weights: refused with the fix, which works
    old = tmp_path / "old"
    shutil.copytree(tiny_t2v_package, old)
    m = load_manifest(old, verify=False)
    write_manifest(old, replace(m, components={n: replace(c, weights={}) if n in pieces else c
                                               for n, c in m.components.items()}))
    with pytest.raises(PackageError, match="vidrt cache split"):
        Pipeline.load(old).run(skipping, noise=noise)
    add_dit_pieces(old)
    assert np.array_equal(Pipeline.load(old).run(skipping, noise=noise).frames, at_load.frames)
