"""LoRA key formats of Wan DiTs -> (diffusers parameter, kind), written as data (fast_paths.md A.1-A.3).

Every format in the wild names the same modules differently:

    diffusers / PEFT      transformer.blocks.0.attn1.to_q.lora_A.weight
    original / ComfyUI    diffusion_model.blocks.0.self_attn.q.lora_down.weight (+ .alpha)
    mixed                 diffusion_model.blocks.0.self_attn.q.lora_A.weight
    kohya / musubi        lora_unet_blocks_0_self_attn_q.lora_down.weight
    VideoX-Fun            lora_unet__blocks_0_cross_attn_k.lora_down.weight
    DiffSynth             blocks.0.self_attn.q.lora_A.default.weight
    LightX2V full deltas  diffusion_model.blocks.0.self_attn.q.diff / .diff_b, blocks.0.diff_m, head.head.diff

A key = PREFIX + MODULE + SUFFIX. The three tables below say which prefixes are stripped, which suffixes
mean which kind of payload, and which module names (original, diffusers, and their kohya `_`-joined
spellings, generated from the module list, never guessed from underscores) name which diffusers module.
`canonical_key` looks a key up in them; nothing else about a key's spelling is assumed.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

# Prefixes stripped before the module lookup (the first that matches; A.2, A.6 step 1).
PREFIXES: tuple[str, ...] = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.",
                             "pipe.dit.", "dit.")

# suffix -> (kind, parameter the payload applies to). Longest suffix wins. Kinds:
#   A / B   LoRA down / up matrices (A: [rank, in...], B: [out, rank...]); alpha: the scalar alpha
#   diff    a full delta of the parameter; diff_b: of the bias
SUFFIXES: dict[str, tuple[str, str]] = {
    ".lora_A.weight": ("A", "weight"), ".lora_B.weight": ("B", "weight"),
    ".lora_A.default.weight": ("A", "weight"), ".lora_B.default.weight": ("B", "weight"),  # DiffSynth
    ".lora_down.weight": ("A", "weight"), ".lora_up.weight": ("B", "weight"),
    ".lora.down.weight": ("A", "weight"), ".lora.up.weight": ("B", "weight"),
    ".alpha": ("alpha", "weight"),
    ".diff": ("diff", "weight"), ".diff_b": ("diff_b", "bias"),
    ".diff_m": ("diff", "modulation"),  # blocks.N.diff_m: the block's modulation (scale_shift_table)
}

# Modules inside each block: (original Wan name, diffusers name). `modulation` is a parameter itself.
BLOCK_MODULES: tuple[tuple[str, str], ...] = (
    ("self_attn.q", "attn1.to_q"), ("self_attn.k", "attn1.to_k"), ("self_attn.v", "attn1.to_v"),
    ("self_attn.o", "attn1.to_out.0"), ("self_attn.norm_q", "attn1.norm_q"), ("self_attn.norm_k", "attn1.norm_k"),
    ("cross_attn.q", "attn2.to_q"), ("cross_attn.k", "attn2.to_k"), ("cross_attn.v", "attn2.to_v"),
    ("cross_attn.o", "attn2.to_out.0"), ("cross_attn.norm_q", "attn2.norm_q"), ("cross_attn.norm_k", "attn2.norm_k"),
    # Wan2.1 I2V / FLF2V image cross-attention (fast_paths.md A.1)
    ("cross_attn.k_img", "attn2.add_k_proj"), ("cross_attn.v_img", "attn2.add_v_proj"),
    ("cross_attn.norm_k_img", "attn2.norm_added_k"),
    ("norm3", "norm2"),  # the affine cross-attention pre-norm: swapped index (A.1)
    ("ffn.0", "ffn.net.0.proj"), ("ffn.2", "ffn.net.2"),
    ("modulation", "scale_shift_table"),
)
# Modules outside the blocks.
GLOBAL_MODULES: tuple[tuple[str, str], ...] = (
    ("patch_embedding", "patch_embedding"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("img_emb.proj.0", "condition_embedder.image_embedder.norm1"),
    ("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"),
    ("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2"),
    ("img_emb.proj.4", "condition_embedder.image_embedder.norm2"),
    ("head.head", "proj_out"),
    ("head.modulation", "scale_shift_table"),
)
PARAMETER_MODULES = frozenset({"modulation", "scale_shift_table", "head.modulation"})  # no .weight
KOHYA_PREFIXES = ("lora_unet_", "lora_unet__")  # musubi / kohya, VideoX-Fun: module path with "." -> "_"
NUM_BLOCKS_MAX = 128  # alias table covers blocks 0..127 (Wan 14B has 40)


@dataclass(frozen=True)
class CanonicalKey:
    """`param`: the diffusers parameter the payload changes ("blocks.0.attn1.to_q.weight"); `module`: its
    module ("blocks.0.attn1.to_q"), the unit A, B and alpha belong to; `kind`: A | B | alpha | diff | diff_b."""

    module: str
    param: str
    kind: str


@lru_cache(maxsize=1)
def module_aliases() -> dict[str, tuple[str, bool]]:
    """Every spelling of every module -> (diffusers module path, is a parameter itself)."""
    table: dict[str, tuple[str, bool]] = {}

    def add(original: str, diffusers: str) -> None:
        is_param = original in PARAMETER_MODULES or original.endswith(".modulation")
        for name in (original, diffusers):
            table[name] = (diffusers, is_param)
            for prefix in KOHYA_PREFIXES:
                table[prefix + name.replace(".", "_")] = (diffusers, is_param)

    for original, diffusers in GLOBAL_MODULES:
        add(original, diffusers)
    for n in range(NUM_BLOCKS_MAX):
        for original, diffusers in BLOCK_MODULES:
            add(f"blocks.{n}.{original}", f"blocks.{n}.{diffusers}")
    return table


def canonical_key(key: str) -> CanonicalKey | None:
    """The diffusers parameter and payload kind a LoRA file's key stands for; None if it names nothing
    this table knows (another architecture, DoRA's dora_scale, a format not in fast_paths.md A.2)."""
    suffix = max((s for s in SUFFIXES if key.endswith(s)), key=len, default=None)
    if suffix is None:
        return None
    kind, param = SUFFIXES[suffix]
    stem = key[: -len(suffix)]
    for prefix in PREFIXES:
        if stem.startswith(prefix):
            stem = stem[len(prefix):]
            break
    if param == "modulation":  # blocks.N.diff_m -> blocks.N.modulation, a full delta of that parameter
        stem, param = f"{stem}.modulation", "weight"
    hit = module_aliases().get(stem)
    if hit is None:
        return None
    module, is_param = hit
    if is_param:
        return CanonicalKey(module, module, kind) if kind == "diff" else None
    return CanonicalKey(module, f"{module}.{param}", kind)
