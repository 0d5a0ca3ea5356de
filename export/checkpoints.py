"""Open a Wan checkpoint folder (official or diffusers layout) and load its parts as the
diffusers/transformers modules that export uses (WanTransformer3DModel, AutoencoderKLWan,
UMT5EncoderModel).

`open_checkpoint` reads small files only (JSON configs, safetensors headers, mmapped .pth
shapes) and infers every architecture number from them; modules load one at a time when asked,
built on the meta device and given the file's tensors with `load_state_dict(assign=True)`, so
weights are never held twice. Official key names are renamed at this boundary only
(`keymaps.py`). Every problem with the folder is a one-line `PackageError` naming the file.

Layouts (wan_official.md §1.4):
  official:  config.json + diffusion_pytorch_model*.safetensors   (or high_noise_model/ +
             low_noise_model/ for A14B), models_t5_umt5-xxl-enc-bf16.pth, Wan2.1_VAE.pth |
             Wan2.2_VAE.pth, google/umt5-xxl/ (tokenizer)
  diffusers: model_index.json, transformer/ (+ transformer_2/), vae/, text_encoder/, tokenizer/.
             diffusers' WanPipeline runs `transformer` while t >= boundary_ratio * 1000 (the
             HIGH-noise expert) and `transformer_2` below it (LOW-noise): pipeline_wan.py,
             "wan2.1 or high-noise stage in wan2.2" / "low-noise stage in wan2.2".
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from vidrt.errors import PackageError
from vidrt.export import keymaps
from vidrt.export.weights import FLOAT_DTYPES, TensorInfo, WeightFiles, read_json, safetensors_files, shapes, stored
from vidrt.export.weights import load as load_tensors
from vidrt.package.registry import VARIANTS, DiTConfig, ModelSpec, TextConfig, VAEConfig, get_variant

if TYPE_CHECKING:
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5EncoderModel

OFFICIAL_EXPERT_DIRS = {"dit_high": "high_noise_model", "dit_low": "low_noise_model"}
DIFFUSERS_EXPERT_DIRS = {"dit": "transformer", "dit_high": "transformer", "dit_low": "transformer_2"}
OFFICIAL_T5_STEM = "models_t5_umt5-xxl-enc-bf16"
OFFICIAL_VAE_STEMS = {"wan2.1": "Wan2.1_VAE", "wan2.2": "Wan2.2_VAE"}
OFFICIAL_TOKENIZER_DIR = "google/umt5-xxl"
OFFICIAL_CLIP_STEM = "models_clip_open-clip-xlm-roberta-large-vit-huge-14"  # Wan2.1 I2V/FLF2V (i2v.md §1)
# W21 wan/modules/clip.py clip_xlm_roberta_vit_h_14: vision_heads 16 at vision_dim 1280. No tensor's shape
# holds the head count, so it comes from that head width (80) and the file's width.
OFFICIAL_CLIP_HEAD_DIM = 80


@dataclass(frozen=True)
class Part:
    """One loadable component: where its weights are, how their names map, its module kwargs."""

    name: str  # "text_encoder" | "dit" | "dit_high" | "dit_low" | "vae"
    weights: WeightFiles
    names: Mapping[str, str]  # module key -> key in the file
    config: Mapping[str, Any]  # kwargs of the module class (UMT5Config kwargs for the text encoder)
    sources: tuple[Path, ...]  # every file the part is read from (fingerprint)
    views: Mapping[str, keymaps.View] = field(default_factory=dict)  # module keys that are part of a file tensor

    def file_shapes(self) -> dict[str, TensorInfo]:
        """Module key -> the shape it gets from the files (headers only; views applied)."""
        info = shapes(self.weights)
        out = {new: info[src] for new, src in self.names.items() if src in info}
        for new, view in self.views.items():
            if new in out:
                out[new] = dataclasses.replace(out[new], shape=view.shape(out[new].shape))
        return out


@dataclass(frozen=True)
class Checkpoint:
    root: Path
    layout: str  # "diffusers" | "official"
    spec: ModelSpec  # registry sampling defaults; dit/vae/text architecture read from the files
    parts: Mapping[str, Part] = field(default_factory=dict, compare=False, hash=False, repr=False)
    tokenizer_dir: Path = field(default=Path(), compare=False, repr=False)

    # ---- modules (fp32, eval, one at a time) ------------------------------------------------

    def text_encoder(self, device: str = "cpu") -> UMT5EncoderModel:
        part = self.parts["text_encoder"]
        return _build(part, self._text_encoder_factory(), self._tensors(part), device)

    def text_encoder_on_meta(self) -> UMT5EncoderModel:
        """The text encoder without storage (for tracing), its keys and shapes checked against the
        files' headers; its weights come from text_encoder_readers()."""
        part = self.parts["text_encoder"]
        return _checked_on_meta(part, self._text_encoder_factory(), part.file_shapes()).eval()

    def _text_encoder_factory(self) -> Callable[[], UMT5EncoderModel]:
        from transformers import UMT5Config, UMT5EncoderModel

        cfg = UMT5Config(**self.parts["text_encoder"].config)
        cfg._attn_implementation = "eager"  # sdpa fails under the dynamo exporter (feasibility §4)
        return lambda: UMT5EncoderModel(cfg)

    def text_encoder_readers(self) -> dict[str, Callable[[], torch.Tensor]]:
        part = self.parts["text_encoder"]
        return stored(part.weights, dict(part.names))

    def transformer(self, expert: str, device: str = "cpu") -> WanTransformer3DModel:
        from diffusers import WanTransformer3DModel
        from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

        part = self._expert(expert)
        cfg = dict(part.config)

        def fix_rope(model: torch.nn.Module) -> None:
            # freqs_cos/sin are non-persistent buffers computed in __init__: on meta they are
            # empty, and no file holds them, so compute them for real.
            model.rope = WanRotaryPosEmbed(cfg["attention_head_dim"], cfg["patch_size"], cfg["rope_max_seq_len"])

        return _build(part, lambda: WanTransformer3DModel(**cfg), self._tensors(part), device, fix_rope)

    def transformer_state_dict(self, expert: str, dtype: torch.dtype | None = torch.float32) -> dict[str, torch.Tensor]:
        """diffusers key names -> tensors read once from the files (dtype None keeps the stored one)."""
        return self._tensors(self._expert(expert), dtype)

    def transformer_readers(self, expert: str) -> dict[str, Callable[[], torch.Tensor]]:
        """diffusers key names -> readers that load each tensor (stored dtype) when called: for
        exports that stream the weights instead of holding the model in RAM."""
        part = self._expert(expert)
        return stored(part.weights, dict(part.names))

    def transformer_shapes(self, expert: str) -> dict[str, tuple[int, ...]]:
        """diffusers key names -> shapes, from the files' headers alone (no tensor is read)."""
        return {k: tuple(v.shape) for k, v in self._expert(expert).file_shapes().items()}

    def transformer_config(self, expert: str) -> dict:
        return dict(self._expert(expert).config)

    def image_encoder(self) -> Any:
        """Wan2.1 I2V/FLF2V: the CLIP vision tower as transformers' CLIPVisionModel (fp32, eval)."""
        from transformers import CLIPVisionConfig, CLIPVisionModel

        part = self.parts["image_encoder"]
        cfg = CLIPVisionConfig(**part.config)

        def fix_positions(model: torch.nn.Module) -> None:
            # position_ids is a non-persistent buffer (in no file): empty on meta, so compute it
            emb = getattr(model, "vision_model", model).embeddings  # transformers 5 dropped the vision_model level
            emb.register_buffer("position_ids", torch.arange(emb.num_positions).expand((1, -1)), persistent=False)

        return _build(part, lambda: CLIPVisionModel(cfg), self._tensors(part), "cpu", fix_positions)

    def vae(self) -> AutoencoderKLWan:
        from diffusers import AutoencoderKLWan

        part = self.parts["vae"]
        return _build(part, lambda: AutoencoderKLWan(**part.config), self._tensors(part), "cpu")

    def check_weights(self) -> None:
        """Every component's weights against the model its config describes, from the files' headers
        only (no tensor is read): keys, shapes, and a floating-point stored dtype for every float
        tensor. `vidrt export` calls this before it writes anything, so a file from another model (a
        TI2V-5B transformer in a Wan2.1 folder) is a one-line PackageError, not a failure mid-export."""
        from diffusers import AutoencoderKLWan, WanTransformer3DModel

        factories: dict[str, Callable[[], Any]] = {"text_encoder": self._text_encoder_factory()}
        for expert in self.spec.experts:
            cfg = dict(self._expert(expert).config)
            factories[expert] = partial(WanTransformer3DModel, **cfg)
        factories["vae"] = partial(AutoencoderKLWan, **self.parts["vae"].config)
        if "image_encoder" in self.parts:  # Wan2.1 I2V/FLF2V's CLIP vision tower
            from transformers import CLIPVisionConfig, CLIPVisionModel

            clip_cfg = CLIPVisionConfig(**self.parts["image_encoder"].config)
            factories["image_encoder"] = partial(CLIPVisionModel, clip_cfg)
        for name, factory in factories.items():
            part = self.parts[name]
            have = part.file_shapes()
            model = _checked_on_meta(part, factory, have)
            floats = {k for k, v in model.state_dict().items() if v.is_floating_point()}
            bad = [f"{part.names.get(k, k)} is {have[k].dtype}" for k in sorted(floats)
                   if have[k].dtype and have[k].dtype not in FLOAT_DTYPES]
            if bad:
                raise PackageError(f"{part.weights.label}: {len(bad)} weight(s) stored as non-float data, e.g. "
                                   f"{bad[0]}; wrong or damaged {part.name} file")
            del model

    # ---- tokenizer, fingerprints ------------------------------------------------------------

    def tokenizer_json(self) -> str:
        path = self.tokenizer_dir / "tokenizer.json"
        if path.is_file():
            return path.read_text()
        if not (self.tokenizer_dir / "spiece.model").is_file():
            raise PackageError(f"{self.tokenizer_dir}: no tokenizer.json or spiece.model; "
                               "copy the umt5-xxl tokenizer files there")
        from transformers import AutoTokenizer

        try:  # sentencepiece model -> fast (tokenizers) form, transformers' own conversion
            tok = AutoTokenizer.from_pretrained(str(self.tokenizer_dir))
            return str(tok.backend_tokenizer.to_str())
        except Exception as exc:
            raise PackageError(f"{self.tokenizer_dir / 'spiece.model'}: cannot convert to tokenizer.json "
                               f"({type(exc).__name__}); re-download the tokenizer") from None

    def fingerprint(self, component: str) -> str:
        """sha256 over (name, size, mtime) of the component's source files: unchanged -> same."""
        if component == "tokenizer":
            files = tuple(sorted(p for p in self.tokenizer_dir.rglob("*") if p.is_file()))
        elif component in self.parts:
            files = self.parts[component].sources
        else:
            raise KeyError(f"unknown component {component!r}: one of tokenizer, {', '.join(self.parts)}")
        h = hashlib.sha256(component.encode())
        for f in files:
            st = f.stat()
            h.update(f"\n{f.relative_to(self.root)}|{st.st_size}|{st.st_mtime_ns}".encode())
        return h.hexdigest()

    # ---- internals --------------------------------------------------------------------------

    def _expert(self, expert: str) -> Part:
        if expert not in self.spec.experts:
            raise KeyError(f"unknown expert {expert!r} for {self.spec.name}: one of {', '.join(self.spec.experts)}")
        return self.parts[expert]

    def _tensors(self, part: Part, dtype: torch.dtype | None = torch.float32) -> dict[str, torch.Tensor]:
        return load_tensors(part.weights, dict(part.names), dtype, part.views)


def _build(part: Part, factory: Callable[[], Any], sd: dict[str, torch.Tensor], device: str,
           fix: Callable[[Any], None] | None = None) -> Any:
    """Module on meta + the file's tensors assigned (no second copy), checked key by key."""
    model = _checked_on_meta(part, factory, {k: TensorInfo(tuple(v.shape), part.weights.label) for k, v in sd.items()})
    model.load_state_dict(sd, strict=True, assign=True)
    if fix is not None:
        fix(model)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # a buffer nobody computed: a bug here, not in the files
        raise RuntimeError(f"{type(model).__name__}: tensors left on meta after loading: {left[:3]}")
    # the tensors are fp32 already (load casts); `.to(dtype)` would also warn about diffusers'
    # keep-in-fp32 modules, so move only when another device is asked for
    return (model if device == "cpu" else model.to(device)).eval()


def _checked_on_meta(part: Part, factory: Callable[[], Any], have: Mapping[str, TensorInfo]) -> Any:
    """The module built on the meta device, after `have` (the files' keys -> shapes) matched it."""
    with torch.device("meta"):
        model = factory()
    _check_keys(part, {k: tuple(v.shape) for k, v in model.state_dict().items()}, have)
    return model


def _check_keys(part: Part, want: Mapping[str, tuple[int, ...]], have: Mapping[str, TensorInfo]) -> None:
    """Missing / unexpected / wrong-shape keys -> one line naming the file, first few keys + count."""
    label = part.weights.label
    missing = [k for k in want if k not in have]
    unexpected = [part.names.get(k, k) for k in have if k not in want]
    if missing or unexpected:
        what = []
        if missing:
            what.append(f"missing {len(missing)} key(s) for {part.name}: {keymaps.summarise(missing)}")
        if unexpected:
            what.append(f"{len(unexpected)} unexpected key(s): {keymaps.summarise(unexpected)}")
        raise PackageError(f"{label}: {'; '.join(what)}; wrong or damaged {part.name} file")
    bad = [f"{k} {have[k].shape} != {want[k]}" for k in want if have[k].shape != want[k]]
    if bad:
        raise PackageError(f"{label}: {len(bad)} tensor(s) of the wrong shape, e.g. {bad[0]}; "
                           f"the {part.name} config does not match its weights")


# ---- architecture inference ---------------------------------------------------------------------


def _need(info: Mapping[str, TensorInfo], key: str, label: Path, what: str) -> tuple[int, ...]:
    if key not in info:
        raise PackageError(f"{label}: no tensor {key!r}; this is not a {what} checkpoint")
    return info[key].shape


def _indices(info: Mapping[str, TensorInfo], pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in info if (m := rx.match(k))})


def _rename_or_fail(info: Mapping[str, TensorInfo], km: keymaps.KeyMap, wf: WeightFiles, name: str) -> dict[str, str]:
    mapping, unknown = keymaps.rename(info, km)
    if unknown:
        raise PackageError(f"{wf.label}: {len(unknown)} unexpected key(s) for {name}: "
                           f"{keymaps.summarise(unknown)}; wrong or unsupported {name} file")
    return mapping


def _official_dit(folder: Path, name: str) -> tuple[Part, DiTConfig, int]:
    """-> (part, DiTConfig, text_len). Numbers from tensor shapes; heads/eps/text_len from
    config.json (real configs omit text_dim and patch_size: WanModel.ignore_for_config)."""
    cfg_path = folder / "config.json"
    cfg = read_json(cfg_path)
    model_type = cfg.get("model_type", "t2v")
    if model_type not in ("t2v", "ti2v", "i2v", "flf2v"):
        raise PackageError(f"{cfg_path}: model_type {model_type!r} is not supported (t2v, ti2v, i2v, flf2v only)")
    wf = safetensors_files(folder, "diffusion_pytorch_model")
    if wf is None:
        raise PackageError(f"{folder}: no diffusion_pytorch_model.safetensors (or .index.json); "
                           "download the DiT weights there")
    info = shapes(wf)
    dim, in_ch, *patch = _need(info, "patch_embedding.weight", wf.label, "Wan DiT")
    text_dim = _need(info, "text_embedding.0.weight", wf.label, "Wan DiT")[1]
    freq_dim = _need(info, "time_embedding.0.weight", wf.label, "Wan DiT")[1]
    head_out = _need(info, "head.head.weight", wf.label, "Wan DiT")[0]
    ffn_dim = _need(info, "blocks.0.ffn.0.weight", wf.label, "Wan DiT")[0]
    num_layers = len(_indices(info, r"^blocks\.(\d+)\."))
    if "num_heads" not in cfg:
        raise PackageError(f"{cfg_path}: no 'num_heads'; re-download config.json")
    heads = int(cfg["num_heads"])
    for key, val in (("dim", dim), ("num_layers", num_layers), ("in_dim", in_ch)):
        if key in cfg and int(cfg[key]) != val:
            raise PackageError(f"{cfg_path}: {key}={cfg[key]} but the weights have {val}; "
                               "config.json belongs to another model")
    out_ch = head_out // (patch[0] * patch[1] * patch[2])
    # Wan2.1 I2V/FLF2V: the CLIP tokens' width from img_emb's first LayerNorm, their own K/V projections
    # (diffusers added_kv_proj_dim = dim), FLF2V's position table over both images' tokens
    image_dim = info["img_emb.proj.0.weight"].shape[0] if "img_emb.proj.0.weight" in info else None
    if (image_dim is not None) != (model_type in ("i2v", "flf2v") and "blocks.0.cross_attn.k_img.weight" in info):
        raise PackageError(f"{wf.label}: model_type {model_type!r} in {cfg_path.name}, but the weights "
                           f"{'lack' if image_dim is None else 'have'} the CLIP branch (img_emb, k_img); "
                           f"config.json belongs to another model")
    pos = info.get("img_emb.emb_pos")
    module_cfg = dict(
        patch_size=tuple(patch), num_attention_heads=heads, attention_head_dim=dim // heads,
        in_channels=in_ch, out_channels=out_ch, text_dim=text_dim, freq_dim=freq_dim, ffn_dim=ffn_dim,
        num_layers=num_layers, cross_attn_norm="blocks.0.norm3.weight" in info,
        qk_norm="rms_norm_across_heads" if "blocks.0.self_attn.norm_q.weight" in info else None,
        eps=float(cfg.get("eps", 1e-6)), image_dim=image_dim, added_kv_proj_dim=dim if image_dim else None,
        rope_max_seq_len=1024, pos_embed_seq_len=pos.shape[1] if pos is not None else None)
    names = _rename_or_fail(info, keymaps.DIT, wf, name)
    part = Part(name, wf, names, module_cfg, (cfg_path, *wf.files, *filter(None, [wf.index])))
    return part, _dit_config(module_cfg), int(cfg.get("text_len", 512))


def _dit_config(c: Mapping[str, Any]) -> DiTConfig:
    return DiTConfig(dim=c["num_attention_heads"] * c["attention_head_dim"], ffn_dim=c["ffn_dim"],
                     num_layers=c["num_layers"], num_heads=c["num_attention_heads"],
                     in_channels=c["in_channels"], out_channels=c["out_channels"] or c["in_channels"],
                     freq_dim=c["freq_dim"], text_dim=c["text_dim"], patch_size=tuple(c["patch_size"]),
                     eps=c["eps"], image_dim=c.get("image_dim"))


def _official_t5(path: WeightFiles) -> tuple[Part, TextConfig]:
    info = shapes(path)
    label = path.label
    vocab, d_model = _need(info, "token_embedding.weight", label, "umT5 encoder")
    d_attn = _need(info, "blocks.0.attn.q.weight", label, "umT5 encoder")[0]
    d_ff = _need(info, "blocks.0.ffn.fc1.weight", label, "umT5 encoder")[0]
    if "pos_embedding.embedding.weight" in info:
        raise PackageError(f"{label}: shared position bias (plain T5); Wan needs the umT5 encoder")
    buckets, heads = _need(info, "blocks.0.pos_embedding.embedding.weight", label, "umT5 encoder")
    layers = len(_indices(info, r"^blocks\.(\d+)\."))
    cfg = dict(vocab_size=vocab, d_model=d_model, d_kv=d_attn // heads, d_ff=d_ff, num_layers=layers,
               num_heads=heads, relative_attention_num_buckets=buckets, relative_attention_max_distance=128,
               feed_forward_proj="gated-gelu", dropout_rate=0.0, layer_norm_epsilon=1e-6)
    names = _rename_or_fail(info, keymaps.UMT5, path, "text_encoder")
    part = Part("text_encoder", path, names, cfg, (*path.files, *filter(None, [path.index])))
    return part, _text_config(cfg)


def _official_clip(wf: WeightFiles) -> Part:
    """Wan's CLIP .pth (XLMRobertaCLIP state dict) -> its visual tower as transformers' CLIPVisionModel:
    architecture from the tensor shapes (width, MLP width, layers, patch, token count), the official
    tower's constants for the rest (GELU, LayerNorm eps 1e-5, 80-wide heads)."""
    info, label, what = shapes(wf), wf.label, "Wan CLIP (open-clip XLM-RoBERTa ViT-H/14)"
    dim, _, patch, _ = _need(info, "visual.patch_embedding.weight", label, what)
    tokens = _need(info, "visual.pos_embedding", label, what)[1]
    grid = math.isqrt(tokens - 1)
    if grid * grid != tokens - 1 or dim % OFFICIAL_CLIP_HEAD_DIM:
        raise PackageError(f"{label}: a CLIP tower of width {dim} with {tokens} positions is not the ViT-H/14 layout "
                           f"Wan uses; re-download {OFFICIAL_CLIP_STEM}.pth")
    cfg = dict(hidden_size=dim, intermediate_size=_need(info, "visual.transformer.0.mlp.0.weight", label, what)[0],
               num_hidden_layers=len(_indices(info, r"^visual\.transformer\.(\d+)\.")),
               num_attention_heads=dim // OFFICIAL_CLIP_HEAD_DIM, image_size=grid * patch, patch_size=patch,
               num_channels=3, hidden_act="gelu", layer_norm_eps=1e-5)
    names = _rename_or_fail(info, keymaps.WAN_CLIP_VISION, wf, "image_encoder")
    return Part("image_encoder", wf, names, cfg, (*wf.files, *filter(None, [wf.index])),
                keymaps.views(names, keymaps.WAN_CLIP_VISION))


def _text_config(c: Mapping[str, Any], text_len: int = 512) -> TextConfig:
    return TextConfig(vocab_size=c["vocab_size"], d_model=c["d_model"], d_ff=c["d_ff"], num_layers=c["num_layers"],
                      num_heads=c["num_heads"], num_buckets=c.get("relative_attention_num_buckets", 32),
                      text_len=text_len)


def _official_vae(wf: WeightFiles) -> tuple[Part, VAEConfig]:
    """Wan2.1 / Wan2.2 VAE architecture from tensor shapes (the .pth has no config)."""
    info, label = shapes(wf), wf.label
    z_dim = _need(info, "conv2.weight", label, "Wan VAE")[0]
    base, in_ch = _need(info, "encoder.conv1.weight", label, "Wan VAE")[:2]
    out_ch, last = _need(info, "decoder.head.2.weight", label, "Wan VAE")[:2]
    residual = any(k.startswith("encoder.downsamples.0.downsamples.") for k in info)
    if residual:  # Wan2.2: encoder.downsamples.S.downsamples.J
        stages = _indices(info, r"^encoder\.downsamples\.(\d+)\.")
        nrb = len(_indices(info, r"^encoder\.downsamples\.0\.downsamples\.(\d+)\.residual\."))
        first = [f"encoder.downsamples.{s}.downsamples.0.residual.2.weight" for s in stages]
        tdown = [f"encoder.downsamples.{s}.downsamples.{nrb}.time_conv.weight" in info for s in stages[:-1]]
        km = keymaps.vae22(nrb)
    else:  # Wan2.1: one flat Sequential; each stage = nrb ResidualBlocks + a Resample (not the last)
        resamples = _indices(info, r"^encoder\.downsamples\.(\d+)\.resample\.")
        if not resamples:
            raise PackageError(f"{label}: no encoder resample layers; this is not a Wan VAE checkpoint")
        nrb = resamples[0]
        n_stages = len(resamples) + 1
        first = [f"encoder.downsamples.{s * (nrb + 1)}.residual.2.weight" for s in range(n_stages)]
        tdown = [f"encoder.downsamples.{i}.time_conv.weight" in info for i in resamples]
        km = keymaps.vae21(nrb, n_stages)
    dim_mult = [_need(info, k, label, "Wan VAE")[0] // base for k in first]
    kind = "wan2.2" if residual else "wan2.1"
    ref = VARIANTS["wan2.2-ti2v-5b" if residual else "wan2.1-t2v-1.3b"].vae
    mean, std = (ref.latents_mean, ref.latents_std)
    if len(mean) != z_dim:  # no statistics for this latent size: identity normalisation
        mean, std = (0.0,) * z_dim, (1.0,) * z_dim
    cfg = dict(base_dim=base, decoder_base_dim=last // dim_mult[0], z_dim=z_dim, dim_mult=dim_mult,
               num_res_blocks=nrb, attn_scales=[], temperal_downsample=tdown, dropout=0.0,
               latents_mean=list(mean), latents_std=list(std), is_residual=residual,
               in_channels=in_ch, out_channels=out_ch, patch_size=2 if residual else None,
               scale_factor_temporal=4, scale_factor_spatial=16 if residual else 8)
    names = _rename_or_fail(info, km, wf, "vae")
    part = Part("vae", wf, names, cfg, (*wf.files, *filter(None, [wf.index])))
    return part, _vae_config(cfg, kind)


def _vae_config(c: Mapping[str, Any], kind: str) -> VAEConfig:
    spatial = c.get("scale_factor_spatial") or 8
    return VAEConfig(kind=kind, z_dim=c["z_dim"], stride=(c.get("scale_factor_temporal") or 4, spatial, spatial),
                     base_dim=c["base_dim"], decoder_base_dim=c.get("decoder_base_dim") or c["base_dim"],
                     latents_mean=tuple(c["latents_mean"]), latents_std=tuple(c["latents_std"]))


def _pick(folder: Path, stem: str) -> WeightFiles | None:
    """`stem.safetensors` (or sharded) preferred over `stem.pth`."""
    st = safetensors_files(folder, stem)
    if st is not None:
        return st
    pth = folder / f"{stem}.pth"
    return WeightFiles((pth,), "pth") if pth.is_file() else None


def _open_official(root: Path) -> tuple[dict[str, Part], DiTConfig, TextConfig, VAEConfig, Path]:
    high, low = (root / d for d in OFFICIAL_EXPERT_DIRS.values())
    if high.is_dir() or low.is_dir():
        for d in (high, low):
            if not (d / "config.json").is_file():
                raise PackageError(f"{d / 'config.json'}: missing; an A14B checkpoint needs both "
                                   "high_noise_model/ and low_noise_model/")
        experts = {"dit_high": high, "dit_low": low}
    else:
        experts = {"dit": root}
    parts: dict[str, Part] = {}
    dits = {}
    for name, folder in experts.items():
        parts[name], dits[name], text_len = _official_dit(folder, name)
    dit = next(iter(dits.values()))
    if len(set(dits.values())) > 1:
        raise PackageError(f"{low / 'config.json'}: the two experts have different architectures")
    t5 = _pick(root, OFFICIAL_T5_STEM)
    if t5 is None:
        raise PackageError(f"{root / (OFFICIAL_T5_STEM + '.pth')}: missing; download the umT5 encoder weights")
    parts["text_encoder"], text = _official_t5(t5)
    # both VAE files may sit side by side: the one whose z matches the DiT's channels wins
    kinds = ["wan2.2", "wan2.1"] if dit.in_channels == 48 else ["wan2.1", "wan2.2"]
    vae_files = next((wf for k in kinds if (wf := _pick(root, OFFICIAL_VAE_STEMS[k])) is not None), None)
    if vae_files is None:
        raise PackageError(f"{root / 'Wan2.1_VAE.pth'}: missing (nor Wan2.2_VAE.pth); download the VAE weights")
    parts["vae"], vae = _official_vae(vae_files)
    if dit.image_dim is not None:  # Wan2.1 I2V/FLF2V: the CLIP vision tower beside the DiT
        clip = _pick(root, OFFICIAL_CLIP_STEM)
        if clip is None:
            raise PackageError(f"{root / (OFFICIAL_CLIP_STEM + '.pth')}: missing; Wan2.1 I2V/FLF2V need the CLIP "
                               f"image encoder weights, download them there")
        parts["image_encoder"] = _official_clip(clip)
    return parts, dit, dataclasses.replace(text, text_len=text_len), vae, root / OFFICIAL_TOKENIZER_DIR


def _init_kwargs(cls: type, cfg: Mapping[str, Any]) -> dict[str, Any]:
    params = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in cfg.items() if k in params}


def _diffusers_part(root: Path, sub: str, name: str, stem: str, km: keymaps.KeyMap | None = None) -> Part:
    folder = root / sub
    cfg_path = folder / "config.json"
    cfg = read_json(cfg_path)
    wf = safetensors_files(folder, stem)
    if wf is None:
        raise PackageError(f"{folder}: no {stem}.safetensors (or .index.json); download the {name} weights there")
    info = shapes(wf)  # headers only: checks shards and sizes now
    return Part(name, wf, keymaps.identity(info, km), cfg, (cfg_path, *wf.files, *filter(None, [wf.index])))


def _open_diffusers(root: Path) -> tuple[dict[str, Part], DiTConfig, TextConfig, VAEConfig, Path]:
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    index = read_json(root / "model_index.json")
    two = bool(index.get("transformer_2")) and index["transformer_2"][0] is not None
    if two and not (root / "transformer_2").is_dir():
        raise PackageError(f"{root / 'model_index.json'}: names transformer_2 but {root / 'transformer_2'} is missing")
    experts = ("dit_high", "dit_low") if two else ("dit",)
    parts: dict[str, Part] = {}
    for name in experts:
        part = _diffusers_part(root, DIFFUSERS_EXPERT_DIRS[name], name, "diffusion_pytorch_model")
        cfg = _init_kwargs(WanTransformer3DModel, part.config)
        if bool(cfg.get("image_dim")) != bool(cfg.get("added_kv_proj_dim")):
            # image tokens without their own K/V would be attended as extra text tokens (i2v.md §6 pitfall 1)
            raise PackageError(f"{part.sources[0]}: image_dim and added_kv_proj_dim must be set together")
        defaults = {k: p.default for k, p in inspect.signature(WanTransformer3DModel.__init__).parameters.items()
                    if p.default is not inspect.Parameter.empty}
        cfg = {**defaults, **cfg, "patch_size": tuple(cfg.get("patch_size", defaults["patch_size"]))}
        parts[name] = dataclasses.replace(part, config=cfg)
    dit = _dit_config(parts[experts[0]].config)
    te = _diffusers_part(root, "text_encoder", "text_encoder", "model", keymaps.UMT5)
    te_cfg = {k: v for k, v in te.config.items()
              if not k.startswith("_") and k not in ("architectures", "transformers_version")}
    parts["text_encoder"] = dataclasses.replace(te, config=te_cfg)
    vae = _diffusers_part(root, "vae", "vae", "diffusion_pytorch_model")
    defaults = {k: p.default for k, p in inspect.signature(AutoencoderKLWan.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    vae_cfg = {**defaults, **_init_kwargs(AutoencoderKLWan, vae.config)}
    parts["vae"] = dataclasses.replace(vae, config=vae_cfg)
    kind = "wan2.2" if vae_cfg.get("is_residual") else "wan2.1"
    if dit.image_dim is not None:  # Wan2.1 I2V/FLF2V: the CLIP vision tower (transformers CLIPVisionModel)
        clip = _diffusers_part(root, "image_encoder", "image_encoder", "model")
        parts["image_encoder"] = dataclasses.replace(clip, config={
            k: v for k, v in clip.config.items() if not k.startswith("_") and k not in (
                "architectures", "transformers_version", "model_type", "torch_dtype", "dtype")})
    return parts, dit, _text_config(te_cfg), _vae_config(vae_cfg, kind), root / "tokenizer"


# ---- detection ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Facts:
    """What the small files say: enough to pick a variant."""

    layout: str
    experts: int
    dim: int
    in_channels: int
    vae_kind: str
    image_dim: int | None = None  # Wan2.1 I2V/FLF2V's CLIP token width; None: no CLIP branch
    last_image: bool = False  # Wan2.1 FLF2V (official model_type "flf2v"; diffusers pos_embed_seq_len)


def _layout(root: Path) -> str:
    if root.exists() and not root.is_dir():
        raise PackageError(f"{root} is a file, not a checkpoint folder; pass the folder that holds model_index.json "
                           f"(diffusers) or config.json (official Wan)")
    if not root.is_dir():
        raise PackageError(f"{root}: no such checkpoint folder")
    if (root / "model_index.json").is_file():
        return "diffusers"
    if (root / "config.json").is_file() or (root / OFFICIAL_EXPERT_DIRS["dit_high"]).is_dir():
        return "official"
    raise PackageError(f"{root}: neither model_index.json (diffusers) nor config.json / high_noise_model/ "
                       "(official Wan) found; point at the checkpoint folder")


def _facts(root: Path) -> _Facts:
    """Configs and file names only (no weights): cheap enough for `detect_variant`."""
    layout = _layout(root)
    if layout == "official":
        two = (root / OFFICIAL_EXPERT_DIRS["dit_high"]).is_dir()
        cfg_path = root / (OFFICIAL_EXPERT_DIRS["dit_high"] if two else ".") / "config.json"
        cfg = read_json(cfg_path)
        dim, in_ch = int(cfg.get("dim", 0)), int(cfg.get("in_dim", 16))
        has22 = any((root / f"{OFFICIAL_VAE_STEMS['wan2.2']}{s}").is_file() for s in (".pth", ".safetensors"))
        vae_kind = "wan2.2" if in_ch == 48 and has22 else "wan2.1"
        clip = cfg.get("model_type") in ("i2v", "flf2v") and not two  # Wan2.1's; Wan2.2 I2V-A14B has none
        return _Facts(layout, 2 if two else 1, dim, in_ch, vae_kind, 1280 if clip else None,
                      cfg.get("model_type") == "flf2v")
    index = read_json(root / "model_index.json")
    two = bool(index.get("transformer_2")) and index["transformer_2"][0] is not None
    tcfg = read_json(root / "transformer" / "config.json")
    vcfg = read_json(root / "vae" / "config.json")
    dim = int(tcfg.get("num_attention_heads", 0)) * int(tcfg.get("attention_head_dim", 0))
    return _Facts(layout, 2 if two else 1, dim, int(tcfg.get("in_channels", 16)),
                  "wan2.2" if vcfg.get("is_residual") else "wan2.1", tcfg.get("image_dim"),
                  tcfg.get("pos_embed_seq_len") is not None)


def _fits(spec: ModelSpec, facts: _Facts) -> str | None:
    """None if the layout can hold this variant, else what is wrong (one clause)."""
    if len(spec.experts) != facts.experts:
        return f"{spec.name} has {len(spec.experts)} DiT expert(s), the folder {facts.experts}"
    if spec.vae.kind != facts.vae_kind:
        return f"{spec.name} needs the {spec.vae.kind} VAE, the folder has the {facts.vae_kind} one"
    if spec.dit.in_channels != facts.in_channels:
        return f"{spec.name} has {spec.dit.in_channels} latent channels, the folder's DiT {facts.in_channels}"
    if (spec.dit.image_dim is None) != (facts.image_dim is None):
        has = "has" if spec.dit.image_dim is not None else "has no"
        return f"{spec.name} {has} CLIP image tokens, the folder's DiT {'has' if facts.image_dim else 'has none'}"
    if bool(spec.image and spec.image.last_image) != facts.last_image:
        kind = "first-and-last-frame (FLF2V)" if facts.last_image else "first-frame"
        return f"{spec.name} is not a {kind} model like the folder's"
    return None


def _detect(root: Path, facts: _Facts) -> str:
    layout_fits = [n for n, s in VARIANTS.items() if _fits(s, facts) is None]
    exact = [n for n in layout_fits if VARIANTS[n].dit.dim == facts.dim]
    if len(exact) == 1:
        return exact[0]
    hint = f"it fits {', '.join(layout_fits)}" if layout_fits else f"choose one of {', '.join(VARIANTS)}"
    raise PackageError(f"{root}: cannot tell the model variant (DiT dim {facts.dim}, {facts.experts} expert(s), "
                       f"{facts.vae_kind} VAE); pass --variant NAME ({hint})")


def detect_variant(path: str | Path) -> str:
    """Registry key of the checkpoint at `path`, from its small files only."""
    root = Path(path).expanduser().resolve()
    return _detect(root, _facts(root))


def open_checkpoint(path: str | Path, variant: str | None = None) -> Checkpoint:
    """Read configs, index files and tensor headers; load nothing big. `variant` picks the
    sampling defaults (else detected); the architecture always comes from the files."""
    root = Path(path).expanduser().resolve()
    facts = _facts(root)
    if variant is None:
        variant = _detect(root, facts)
    spec = get_variant(variant)
    wrong = _fits(spec, facts)
    if wrong is not None:
        raise PackageError(f"{root}: {wrong}; pass the right --variant or fix the folder")
    opener = _open_official if facts.layout == "official" else _open_diffusers
    parts, dit, text, vae, tok = opener(root)
    # the DiT takes the latents, plus (channel-concat image-to-video) a 4-channel frame mask and the
    # image latents: 16 + 4 + 16 = 36 for Wan2.1 I2V / Wan2.2 I2V-A14B
    concat = spec.image is not None and spec.image.mode == "concat"
    if dit.in_channels != (2 * vae.z_dim + vae.stride[0] if concat else vae.z_dim):
        raise PackageError(f"{parts['vae'].weights.label}: VAE z_dim {vae.z_dim} but the DiT takes "
                           f"{dit.in_channels} channels; wrong VAE file for this model")
    spec = dataclasses.replace(spec, dit=dit, vae=vae, text=text)
    if spec.image is not None and spec.image.clip_size:  # CLIP's size, tokens and width from its config
        if "image_encoder" not in parts:
            raise PackageError(f"{root}: {spec.name} needs the CLIP image encoder (image_encoder/), the folder "
                               f"has none")
        from transformers import CLIPVisionConfig

        c = CLIPVisionConfig(**parts["image_encoder"].config)  # config.json omits the defaults (224, 14, ...)
        size, patch = int(c.image_size), int(c.patch_size)
        if int(c.hidden_size) != spec.dit.image_dim:
            raise PackageError(f"{parts['image_encoder'].weights.label}: CLIP width {c.hidden_size} but the DiT takes "
                               f"{spec.dit.image_dim}-wide image tokens; wrong CLIP file for this model")
        spec = dataclasses.replace(spec, image=dataclasses.replace(
            spec.image, clip_size=size, clip_tokens=(size // patch) ** 2 + 1, clip_dim=int(c.hidden_size)))
    return Checkpoint(root=root, layout=facts.layout, spec=spec, parts=parts, tokenizer_dir=tok)


__all__ = ["Checkpoint", "Part", "open_checkpoint", "detect_variant"]
