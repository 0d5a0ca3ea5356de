"""vidrt's whole pipeline against diffusers' WanPipeline driven by the official FlowUniPC scheduler.

Same tiny random-weight checkpoint (diffusers folder), same noise, prompt, negative prompt, steps,
shift and guidance. diffusers runs torch; vidrt runs the exported ONNX package on ONNX Runtime.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import wan_ref
from tiny import TINY_VARIANT, write_diffusers_checkpoint
from vidrt.export.package import export_package
from vidrt.package.registry import get_variant
from vidrt.pipeline import Pipeline
from vidrt.request import Request, resolve

PROMPT = "a red cat walks on the beach"
NEGATIVE = "blue sky night"
WIDTH, HEIGHT, FRAMES, STEPS, SHIFT = 64, 64, 9, 6, 5.0


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


@pytest.fixture(scope="module", params=["t2v", "a14b", "ti2v"])
def tiny_package(request, tmp_path_factory):
    kind = request.param
    if kind == "ti2v":  # exported once per session (conftest), shared with test_export and test_i2v
        tiny, package, _ = request.getfixturevalue("tiny_ti2v_export")
        return kind, tiny.root, package
    if kind == "t2v":  # the same (conftest): shared with test_export, test_lora, test_caching, ...
        return kind, request.getfixturevalue("tiny_t2v_checkpoint"), request.getfixturevalue("tiny_t2v_package")
    root = tmp_path_factory.mktemp(f"ckpt-{kind}")
    write_diffusers_checkpoint(root, kind)
    package = export_package(root, root / "package", variant=TINY_VARIANT[kind], progress=False)
    return kind, root, package


def only(tiny_package, kind: str) -> Path:
    """The package, for tests that need one model kind: the fixture's other kinds skip."""
    got, _, package = tiny_package
    if got != kind:
        pytest.skip(f"one model is enough ({kind})")
    return package


def official_unipc(shift: float):
    """The official scheduler as Wan's text2video.py configures it: shift=1 at construction, the
    real shift given to set_timesteps (constructing with shift=S moves sigma_max/min)."""
    base = wan_ref.load("utils.fm_solvers_unipc").FlowUniPCMultistepScheduler

    class OfficialUniPC(base):
        def set_timesteps(self, num_inference_steps, device=None, **_):
            return super().set_timesteps(num_inference_steps, device=device, shift=shift)

    return OfficialUniPC(num_train_timesteps=1000, shift=1, use_dynamic_shifting=False)


def reference_frames(root: Path, kind: str, noise: np.ndarray, guidance_high: float,
                     guidance_low: float) -> np.ndarray:
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(root, scheduler=official_unipc(SHIFT))
    pipe.text_encoder.config._attn_implementation = "eager"
    pipe.set_progress_bar_config(disable=True)
    kwargs = {}
    if kind == "a14b":  # diffusers: transformer (high noise) with guidance_scale, transformer_2 with guidance_scale_2
        kwargs["guidance_scale_2"] = guidance_low
    out = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, height=HEIGHT, width=WIDTH, num_frames=FRAMES,
               num_inference_steps=STEPS, guidance_scale=guidance_high, latents=torch.from_numpy(noise)[None],
               output_type="np", **kwargs).frames[0]  # [F, H, W, 3] in [0, 1]
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def test_matches_diffusers_pipeline(tiny_package):
    kind, root, package = tiny_package
    pipe = Pipeline.load(package)
    spec = pipe.manifest.model
    noise = np.random.default_rng(7).standard_normal(spec.latent_shape(WIDTH, HEIGHT, FRAMES), dtype=np.float32)
    # a14b: one scale per expert, neither the default (4.0 / 3.0): diffusers guidance_scale / guidance_scale_2
    g_high, g_low = (4.5, 2.5) if kind == "a14b" else (5.0, 5.0)
    req = Request(prompt=PROMPT, negative_prompt=NEGATIVE, width=WIDTH, height=HEIGHT, num_frames=FRAMES,
                  steps=STEPS, shift=SHIFT, scheduler="unipc", guidance=g_high,
                  guidance_low_noise=g_low if kind == "a14b" else None)
    ours = pipe.run(req, noise=noise).frames
    ref = reference_frames(root, kind, noise, g_high, g_low)
    assert ours.shape == ref.shape == (FRAMES, HEIGHT, WIDTH, 3)
    value = psnr(ours, ref)
    print(f"{kind}: PSNR vidrt vs diffusers WanPipeline = {value:.1f} dB")
    # measured 89.0 dB (t2v, a14b); guidance x 0.9 measured 59 dB and an ignored negative prompt 51 dB
    # (issue 17): a threshold near what a correct implementation gets, so those fail
    assert value >= 75.0


def test_negative_prompt_changes_the_clip(tiny_package):
    """The negative prompt is the unconditional branch of CFG: another one must change the clip (an
    implementation that encodes the prompt twice, or zeros, would not)."""
    package = only(tiny_package, "t2v")
    pipe = Pipeline.load(package)
    req = Request(prompt=PROMPT, negative_prompt=NEGATIVE, width=WIDTH, height=HEIGHT, num_frames=FRAMES, steps=3,
                  seed=3, guidance=5.0)
    base = pipe.run(req).frames
    other = pipe.run(replace(req, negative_prompt="a dog runs in snow")).frames
    same = pipe.run(replace(req, negative_prompt=NEGATIVE + "  ")).frames  # cleaned to the same text
    print(f"negative prompt changed: PSNR {psnr(base, other):.1f} dB; same after cleaning: {psnr(base, same):.1f} dB")
    assert np.array_equal(base, same)
    assert psnr(base, other) < 55.0  # measured 46.2 dB; ignoring the negative prompt gives the same clip (inf)


def test_seed_reproducible(tiny_package):
    package = only(tiny_package, "t2v")
    pipe = Pipeline.load(package)
    req = Request(prompt=PROMPT, width=WIDTH, height=HEIGHT, num_frames=FRAMES, steps=3, seed=11)
    a = pipe.run(req).frames
    b = pipe.run(req).frames
    c = pipe.run(replace(req, seed=12)).frames
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_run_never_imports_torch(tiny_package, tmp_path):
    """A full `vidrt run` in a fresh interpreter: torch (and friends) never get imported."""
    package = only(tiny_package, "t2v")
    out = tmp_path / "clip.mp4"
    code = (
        "import sys\n"
        "from vidrt.cli import main\n"
        "try:\n"
        f"    main(['run', '--model', {str(package)!r}, '--prompt', 'a cat', '--size', '64x64', '--frames', '9',"
        f" '--steps', '2', '-o', {str(out)!r}, '--quiet'])\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'onnx') if m in sys.modules)\n"
        "print('HEAVY=' + ','.join(heavy))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "HEAVY=\n" in res.stdout or res.stdout.strip().endswith("HEAVY="), res.stdout
    assert out.is_file()


def test_cfg_as_two_calls_matches_batch_two(tiny_package):
    """The memory plan may split CFG into two batch-1 DiT calls; the clip must not change."""
    package = only(tiny_package, "a14b")
    pipe = Pipeline.load(package)
    req = Request(prompt=PROMPT, width=WIDTH, height=HEIGHT, num_frames=FRAMES, steps=3, seed=3)
    batched = pipe.run(req).frames
    pipe.cfg_batch = 1
    split = pipe.run(req).frames
    value = psnr(batched, split)
    print(f"CFG as two batch-1 calls vs one batch-2 call: {value:.1f} dB")
    # measured: identical (inf dB). One pixel one level off in this clip is 98.6 dB: allow a few rounding
    # flips of another CPU's kernels, nothing more
    assert value >= 90.0


class _PlannedBackend:
    """ONNX Runtime engines behind a device budget, as the TensorRT backend reports one: the pipeline
    then runs by the residency plan. Records (event, engine, DiT batch) in call order."""

    name = "onnxruntime"

    def __init__(self, inner, budget: int) -> None:
        self.inner, self.budget, self.events = inner, budget, []
        self.cpu_features = inner.cpu_features

    def device_memory(self):
        return self.budget, "fp32"

    def stream_weights(self, streamed):
        self.events.append(("stream", tuple(sorted(streamed)), None))

    def tensor_ops(self):
        return self.inner.tensor_ops()

    def open(self, name, path, contract):
        engine, events = self.inner.open(name, path, contract), self.events

        class Recorded:
            def __getattr__(self, attr):  # name, contract, ...: the real engine's
                return getattr(engine, attr)

            def run(self, feeds):
                events.append(("run", name, feeds["hidden_states"].shape[0] if "hidden_states" in feeds else None))
                return engine.run(feeds)

            def close(self):
                events.append(("close", name, None))
                engine.close()

        return Recorded()


def test_gpu_memory_plan_drives_the_run(tiny_package):
    """With a device budget the run follows `vidrt plan`'s plan: at the smallest budget that fits,
    A14B runs per stage (text encoder released before denoising, the high-noise expert released at
    the boundary before the low-noise one runs) with CFG as batch-1 calls, and makes the same clip;
    one byte less is refused before anything runs, pointing at `vidrt plan`."""
    from vidrt.backends.residency import plan_for_package
    from vidrt.errors import DeviceError

    package = only(tiny_package, "a14b")
    pipe = Pipeline.load(package)
    req = Request(prompt=PROMPT, width=WIDTH, height=HEIGHT, num_frames=FRAMES, steps=4, seed=5)
    reference = pipe.run(req).frames
    s = resolve(req, pipe.manifest.model)

    def fits(budget: int) -> bool:
        return plan_for_package(package, pipe.manifest, s.width, s.height, s.num_frames, budget, "fp32",
                                text_device="gpu").fits  # umT5 on the GPU (auto would move it to the CPU)

    lo, hi = 0, 2**40  # smallest fitting budget, by bisection
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    plan = plan_for_package(package, pipe.manifest, s.width, s.height, s.num_frames, hi, "fp32")
    assert not plan.all_resident and plan.cfg_batch == 1 and plan.text_device == "gpu", plan.table()

    inner = pipe.backend
    pipe.backend = backend = _PlannedBackend(inner, hi)
    pipe._engines.clear()  # reopened through the recording backend
    planned = pipe.run(req).frames
    events = backend.events
    dit_runs = [e for e in events if e[0] == "run" and e[1].startswith("dit")]
    assert dit_runs and {e[2] for e in dit_runs} == {1}, "CFG as batch-1 calls"
    order = [(e[0], e[1]) for e in events]
    assert order.index(("close", "text_encoder")) < order.index(("run", "dit_high"))
    assert order.index(("close", "dit_high")) < order.index(("run", "dit_low"))
    print(f"planned run vs all-resident run: {psnr(reference, planned):.1f} dB")
    assert psnr(reference, planned) >= 90.0, psnr(reference, planned)  # measured identical (inf dB), as above

    backend.budget = hi - 1
    with pytest.raises(DeviceError, match="vidrt plan"):
        pipe.run(req)


def test_dit_pieces_make_the_same_clip(tiny_package):
    """Every kind (t2v, A14B's two experts, TI2V's per-token timesteps): the DiT run as its step-caching
    pieces (First Block Cache at threshold 0 never skips) makes the whole graph's clip; on A14B the
    high-noise expert's pieces are released at the boundary like its whole graph."""
    kind, _, package = tiny_package
    pipe = Pipeline.load(package)
    req = Request(prompt=PROMPT, width=WIDTH, height=HEIGHT, num_frames=FRAMES, steps=4, seed=5)
    whole = pipe.run(req)
    pieces = pipe.run(replace(req, cache="fbcache:0"))
    assert pieces.stats.cache.block_stack_runs == 4 and pieces.stats.cache.block_stack_skips == 0
    assert psnr(whole.frames, pieces.frames) >= 70.0, psnr(whole.frames, pieces.frames)
    skipping = pipe.run(replace(req, cache="fbcache:10"))  # skips all but the first step of each expert
    assert skipping.stats.cache.block_stack_runs == (2 if kind == "a14b" else 1)


def test_cpu_host_memory_decides_cfg_batch_or_refuses(monkeypatch):
    """ONNX Runtime (CPU): the run's DiT call must fit the available host memory. Between the batch-1
    and batch-2 estimates the run makes CFG as two batch-1 calls (same clip); below the batch-1 estimate
    it is refused before anything runs, with the figures and the fix (the 1.3B default size on a 24 GiB
    machine was OOM-killed without a word before this check)."""
    import vidrt.pipeline as pipeline_mod
    from vidrt.backends.residency import ort_dit_host_bytes
    from vidrt.errors import DeviceError
    from vidrt.models import default_package

    pipe = Pipeline.load(default_package(), threads=1)
    req = Request(prompt="a red circle moving left", steps=2, seed=5)
    s = resolve(req, pipe.manifest.model)
    one, two = (ort_dit_host_bytes(pipe.manifest.model, s.width, s.height, s.num_frames, b) for b in (1, 2))
    assert 0 < one < two
    batches: list[int] = []
    inner_engine = pipe.engine

    def recording_engine(name):
        engine = inner_engine(name)
        if not name.startswith("dit"):
            return engine

        class Recorded:
            contract = engine.contract

            def run(self, feeds):
                batches.append(next(iter(feeds.values())).shape[0])
                return engine.run(feeds)

            def __getattr__(self, attr):
                return getattr(engine, attr)

        return Recorded()

    reference = pipe.run(req).frames
    monkeypatch.setattr(pipe, "engine", recording_engine)
    monkeypatch.setattr(pipeline_mod, "available_memory_bytes", lambda: (one + two) // 2)
    tight = pipe.run(req).frames
    assert batches and set(batches) == {1}, batches
    assert np.array_equal(reference, tight)
    monkeypatch.setattr(pipeline_mod, "available_memory_bytes", lambda: one - 1)
    batches.clear()
    with pytest.raises(DeviceError, match=r"host memory.*lower size or num_frames, or run on a GPU "
                                          r"\(backend='tensorrt'\)"):
        pipe.run(req)
    assert not batches, "refused before any DiT call"
    big = get_variant("wan2.1-t2v-1.3b")  # the official default size needs ~195 GiB at batch 1 on the CPU
    assert ort_dit_host_bytes(big, 832, 480, 81, 1) > 100 * 2**30
