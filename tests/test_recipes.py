"""CFG-free steps, the distilled Euler sampler and named recipes (issue 12 items 1-2).

References: diffusers `FlowMatchEulerDiscreteScheduler(shift=5).set_timesteps(sigmas=[1, .75, .5, .25])`
(the distill schedule, shared/reference/fast_paths.md B.4) and diffusers `WanPipeline` with
guidance_scale=1 (no unconditional pass), on the tiny random Wan2.1 checkpoint of tests/conftest.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from vidrt.errors import UsageError
from vidrt.package.recipes import all_recipes
from vidrt.package.registry import get_variant
from vidrt.pipeline import Pipeline, plan_steps
from vidrt.request import Request, resolve
from vidrt.schedulers import make_schedule, make_solver

PROMPT = "a red cat walks on the beach"
NEGATIVE = "blue sky night"
W, H, F = 64, 64, 9
DISTILL = (1000.0, 750.0, 500.0, 250.0)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def distill_scheduler(shift: float, sigmas: list[float]):
    """diffusers' Euler scheduler on a fixed sigma list: WanPipeline calls set_timesteps(num_steps) only."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    class Distill(FlowMatchEulerDiscreteScheduler):
        def set_timesteps(self, num_inference_steps=None, device=None, **_):
            return super().set_timesteps(sigmas=sigmas, device=device)

    return Distill(num_train_timesteps=1000, shift=shift)


def test_euler_schedule_equals_diffusers_step_by_step():
    ref = distill_scheduler(5.0, [1.0, 0.75, 0.5, 0.25])
    ref.set_timesteps(4)
    ours = make_schedule("euler", 4, 5.0, 1000, DISTILL)
    assert [s.timestep for s in ours] == ref.timesteps.tolist()  # 1000, 937.5, 833.33.., 625: fractional
    assert [s.sigma for s in ours] + [0.0] == ref.sigmas.tolist()
    assert ours[1].timestep == 937.5
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 3, 8, 8), dtype=np.float32)
    y = torch.from_numpy(x.copy())
    solver = make_solver("euler", ours)
    for i, t in enumerate(ref.timesteps):
        v = rng.standard_normal(x.shape, dtype=np.float32)
        x = solver.step(v, x)
        y = ref.step(torch.from_numpy(v), t, y).prev_sample
        assert np.array_equal(x, y.numpy()), f"step {i}"


def test_a14b_expert_switch_by_boundary_is_lightx2v_step_index_2():
    """At shift 5 the boundary 0.875 puts steps {1000, 937.5} on the high-noise expert and
    {833.3, 625} on the low-noise one: LightX2V's boundary_step_index 2 (fast_paths.md B.2)."""
    spec = get_variant("wan2.2-t2v-a14b")
    s = resolve(Request(prompt="x", recipe="lightx2v-4step"), spec)
    plan = plan_steps(SimpleNamespace(model=spec), s)
    assert [p.expert for p in plan] == ["dit_high", "dit_high", "dit_low", "dit_low"]
    assert not any(p.cfg for p in plan)


def test_recipe_fields_and_overrides():
    spec = get_variant("wan2.1-t2v-1.3b")
    s = resolve(Request(prompt="x", recipe="lightx2v-4step"), spec)
    assert (s.scheduler, s.steps, s.timesteps, s.shift, s.guidance_high_noise) == ("euler", 4, DISTILL, 5.0, 1.0)
    s = resolve(Request(prompt="x", recipe="lightx2v-4step", shift=3.0, guidance=2.0), spec)
    assert (s.shift, s.guidance_high_noise, s.timesteps) == (3.0, 2.0, DISTILL)
    s = resolve(Request(prompt="x", recipe="lightx2v-4step", steps=6), spec)  # linspace, 6 steps
    assert s.steps == 6 and s.timesteps is None and s.scheduler == "euler"
    # an explicit sampler other than the recipe's drops its timestep list too (keeps its 4 steps)
    s = resolve(Request(prompt="x", recipe="lightx2v-4step", scheduler="unipc"), spec)
    assert (s.scheduler, s.steps, s.timesteps, s.shift) == ("unipc", 4, None, 5.0)
    s = resolve(Request(prompt="x", recipe="lightx2v-4step", scheduler="euler"), spec)
    assert s.timesteps == DISTILL
    assert "lightning-4step" in all_recipes()
    with pytest.raises(UsageError, match="unknown recipe 'nope'; use one of"):
        resolve(Request(prompt="x", recipe="nope"), spec)
    with pytest.raises(UsageError, match="timesteps is for scheduler='euler', not unipc; add scheduler='euler'"):
        resolve(Request(prompt="x", scheduler="unipc", timesteps=DISTILL), spec)
    with pytest.raises(UsageError, match="decrease strictly"):
        resolve(Request(prompt="x", timesteps=(500.0, 750.0)), spec)


class _Counting:
    """An engine wrapper counting runs and batch rows."""

    def __init__(self, engine):
        self.engine, self.rows = engine, []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def run(self, feeds):
        self.rows.append(next(iter(feeds.values())).shape[0])
        return self.engine.run(feeds)


def test_cfg_free_run_equals_diffusers_and_halves_dit_calls(tiny_t2v_checkpoint, tiny_t2v_package):
    from diffusers import WanPipeline

    pipe = Pipeline.load(tiny_t2v_package)
    noise = np.random.default_rng(3).standard_normal(pipe.manifest.model.latent_shape(W, H, F), dtype=np.float32)
    text = pipe._engines["text_encoder"] = _Counting(pipe.engine("text_encoder"))
    req = Request(prompt=PROMPT, negative_prompt=NEGATIVE, width=W, height=H, num_frames=F, recipe="lightx2v-4step")
    free = pipe.run(req, noise=noise)
    assert text.rows == [1], "no negative-prompt encoding when no step needs CFG"
    cfg = pipe.run(Request(prompt=PROMPT, negative_prompt=NEGATIVE, width=W, height=H, num_frames=F,
                           recipe="lightx2v-4step", guidance=5.0), noise=noise)
    assert text.rows == [1, 1, 1]
    assert (free.stats.dit_calls, cfg.stats.dit_calls) == (4, 8)  # DiT evaluations: half without CFG
    assert free.stats.to_dict()["dit_calls"] == 4

    ref_pipe = WanPipeline.from_pretrained(tiny_t2v_checkpoint, scheduler=distill_scheduler(5.0, [1, .75, .5, .25]))
    ref_pipe.text_encoder.config._attn_implementation = "eager"
    ref_pipe.set_progress_bar_config(disable=True)
    calls = []
    ref_pipe.transformer.register_forward_hook(lambda m, a, k, out: calls.append(1), with_kwargs=True)
    out = ref_pipe(prompt=PROMPT, negative_prompt=NEGATIVE, height=H, width=W, num_frames=F, num_inference_steps=4,
                   guidance_scale=1.0, latents=torch.from_numpy(noise)[None], output_type="np").frames[0]
    ref = np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)
    value = psnr(free.frames, ref)
    print(f"CFG-free 4-step Euler: vidrt vs diffusers guidance_scale=1: {value:.1f} dB; DiT calls "
          f"vidrt {free.stats.dit_calls}, diffusers {len(calls)}, vidrt with CFG {cfg.stats.dit_calls}")
    assert len(calls) == free.stats.dit_calls
    assert value >= 75.0  # measured 87.4 dB; near it, so a wrong guidance or timestep list fails


def test_negative_prompt_without_cfg_warns_once():
    """guidance 1 makes no unconditional pass, so a negative prompt the user gave does nothing: say so
    (a tester's `--negative-prompt blurry --guidance 1` was silently ignored); with CFG, no warning."""
    from vidrt.pipeline import Pipeline
    from vidrt.request import Request

    said: list[str] = []
    pipe = Pipeline.load(threads=1, warn=said.append)
    pipe.run(Request(prompt="a red circle moving left", negative_prompt="blurry", guidance=1.0, steps=2, seed=1))
    assert [m for m in said if "negative prompt" in m] == [said[-1]] and len(said) == 1, said
    said.clear()
    pipe.run(Request(prompt="a red circle moving left", negative_prompt="blurry", guidance=2.0, steps=2, seed=1))
    assert not said, said
