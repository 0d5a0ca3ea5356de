"""The streaming VAE encoder (vidrt.vae_encode + export_vae_encoder) against AutoencoderKLWan.encode.

Tiny diffusers VAEs of both styles (Wan2.1: z 16, 8x; Wan2.2: patchify 2, residual down blocks,
z 48, 16x), every weight random (the zero-initialised ones too), exported to the two step graphs
and run with ONNX Runtime, chunk by chunk with explicit caches. Reference: the latent
distribution's mode from diffusers (its own chunked loop), normalised with latents_mean/std as
WanImageToVideoPipeline.prepare_latents does.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from vidrt.backends.ort import OrtEngine
from vidrt.export.onnx_export import export_vae_encoder
from vidrt.export.random_weights import randomise_
from vidrt.package.contracts import VAE_ENCODE_FIRST, VAE_ENCODE_STEP
from vidrt.package.manifest import load_manifest
from vidrt.package.registry import VARIANTS
from vidrt.vae_encode import encode

SPECS = {"wan2.1": VARIANTS["wan2.1-t2v-1.3b"], "wan2.2": VARIANTS["wan2.2-ti2v-5b"]}


def tiny_vae(kind: str):
    """Wan2.1 kind only (the Wan2.2 one comes from the shared package)."""
    from diffusers import AutoencoderKLWan

    rng = np.random.default_rng(3)
    kw = dict(base_dim=8, z_dim=16, num_res_blocks=2)
    z = kw["z_dim"]
    kw.update(latents_mean=rng.normal(0, 0.5, z).tolist(), latents_std=rng.uniform(0.5, 2.0, z).tolist())
    return randomise_(AutoencoderKLWan(**kw), seed=70).eval()


@pytest.fixture(scope="module", params=["wan2.1", "wan2.2"])
def exported(request, tmp_path_factory):
    """Wan2.1: exported here (random latent statistics, 2 res blocks as the real VAE). Wan2.2: the
    encoder graphs of the shared tiny TI2V package (conftest; exported through `export_package`)."""
    kind = request.param
    if kind == "wan2.2":
        tiny, package, _ = request.getfixturevalue("tiny_ti2v_export")
        m = load_manifest(package)
        engines = [OrtEngine(n, package / m.components[n].artifact.file, m.components[n].contract)
                   for n in (VAE_ENCODE_FIRST, VAE_ENCODE_STEP)]
        return kind, tiny.vae, *engines
    vae = tiny_vae(kind)
    out = tmp_path_factory.mktemp(f"enc-{kind}")
    first_c, step_c = export_vae_encoder(vae, out / "first.onnx", out / "step.onnx", SPECS[kind])
    return kind, vae, OrtEngine(VAE_ENCODE_FIRST, out / "first.onnx", first_c), \
        OrtEngine(VAE_ENCODE_STEP, out / "step.onnx", step_c)


@pytest.mark.parametrize("frames, size", [(1, (48, 80)), (9, (64, 32))])
def test_streaming_encoder_equals_diffusers(exported, frames, size):
    kind, vae, first, step = exported
    h, w = size
    rng = np.random.default_rng(frames)
    video = rng.uniform(-1, 1, (3, frames, h, w)).astype(np.float32)
    if frames > 1:
        video[:, 1:] = 0.0  # the I2V condition video: the image, then mid-grey (zeros) frames
        video[:, -1] = rng.uniform(-1, 1, (3, h, w))  # FLF2V: a last image too
    cfg = vae.config
    ours = encode(video, first, step, mean=cfg.latents_mean, std=cfg.latents_std)
    with torch.no_grad():
        mu = vae.encode(torch.from_numpy(video)[None]).latent_dist.mode()[0].numpy()
    ref = (mu - np.array(cfg.latents_mean, np.float32)[:, None, None, None]) \
        / np.array(cfg.latents_std, np.float32)[:, None, None, None]
    s = SPECS[kind].vae.stride[1]
    assert ours.shape == ref.shape == (cfg.z_dim, (frames - 1) // 4 + 1, h // s, w // s)
    err = float(np.abs(ours - ref).max())
    print(f"{kind} {frames}x{h}x{w}: max |vidrt - diffusers| = {err:.2e}")
    assert err <= 1e-4
