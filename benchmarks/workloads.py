"""The two side-by-side workloads: a diffusers checkpoint folder (the reference side loads it) and the
vidrt package exported from it (cached under build/bench/, git-ignored, reused across runs).

tiny      the default tiny model ("tiny-shapes", trained by export/train_tiny.py) when both its
          checkpoint (checkpoints/tiny-shapes/) and its bundled package (vidrt.models.default_package())
          exist; until then a random-weight stand-in of the same architecture and size (see
          TINY_STANDIN_* below; z_dim 16 instead of 8 so that it exports as the wan2.1 variant).
wan1.3b   the real Wan2.1 T2V-1.3B architecture with random weights: WanTransformer3DModel dim 1536,
          30 layers, 12 heads, ffn 8960, text_dim 4096; AutoencoderKLWan default config (base_dim 96,
          z 16). The text encoder is NOT the real umT5-XXL (24 layers, 5.7 B params, 23 GB fp32: it does
          not fit 24 GB of RAM beside the DiT twice): it is umT5 with the real width (d_model 4096,
          d_ff 10240, 64 heads, so the DiT's text_dim matches) but 2 layers and a 64-word vocabulary
          (the real 256k-row embedding alone is 4.2 GB). Text-stage seconds of this workload are therefore
          not the real model's (~12x fewer layers); DiT and VAE are the real architecture.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vidrt.export.random_weights import randomise_, write_word_tokenizer

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / "build" / "bench"
TINY_CHECKPOINT = REPO / "checkpoints" / "tiny-shapes"
READY = ".bench-complete"  # written last into a generated checkpoint folder
EXPORTED = ".bench-exported"  # stamp of what a cached package was exported from

PROMPT = "a red cat walks on the beach"
NEGATIVE = "blue sky night"
WORDS = ("a cat dog walks runs on the beach in snow under blue red sky city night day slowly fast "
         "camera video of with and").split()

# Stand-in for tiny-shapes: export/train_tiny.py's DIT_CONFIG / T5_CONFIG / VAE_CONFIG, except z_dim.
TINY_STANDIN_DIT = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=16,
                        out_channels=16, text_dim=64, freq_dim=256, ffn_dim=256, num_layers=4)
TINY_STANDIN_T5 = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                       relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", dropout_rate=0.0)
TINY_STANDIN_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
                        temperal_downsample=[False, True, True])

# Wan2.1 T2V-1.3B (diffusers names; W21 wan/configs/wan_t2v_1_3B.py) and the reduced umT5.
WAN13B_DIT = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                  out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30)
WAN13B_T5 = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=2, num_heads=64,
                 relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", dropout_rate=0.0)


@dataclass(frozen=True)
class Clip:
    width: int
    height: int
    frames: int
    steps: int
    guidance: float = 5.0
    shift: float = 5.0
    prompt: str = PROMPT
    negative_prompt: str = NEGATIVE
    # The recipe / cache axes (benchmarks/axes.py); the defaults are the official sampler, no LoRA, no cache.
    scheduler: str = "unipc"  # "unipc" (wan22's FlowUniPC on the diffusers side) | "euler" (flow-matching Euler)
    sigmas: tuple[float, ...] | None = None  # euler: unshifted sigmas (timesteps / 1000), as LightX2V's list
    recipe: str | None = None  # vidrt's `--recipe` (it fills nothing the fields above do not already say)
    loras: tuple[tuple[str, float], ...] = ()  # vidrt: LoRA files beyond its recipe's shipped ones
    reference_loras: tuple[tuple[str, float], ...] = ()  # diffusers: every LoRA file (load_lora_weights)
    cache: str | None = None  # vidrt's `--cache METHOD[:THRESHOLD]`
    reference_cache: dict[str, Any] | None = None  # diffusers: {"kind": "magcache"|"fbcache", **config}


@dataclass(frozen=True)
class Workload:
    name: str
    checkpoint: Path  # diffusers WanPipeline folder
    package: Path  # vidrt model package exported from it
    clip: Clip
    real_weights: bool
    note: str
    architecture: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["checkpoint"], d["package"] = _rel(self.checkpoint), _rel(self.package)
        return d


def _rel(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(REPO))
    except ValueError:
        return str(p)


# ---- random checkpoints --------------------------------------------------------------------------


def write_tokenizer(folder: Path) -> int:
    """A T5-like Unigram tokenizer over WORDS (<pad>=0, </s>=1, <unk>=2); returns its vocabulary size."""
    return write_word_tokenizer(folder, WORDS)


def write_random_checkpoint(root: Path, dit_cfg: dict, t5_cfg: dict, vae_cfg: dict, seed: int = 0,
                            log: Any = print) -> Path:
    """A diffusers WanPipeline folder with random weights (skipped when already complete)."""
    if (root / READY).is_file():
        return root
    import torch
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    t0 = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(root / "tokenizer")
    with torch.device("cpu"):
        te_cfg = UMT5Config(vocab_size=vocab, **t5_cfg)
        te_cfg._attn_implementation = "eager"
        te = randomise_(UMT5EncoderModel(te_cfg), seed + 1)
        te.save_pretrained(root / "text_encoder")
        del te
        vae = randomise_(AutoencoderKLWan(**vae_cfg), seed + 2)
        vae.save_pretrained(root / "vae")
        del vae
        dit = randomise_(WanTransformer3DModel(**dit_cfg), seed + 3)
        dit.save_pretrained(root / "transformer", max_shard_size="20GB")
        del dit
    index = {"_class_name": "WanPipeline", "_diffusers_version": "0.42.1",
             "scheduler": ["diffusers", "UniPCMultistepScheduler"],
             "text_encoder": ["transformers", "UMT5EncoderModel"], "tokenizer": ["transformers", "T5TokenizerFast"],
             "transformer": ["diffusers", "WanTransformer3DModel"], "transformer_2": [None, None],
             "vae": ["diffusers", "AutoencoderKLWan"], "boundary_ratio": None, "expand_timesteps": False}
    (root / "model_index.json").write_text(json.dumps(index, indent=1))
    (root / READY).write_text("ok\n")
    log(f"wrote random checkpoint {_rel(root)} in {time.perf_counter() - t0:.0f} s")
    return root


def export_cached(checkpoint: Path, package: Path, variant: str, log: Any = print) -> Path:
    """export_package skips every stage whose fingerprint is unchanged, so a second call is ~free."""
    stamp = _export_stamp(checkpoint, variant)
    marker = package / EXPORTED
    if (package / "manifest.json").is_file() and marker.is_file() and marker.read_text() == stamp:
        return package  # its fingerprint check alone costs ~10 s (hashing): skip it when nothing changed
    from vidrt.export.package import export_package

    t0 = time.perf_counter()
    out = Path(export_package(checkpoint, package, variant=variant, progress=False))
    (out / EXPORTED).write_text(stamp)
    log(f"exported {_rel(checkpoint)} -> {_rel(out)} in {time.perf_counter() - t0:.0f} s")
    return out


def _export_stamp(checkpoint: Path, variant: str) -> str:
    """What the cached package depends on: vidrt's version, the exporter's source, the checkpoint's files."""
    import vidrt

    h = hashlib.sha256(f"{vidrt.__version__} {variant}".encode())
    sources = sorted((REPO / "export").glob("*.py"))
    sources += [REPO / "runtime" / "package" / n for n in ("contracts.py", "manifest.py", "registry.py")]
    for src in sources:
        h.update(src.name.encode() + src.read_bytes())
    for f in sorted(checkpoint.rglob("*")):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.relative_to(checkpoint)} {st.st_size} {st.st_mtime_ns}".encode())
    return h.hexdigest() + "\n"


# ---- the workloads -------------------------------------------------------------------------------


def tiny_real() -> tuple[Path, Path] | None:
    """(checkpoint, package) of the trained tiny model when both exist, else None."""
    from vidrt.models import default_package

    pkg = default_package()
    ok = (TINY_CHECKPOINT / "model_index.json").is_file() and (TINY_CHECKPOINT / "transformer").is_dir()
    return (TINY_CHECKPOINT, pkg) if ok and pkg is not None else None


def tiny(cache: Path = CACHE, steps: int | None = None, log: Any = print) -> Workload:
    real = tiny_real()
    if real is not None:
        ckpt, pkg = real
        d: dict[str, Any] = {}
        defaults = ckpt / "sampling_defaults.json"
        if defaults.is_file():
            d = json.loads(defaults.read_text())
        from vidrt.package.manifest import load_manifest

        m = load_manifest(pkg, verify=False)
        s = m.model.sampling
        width, height = d.get("width", s.sizes[0][0]), d.get("height", s.sizes[0][1])
        vocab = list(m.vocabulary or [])
        prompt = " ".join(w for w in ("a", "red", "circle", "moving", "left") if not vocab or w in vocab) or PROMPT
        clip = Clip(width, height, d.get("num_frames", s.frames), steps or d.get("steps", s.steps),
                    d.get("guidance_scale", s.guidance_low_noise), d.get("shift", s.shift), prompt,
                    d.get("negative_prompt", ""))
        return Workload("tiny", ckpt, pkg, clip, True, "the trained default model (tiny-shapes)")
    root = cache / "tiny-standin"
    ckpt = write_random_checkpoint(root / "checkpoint", TINY_STANDIN_DIT, TINY_STANDIN_T5, TINY_STANDIN_VAE, log=log)
    pkg = export_cached(ckpt, root / "package", "wan2.1-t2v-1.3b", log=log)
    clip = Clip(64, 64, 17, steps or 25, guidance=5.0, shift=3.0)
    return Workload("tiny", ckpt, pkg, clip, False,
                    "random-weight stand-in for tiny-shapes (its checkpoint/package are not there yet): same "
                    "DiT/umT5/VAE sizes as export/train_tiny.py but z_dim 16", {
                        "dit": TINY_STANDIN_DIT, "text_encoder": TINY_STANDIN_T5, "vae": TINY_STANDIN_VAE})


def wan13b(cache: Path = CACHE, width: int = 128, height: int = 128, frames: int = 5, steps: int = 2,
           log: Any = print) -> Workload:
    root = cache / "wan2.1-t2v-1.3b-random"
    ckpt = write_random_checkpoint(root / "checkpoint", WAN13B_DIT, WAN13B_T5, {}, log=log)
    pkg = export_cached(ckpt, root / "package", "wan2.1-t2v-1.3b", log=log)
    clip = Clip(width, height, frames, steps, guidance=5.0, shift=5.0)
    return Workload("wan1.3b", ckpt, pkg, clip, False,
                    "Wan2.1 T2V-1.3B architecture, random weights; umT5 reduced to 2 layers and a 64-word "
                    "vocabulary (real width 4096), so text-stage time is not the real model's", {
                        "dit": WAN13B_DIT, "text_encoder": WAN13B_T5, "vae": "AutoencoderKLWan() defaults"})


WORKLOADS = {"tiny": tiny, "wan1.3b": wan13b}
