"""I/O contracts of the exported components, declared once.

The same names are used for torch export, ONNX Runtime feeds and TensorRT bindings. A dim is an
int (fixed) or a str (symbolic; the runtime binds it per call). The VAE graphs carry a list of
cache tensors whose channel counts depend on the architecture: export fills them in from the
traced module and writes the finished contracts into manifest.json; the runtime reads them
from there.
"""

from __future__ import annotations

from dataclasses import dataclass

from vidrt.package.registry import ModelSpec

Dim = int | str


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "float32", "float16", "int64", ...
    shape: tuple[Dim, ...]


@dataclass(frozen=True)
class Contract:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def output(self, name: str) -> TensorSpec:
        return next(t for t in self.outputs if t.name == name)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)


# Component names = artifact stems in the package.
TEXT_ENCODER = "text_encoder"
VAE_FIRST = "vae_decode_first"
VAE_STEP = "vae_decode_step"
VAE_ENCODE_FIRST = "vae_encode_first"  # image-to-video models only: the streaming VAE encoder
VAE_ENCODE_STEP = "vae_encode_step"
IMAGE_ENCODER = "image_encoder"  # Wan2.1 I2V/FLF2V: the CLIP vision tower

# Tensor names.
INPUT_IDS, ATTENTION_MASK, TEXT_HIDDEN = "input_ids", "attention_mask", "last_hidden_state"
LATENTS, TIMESTEP, CONTEXT, VELOCITY = "hidden_states", "timestep", "encoder_hidden_states", "noise_pred"
VAE_LATENT, VAE_FRAMES, VAE_VIDEO = "latent", "frames", "video"
PIXEL_VALUES, IMAGE_EMBEDS = "pixel_values", "encoder_hidden_states_image"

# The DiT cut into pieces for step caching (component "<expert>.<piece>", vidrt.export.dit_split;
# fast_paths.md C.6): the tensors handed between them.
TEXT_EMBED, TIME_EMBED, PATCH_EMBED = "text_embed", "time_embed", "patch_embed"
BLOCK0, BLOCKS_REST, HEAD = "block0", "blocks_rest", "head"
DIT_PIECES = (TEXT_EMBED, TIME_EMBED, PATCH_EMBED, BLOCK0, BLOCKS_REST, HEAD)
TOKENS, BLOCK_OUT = "tokens", "block_out"  # the residual stream [B, L, dim] into / out of blocks
TEMB, TIMESTEP_PROJ = "temb", "timestep_proj"  # e [B, dim] (head), e0 [B, 6*dim] (blocks); TI2V: per token
CONTEXT_EMB = "context_emb"  # text embedding [B, 512, dim]: step-invariant
ROPE_COS, ROPE_SIN = "rope_cos", "rope_sin"  # [1, L, 1, head_dim]: step-invariant


def dit_piece(expert: str, piece: str) -> str:
    """Component name of one piece of a DiT expert: "dit.block0", "dit_high.head"."""
    return f"{expert}.{piece}"


def cache_in(i: int) -> str:
    return f"cache_in_{i:02d}"


def cache_out(i: int) -> str:
    return f"cache_out_{i:02d}"


def text_encoder_contract(spec: ModelSpec) -> Contract:
    """ids/mask [batch, seq] at the real token length -> hidden [batch, seq, d_model] (fp32 out)."""
    return Contract(
        inputs=(TensorSpec(INPUT_IDS, "int64", ("batch", "seq")),
                TensorSpec(ATTENTION_MASK, "int64", ("batch", "seq"))),
        outputs=(TensorSpec(TEXT_HIDDEN, "float32", ("batch", "seq", spec.text.d_model)),),
    )


def dit_contract(spec: ModelSpec, dtype: str = "float32") -> Contract:
    """latents [B, C, F, H, W] + timestep [B] (TI2V: [B, tokens]) + context [B, 512, text_dim] (+ Wan2.1
    I2V: CLIP tokens [B, 257 per image, image_dim], FLF2V 514) -> velocity [B, C_out, F, H, W]."""
    timestep_shape: tuple[Dim, ...] = ("batch", "tokens") if spec.per_token_timestep else ("batch",)
    image: tuple[TensorSpec, ...] = ()
    if spec.dit.image_dim is not None and spec.image is not None:
        image = (TensorSpec(IMAGE_EMBEDS, dtype, ("batch", spec.image.image_tokens, spec.dit.image_dim)),)
    return Contract(
        inputs=(TensorSpec(LATENTS, dtype, ("batch", spec.dit.in_channels, "frames", "height", "width")),
                TensorSpec(TIMESTEP, "float32", timestep_shape),
                TensorSpec(CONTEXT, dtype, ("batch", spec.text.text_len, spec.dit.text_dim))) + image,
        outputs=(TensorSpec(VELOCITY, dtype, ("batch", spec.dit.out_channels, "frames", "height", "width")),),
    )


def vae_contracts(spec: ModelSpec, cache_shapes: list[tuple[Dim, ...]]) -> tuple[Contract, Contract]:
    """(first, step) contracts. One latent frame in [1, z, 1, h, w] (already denormalised);
    first -> 1 video frame [1, 3, 1, H, W] + caches; step (+ caches in) -> 4 frames + caches out.
    Frames are in [-1, 1]. `cache_shapes` come from tracing the decoder (2 frames per slot)."""
    latent = TensorSpec(VAE_LATENT, "float32", (1, spec.vae.z_dim, 1, "lat_h", "lat_w"))
    outs = tuple(TensorSpec(cache_out(i), "float32", s) for i, s in enumerate(cache_shapes))
    ins = tuple(TensorSpec(cache_in(i), "float32", s) for i, s in enumerate(cache_shapes))
    first = Contract(inputs=(latent,),
                     outputs=(TensorSpec(VAE_FRAMES, "float32", (1, 3, 1, "out_h", "out_w")),) + outs)
    step = Contract(inputs=(latent,) + ins,
                    outputs=(TensorSpec(VAE_FRAMES, "float32", (1, 3, spec.vae.stride[0], "out_h", "out_w")),) + outs)
    return first, step


def image_encoder_contract(spec: ModelSpec) -> Contract:
    """Wan2.1's CLIP vision tower: pixel_values [n, 3, S, S] (CLIP-normalised) -> the penultimate layer's
    hidden states [n, tokens, width] (W21 wan/modules/clip.py use_31_block; transformers hidden_states[-2])."""
    assert spec.image is not None
    c = spec.image
    return Contract(inputs=(TensorSpec(PIXEL_VALUES, "float32", ("images", 3, c.clip_size, c.clip_size)),),
                    outputs=(TensorSpec(IMAGE_EMBEDS, "float32", ("images", c.clip_tokens, c.clip_dim)),))


def vae_encoder_contracts(spec: ModelSpec, cache_shapes: list[tuple[Dim, ...]]) -> tuple[Contract, Contract]:
    """(first, step) contracts of the streaming encoder. Video in [-1, 1], RGB, at the latent's
    pixel size (stride x lat_h); first: 1 frame [1, 3, 1, H, W] -> latent mu [1, z, 1, h, w] + caches;
    step (+ caches in): the next 4 frames -> the next latent frame + caches. mu is the VAE's own
    latent (not normalised: the runtime applies latents_mean/std, as for the decoder)."""
    s = spec.vae.stride[1]
    video = f"{s}*lat_h", f"{s}*lat_w"
    latent = TensorSpec(VAE_LATENT, "float32", (1, spec.vae.z_dim, 1, "lat_h", "lat_w"))
    outs = tuple(TensorSpec(cache_out(i), "float32", sh) for i, sh in enumerate(cache_shapes))
    ins = tuple(TensorSpec(cache_in(i), "float32", sh) for i, sh in enumerate(cache_shapes))
    first = Contract(inputs=(TensorSpec(VAE_VIDEO, "float32", (1, 3, 1, *video)),), outputs=(latent,) + outs)
    step = Contract(inputs=(TensorSpec(VAE_VIDEO, "float32", (1, 3, spec.vae.stride[0], *video)),) + ins,
                    outputs=(latent,) + outs)
    return first, step


def resolve_shape(shape: tuple[Dim, ...], sizes: dict[str, int]) -> tuple[int, ...]:
    """Bind symbolic dims. A str dim is a name ("lat_h") or a multiple of one ("4*lat_h")."""
    out = []
    for d in shape:
        if isinstance(d, int):
            out.append(d)
            continue
        factor, _, name = d.rpartition("*")
        out.append((int(factor) if factor else 1) * sizes[name])
    return tuple(out)
