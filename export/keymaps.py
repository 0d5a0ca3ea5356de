"""Official Wan key names -> diffusers / transformers key names, written as data.

A map is an ordered table of `(regex, replacement)` rules. `rename` matches each official key
against the rules in order; the first rule whose regex matches the *start* of the key rewrites
that prefix (`re.Match.expand`, so `\\1` works) and the rest of the key goes through the
`LEAF` table of the same map (identity when no leaf rule matches). Keys that match no prefix
rule are returned as unknown, so the caller can name them in a one-line error.

The maps are applied at the load boundary only (`checkpoints.py`); the modules themselves are
plain diffusers/transformers classes. Sources: feasibility.md §5 (DiT, umT5: verified per key),
the official vae2_1/vae2_2 module trees against diffusers' AutoencoderKLWan (checked here by
building both and zipping their state dicts; tests/test_checkpoints.py checks the outputs).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

Rule = tuple[str, str]  # (regex matched at the start of the key, replacement for the matched part)


@dataclass(frozen=True)
class View:
    """A module tensor that is a part of a stored one: chunk `index` of `chunks` equal parts along
    dim 0 (a fused q/k/v projection), and/or the stored tensor without its `drop` leading size-1
    dims (open-clip's [1, 1, D] class token is transformers' [D])."""

    index: int = 0
    chunks: int = 1
    drop: int = 0

    def shape(self, stored: tuple[int, ...]) -> tuple[int, ...]:
        out = stored[self.drop:]
        return (out[0] // self.chunks, *out[1:]) if self.chunks > 1 else out


@dataclass(frozen=True)
class KeyMap:
    prefix: tuple[Rule, ...]
    leaf: tuple[Rule, ...] = ()
    # (alias, source): diffusers/transformers keys that are tied to another one (same tensor)
    ties: tuple[tuple[str, str], ...] = ()
    # (regex, replacements): one stored tensor is several module tensors stacked along dim 0, in order
    splits: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # (regex on the full official key, n): the module tensor is the stored one without n leading 1-dims
    squeeze: tuple[tuple[str, int], ...] = ()
    # regexes of official keys that belong to no module loaded from this file (CLIP's text tower)
    ignore: tuple[str, ...] = ()


def _attn(official: str, diffusers: str) -> tuple[Rule, ...]:
    """Attention sub-map shared by self- and cross-attention: q/k/v/o + q/k RMS norms."""
    b = r"^blocks\.(\d+)\."
    return (
        (b + official + r"\.q\.", r"blocks.\1." + diffusers + ".to_q."),
        (b + official + r"\.k\.", r"blocks.\1." + diffusers + ".to_k."),
        (b + official + r"\.v\.", r"blocks.\1." + diffusers + ".to_v."),
        (b + official + r"\.o\.", r"blocks.\1." + diffusers + ".to_out.0."),
        (b + official + r"\.norm_q\.", r"blocks.\1." + diffusers + ".norm_q."),
        (b + official + r"\.norm_k\.", r"blocks.\1." + diffusers + ".norm_k."),
    )


# Official WanModel -> diffusers WanTransformer3DModel (t2v / ti2v / i2v / flf2v).
# The official norm1/norm2 have no affine weights; official norm3 (the affine cross-attn pre-norm)
# is diffusers' norm2. `freqs` is a plain attribute in the official model, not a state-dict key.
# Wan2.1 I2V/FLF2V add the CLIP branch (W21 wan/modules/model.py MLPProj, WanI2VCrossAttention; the
# names as diffusers' convert_wan_to_diffusers / single_file_utils convert_wan_transformer_to_diffusers):
# img_emb.proj = LayerNorm, Linear, GELU, Linear, LayerNorm -> image_embedder norm1, ff.net.0.proj,
# ff.net.2, norm2; FLF2V's img_emb.emb_pos [1, 2 x 257, 1280] -> image_embedder.pos_embed.
DIT = KeyMap(prefix=(
    (r"^img_emb\.proj\.0\.", "condition_embedder.image_embedder.norm1."),
    (r"^img_emb\.proj\.1\.", "condition_embedder.image_embedder.ff.net.0.proj."),
    (r"^img_emb\.proj\.3\.", "condition_embedder.image_embedder.ff.net.2."),
    (r"^img_emb\.proj\.4\.", "condition_embedder.image_embedder.norm2."),
    (r"^img_emb\.emb_pos$", "condition_embedder.image_embedder.pos_embed"),
    (r"^blocks\.(\d+)\.cross_attn\.k_img\.", r"blocks.\1.attn2.add_k_proj."),
    (r"^blocks\.(\d+)\.cross_attn\.v_img\.", r"blocks.\1.attn2.add_v_proj."),
    (r"^blocks\.(\d+)\.cross_attn\.norm_k_img\.", r"blocks.\1.attn2.norm_added_k."),
    (r"^patch_embedding\.", "patch_embedding."),
    (r"^text_embedding\.0\.", "condition_embedder.text_embedder.linear_1."),
    (r"^text_embedding\.2\.", "condition_embedder.text_embedder.linear_2."),
    (r"^time_embedding\.0\.", "condition_embedder.time_embedder.linear_1."),
    (r"^time_embedding\.2\.", "condition_embedder.time_embedder.linear_2."),
    (r"^time_projection\.1\.", "condition_embedder.time_proj."),
    *_attn("self_attn", "attn1"),
    *_attn("cross_attn", "attn2"),
    (r"^blocks\.(\d+)\.norm3\.", r"blocks.\1.norm2."),
    (r"^blocks\.(\d+)\.ffn\.0\.", r"blocks.\1.ffn.net.0.proj."),
    (r"^blocks\.(\d+)\.ffn\.2\.", r"blocks.\1.ffn.net.2."),
    (r"^blocks\.(\d+)\.modulation$", r"blocks.\1.scale_shift_table"),
    (r"^head\.head\.", "proj_out."),
    (r"^head\.modulation$", "scale_shift_table"),
))

# Wan2.1 I2V/FLF2V's CLIP checkpoint `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`: the
# state dict of Wan's own XLMRobertaCLIP (W21 wan/modules/clip.py; the same module in wan22
# wan/modules/animate/clip.py). Only its visual tower (`visual.*`, a ViT-H/14: pre-norm, class token,
# GELU) is used, as transformers' CLIPVisionModel (transformers 5 names: no `vision_model.` level).
# to_qkv is q, k, v stacked along dim 0 (SelfAttention.forward: view(b, s, 3, n, d)); `visual.head`
# (the contrastive projection), `textual.*` (XLM-RoBERTa) and `log_scale` are not needed.
_CLIP_LAYER = r"^visual\.transformer\.(\d+)\."
WAN_CLIP_VISION = KeyMap(
    prefix=(
        (r"^visual\.patch_embedding\.", "embeddings.patch_embedding."),
        (r"^visual\.cls_embedding$", "embeddings.class_embedding"),
        (r"^visual\.pos_embedding$", "embeddings.position_embedding.weight"),
        (r"^visual\.pre_norm\.", "pre_layrnorm."),
        (_CLIP_LAYER + r"norm1\.", r"encoder.layers.\1.layer_norm1."),
        (_CLIP_LAYER + r"attn\.proj\.", r"encoder.layers.\1.self_attn.out_proj."),
        (_CLIP_LAYER + r"norm2\.", r"encoder.layers.\1.layer_norm2."),
        (_CLIP_LAYER + r"mlp\.0\.", r"encoder.layers.\1.mlp.fc1."),
        (_CLIP_LAYER + r"mlp\.2\.", r"encoder.layers.\1.mlp.fc2."),
        (r"^visual\.post_norm\.", "post_layernorm."),
    ),
    splits=((_CLIP_LAYER + r"attn\.to_qkv\.", (r"encoder.layers.\1.self_attn.q_proj.",
                                                r"encoder.layers.\1.self_attn.k_proj.",
                                                r"encoder.layers.\1.self_attn.v_proj.")),),
    squeeze=((r"^visual\.cls_embedding$", 2), (r"^visual\.pos_embedding$", 1)),  # [1, 1, D], [1, T, D]
    ignore=(r"^textual\.", r"^log_scale$", r"^visual\.head$"),
)

# Official t5.T5Encoder (shared_pos=False, i.e. umT5: one relative-position table per layer)
# -> transformers UMT5EncoderModel. The input embedding is tied: encoder.embed_tokens = shared.
_T5_BLOCK = r"^blocks\.(\d+)\."
UMT5 = KeyMap(
    prefix=(
        (r"^token_embedding\.", "shared."),
        (_T5_BLOCK + r"norm1\.", r"encoder.block.\1.layer.0.layer_norm."),
        (_T5_BLOCK + r"attn\.(q|k|v|o)\.", r"encoder.block.\1.layer.0.SelfAttention.\2."),
        (_T5_BLOCK + r"pos_embedding\.embedding\.",
         r"encoder.block.\1.layer.0.SelfAttention.relative_attention_bias."),
        (_T5_BLOCK + r"norm2\.", r"encoder.block.\1.layer.1.layer_norm."),
        (_T5_BLOCK + r"ffn\.gate\.0\.", r"encoder.block.\1.layer.1.DenseReluDense.wi_0."),
        (_T5_BLOCK + r"ffn\.fc1\.", r"encoder.block.\1.layer.1.DenseReluDense.wi_1."),
        (_T5_BLOCK + r"ffn\.fc2\.", r"encoder.block.\1.layer.1.DenseReluDense.wo."),
        (r"^norm\.", "encoder.final_layer_norm."),
    ),
    ties=(("encoder.embed_tokens.weight", "shared.weight"),),
)

# VAE leaves inside a block: official ResidualBlock is a Sequential
# (0 RMS_norm, 1 SiLU, 2 conv, 3 RMS_norm, 4 SiLU, 5 Dropout, 6 conv) + a 1x1x1 `shortcut` conv.
# Attention (norm, to_qkv, proj) and Resample (resample.1 conv2d, time_conv) keep their names.
_VAE_LEAF: tuple[Rule, ...] = (
    (r"^residual\.0\.", "norm1."),
    (r"^residual\.2\.", "conv1."),
    (r"^residual\.3\.", "norm2."),
    (r"^residual\.6\.", "conv2."),
    (r"^shortcut\.", "conv_shortcut."),
)

# Parts shared by both VAE generations.
_VAE_COMMON: tuple[Rule, ...] = (
    (r"^conv1\.", "quant_conv."),  # 2z -> 2z 1x1x1 after the encoder
    (r"^conv2\.", "post_quant_conv."),  # z -> z 1x1x1 before the decoder
    (r"^(encoder|decoder)\.conv1\.", r"\1.conv_in."),
    (r"^(encoder|decoder)\.head\.0\.", r"\1.norm_out."),
    (r"^(encoder|decoder)\.head\.2\.", r"\1.conv_out."),
    (r"^(encoder|decoder)\.middle\.0\.", r"\1.mid_block.resnets.0."),
    (r"^(encoder|decoder)\.middle\.1\.", r"\1.mid_block.attentions.0."),
    (r"^(encoder|decoder)\.middle\.2\.", r"\1.mid_block.resnets.1."),
)


def vae21(num_res_blocks: int, num_stages: int) -> KeyMap:
    """Wan2.1 VAE (vae2_1.WanVAE_). Its encoder is one flat Sequential, like diffusers' down_blocks.
    Its decoder is flat too (per stage: num_res_blocks+1 ResidualBlocks, then a Resample but
    after the last stage), while diffusers nests it as up_blocks.S.{resnets.J, upsamplers.0}:
    the table below spells out that index arithmetic for this architecture."""
    per_stage = num_res_blocks + 2  # resnets + one upsampler
    decoder: list[Rule] = []
    for flat in range(num_stages * per_stage - 1):
        stage, j = divmod(flat, per_stage)
        target = "upsamplers.0." if j == num_res_blocks + 1 else f"resnets.{j}."
        decoder.append((rf"^decoder\.upsamples\.{flat}\.", f"decoder.up_blocks.{stage}.{target}"))
    return KeyMap(prefix=(
        *_VAE_COMMON,
        (r"^encoder\.downsamples\.(\d+)\.", r"encoder.down_blocks.\1."),
        *decoder,
    ), leaf=_VAE_LEAF)


def vae22(num_res_blocks: int) -> KeyMap:
    """Wan2.2 VAE (vae2_2.WanVAE_): stages are already nested (Down_/Up_ResidualBlock) with the
    resampler last in each stage's Sequential; the parameter-free AvgDown3D/DupUp3D shortcuts
    hold no weights. Encoder stages have num_res_blocks resnets, decoder stages one more."""
    n_enc, n_dec = num_res_blocks, num_res_blocks + 1
    return KeyMap(prefix=(
        *_VAE_COMMON,
        (rf"^encoder\.downsamples\.(\d+)\.downsamples\.{n_enc}\.", r"encoder.down_blocks.\1.downsampler."),
        (r"^encoder\.downsamples\.(\d+)\.downsamples\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2."),
        (rf"^decoder\.upsamples\.(\d+)\.upsamples\.{n_dec}\.", r"decoder.up_blocks.\1.upsampler."),
        (r"^decoder\.upsamples\.(\d+)\.upsamples\.(\d+)\.", r"decoder.up_blocks.\1.resnets.\2."),
    ), leaf=_VAE_LEAF)


_COMPILED: dict[str, re.Pattern[str]] = {}


def _match(pattern: str, key: str) -> re.Match[str] | None:
    rx = _COMPILED.get(pattern)
    if rx is None:
        rx = _COMPILED[pattern] = re.compile(pattern)
    return rx.match(key)


def rename_key(key: str, keymap: KeyMap) -> str | None:
    """One official key -> its diffusers name, or None if no rule covers it."""
    for pattern, repl in keymap.prefix:
        m = _match(pattern, key)
        if m is None:
            continue
        head, rest = m.expand(repl), key[m.end():]
        for leaf_pattern, leaf_repl in keymap.leaf:
            lm = _match(leaf_pattern, rest)
            if lm is not None:
                rest = lm.expand(leaf_repl) + rest[lm.end():]
                break
        return head + rest
    return None


def rename(keys: Iterable[str], keymap: KeyMap) -> tuple[dict[str, str], list[str]]:
    """-> ({diffusers_key: official_key}, [official keys no rule covers]). Ties are added as
    extra diffusers keys pointing at the same official key; a split key gives one diffusers key per
    part (all pointing at it: `views` says which part); ignored keys are in neither."""
    mapping: dict[str, str] = {}
    unknown: list[str] = []
    for key in keys:
        if any(_match(p, key) for p in keymap.ignore):
            continue
        parts = _split(key, keymap)
        new = rename_key(key, keymap) if parts is None else None
        if parts is not None:
            mapping.update(dict.fromkeys(parts, key))
        elif new is None:
            unknown.append(key)
        else:
            mapping[new] = key
    add_ties(mapping, keymap)
    return mapping, unknown


def _split(key: str, keymap: KeyMap) -> list[str] | None:
    for pattern, repls in keymap.splits:
        m = _match(pattern, key)
        if m is not None:
            return [m.expand(r) + key[m.end():] for r in repls]
    return None


def views(mapping: Mapping[str, str], keymap: KeyMap) -> dict[str, View]:
    """diffusers key -> View, for the keys that are not their official tensor as stored (a part of a
    split tensor, a squeezed one); every other key reads its tensor unchanged."""
    out: dict[str, View] = {}
    for new, key in mapping.items():
        parts = _split(key, keymap)
        drop = next((n for p, n in keymap.squeeze if _match(p, key)), 0)
        if parts is not None or drop:
            out[new] = View(parts.index(new) if parts else 0, len(parts) if parts else 1, drop)
    return out


def add_ties(mapping: dict[str, str], keymap: KeyMap) -> None:
    """Tied keys (e.g. umT5 encoder.embed_tokens = shared) that the file stores once."""
    for alias, source in keymap.ties:
        if alias not in mapping and source in mapping:
            mapping[alias] = mapping[source]


def identity(keys: Iterable[str], keymap: KeyMap | None = None) -> dict[str, str]:
    """Files already in diffusers/transformers naming: {key: key} plus ties."""
    mapping = {k: k for k in keys}
    if keymap is not None:
        add_ties(mapping, keymap)
    return mapping


def summarise(keys: Iterable[str] | Mapping[str, object], first: int = 3) -> str:
    """'a, b, c (+12 more)' for one-line error messages."""
    keys = sorted(keys)
    more = f" (+{len(keys) - first} more)" if len(keys) > first else ""
    return ", ".join(keys[:first]) + more
