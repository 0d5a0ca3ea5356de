"""Streaming Wan VAE encode (i2v.md §3): pixels -> normalised latents for image conditioning.

The encoder is two graphs with explicit causal caches (contracts.VAE_ENCODE_FIRST / _STEP), the
chunking of the reference (diffusers AutoencoderKLWan._encode, W21 WanVAE_.encode): the first video
frame alone -> latent frame 0, then 4 frames at a time -> one latent frame each, the caches of each
call fed to the next. The chunking is part of the model (the temporal downsamplers skip their conv
on the first chunk), so this is the only exact way to run it. No tiling: the official code has none,
and a conditioning video is encoded once per clip.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from vidrt.package.contracts import VAE_LATENT, VAE_VIDEO, cache_in, cache_out
from vidrt.vae_decode import Engine


def normalize(mu: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """[z, F, h, w] VAE latents -> what the DiT sees: (mu - mean) / std, per channel."""
    m = np.asarray(mean, dtype=np.float32)[:, None, None, None]
    s = np.asarray(std, dtype=np.float32)[:, None, None, None]
    return ((mu.astype(np.float32) - m) * (np.float32(1.0) / s)).astype(np.float32)


def encode(video: np.ndarray, first: Engine, step: Engine, *, mean: Sequence[float],
           std: Sequence[float]) -> np.ndarray:
    """float32 [3, F, H, W] in [-1, 1], F = 4k + 1 -> normalised latents float32 [z, k + 1, H/s, W/s].

    Raises ValueError if F is not 4k + 1 (callers build the video, so this is a programming error)."""
    c, frames, _, _ = video.shape
    t = step.contract.input(VAE_VIDEO).shape[2]
    assert isinstance(t, int)
    if c != 3 or (frames - 1) % t:
        raise ValueError(f"video {video.shape} is not [3, {t}k+1, H, W]")
    n_caches = sum(1 for name in step.contract.input_names if name.startswith("cache_in_"))
    x = np.ascontiguousarray(video[None], dtype=np.float32)  # [1, 3, F, H, W]
    res = first.run({VAE_VIDEO: np.ascontiguousarray(x[:, :, :1])})
    out = [res[VAE_LATENT][0]]
    for i in range(1, frames, t):
        feeds = {VAE_VIDEO: np.ascontiguousarray(x[:, :, i:i + t])}
        feeds.update({cache_in(k): res[cache_out(k)] for k in range(n_caches)})
        res = step.run(feeds)
        out.append(res[VAE_LATENT][0])
    return normalize(np.concatenate(out, axis=1), mean, std)


__all__ = ["encode", "normalize"]
