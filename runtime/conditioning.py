"""Stage 1b: how the clip is conditioned beyond text, as a policy object the denoise loop calls.

The loop is the same for every model (DESIGN.md §9); what differs is data (the manifest's
`ImageConditioning`) and one of these objects:

  TextOnly     text-to-video: the latents are the DiT input; one timestep per clip (TI2V: per token,
               all equal).
  FirstFrame   Wan2.2 TI2V-5B image mode (W22 wan/textimage2video.py WanTI2V.i2v): latent frame 0 is
               the image latent z; its tokens get timestep 0, every other token t; after every solver
               step frame 0 is set to z again. No new DiT inputs.
  Concat       Wan2.1 I2V / FLF2V, Wan2.2 I2V-A14B (W21/W22 wan/image2video.py WanI2V.generate): the DiT
               input is [latents (z), mask (4), image latents (z)] along channels; the image latents are
               never re-imposed (the model generates frame 0 itself). Wan2.1 also feeds the CLIP tokens
               of the image(s) as a DiT input of their own.

Every array is float32 [C, F, h, w] (latent frames F, latent rows h, cols w).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class TextOnly:
    """No image: the loop's plain behaviour."""

    per_token_timestep: bool = False
    patch_size: tuple[int, int, int] = (1, 2, 2)

    def initial(self, latents: np.ndarray) -> np.ndarray:
        return latents

    def model_input(self, latents: np.ndarray) -> np.ndarray:
        return latents

    def timestep_row(self, t: float, latents: np.ndarray) -> np.ndarray:
        """float32 [] (one timestep), or [tokens] for a DiT that takes one per token."""
        if not self.per_token_timestep:
            return np.full((), t, dtype=np.float32)
        _, f, h, w = latents.shape
        pt, ph, pw = self.patch_size
        return np.full(((f // pt) * (h // ph) * (w // pw),), t, dtype=np.float32)

    def after_step(self, latents: np.ndarray) -> np.ndarray:
        return latents

    def extra_feeds(self) -> dict[str, np.ndarray]:
        """DiT inputs beyond latents/timestep/context, each [1, ...] (broadcast to the call's batch)."""
        return {}


@dataclass(frozen=True, eq=False)
class FirstFrame(TextOnly):
    """TI2V image mode. image_latent: normalised [z, 1, h, w] (the VAE encoder's first chunk)."""

    image_latent: np.ndarray = field(kw_only=True)

    def initial(self, latents: np.ndarray) -> np.ndarray:
        # (1 - mask) * z + mask * noise, mask = 0 on frame 0 (W22 wan/utils/utils.py masks_like(zero=True))
        out = latents.copy()
        out[:, :1] = self.image_latent
        return out

    def timestep_row(self, t: float, latents: np.ndarray) -> np.ndarray:
        # (mask[0][:, ::2, ::2] * t).flatten(): the first latent frame's tokens come first and get 0
        row = super().timestep_row(t, latents)
        _, _, h, w = latents.shape
        _, ph, pw = self.patch_size
        row[: (h // ph) * (w // pw)] = 0.0
        return row

    def after_step(self, latents: np.ndarray) -> np.ndarray:
        latents[:, :1] = self.image_latent
        return latents


@dataclass(frozen=True, eq=False)
class Concat(TextOnly):
    """Channel-concat I2V. condition: [4 + z, F, h, w] = mask (4) then the normalised latents of the
    condition video ([image, grey, ..., grey] or FLF2V [first, grey, ..., last])."""

    condition: np.ndarray = field(kw_only=True)
    # Wan2.1 I2V/FLF2V: the CLIP tokens [1, n_images * T, D] under the contract's name; else empty
    image_tokens: dict[str, np.ndarray] = field(kw_only=True, default_factory=dict)

    def model_input(self, latents: np.ndarray) -> np.ndarray:
        return np.concatenate([latents, self.condition], axis=0)

    def extra_feeds(self) -> dict[str, np.ndarray]:
        return self.image_tokens


def frame_mask(num_frames: int, lat_h: int, lat_w: int, stride_t: int = 4, last: bool = False) -> np.ndarray:
    """float32 [stride_t, F_lat, h, w]: which video frames of each latent frame are given (1) or to be
    generated (0). W21 WanI2V.generate: ones(F) with frames 1.. zeroed (FLF2V: 1..F-2), frame 0
    repeated stride_t times, then viewed as [F_lat, stride_t] and transposed; FLF2V's last latent
    frame is [0, 0, 0, 1]. Uses num_frames like the fixed official code and diffusers (the original
    FLF2V hard-codes 81, i2v.md §7)."""
    given = np.zeros(num_frames, dtype=np.float32)
    given[0] = 1.0
    if last:
        given[-1] = 1.0
    seq = np.concatenate([np.repeat(given[:1], stride_t), given[1:]])  # [(F_lat) * stride_t]
    m = seq.reshape(-1, stride_t).T  # [stride_t, F_lat]
    return np.ascontiguousarray(np.broadcast_to(m[:, :, None, None], (*m.shape, lat_h, lat_w)), dtype=np.float32)


__all__ = ["TextOnly", "FirstFrame", "Concat", "frame_mask"]
