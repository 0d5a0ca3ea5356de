"""Tiny random-weight Wan checkpoints, written to disk in the real formats (for tests).

    from tiny import write_official_checkpoint, write_diffusers_checkpoint, TINY_VARIANT
    ref = write_official_checkpoint(tmp_path / "ckpt", "t2v")      # kind: "t2v" | "a14b" | "ti2v" | "i2v"
    ckpt = open_checkpoint(ref.root, variant=TINY_VARIANT["t2v"])  # tiny dims: pass the variant
    ref.dit["dit"], ref.text_encoder, ref.vae                      # the modules that wrote the files

Official layout: written from the OFFICIAL `wan` modules (tests/wan_ref.py), every parameter
randomised (zero-initialised heads too), fixed seeds:
  t2v   config.json + diffusion_pytorch_model.safetensors, Wan2.1_VAE.pth (num_res_blocks 1)
  a14b  high_noise_model/ + low_noise_model/, each sharded in 2 with an index; Wan2.1_VAE.pth
        (num_res_blocks 2, the real count)
  ti2v  in_dim 48, model_type ti2v, Wan2.2_VAE.pth
  i2v   Wan2.2 I2V-A14B: as a14b with in_dim 36 (latents 16 + mask 4 + image latents 16), out_dim 16,
        model_type i2v (no CLIP)
  Wan2.1 I2V / FLF2V: write_official_wan21_i2v (CLIP branch, models_clip_...pth, model_type i2v/flf2v)
  all   models_t5_umt5-xxl-enc-bf16.pth (fp32 tensors), google/umt5-xxl/ (tokenizer.json +
        tokenizer_config.json, loadable by transformers' AutoTokenizer)
Diffusers layout: the same kinds from WanTransformer3DModel / AutoencoderKLWan / UMT5EncoderModel
via save_pretrained, plus model_index.json like WanPipeline's (transformer_2 + boundary_ratio for
a14b) and tokenizer/.

Dims: DiT dim 64 (2 heads x 32), ffn 128, 2 layers, freq 32, text_dim 64, text_len 512 (the
official model zero-pads the context to text_len and does not mask it, so it must equal the
512 rows the runtime pads to); umT5 vocab 256, d 64, 4 heads, 2 layers, 32 buckets.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import wan_ref
from safetensors.torch import save_file
from vidrt.export.random_weights import randomise_, write_word_tokenizer

KINDS = ("t2v", "a14b", "ti2v", "i2v")
TINY_VARIANT = {"t2v": "wan2.1-t2v-1.3b", "a14b": "wan2.2-t2v-a14b", "ti2v": "wan2.2-ti2v-5b",
                "i2v": "wan2.2-i2v-a14b"}
TEXT_LEN = 512
DIT = dict(dim=64, ffn_dim=128, freq_dim=32, text_dim=64, num_heads=2, num_layers=2, text_len=TEXT_LEN)
T5 = dict(vocab=256, dim=64, dim_attn=64, dim_ffn=128, num_heads=4, num_layers=2, num_buckets=32)
VAE21 = dict(dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], temperal_downsample=[False, True, True])
VAE22 = dict(dim=8, dec_dim=16, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
             temperal_downsample=[False, True, True])
# Wan2.2 VAE latent statistics of the tiny ti2v kind: fixed, non-trivial (normalisation bugs show up)
_rng = np.random.default_rng(5)
LATENT_STATS = (_rng.normal(0, 0.3, 48).round(4).tolist(), _rng.uniform(0.5, 1.5, 48).round(4).tolist())
WORDS = ("a cat dog walks runs on the beach in snow under blue red sky city night day slowly fast "
         "camera video of with and").split()


def _experts(kind: str) -> tuple[str, ...]:
    return ("dit_high", "dit_low") if kind in ("a14b", "i2v") else ("dit",)


def _channels(kind: str) -> tuple[int, int]:
    """(DiT in, out) channels: ti2v 48; i2v (A14B) 16 latents + 4 mask + 16 image latents in, 16 out."""
    return {"ti2v": (48, 48), "i2v": (36, 16)}.get(kind, (16, 16))


def write_tokenizer(folder: Path) -> Path:
    """A T5-like Unigram tokenizer over WORDS: <pad>=0, </s>=1, <unk>=2, Metaspace, '</s>' appended."""
    write_word_tokenizer(folder, WORDS, TEXT_LEN)
    return folder


def _save_sharded(sd: dict[str, torch.Tensor], folder: Path, stem: str, shards: int) -> None:
    """`stem.safetensors`, or `stem-0000i-of-0000n.safetensors` + `stem.safetensors.index.json`."""
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous() for k, v in sd.items()}
    if shards == 1:
        save_file(sd, str(folder / f"{stem}.safetensors"))
        return
    keys = list(sd)
    per = math.ceil(len(keys) / shards)
    weight_map = {}
    for i in range(shards):
        name = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        chunk = keys[i * per:(i + 1) * per]
        save_file({k: sd[k] for k in chunk}, str(folder / name))
        weight_map.update(dict.fromkeys(chunk, name))
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in sd.values())},
             "weight_map": weight_map}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=1))


@dataclass(frozen=True)
class OfficialTiny:
    root: Path
    kind: str
    dit: dict[str, Any]  # expert -> official WanModel
    text_encoder: Any  # official t5.T5Encoder
    vae: Any  # official vae2_1.WanVAE_ | vae2_2.WanVAE_


def write_official_checkpoint(root: str | Path, kind: str) -> OfficialTiny:
    assert kind in KINDS, kind
    root = Path(root)
    model_mod = wan_ref.load("modules.model")
    in_dim, out_dim = _channels(kind)
    dits = {}
    for i, expert in enumerate(_experts(kind)):
        dit = randomise_(model_mod.WanModel(model_type={"ti2v": "ti2v", "i2v": "i2v"}.get(kind, "t2v"),
                                            in_dim=in_dim, out_dim=out_dim, **DIT), seed=10 + i)
        folder = root / {"dit": ".", "dit_high": "high_noise_model", "dit_low": "low_noise_model"}[expert]
        _save_sharded(dit.state_dict(), folder, "diffusion_pytorch_model",
                      shards=2 if kind in ("a14b", "i2v") else 1)
        config = {"_class_name": "WanModel", "_diffusers_version": "0.30.0",
                  **{k: v for k, v in dit.config.items() if not k.startswith("_")}}
        (folder / "config.json").write_text(json.dumps(config, indent=1))
        dits[expert] = dit
    t5, vae = _write_official_rest(root, kind)
    return OfficialTiny(root, kind, dits, t5, vae)


def _write_official_rest(root: Path, kind: str) -> tuple[Any, Any]:
    """umT5 .pth, the VAE .pth of the kind, the tokenizer folder; -> (official T5Encoder, WanVAE_)."""
    t5_mod = wan_ref.load("modules.t5")
    t5 = randomise_(t5_mod.T5Encoder(shared_pos=False, dropout=0.0, **T5), seed=20)
    torch.save(t5.state_dict(), root / "models_t5_umt5-xxl-enc-bf16.pth")
    if kind == "ti2v":
        vae = wan_ref.load("modules.vae2_2").WanVAE_(**VAE22)
        name = "Wan2.2_VAE.pth"
    else:
        nrb = 2 if kind in ("a14b", "i2v") else 1
        vae = wan_ref.load("modules.vae2_1").WanVAE_(num_res_blocks=nrb, **VAE21)
        name = "Wan2.1_VAE.pth"
    randomise_(vae, seed=30)
    torch.save(vae.state_dict(), root / name)
    write_tokenizer(root / "google" / "umt5-xxl")
    return t5, vae


# Wan2.1's CLIP (W21 wan/modules/clip.py XLMRobertaCLIP; wan22 ships the same module in modules/animate):
# a ViT of 80-wide heads like the real ViT-H/14 (2 heads of 80), 28 px / patch 14 = 5 tokens, and a
# one-layer text tower (its keys are in the real file and must be skipped by the loader)
CLIP21 = dict(embed_dim=32, image_size=28, patch_size=14, vision_dim=160, vision_mlp_ratio=2, vision_heads=2,
              vision_layers=3, vocab_size=64, max_text_len=16, text_dim=16, text_heads=2, text_layers=1)


@dataclass(frozen=True)
class OfficialWan21:
    root: Path
    kind: str  # "i2v" | "flf2v"
    dit: Any  # official WanModel with Wan2.1's image branch (see write_official_wan21_i2v)
    clip: Any  # official XLMRobertaCLIP


def write_official_wan21_i2v(root: str | Path, flf2v: bool = False) -> OfficialWan21:
    """Tiny Wan2.1 I2V / FLF2V in the official layout, from official modules: wan22's WanModel (36 in,
    16 out) whose cross-attentions are wan22's WanAnimateCrossAttention with use_img_emb (Wan2.1's
    WanI2VCrossAttention: + k_img, v_img, norm_k_img) and `img_emb` = its MLPProj(CLIP width, dim)
    (FLF2V: + `emb_pos` [1, 2 x tokens, CLIP width], W21 model.py MLPProj(flf_pos_emb=True)); config.json
    with model_type "i2v"/"flf2v"; models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth; umT5, VAE."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    model_mod, animate = wan_ref.load("modules.model"), wan_ref.load("modules.animate.model_animate")
    dit = model_mod.WanModel(model_type="i2v", in_dim=36, out_dim=16, **DIT)
    for block in dit.blocks:
        block.cross_attn = animate.WanAnimateCrossAttention(DIT["dim"], DIT["num_heads"], (-1, -1), True, 1e-6,
                                                            use_img_emb=True)
    dit.img_emb = animate.MLPProj(CLIP21["vision_dim"], DIT["dim"])
    tokens = (CLIP21["image_size"] // CLIP21["patch_size"]) ** 2 + 1
    if flf2v:
        dit.img_emb.emb_pos = torch.nn.Parameter(torch.zeros(1, 2 * tokens, CLIP21["vision_dim"]))
    randomise_(dit, seed=15)
    save_file({k: v.detach().contiguous() for k, v in dit.state_dict().items()},
              str(root / "diffusion_pytorch_model.safetensors"))
    config = {"_class_name": "WanModel", "_diffusers_version": "0.30.0",
              **{k: v for k, v in dit.config.items() if not k.startswith("_")},
              "model_type": "flf2v" if flf2v else "i2v"}
    (root / "config.json").write_text(json.dumps(config, indent=1))
    clip = randomise_(wan_ref.load("modules.animate.clip").XLMRobertaCLIP(**CLIP21), seed=25).eval()
    torch.save(clip.state_dict(), root / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth")
    _write_official_rest(root, "i2v21")
    return OfficialWan21(root, "flf2v" if flf2v else "i2v", dit.eval(), clip)


@dataclass(frozen=True)
class DiffusersTiny:
    root: Path
    kind: str
    transformer: dict[str, Any]  # expert -> WanTransformer3DModel
    text_encoder: Any  # UMT5EncoderModel
    vae: Any  # AutoencoderKLWan


def diffusers_configs(kind: str) -> tuple[dict, dict, dict]:
    """(WanTransformer3DModel kwargs, UMT5Config kwargs, AutoencoderKLWan kwargs) of the tiny kind."""
    ch_in, ch_out = _channels(kind)
    dit = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=ch_in,
               out_channels=ch_out, text_dim=64, freq_dim=32, ffn_dim=128, num_layers=2)
    t5 = dict(vocab_size=256, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
              relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", dropout_rate=0.0)
    if kind == "ti2v":
        vae = dict(base_dim=8, decoder_base_dim=16, z_dim=48, num_res_blocks=1, is_residual=True,
                   in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16,
                   latents_mean=LATENT_STATS[0], latents_std=LATENT_STATS[1])
    else:
        vae = dict(base_dim=8, z_dim=16, num_res_blocks=1)
    return dit, t5, vae


def write_diffusers_checkpoint(root: str | Path, kind: str) -> DiffusersTiny:
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    assert kind in KINDS, kind
    root = Path(root)
    dit_cfg, t5_cfg, vae_cfg = diffusers_configs(kind)
    subs = {"dit": "transformer", "dit_high": "transformer", "dit_low": "transformer_2"}
    transformers = {}
    for i, expert in enumerate(_experts(kind)):
        m = randomise_(WanTransformer3DModel(**dit_cfg), seed=40 + i)
        # a14b: sharded with diffusers' own index writer
        m.save_pretrained(root / subs[expert], max_shard_size="300KB" if kind in ("a14b", "i2v") else "10GB")
        transformers[expert] = m
    te_cfg = UMT5Config(**t5_cfg)
    te_cfg._attn_implementation = "eager"  # what Checkpoint.text_encoder() builds: same kernels
    te = randomise_(UMT5EncoderModel(te_cfg), seed=50)
    te.save_pretrained(root / "text_encoder")
    vae = randomise_(AutoencoderKLWan(**vae_cfg), seed=60)
    vae.save_pretrained(root / "vae")
    write_tokenizer(root / "tokenizer")
    index = {"_class_name": "WanPipeline", "_diffusers_version": "0.42.1",
             "scheduler": ["diffusers", "UniPCMultistepScheduler"],
             "text_encoder": ["transformers", "UMT5EncoderModel"],
             "tokenizer": ["transformers", "T5TokenizerFast"], "transformer": ["diffusers", "WanTransformer3DModel"],
             "transformer_2": ["diffusers", "WanTransformer3DModel"] if kind in ("a14b", "i2v") else [None, None],
             "vae": ["diffusers", "AutoencoderKLWan"],
             "boundary_ratio": {"a14b": 0.875, "i2v": 0.9}.get(kind),
             "expand_timesteps": kind == "ti2v"}
    if kind == "i2v":  # as Wan-AI/Wan2.2-I2V-A14B-Diffusers: no image encoder (i2v.md §1)
        index.update(_class_name="WanImageToVideoPipeline", image_encoder=[None, None], image_processor=[None, None])
    (root / "model_index.json").write_text(json.dumps(index, indent=1))
    return DiffusersTiny(root, kind, transformers, te, vae)


def write_diffusers_wan21_i2v(root: str | Path, flf2v: bool = False) -> DiffusersTiny:
    """Tiny Wan2.1 I2V (or FLF2V) in the diffusers layout, as i2v.md §6 prescribes: a 36-channel DiT
    with the CLIP branch switched on for real (image_dim = CLIP width, added_kv_proj_dim = inner dim;
    FLF2V: pos_embed_seq_len = 2 x CLIP tokens), a tiny CLIPVisionModel (28 px, patch 14: 5 tokens),
    its CLIPImageProcessor, the Wan2.1 VAE and umT5 of the t2v kind. model_index.json as
    Wan-AI/Wan2.1-I2V-14B-480P-Diffusers (WanImageToVideoPipeline)."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    root = Path(root)
    dit_cfg, t5_cfg, vae_cfg = diffusers_configs("t2v")
    clip_cfg = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                                image_size=28, patch_size=14, hidden_act="gelu")
    tokens = (28 // 14) ** 2 + 1
    dit_cfg.update(in_channels=36, out_channels=16, image_dim=16, added_kv_proj_dim=64,
                   pos_embed_seq_len=2 * tokens if flf2v else None)
    transformer = randomise_(WanTransformer3DModel(**dit_cfg), seed=45)
    transformer.save_pretrained(root / "transformer")
    te_cfg = UMT5Config(**t5_cfg)
    te_cfg._attn_implementation = "eager"
    te = randomise_(UMT5EncoderModel(te_cfg), seed=50)
    te.save_pretrained(root / "text_encoder")
    vae = randomise_(AutoencoderKLWan(**vae_cfg), seed=60)
    vae.save_pretrained(root / "vae")
    clip = randomise_(CLIPVisionModel(clip_cfg), seed=65).eval()
    clip.save_pretrained(root / "image_encoder")
    CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, do_center_crop=True,
                       resample=3).save_pretrained(root / "image_processor")
    write_tokenizer(root / "tokenizer")
    index = {"_class_name": "WanImageToVideoPipeline", "_diffusers_version": "0.42.1",
             "scheduler": ["diffusers", "UniPCMultistepScheduler"],
             "text_encoder": ["transformers", "UMT5EncoderModel"], "tokenizer": ["transformers", "T5TokenizerFast"],
             "transformer": ["diffusers", "WanTransformer3DModel"], "transformer_2": [None, None],
             "vae": ["diffusers", "AutoencoderKLWan"], "image_encoder": ["transformers", "CLIPVisionModel"],
             "image_processor": ["transformers", "CLIPImageProcessor"], "boundary_ratio": None,
             "expand_timesteps": False}
    (root / "model_index.json").write_text(json.dumps(index, indent=1))
    out = DiffusersTiny(root, "flf2v" if flf2v else "i2v21", {"dit": transformer}, te, vae)
    object.__setattr__(out, "image_encoder", clip)
    return out
