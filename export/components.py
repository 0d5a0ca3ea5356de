"""Torch wrappers that give each exported graph its contract's I/O (names, order, dtypes).

One wrapper per graph: `DiTGraph`, `TextEncoderGraph`, `VAEFirstGraph`, `VAEStepGraph`. Each
pairs with a `GraphSpec` (example inputs + torch.export dynamic shapes + contract) built by the
`*_graph_spec` functions. The diffusers/transformers modules run unchanged; export-only rewrites
(stack-form RoPE, nearest upsampling, eager attention, low precision) live in context managers
here and are undone afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.export import Dim
from vidrt.package.contracts import (
    Contract,
    dit_contract,
    image_encoder_contract,
    text_encoder_contract,
    vae_contracts,
    vae_encoder_contracts,
)
from vidrt.package.registry import ModelSpec

PRECISIONS = ("fp32", "fp16", "bf16")
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
NUMPY_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

# Parts of the DiT that stay fp32 in a low-precision graph (a module/parameter name component).
# diffusers' WanTransformer3DModel._keep_in_fp32_modules, plus: patch_embedding (so the residual
# stream starts and stays fp32), time_proj (the per-block modulation is computed from it) and
# norm_out. Everything else (attention, FFN, text projection, proj_out) runs in low precision.
DIT_FP32_PARTS = ("rope", "time_embedder", "time_proj", "scale_shift_table", "norm1", "norm2", "norm3",
                  "norm_out", "patch_embedding")


@dataclass(frozen=True)
class GraphSpec:
    """Everything torch.onnx.export needs for one graph, plus the contract it implements."""

    module: nn.Module
    args: tuple[Any, ...]
    dynamic_shapes: tuple[Any, ...]
    contract: Contract


# ---- DiT --------------------------------------------------------------------------------------


class DiTGraph(nn.Module):
    """(hidden_states [B,C,F,H,W], timestep [B] or [B,tokens], context [B,512,text_dim]) -> velocity.

    Inputs/outputs carry the graph precision; inside, the residual stream is fp32 (see
    `low_precision`), so latents and context are lifted to fp32 before the model."""

    def __init__(self, model: nn.Module, io_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.model = model  # initializer names are "model.<diffusers key>"
        self.io_dtype = io_dtype

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        out = self.model(hidden_states.float(), timestep, encoder_hidden_states.float(), return_dict=False)[0]
        return out.to(self.io_dtype)


class DiTImageGraph(DiTGraph):
    """DiTGraph + Wan2.1's CLIP tokens: encoder_hidden_states_image [B, n_images * T, image_dim]. diffusers'
    WanImageEmbedding takes [B, T, D] and, for FLF2V (pos_embed), reshapes [2B, T, D] to [B, 2T, D]
    itself, so the graph hands it [B * n_images, T, D]."""

    def __init__(self, model: nn.Module, io_dtype: torch.dtype, tokens_per_image: int) -> None:
        super().__init__(model, io_dtype)
        self.tokens_per_image = tokens_per_image

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_hidden_states_image: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        image = encoder_hidden_states_image.float()
        image = image.reshape(-1, self.tokens_per_image, image.shape[-1])
        out = self.model(hidden_states.float(), timestep, encoder_hidden_states.float(),
                         encoder_hidden_states_image=image, return_dict=False)[0]
        return out.to(self.io_dtype)


def dit_graph_spec(model: nn.Module, spec: ModelSpec, precision: str = "fp32", *, batch: int = 2,
                   frames: int = 2, height: int = 4, width: int = 4) -> GraphSpec:
    """Example inputs on the model's device (meta works). Batch must be >= 2: torch.export
    specialises size-1 dims. H/W are declared as 2*Dim so the patch divisibility is in the graph."""
    cfg = spec.dit
    device = next(model.parameters()).device
    io_dtype = TORCH_DTYPES[precision]
    x = torch.randn(batch, cfg.in_channels, frames, height, width, device=device, dtype=io_dtype)
    if spec.per_token_timestep:
        pt, ph, pw = cfg.patch_size
        tokens = (frames // pt) * (height // ph) * (width // pw)
        t = torch.full((batch, tokens), 500.0, device=device)
    else:
        t = torch.full((batch,), 500.0, device=device)
    ctx = torch.randn(batch, spec.text.text_len, cfg.text_dim, device=device, dtype=io_dtype)
    b = Dim("batch", min=1, max=64)
    f = Dim("frames", min=1, max=256)
    hh, ww = Dim("half_height", min=1, max=1024), Dim("half_width", min=1, max=1024)
    ph, pw = cfg.patch_size[1], cfg.patch_size[2]
    x_dims = {0: b, 2: f, 3: ph * hh, 4: pw * ww}
    # tokens = F*H*W/4 is a product of the other dims: let torch.export derive it (AUTO).
    t_dims = {0: b, 1: Dim.AUTO} if spec.per_token_timestep else {0: b}
    if cfg.image_dim is not None and spec.image is not None:  # Wan2.1 I2V/FLF2V: + CLIP tokens
        img = torch.randn(batch, spec.image.image_tokens, cfg.image_dim, device=device, dtype=io_dtype)
        return GraphSpec(DiTImageGraph(model, io_dtype, spec.image.clip_tokens), (x, t, ctx, img),
                         (x_dims, t_dims, {0: b}, {0: b}), dit_contract(spec, NUMPY_NAMES[precision]))
    return GraphSpec(DiTGraph(model, io_dtype), (x, t, ctx), (x_dims, t_dims, {0: b}),
                     dit_contract(spec, NUMPY_NAMES[precision]))


def _keeps_fp32(name: str) -> bool:
    return any(part in DIT_FP32_PARTS for part in name.split("."))


def _cast_inputs_hook(dtype: torch.dtype):
    def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
    return hook


def make_low_precision(model: nn.Module, dtype: torch.dtype) -> list[Any]:
    """Cast the DiT's compute weights to `dtype` in place, keeping DIT_FP32_PARTS fp32.

    Each cast module gets a forward pre-hook that casts its floating inputs to `dtype`; its outputs
    rejoin the fp32 residual stream by type promotion (fp32 + fp16 -> fp32), which is how the
    residual stream stays fp32. Returns the hook handles (remove them to undo the hooks)."""
    handles = []
    for mod_name, module in model.named_modules():
        direct = [(n, p) for n, p in module.named_parameters(recurse=False)]
        cast = [(n, p) for n, p in direct if not _keeps_fp32(f"{mod_name}.{n}" if mod_name else n)]
        if not cast:
            continue
        for _, p in cast:
            p.data = p.data.to(dtype)
        if len(cast) == len(direct) and mod_name:  # a compute leaf (Linear, RMSNorm): feed it `dtype`
            handles.append(module.register_forward_pre_hook(_cast_inputs_hook(dtype)))
    return handles


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on interleaved pairs without in-place writes (exports without ScatterND).
    x [B, L, heads, D]; cos/sin [1, L, 1, D] with each frequency repeated twice."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)  # even / odd channels, [B, L, heads, D/2]
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2).type_as(x)


class StackRopeAttnProcessor:
    """Self/cross attention of WanAttention (text-only: no image K/V) with stack-form RoPE.
    Same math as diffusers' WanAttnProcessor with the default SDPA backend."""

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, rotary_emb: Any = None) -> torch.Tensor:
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))  # [B, L, heads, D]
        k = attn.norm_k(attn.to_k(context)).unflatten(2, (attn.heads, -1))
        v = attn.to_v(context).unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            q, k = _rotate(q, *rotary_emb), _rotate(k, *rotary_emb)
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attention_mask)
        out = out.transpose(1, 2).flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


@contextlib.contextmanager
def stack_rope(model: nn.Module) -> Iterator[int]:
    """Swap every text-only WanAttention processor for StackRopeAttnProcessor; restore on exit.
    Yields how many were swapped."""
    swapped = []
    for module in model.modules():
        if hasattr(module, "set_processor") and getattr(module, "add_k_proj", 1) is None \
                and not getattr(module, "fused_projections", False):
            swapped.append((module, module.processor))
            module.processor = StackRopeAttnProcessor()
    try:
        yield len(swapped)
    finally:
        for module, proc in swapped:
            module.processor = proc


# ---- text encoder -----------------------------------------------------------------------------


class TextEncoderGraph(nn.Module):
    """(input_ids, attention_mask) int64 [batch, seq] -> last_hidden_state fp32 [batch, seq, d_model]."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.float()


def text_encoder_graph_spec(model: nn.Module, spec: ModelSpec, *, batch: int = 2, seq: int = 16) -> GraphSpec:
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), device=device) if device.type != "meta" \
        else torch.zeros(batch, seq, dtype=torch.int64, device=device)
    mask = torch.ones(batch, seq, dtype=torch.int64, device=device)
    dims = {0: Dim("batch", min=1, max=64), 1: Dim("seq", min=2, max=spec.text.text_len)}
    return GraphSpec(TextEncoderGraph(model), (ids, mask), (dims, dims), text_encoder_contract(spec))


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """UMT5 with SDPA fails to decompose under the dynamo exporter; eager attention exports."""
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


# ---- VAE decoder ------------------------------------------------------------------------------


def _two_frames(cache: torch.Tensor) -> torch.Tensor:
    """Uniform 2-frame cache: a zero frame in front of a 1-frame cache is the same causal padding."""
    if cache.shape[2] == 2:
        return cache
    return torch.cat([torch.zeros_like(cache[:, :, -1:]), cache[:, :, -1:]], dim=2)


class _VAEGraph(nn.Module):
    def __init__(self, vae: nn.Module, num_caches: int) -> None:
        super().__init__()
        self.post_quant_conv = vae.post_quant_conv  # 1x1x1, so applying it per frame is exact
        self.decoder = vae.decoder
        self.patch_size = vae.config.patch_size  # Wan2.2: 2x2 unpatchify after the decoder
        self.num_caches = num_caches

    def _frames(self, out: torch.Tensor) -> torch.Tensor:
        if self.patch_size is not None and self.patch_size > 1:
            p = self.patch_size
            b, cpp, t, h, w = out.shape  # channels laid out as (c, p_w, p_h), see diffusers unpatchify
            out = out.view(b, cpp // (p * p), p, p, t, h, w).permute(0, 1, 4, 5, 3, 6, 2)
            out = out.reshape(b, cpp // (p * p), t, h * p, w * p)
        return out.clamp(-1.0, 1.0)


class VAEFirstGraph(_VAEGraph):
    """latent [1, z, 1, h, w] (denormalised) -> frames [1, 3, 1, H, W], cache_out_00..N-1 [1, c, 2, k*h, k*w]."""

    def forward(self, latent: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feat_cache: list[Any] = [None] * self.num_caches
        rep_inputs: dict[int, torch.Tensor] = {}
        with _record_rep_inputs(self.decoder, rep_inputs):
            out = self.decoder(self.post_quant_conv(latent), feat_cache=feat_cache, feat_idx=[0], first_chunk=True)
        caches = []
        for i, c in enumerate(feat_cache):
            if isinstance(c, str):  # "Rep": the temporal upsampler was skipped; next step sees a zero cache
                c = torch.zeros_like(rep_inputs[i])
            caches.append(_two_frames(c))
        return (self._frames(out), *caches)


class VAEStepGraph(_VAEGraph):
    """latent [1, z, 1, h, w] + cache_in_* -> frames [1, 3, 4, H, W], cache_out_* (same shapes as in)."""

    def forward(self, latent: torch.Tensor, *caches: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feat_cache: list[Any] = list(caches)
        out = self.decoder(self.post_quant_conv(latent), feat_cache=feat_cache, feat_idx=[0])
        return (self._frames(out), *(_two_frames(c) for c in feat_cache))


@contextlib.contextmanager
def _record_rep_inputs(decoder: nn.Module, store: dict[int, torch.Tensor]) -> Iterator[None]:
    """Remember the input of each temporal upsampler that marks its slot "Rep" (first step)."""

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        idx, cache = kwargs["feat_idx"][0], kwargs["feat_cache"]
        if cache[idx] is None:
            store[idx] = args[0]

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True)
               for m in decoder.modules() if getattr(m, "mode", None) == "upsample3d"]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def nearest_upsampling(vae: nn.Module) -> Iterator[None]:
    """nearest-exact == nearest at exact 2x; nearest exports as one Resize instead of a GatherND chain."""
    changed = [m for m in vae.modules() if isinstance(m, nn.Upsample) and m.mode == "nearest-exact"]
    for m in changed:
        m.mode = "nearest"
    try:
        yield
    finally:
        for m in changed:
            m.mode = "nearest-exact"


def count_vae_caches(vae: nn.Module) -> int:
    """Cache slots one decoder step uses (32 for the full Wan2.1/2.2 decoders), from a 1x1-latent probe."""
    z = vae.config.z_dim
    device = next(vae.parameters()).device
    feat_idx = [0]
    with torch.no_grad():
        vae.decoder(torch.zeros(1, z, 1, 1, 1, device=device), feat_cache=[None] * 256, feat_idx=feat_idx,
                    first_chunk=True)
    return feat_idx[0]


def vae_graph_specs(vae: nn.Module, spec: ModelSpec, *, lat_h: int = 3, lat_w: int = 5
                    ) -> tuple[GraphSpec, GraphSpec]:
    """(first, step) specs. Example latent h/w 3x5 (distinct odd primes), so each cache's spatial
    factor k (cache = k * latent) is read off the traced shapes unambiguously."""
    n = count_vae_caches(vae)
    device = next(vae.parameters()).device
    first = VAEFirstGraph(vae, n)
    latent = torch.randn(1, spec.vae.z_dim, 1, lat_h, lat_w, device=device)
    with torch.no_grad():
        caches = first(latent)[1:]
    h, w = Dim("lat_h", min=1, max=512), Dim("lat_w", min=1, max=512)
    # *caches is one varargs entry: its dynamic shapes must be a tuple (a list fails torch.export)
    cache_dims, cache_shapes = _cache_dims(caches, lat_h, lat_w, h, w)
    first_c, step_c = vae_contracts(spec, cache_shapes)
    lat_dims = {3: h, 4: w}
    step_caches = tuple(torch.randn(c.shape, device=device) for c in caches)
    return (GraphSpec(first, (latent,), (lat_dims,), first_c),
            GraphSpec(VAEStepGraph(vae, n), (latent, *step_caches), (lat_dims, tuple(cache_dims)), step_c))


# ---- CLIP vision tower (Wan2.1 I2V / FLF2V) ----------------------------------------------------------


class ImageEncoderGraph(nn.Module):
    """transformers CLIPVisionModel: pixel_values [n, 3, S, S] -> hidden_states[-2] [n, T, D], the output
    of the second-to-last layer without the final LayerNorm: what W21 wan/modules/clip.py calls
    `use_31_block=True` and diffusers' WanImageToVideoPipeline.encode_image takes (i2v.md §4.4)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-2].float()


def image_encoder_graph_spec(model: nn.Module, spec: ModelSpec) -> GraphSpec:
    assert spec.image is not None
    s = spec.image.clip_size
    device = next(model.parameters()).device
    x = torch.randn(2, 3, s, s, device=device)
    return GraphSpec(ImageEncoderGraph(model), (x,), ({0: Dim("images", min=1, max=64)},),
                     image_encoder_contract(spec))


# ---- VAE encoder (image-to-video conditioning) ----------------------------------------------------


class _VAEEncodeGraph(nn.Module):
    """The encoder as the reference runs it chunk by chunk (diffusers AutoencoderKLWan._encode, W21
    WanVAE_.encode): Wan2.2 patchify (2x2, channel order (c, r, q)) -> encoder with causal caches ->
    quant_conv (1x1x1, so per chunk is exact) -> mu = the first z channels (the posterior's mode;
    what the official code and diffusers' I2V pipeline use, never a sample)."""

    def __init__(self, vae: nn.Module, num_caches: int) -> None:
        super().__init__()
        self.encoder = vae.encoder
        self.quant_conv = vae.quant_conv
        self.patch_size = vae.config.patch_size
        self.z_dim = vae.config.z_dim
        self.num_caches = num_caches

    def _pixels(self, video: torch.Tensor) -> torch.Tensor:
        if self.patch_size is not None and self.patch_size > 1:
            from diffusers.models.autoencoders.autoencoder_kl_wan import patchify

            return patchify(video, patch_size=self.patch_size)
        return video

    def _mu(self, out: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(out)[:, : self.z_dim]


class VAEEncodeFirstGraph(_VAEEncodeGraph):
    """video [1, 3, 1, H, W] in [-1, 1] -> latent mu [1, z, 1, h, w] (not normalised), cache_out_* with
    2 frames each (a 1-frame cache gets a zero frame in front: the causal padding the next chunk would
    have had; the temporal downsamplers read only the last frame of theirs)."""

    def forward(self, video: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feat_cache: list[Any] = [None] * self.num_caches
        out = self.encoder(self._pixels(video), feat_cache=feat_cache, feat_idx=[0])
        return (self._mu(out), *(_two_frames(c) for c in feat_cache))


class VAEEncodeStepGraph(_VAEEncodeGraph):
    """video [1, 3, 4, H, W] + cache_in_* -> latent mu [1, z, 1, h, w], cache_out_* (same shapes as in)."""

    def forward(self, video: torch.Tensor, *caches: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feat_cache: list[Any] = list(caches)
        out = self.encoder(self._pixels(video), feat_cache=feat_cache, feat_idx=[0])
        return (self._mu(out), *(_two_frames(c) for c in feat_cache))


def count_encoder_caches(vae: nn.Module, spatial: int) -> int:
    """Cache slots one encoder chunk uses (24 for the full Wan VAEs: the 1x1x1 shortcuts take none)."""
    device = next(vae.parameters()).device
    feat_idx = [0]
    graph = _VAEEncodeGraph(vae, 0)
    with torch.no_grad():
        vae.encoder(graph._pixels(torch.zeros(1, 3, 1, spatial, spatial, device=device)), feat_cache=[None] * 256,
                    feat_idx=feat_idx)
    return feat_idx[0]


def vae_encoder_graph_specs(vae: nn.Module, spec: ModelSpec, *, lat_h: int = 3, lat_w: int = 5
                            ) -> tuple[GraphSpec, GraphSpec]:
    """(first, step) specs of the streaming encoder; example latent 3x5 as for the decoder, so every
    cache's spatial factor (cache = k * latent) is read off the traced shapes."""
    s = spec.vae.stride[1]
    n = count_encoder_caches(vae, s)
    device = next(vae.parameters()).device
    first = VAEEncodeFirstGraph(vae, n)
    video = torch.rand(1, 3, 1, s * lat_h, s * lat_w, device=device) * 2 - 1
    with torch.no_grad():
        caches = first(video)[1:]
    h, w = Dim("lat_h", min=1, max=512), Dim("lat_w", min=1, max=512)
    # *caches is one varargs entry: its dynamic shapes must be a tuple (a list fails torch.export)
    cache_dims, cache_shapes = _cache_dims(caches, lat_h, lat_w, h, w)
    first_c, step_c = vae_encoder_contracts(spec, cache_shapes)
    video_dims = {3: s * h, 4: s * w}
    step_video = torch.rand(1, 3, spec.vae.stride[0], s * lat_h, s * lat_w, device=device) * 2 - 1
    step_caches = tuple(torch.randn(c.shape, device=device) for c in caches)
    return (GraphSpec(first, (video,), (video_dims,), first_c),
            GraphSpec(VAEEncodeStepGraph(vae, n), (step_video, *step_caches), (video_dims, tuple(cache_dims)),
                      step_c))


def _cache_dims(caches: Any, lat_h: int, lat_w: int, h: Any, w: Any) -> tuple[list[dict[int, Any]], list[tuple]]:
    """Each causal cache [1, C, 2, k*lat_h, k*lat_w]: its dynamic dims for torch.export and its contract
    shape (k = 1, or the spatial multiple of that cache's resolution)."""
    cache_dims, cache_shapes = [], []
    for c in caches:
        kh, kw = c.shape[3] // lat_h, c.shape[4] // lat_w
        assert c.shape[3] == kh * lat_h and c.shape[4] == kw * lat_w, c.shape
        cache_dims.append({3: h if kh == 1 else kh * h, 4: w if kw == 1 else kw * w})
        cache_shapes.append((1, c.shape[1], 2, _sym(kh, "lat_h"), _sym(kw, "lat_w")))
    return cache_dims, cache_shapes


def _sym(k: int, name: str) -> str:
    return name if k == 1 else f"{k}*{name}"


__all__ = [
    "PRECISIONS", "TORCH_DTYPES", "NUMPY_NAMES", "DIT_FP32_PARTS", "GraphSpec", "DiTGraph", "dit_graph_spec",
    "make_low_precision", "StackRopeAttnProcessor", "stack_rope", "TextEncoderGraph", "text_encoder_graph_spec",
    "eager_attention", "VAEFirstGraph", "VAEStepGraph", "nearest_upsampling", "count_vae_caches",
    "vae_graph_specs", "VAEEncodeFirstGraph", "VAEEncodeStepGraph", "count_encoder_caches",
    "vae_encoder_graph_specs", "DiTImageGraph", "ImageEncoderGraph", "image_encoder_graph_spec",
]
