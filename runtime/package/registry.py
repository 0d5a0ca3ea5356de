"""Model variants: one typed spec per Wan model, one registry dict.

Every number below is from the official Wan code or its README; `ModelSpec.source` names where.
Abbreviations in the sources: W21 = github.com/Wan-Video/Wan2.1, W22 = github.com/Wan-Video/Wan2.2
(same files ship in the PyPI package `wan22`), DIFF = diffusers `scripts/convert_wan_to_diffusers.py`.
Variant differences live here and in the manifest, never in `if`s on model names.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, TypeVar

from vidrt.package.recipes import Recipe

# W21/W22 wan/configs/shared_config.py::sample_neg_prompt (shared by every T2V / TI2V variant).
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

# W21 wan/configs/wan_i2v_14B.py: i2v_14B.sample_neg_prompt = "镜头晃动，" + the shared one (i2v.md §1).
WAN21_I2V_NEGATIVE = "镜头晃动，" + WAN_NEGATIVE_PROMPT

# W22 wan/modules/vae2_1.py:629-639 (Wan2_1_VAE.__init__): per-channel latent statistics, 16 channels.
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)
# W22 wan/modules/vae2_2.py:904-1011 (Wan2_2_VAE.__init__): 48 channels.
WAN22_LATENTS_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)
WAN22_LATENTS_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)


@dataclass(frozen=True)
class DiTConfig:
    """WanTransformer3DModel architecture (diffusers names). head_dim = dim / num_heads."""

    dim: int
    ffn_dim: int
    num_layers: int
    num_heads: int
    in_channels: int = 16
    out_channels: int = 16
    freq_dim: int = 256
    text_dim: int = 4096
    patch_size: tuple[int, int, int] = (1, 2, 2)  # (t, h, w) latent cells per token
    eps: float = 1e-6
    image_dim: int | None = None  # Wan2.1 I2V/FLF2V: width of the CLIP tokens (img_emb, add_k/v_proj); None: none

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


@dataclass(frozen=True)
class VAEConfig:
    """AutoencoderKLWan architecture + the latent statistics the reference code hard-codes."""

    kind: str  # "wan2.1" (z 16, 8x spatial) | "wan2.2" (z 48, 2x2 patchify + 8x = 16x spatial, residual)
    z_dim: int
    stride: tuple[int, int, int]  # (t, h, w) video frames / pixels per latent cell
    base_dim: int
    decoder_base_dim: int
    latents_mean: tuple[float, ...]
    latents_std: tuple[float, ...]


@dataclass(frozen=True)
class TextConfig:
    """umT5 encoder (transformers UMT5EncoderModel). Wan zero-pads its output to text_len rows."""

    vocab_size: int = 256384
    d_model: int = 4096
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    num_buckets: int = 32
    text_len: int = 512


@dataclass(frozen=True)
class SamplingDefaults:
    """What `vidrt run` uses when the user gives nothing. Guidance is per expert, by name."""

    steps: int
    shift: float
    guidance_high_noise: float  # CFG scale while t >= boundary * 1000 (single-expert models: same as low)
    guidance_low_noise: float
    frames: int  # video frames, 4k + 1
    fps: int
    sizes: tuple[tuple[int, int], ...]  # supported (width, height); the first is the default
    boundary: float | None = None  # two-expert models: high-noise expert while t >= boundary * 1000
    scheduler: str = "unipc"
    negative_prompt: str = WAN_NEGATIVE_PROMPT
    num_train_timesteps: int = 1000


@dataclass(frozen=True)
class ImageConditioning:
    """How a start image conditions the clip (i2v.md §0-§4); a spec without one is text-to-video only.

    mode      "first_frame": the image latent is latent frame 0, its tokens at timestep 0, re-imposed
              after every step (Wan2.2 TI2V-5B); "concat": [noise, mask (4), image latents] as the DiT's
              input channels (Wan2.1 I2V/FLF2V, Wan2.2 I2V-A14B). See vidrt.conditioning.
    resize    vidrt.image rule: "cover_lanczos" (TI2V) or "area_bicubic" (Wan2.1 / A14B)
    required  the model cannot run without an image (the I2V models; TI2V also runs from text alone)
    last_image  the model also takes a last frame (Wan2.1 FLF2V)
    clip_*    Wan2.1: the CLIP vision tower's input size, tokens per image and width (see below)
    """

    mode: str
    resize: str
    required: bool = False
    last_image: bool = False
    # Wan2.1 I2V/FLF2V only: the CLIP vision tower (`image_encoder`): its input side in px (224), tokens
    # per image (257 = 16x16 patches + class token) and their width (1280); 0 = no image encoder
    clip_size: int = 0
    clip_tokens: int = 0
    clip_dim: int = 0

    @property
    def image_tokens(self) -> int:
        """CLIP tokens the DiT receives per clip: one image's, or the first and last image's (FLF2V)."""
        return self.clip_tokens * (2 if self.last_image else 1)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    dit: DiTConfig
    vae: VAEConfig
    text: TextConfig
    sampling: SamplingDefaults
    experts: tuple[str, ...] = ("dit",)  # DiT graph names; two experts = ("dit_high", "dit_low")
    per_token_timestep: bool = False  # TI2V-5B: timestep is [B, tokens] (first latent frame t=0 in i2v)
    source: str = ""
    recipes: tuple[Recipe, ...] = ()  # the model's own named recipes (the bundled model's `fast`), besides
    #                                   the built-in ones (vidrt.package.recipes)
    image: ImageConditioning | None = None  # image-to-video: how an image conditions the clip (None: text only)

    @property
    def spatial_multiple(self) -> int:
        """Width and height must be multiples of this: VAE stride x DiT patch (16 for 2.1, 32 for 2.2)."""
        return self.vae.stride[1] * self.dit.patch_size[1]

    def num_latent_frames(self, num_frames: int) -> int:
        return (num_frames - 1) // self.vae.stride[0] + 1

    def latent_shape(self, width: int, height: int, num_frames: int) -> tuple[int, int, int, int]:
        """[C, F, H, W] of the latent video for a clip of that size."""
        return (self.vae.z_dim, self.num_latent_frames(num_frames),
                height // self.vae.stride[1], width // self.vae.stride[2])

    def num_tokens(self, width: int, height: int, num_frames: int) -> int:
        _, f, h, w = self.latent_shape(width, height, num_frames)
        pt, ph, pw = self.dit.patch_size
        return (f // pt) * (h // ph) * (w // pw)


WAN21_VAE = VAEConfig("wan2.1", 16, (4, 8, 8), 96, 96, WAN21_LATENTS_MEAN, WAN21_LATENTS_STD)
WAN22_VAE = VAEConfig("wan2.2", 48, (4, 16, 16), 160, 256, WAN22_LATENTS_MEAN, WAN22_LATENTS_STD)
_SIZES_480_720 = ((1280, 720), (720, 1280), (832, 480), (480, 832))

VARIANTS: dict[str, ModelSpec] = {
    "wan2.1-t2v-1.3b": ModelSpec(
        name="wan2.1-t2v-1.3b",
        description="Wan2.1 text-to-video 1.3B, 480p",
        dit=DiTConfig(dim=1536, ffn_dim=8960, num_layers=30, num_heads=12),
        vae=WAN21_VAE,
        text=TextConfig(),
        # W21 generate.py::_validate_args: 50 steps, shift 5 (README advises 8-12), guide 5 (README: 6);
        # W21 wan/configs/__init__.py SUPPORTED_SIZES['t2v-1.3B'] = 480*832, 832*480; 81 frames at 16 fps.
        sampling=SamplingDefaults(steps=50, shift=5.0, guidance_high_noise=5.0, guidance_low_noise=5.0,
                                  frames=81, fps=16, sizes=((832, 480), (480, 832))),
        source="W21 wan/configs/wan_t2v_1_3B.py, generate.py, shared_config.py",
    ),
    "wan2.1-t2v-14b": ModelSpec(
        name="wan2.1-t2v-14b",
        description="Wan2.1 text-to-video 14B, 480p/720p",
        dit=DiTConfig(dim=5120, ffn_dim=13824, num_layers=40, num_heads=40),
        vae=WAN21_VAE,
        text=TextConfig(),
        sampling=SamplingDefaults(steps=50, shift=5.0, guidance_high_noise=5.0, guidance_low_noise=5.0,
                                  frames=81, fps=16, sizes=_SIZES_480_720),
        source="W21 wan/configs/wan_t2v_14B.py, generate.py, shared_config.py",
    ),
    "wan2.2-ti2v-5b": ModelSpec(
        name="wan2.2-ti2v-5b",
        description="Wan2.2 text/image-to-video 5B, 720p 24 fps (Wan2.2 VAE, 16x spatial)",
        dit=DiTConfig(dim=3072, ffn_dim=14336, num_layers=30, num_heads=24, in_channels=48, out_channels=48),
        vae=WAN22_VAE,
        text=TextConfig(),
        # W22 wan/configs/wan_ti2v_5B.py: 50 steps, shift 5, guide 5, 121 frames, 24 fps; sizes 1280*704, 704*1280.
        sampling=SamplingDefaults(steps=50, shift=5.0, guidance_high_noise=5.0, guidance_low_noise=5.0,
                                  frames=121, fps=24, sizes=((1280, 704), (704, 1280))),
        per_token_timestep=True,
        source="W22 wan/configs/wan_ti2v_5B.py, wan/textimage2video.py; DIFF get_transformer_config",
        # W22 wan/textimage2video.py WanTI2V.i2v: best_output_size (multiples of 32) in the --size area,
        # Lanczos cover + centre crop, first latent frame in-painted; generate.py runs it when --image is given.
        image=ImageConditioning(mode="first_frame", resize="cover_lanczos"),
    ),
    "wan2.2-t2v-a14b": ModelSpec(
        name="wan2.2-t2v-a14b",
        description="Wan2.2 text-to-video A14B (high-noise + low-noise experts), 480p/720p",
        dit=DiTConfig(dim=5120, ffn_dim=13824, num_layers=40, num_heads=40),
        vae=WAN21_VAE,
        text=TextConfig(),
        # W22 wan/configs/wan_t2v_A14B.py: 40 steps, shift 12, sample_guide_scale = (3.0, 4.0) =
        # (low-noise, high-noise), boundary 0.875; text2video.py switches experts at t >= boundary * 1000.
        sampling=SamplingDefaults(steps=40, shift=12.0, guidance_high_noise=4.0, guidance_low_noise=3.0,
                                  frames=81, fps=16, sizes=_SIZES_480_720, boundary=0.875),
        experts=("dit_high", "dit_low"),
        source="W22 wan/configs/wan_t2v_A14B.py, wan/text2video.py",
    ),
    "wan2.2-i2v-a14b": ModelSpec(
        name="wan2.2-i2v-a14b",
        description="Wan2.2 image-to-video A14B (high-noise + low-noise experts, 36-channel input), 480p/720p",
        dit=DiTConfig(dim=5120, ffn_dim=13824, num_layers=40, num_heads=40, in_channels=36, out_channels=16),
        vae=WAN21_VAE,
        text=TextConfig(),
        # W22 wan/configs/wan_i2v_A14B.py: 40 steps, shift 5, boundary 0.900, sample_guide_scale = (3.5, 3.5)
        # (low-noise, high-noise); generate.py: 81 frames at 16 fps, default --size 1280*720 (the area the
        # image's aspect is fitted into); SUPPORTED_SIZES['i2v-A14B'] = 480p/720p. No CLIP (i2v.md §2.3).
        sampling=SamplingDefaults(steps=40, shift=5.0, guidance_high_noise=3.5, guidance_low_noise=3.5,
                                  frames=81, fps=16, sizes=_SIZES_480_720, boundary=0.9),
        experts=("dit_high", "dit_low"),
        # W22 wan/image2video.py WanI2V.generate: area rule + bicubic stretch, y = [mask 4, VAE(image, 0...)]
        image=ImageConditioning(mode="concat", resize="area_bicubic", required=True),
        source="W22 wan/configs/wan_i2v_A14B.py, wan/image2video.py, generate.py",
    ),
    # Wan2.1 image-to-video (W21 wan/configs/wan_i2v_14B.py, generate.py, wan/image2video.py; i2v.md §1):
    # 14B DiT with 36 input channels and the CLIP branch (img_emb, k_img/v_img), 40 steps, guidance 5,
    # 81 frames at 16 fps; generate.py's shift is 3.0 for the 480p sizes and 5.0 otherwise. The
    # negative prompt is "镜头晃动，" + the shared one (wan_i2v_14B.py sample_neg_prompt).
    "wan2.1-i2v-14b-480p": ModelSpec(
        name="wan2.1-i2v-14b-480p",
        description="Wan2.1 image-to-video 14B, 480p (CLIP image tokens + 36-channel input)",
        dit=DiTConfig(dim=5120, ffn_dim=13824, num_layers=40, num_heads=40, in_channels=36, out_channels=16,
                      image_dim=1280),
        vae=WAN21_VAE,
        text=TextConfig(),
        sampling=SamplingDefaults(steps=40, shift=3.0, guidance_high_noise=5.0, guidance_low_noise=5.0, frames=81,
                                  fps=16, sizes=((832, 480), (480, 832)), negative_prompt=WAN21_I2V_NEGATIVE),
        image=ImageConditioning(mode="concat", resize="area_bicubic", required=True, clip_size=224,
                                clip_tokens=257, clip_dim=1280),
        source="W21 wan/configs/wan_i2v_14B.py, wan/image2video.py, generate.py; i2v.md §1",
    ),
    "wan2.1-i2v-14b-720p": ModelSpec(
        name="wan2.1-i2v-14b-720p",
        description="Wan2.1 image-to-video 14B, 720p (CLIP image tokens + 36-channel input)",
        dit=DiTConfig(dim=5120, ffn_dim=13824, num_layers=40, num_heads=40, in_channels=36, out_channels=16,
                      image_dim=1280),
        vae=WAN21_VAE,
        text=TextConfig(),
        sampling=SamplingDefaults(steps=40, shift=5.0, guidance_high_noise=5.0, guidance_low_noise=5.0, frames=81,
                                  fps=16, sizes=((1280, 720), (720, 1280)), negative_prompt=WAN21_I2V_NEGATIVE),
        image=ImageConditioning(mode="concat", resize="area_bicubic", required=True, clip_size=224,
                                clip_tokens=257, clip_dim=1280),
        source="W21 wan/configs/wan_i2v_14B.py, wan/image2video.py, generate.py; i2v.md §1",
    ),
    # W21 wan/first_last_frame2video.py, configs (flf2v = deepcopy of i2v, neg prompt "镜头切换，" + i2v's),
    # generate.py: 50 steps ("i2v" is not in "flf2v-14B"), shift 16, guidance 5 (argparse), 720p only.
    "wan2.1-flf2v-14b-720p": ModelSpec(
        name="wan2.1-flf2v-14b-720p",
        description="Wan2.1 first-and-last-frame-to-video 14B, 720p",
        dit=DiTConfig(dim=5120, ffn_dim=13824, num_layers=40, num_heads=40, in_channels=36, out_channels=16,
                      image_dim=1280),
        vae=WAN21_VAE,
        text=TextConfig(),
        sampling=SamplingDefaults(steps=50, shift=16.0, guidance_high_noise=5.0, guidance_low_noise=5.0, frames=81,
                                  fps=16, sizes=((1280, 720), (720, 1280)),
                                  negative_prompt="镜头切换，" + WAN21_I2V_NEGATIVE),
        image=ImageConditioning(mode="concat", resize="area_bicubic", required=True, last_image=True, clip_size=224,
                                clip_tokens=257, clip_dim=1280),
        source="W21 wan/first_last_frame2video.py, wan/configs/__init__.py, generate.py; i2v.md §1",
    ),
    # vidrt's bundled default: a tiny Wan trained on synthetic moving shapes (export/train_tiny.py).
    # Architecture and latent statistics come from its files; the sampling defaults are the ones
    # the training sweep chose (checkpoints/tiny-shapes/TRAINING.md).
    "vidrt-tiny-shapes": ModelSpec(
        name="vidrt-tiny-shapes",
        description="tiny Wan (1 M-param DiT) trained on coloured shapes moving left/right/up/down, 64x64",
        dit=DiTConfig(dim=128, ffn_dim=256, num_layers=4, num_heads=4, in_channels=8, out_channels=8,
                      text_dim=64),
        vae=VAEConfig("wan2.1", 8, (4, 8, 8), 8, 8, (0.0,) * 8, (1.0,) * 8),
        text=TextConfig(vocab_size=18, d_model=64, d_ff=128, num_layers=2, num_heads=4),
        sampling=SamplingDefaults(steps=25, shift=2.0, guidance_high_noise=2.0, guidance_low_noise=2.0,
                                  frames=17, fps=8, sizes=((64, 64),), negative_prompt=""),
        source="checkpoints/tiny-shapes/TRAINING.md (sampling sweep on the 72-prompt grid)",
        # Wan2.2 TI2V-5B's image mode, learned in stage 4 (export/train_tiny_i2v.py): the picture's latent is
        # latent frame 0 at timestep 0 (per-token timesteps), re-imposed after every step; text-only still runs.
        per_token_timestep=True,
        image=ImageConditioning(mode="first_frame", resize="cover_lanczos"),
    ),
}


def get_variant(name: str) -> ModelSpec:
    from vidrt.errors import UsageError

    try:
        return VARIANTS[name]
    except KeyError:
        raise UsageError(f"unknown variant {name!r}: choose one of {', '.join(VARIANTS)}") from None


# ---- (de)serialisation of the frozen dataclasses above, for manifest.json -----------------------

T = TypeVar("T")


def to_dict(obj: Any) -> Any:
    """Dataclass tree -> JSON-able dicts/lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [to_dict(x) for x in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def from_dict(cls: type[T], data: Any) -> T:
    """JSON dicts -> the typed dataclass `cls`; lists become tuples. Raises TypeError/ValueError on a mismatch."""
    return _convert(cls, data)  # type: ignore[no-any-return]


def _convert(tp: Any, data: Any) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(data, dict):
            raise TypeError(f"expected an object for {tp.__name__}, got {type(data).__name__}")
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp)}
        unknown = set(data) - set(fields)
        if unknown:
            raise ValueError(f"unknown field(s) for {tp.__name__}: {', '.join(sorted(unknown))}")
        kwargs = {k: _convert(hints[k], v) for k, v in data.items()}
        return tp(**kwargs)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if data is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, data)
            except (TypeError, ValueError) as exc:
                errors.append(str(exc))
        raise TypeError("; ".join(errors) or f"no type of {tp} fits {data!r}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(data, (list, tuple)):
            raise TypeError(f"expected a list, got {type(data).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], x) for x in data)
        if len(args) != len(data):
            raise ValueError(f"expected {len(args)} items, got {len(data)}")
        return tuple(_convert(a, x) for a, x in zip(args, data, strict=True))
    if origin is dict:
        kt, vt = typing.get_args(tp)
        if not isinstance(data, dict):
            raise TypeError(f"expected an object, got {type(data).__name__}")
        return {_convert(kt, k): _convert(vt, v) for k, v in data.items()}
    if tp is Any:
        return data
    if tp is float:
        if isinstance(data, bool) or not isinstance(data, (int, float)):
            raise TypeError(f"expected a number, got {data!r}")
        return float(data)
    if tp in (int, str, bool):
        if not isinstance(data, tp) or (tp is int and isinstance(data, bool)):
            raise TypeError(f"expected {tp.__name__}, got {data!r}")
        return data
    raise TypeError(f"unsupported type {tp}")


__all__ = [
    "DiTConfig", "VAEConfig", "TextConfig", "SamplingDefaults", "ImageConditioning", "ModelSpec", "VARIANTS",
    "get_variant", "to_dict", "from_dict",
]
