"""Image-to-video through the whole pipeline against diffusers' WanImageToVideoPipeline.

Same tiny random-weight checkpoint (diffusers folder; the VAE's latents_mean/std made non-trivial so
normalisation bugs show), same noise, prompt, steps, shift, guidance, the official FlowUniPC
scheduler on the diffusers side (as tests/test_pipeline.py), and the same preprocessed image: vidrt
preprocesses by the official rule (tests/test_image.py), then hands diffusers that exact [-1, 1]
tensor (diffusers' own preprocessing differs, i2v.md §5). vidrt runs the exported ONNX package.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import wan_ref
from test_pipeline import NEGATIVE, PROMPT, SHIFT, official_unipc, psnr
from vidrt.errors import UsageError
from vidrt.image import preprocess
from vidrt.pipeline import Pipeline
from vidrt.request import Request, resolve

FRAMES, STEPS = 9, 6


def _picture(w: int, h: int) -> np.ndarray:
    """A smooth picture with edges (a disc on a gradient): uint8 [h, w, 3]."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([xx, yy, 1 - xx], axis=-1) * 200
    img[(xx - 0.5) ** 2 + (yy - 0.4) ** 2 < 0.04] = (250, 40, 30)
    return img.astype(np.uint8)


@pytest.fixture(scope="module")
def ti2v(tiny_ti2v_export):
    tiny, package, _ = tiny_ti2v_export  # its VAE has non-trivial latents_mean/std (tiny.LATENT_STATS)
    return tiny.root, package


def diffusers_i2v(root, image: np.ndarray, noise: np.ndarray, width: int, height: int, guidance: float,
                  **extra) -> np.ndarray:
    from diffusers import WanImageToVideoPipeline

    components = {} if (root / "image_encoder").is_dir() else {"image_encoder": None, "image_processor": None}
    pipe = WanImageToVideoPipeline.from_pretrained(root, scheduler=official_unipc(SHIFT), **components)
    pipe.text_encoder.config._attn_implementation = "eager"
    pipe.set_progress_bar_config(disable=True)
    embeds = extra.pop("image_embeds", None)
    if embeds is not None:  # diffusers refuses image + image_embeds together; the VAE needs the image
        pipe.encode_image = lambda image, device=None: embeds.to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "input is in [-1, 1]": on purpose, the preprocessed tensor as is
        out = pipe(image=torch.from_numpy(image)[None], prompt=PROMPT, negative_prompt=NEGATIVE, height=height,
                   width=width, num_frames=FRAMES, num_inference_steps=STEPS, guidance_scale=guidance,
                   latents=torch.from_numpy(noise)[None], max_sequence_length=512, output_type="np",
                   **extra).frames[0]
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def test_ti2v_image_mode_matches_diffusers(ti2v):
    """TI2V-5B image mode: frame 0 in-painted with the image latent, its tokens at t = 0, re-imposed
    after every step (diffusers: expand_timesteps=True). The image is 100x60: the size follows it."""
    root, package = ti2v
    pipe = Pipeline.load(package)
    picture = _picture(100, 60)
    req = Request(prompt=PROMPT, negative_prompt=NEGATIVE, image=picture, num_frames=FRAMES, steps=STEPS,
                  shift=SHIFT, scheduler="unipc", guidance=5.0)
    s = resolve(req, pipe.manifest.model)
    # the tiny variant keeps TI2V's default area (1280x704): run at a small size, given explicitly
    req = Request(prompt=PROMPT, negative_prompt=NEGATIVE, image=picture, width=96, height=64, num_frames=FRAMES,
                  steps=STEPS, shift=SHIFT, scheduler="unipc", guidance=5.0)
    best = wan_ref.load("utils.utils").best_output_size
    assert (s.width, s.height) == best(100, 60, 32, 32, 1280 * 704) == (1216, 736)  # the official rule
    noise = np.random.default_rng(7).standard_normal(pipe.manifest.model.latent_shape(96, 64, FRAMES),
                                                     dtype=np.float32)
    ours = pipe.run(req, noise=noise).frames
    image = preprocess(picture, 96, 64, "cover_lanczos")
    ref = diffusers_i2v(root, image, noise, 96, 64, 5.0)
    assert ours.shape == ref.shape == (FRAMES, 64, 96, 3)
    value = psnr(ours, ref)
    print(f"ti2v image mode: PSNR vidrt vs diffusers WanImageToVideoPipeline = {value:.1f} dB")
    assert value >= 70.0
    # the image conditions the clip: another picture changes it, and frame 0 follows the image
    other = pipe.run(Request(prompt=PROMPT, negative_prompt=NEGATIVE, image=255 - picture, width=96, height=64,
                             num_frames=FRAMES, steps=STEPS, shift=SHIFT, guidance=5.0), noise=noise).frames
    assert psnr(ours, other) < 40.0


@pytest.fixture(scope="module")
def i2v_a14b(tmp_path_factory):
    """Tiny Wan2.2 I2V-A14B, diffusers layout: two 36-channel experts, boundary 0.9, no CLIP."""
    from tiny import TINY_VARIANT, write_diffusers_checkpoint
    from vidrt.export.package import export_package

    root = tmp_path_factory.mktemp("ckpt-i2v-a14b")
    write_diffusers_checkpoint(root, "i2v")
    return root, export_package(root, root / "package", variant=TINY_VARIANT["i2v"], progress=False)


def test_i2v_a14b_matches_diffusers(i2v_a14b):
    """Channel concat: DiT input [latents 16, mask 4, VAE(image, grey x 8) 16], never re-imposed; the
    high-noise expert (guidance_scale) while t >= 900, then the low-noise one (guidance_scale_2)."""
    root, package = i2v_a14b
    pipe = Pipeline.load(package)
    spec = pipe.manifest.model
    picture = _picture(90, 50)
    s = resolve(Request(prompt=PROMPT, image=picture), spec)  # the size from the image: official area rule
    ar = 50 / 90
    lat_h, lat_w = round(np.sqrt(1280 * 720 * ar) // 8 // 2 * 2), round(np.sqrt(1280 * 720 / ar) // 8 // 2 * 2)
    assert (s.width, s.height) == (lat_w * 8, lat_h * 8)  # W22 wan/image2video.py, 1280*720 area
    w, h = 64, 48
    noise = np.random.default_rng(8).standard_normal(spec.latent_shape(w, h, FRAMES), dtype=np.float32)
    req = Request(prompt=PROMPT, negative_prompt=NEGATIVE, image=picture, width=w, height=h, num_frames=FRAMES,
                  steps=STEPS, shift=SHIFT, scheduler="unipc", guidance=4.5, guidance_low_noise=2.5)
    ours = pipe.run(req, noise=noise).frames
    ref = diffusers_i2v(root, preprocess(picture, w, h, "area_bicubic"), noise, w, h, 4.5, guidance_scale_2=2.5)
    assert ours.shape == ref.shape == (FRAMES, h, w, 3)
    value = psnr(ours, ref)
    print(f"i2v-a14b: PSNR vidrt vs diffusers WanImageToVideoPipeline = {value:.1f} dB")
    assert value >= 70.0
    with pytest.raises(UsageError, match="image-to-video model: pass image='START.png'"):
        pipe("a cat", steps=1)


@pytest.fixture(scope="module", params=["i2v", "flf2v"])
def wan21(request, tmp_path_factory):
    """Tiny Wan2.1 I2V / FLF2V (diffusers layout, CLIP branch live, tiny CLIP tower), exported."""
    from tiny import write_diffusers_wan21_i2v
    from vidrt.export.package import export_package

    kind = request.param
    root = tmp_path_factory.mktemp(f"ckpt-wan21-{kind}")
    tiny = write_diffusers_wan21_i2v(root, flf2v=kind == "flf2v")
    variant = "wan2.1-flf2v-14b-720p" if kind == "flf2v" else "wan2.1-i2v-14b-480p"
    return kind, tiny, export_package(root, root / "package", variant=variant, progress=False)


@pytest.mark.slow  # two Wan2.1 exports with CLIP (~4 min idle): `make test-all`, kept out of CI's 90 minutes
def test_wan21_i2v_and_flf2v_match_diffusers(wan21):
    """Wan2.1: concat as A14B plus the CLIP tokens of the image (FLF2V: of both images, with img_emb's
    position embedding) through img_emb and the add_k/v_proj branch of every cross-attention. vidrt runs
    the exported CLIP tower on the officially preprocessed pixels; diffusers gets the tokens of the
    checkpoint's own CLIPVisionModel (hidden_states[-2]) on the same pixels, as image_embeds."""
    from vidrt.image import clip_pixels

    kind, tiny, package = wan21
    pipe = Pipeline.load(package)
    spec = pipe.manifest.model
    assert spec.image.clip_tokens == 5 and spec.dit.image_dim == 16
    first, last = _picture(90, 50), np.ascontiguousarray(_picture(90, 50)[::-1, ::-1])
    w, h = 64, 48
    noise = np.random.default_rng(9).standard_normal(spec.latent_shape(w, h, FRAMES), dtype=np.float32)
    extra = {"last_image": last} if kind == "flf2v" else {}
    req = Request(prompt=PROMPT, negative_prompt=NEGATIVE, image=first, width=w, height=h, num_frames=FRAMES,
                  steps=STEPS, shift=SHIFT, scheduler="unipc", guidance=5.0, **extra)
    ours = pipe.run(req, noise=noise).frames
    images = [first] + ([last] if kind == "flf2v" else [])
    with torch.no_grad():
        px = torch.from_numpy(np.stack([clip_pixels(im, 28) for im in images]))
        embeds = tiny.image_encoder(pixel_values=px, output_hidden_states=True).hidden_states[-2]
    ref_extra = {"image_embeds": embeds}
    if kind == "flf2v":
        ref_extra["last_image"] = torch.from_numpy(preprocess(last, w, h, "area_bicubic"))[None]
    ref = diffusers_i2v(tiny.root, preprocess(first, w, h, "area_bicubic"), noise, w, h, 5.0, **ref_extra)
    assert ours.shape == ref.shape == (FRAMES, h, w, 3)
    value = psnr(ours, ref)
    print(f"wan2.1 {kind}: PSNR vidrt vs diffusers WanImageToVideoPipeline = {value:.1f} dB")
    assert value >= 70.0


def test_text_only_model_refuses_an_image(tiny_t2v_package):
    pipe = Pipeline.load(tiny_t2v_package)
    with pytest.raises(UsageError, match="text-to-video model and takes no image;"):
        pipe("a cat", image=_picture(64, 64), steps=1)


def test_cli_run_with_image_prints_the_size(ti2v, tmp_path, capsys):
    """`vidrt run --image` on TI2V: the size is printed before the run, the clip written; a bad image is
    one line, exit 2, nothing written."""
    from cli_helpers import assert_error, vidrt
    from PIL import Image

    _, package = ti2v
    start = tmp_path / "start.png"
    Image.fromarray(_picture(90, 60)).save(start)
    out = tmp_path / "clip.mp4"
    code, err = vidrt(capsys, "run", "--model", package, "--prompt", "a cat", "--image", start, "--size", "64x64",
                      "--frames", "5", "--steps", "2", "-o", out)
    assert code == 0, err
    assert f"image {start} -> 64x64 (as given by --size)" in err and out.is_file()
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    code, err = vidrt(capsys, "run", "--model", package, "--prompt", "a cat", "--image", bad, "-o", tmp_path / "x.mp4")
    assert_error(code, err, 2, "--image", "not an image")
    assert not (tmp_path / "x.mp4").exists()


def test_job_api_input_reference_runs_image_to_video(ti2v, tmp_path):
    """The serve path without Ray: OpenAI's input_reference bytes -> VideoAPI.to_job (kept as a file,
    checked as an image) -> execute_job runs image-to-video; a bad upload is a 400 naming input_reference."""
    import io
    from dataclasses import replace

    from PIL import Image
    from vidrt.service.api import ApiError, ServeLimits, VideoAPI
    from vidrt.service.jobs import execute_job

    _, package = ti2v
    pipe = Pipeline.load(package)
    api = VideoAPI(pipe.manifest.model, ServeLimits(max_pixels=96 * 96, max_frames=9, max_steps=10),
                   image_dir=tmp_path / "inputs")
    buf = io.BytesIO()
    Image.fromarray(_picture(80, 80)).save(buf, "PNG")
    fields = {"prompt": PROMPT, "size": "64x64", "frames": 5, "steps": 2, "seed": 3}
    job, settings, _ = api.to_job(fields, image=buf.getvalue())
    assert job.image is not None and job.image.startswith(str(tmp_path / "inputs")) and settings.image == job.image
    result = execute_job(pipe, job, tmp_path / "clip.mp4")
    assert result.path.is_file() and result.settings.image == job.image
    with_image = pipe.run(job.to_request()).frames
    text_only = pipe.run(replace(job, image=None).to_request()).frames
    assert psnr(with_image, text_only) < 40.0  # the image conditions the clip
    for data, needle in ((b"GIF89a not really", "not an image"), (b"\x00" * 10, "not an image")):
        with pytest.raises(ApiError) as err:
            api.to_job(fields, image=data)
        assert err.value.status == 400 and err.value.param == "input_reference" and needle in err.value.message
        assert err.value.message.startswith("input_reference ")
        assert str(tmp_path) not in err.value.message and "\n" not in err.value.message


def test_memory_plan_has_an_image_stage():
    """`vidrt plan`: image-to-video models encode in a stage of their own before denoising, whose
    engines (VAE encoder graphs; Wan2.1: + CLIP) are released before the DiT loads; text-only: none."""
    from vidrt.backends.residency import make_plan
    from vidrt.package.registry import VARIANTS

    for name, engines in (("wan2.2-i2v-a14b", {"vae_encode_first", "vae_encode_step"}),
                          ("wan2.1-i2v-14b-480p", {"vae_encode_first", "vae_encode_step", "image_encoder"})):
        plan = make_plan(VARIANTS[name], 832, 480, 81, 24 * 10**9, "fp8")
        names = [s.name for s in plan.stages]
        assert "image" in names and names.index("image") < min(i for i, n in enumerate(names) if "denoise" in n)
        image = plan.stages[names.index("image")]
        assert set(image.load) == set(image.release) == engines, image
        assert "image" in plan.table()
    plan = make_plan(VARIANTS["wan2.1-t2v-14b"], 832, 480, 81, 24 * 10**9, "fp8")
    assert all(s.name != "image" for s in plan.stages)
    ti2v = VARIANTS["wan2.2-ti2v-5b"]  # text or image: the stage only for a clip with an image
    assert "image" not in [s.name for s in make_plan(ti2v, 1280, 704, 121, 24 * 10**9, "fp8").stages]
    assert "image" in [s.name for s in make_plan(ti2v, 1280, 704, 121, 24 * 10**9, "fp8", image=True).stages]
