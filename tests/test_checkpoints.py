"""export/checkpoints.py: official and diffusers folders load into the diffusers/transformers
modules with the outputs of the modules that wrote them; bad folders fail in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import tiny
import torch
from safetensors.torch import load_file, save_file
from vidrt.errors import PackageError
from vidrt.export.checkpoints import detect_variant, open_checkpoint


@pytest.fixture(scope="module")
def official(tmp_path_factory) -> dict[str, tiny.OfficialTiny]:
    base = tmp_path_factory.mktemp("official")
    return {k: tiny.write_official_checkpoint(base / k, k) for k in tiny.KINDS}


@pytest.fixture(scope="module")
def diffusers(tmp_path_factory) -> dict[str, tiny.DiffusersTiny]:
    base = tmp_path_factory.mktemp("diffusers")
    return {k: tiny.write_diffusers_checkpoint(base / k, k) for k in tiny.KINDS}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _dit_inputs(channels: int, per_token: bool, seed: int = 0):
    """x [C, F=2, H=4, W=4] -> 2*2*2 = 8 tokens; 7 context rows (< text_len: exercises padding)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(channels, 2, 4, 4, generator=g)
    ctx = torch.randn(7, 64, generator=g)
    seq = 8
    t = torch.full((1, seq), 700.0) if per_token else torch.tensor([700.0])
    if per_token:
        t[:, :4] = 0.0  # TI2V image mode: latent frame 0's tokens at t = 0
    return x, t, ctx, seq


def _diffusers_dit(model, x, t, ctx):
    padded = torch.cat([ctx, ctx.new_zeros(tiny.TEXT_LEN - ctx.shape[0], ctx.shape[1])])[None]
    return model(x[None], t, padded, return_dict=False)[0][0]


def _raw_decode(vae, z: torch.Tensor) -> torch.Tensor:
    """diffusers' _decode without its final clamp (random weights leave [-1, 1])."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

    vae.clear_cache()
    x = vae.post_quant_conv(z)
    out = torch.cat([vae.decoder(x[:, :, i:i + 1], feat_cache=vae._feat_map, feat_idx=[0], first_chunk=i == 0)
                     for i in range(z.shape[2])], 2)
    vae.clear_cache()
    return unpatchify(out, patch_size=vae.config.patch_size) if vae.config.patch_size else out


# ---- official layout == official modules ------------------------------------------------------


@pytest.mark.parametrize("kind", tiny.KINDS)
@torch.no_grad()
def test_official_dit_matches_official_module(official, kind):
    ref = official[kind]
    ckpt = open_checkpoint(ref.root, variant=tiny.TINY_VARIANT[kind])
    assert ckpt.layout == "official" and ckpt.spec.experts == tuple(ref.dit)
    assert ckpt.spec.text.text_len == tiny.TEXT_LEN and ckpt.spec.dit.dim == 64
    for i, (expert, off) in enumerate(ref.dit.items()):
        x, t, ctx, seq = _dit_inputs(ckpt.spec.dit.in_channels, kind == "ti2v", seed=i)
        if kind == "i2v":  # official I2V: latents x [16] and y = [mask 4, image latents 16], concatenated inside
            want = off([x[:16]], t, [ctx], seq, y=[x[16:]])[0]
        else:
            want = off([x], t, [ctx], seq)[0]
        got = _diffusers_dit(ckpt.transformer(expert), x, t, ctx)
        assert got.shape == want.shape
        assert _rel(got, want) <= 1e-4, expert


@pytest.fixture(scope="module", params=["i2v", "flf2v"])
def official_wan21(request, tmp_path_factory) -> tiny.OfficialWan21:
    return tiny.write_official_wan21_i2v(tmp_path_factory.mktemp(f"official-{request.param}"),
                                         flf2v=request.param == "flf2v")


@torch.no_grad()
def test_official_wan21_i2v_loads_into_the_official_modules(official_wan21):
    """Issue 16 item 1: Wan2.1 I2V / FLF2V in the official layout. Every DiT tensor lands where diffusers'
    own converter (single_file_utils.convert_wan_transformer_to_diffusers) puts it; the image branch
    (img_emb, k_img/v_img/norm_k_img) computes what the official modules compute; the CLIP .pth's visual
    tower = the official VisionTransformer's penultimate block (use_31_block) as CLIPVisionModel."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    ref = official_wan21
    flf2v = ref.kind == "flf2v"
    variant = "wan2.1-flf2v-14b-720p" if flf2v else "wan2.1-i2v-14b-480p"
    ckpt = open_checkpoint(ref.root, variant=variant)
    assert ckpt.layout == "official" and ckpt.spec.dit.image_dim == 160 and ckpt.spec.dit.in_channels == 36
    assert (ckpt.spec.image.clip_size, ckpt.spec.image.clip_tokens, ckpt.spec.image.clip_dim) == (28, 5, 160)
    ckpt.check_weights()  # what `vidrt export` runs first: keys, shapes, dtypes of every part (CLIP views too)

    tr = ckpt.transformer("dit")
    official_sd = {k: v.clone() for k, v in ref.dit.state_dict().items()}
    want = convert_wan_transformer_to_diffusers(dict(official_sd))
    if flf2v:  # diffusers' single-file table has no emb_pos; its convert_wan_to_diffusers.py names it pos_embed
        want["condition_embedder.image_embedder.pos_embed"] = want.pop("img_emb.emb_pos")
    got = tr.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)

    g = torch.Generator().manual_seed(5)
    n = 257  # the official cross-attention takes the first 257 context tokens as the image's
    clip_fea = torch.randn(2 if flf2v else 1, n, 160, generator=g)
    if flf2v:  # W21 MLPProj: [2, n, d] -> [1, 2n, d] + emb_pos (here: a 257-token table, like the real one)
        emb = ref.dit.img_emb
        emb.emb_pos = torch.nn.Parameter(torch.randn(1, 2 * n, 160, generator=g))
        tr.condition_embedder.image_embedder.pos_embed = torch.nn.Parameter(emb.emb_pos.detach().clone())
        off_tokens = emb.proj(clip_fea.view(1, 2 * n, 160) + emb.emb_pos)
    else:
        off_tokens = ref.dit.img_emb(clip_fea)
    our_tokens = tr.condition_embedder.image_embedder(clip_fea)
    assert _rel(our_tokens, off_tokens) <= 1e-5
    x = torch.randn(1, 8, 64, generator=g)
    context = torch.cat([torch.randn(1, n, 64, generator=g), torch.randn(1, tiny.TEXT_LEN, 64, generator=g)], 1)
    for b, block in enumerate(ref.dit.blocks):
        off = block.cross_attn(x, context, None)
        ours = tr.blocks[b].attn2(x, encoder_hidden_states=context)
        assert _rel(ours, off) <= 1e-5, b

    px = torch.randn(2, 3, 28, 28, generator=g)
    off_clip = ref.clip.visual(px, use_31_block=True)
    our_clip = ckpt.image_encoder()(pixel_values=px, output_hidden_states=True).hidden_states[-2]
    assert our_clip.shape == off_clip.shape == (2, 5, 160)
    assert _rel(our_clip, off_clip) <= 1e-5


def test_official_wan21_i2v_detection_and_bad_clip(official_wan21, tmp_path):
    """From config.json's model_type: "flf2v" is the FLF2V variant; "i2v" fits the 480P and 720P entries
    (the same files), so the variant is asked for, naming both. A missing CLIP file is one line."""
    ref = official_wan21
    if ref.kind == "flf2v":
        with pytest.raises(PackageError) as err:  # tiny dims: no registry entry has them, FLF2V is named
            detect_variant(ref.root)
        _one_line(err, "--variant", "wan2.1-flf2v-14b-720p")
        assert "wan2.1-i2v-14b" not in str(err.value)
        with pytest.raises(PackageError) as err:
            open_checkpoint(ref.root, variant="wan2.1-i2v-14b-480p")
        _one_line(err, "first-and-last-frame (FLF2V)", "wan2.1-i2v-14b-480p")
        return
    bad = tmp_path / "no-clip"
    shutil.copytree(ref.root, bad)
    (bad / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth").unlink()
    with pytest.raises(PackageError) as err:
        open_checkpoint(bad, variant="wan2.1-i2v-14b-480p")
    _one_line(err, "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth", "missing")


@pytest.mark.parametrize("kind", ["t2v", "ti2v"])
@torch.no_grad()
def test_official_vae_decode_matches(official, kind):
    ref = official[kind]
    vae = open_checkpoint(ref.root, variant=tiny.TINY_VARIANT[kind]).vae()
    hw = 2 if kind == "ti2v" else 4
    z = torch.randn(1, vae.config.z_dim, 2, hw, hw, generator=torch.Generator().manual_seed(3))
    want = ref.vae.decode(z, scale=[0.0, 1.0])  # raw latent in: no mean/std on either side
    got = _raw_decode(vae, z)
    assert got.shape == want.shape == (1, 3, 5, 32, 32)
    assert _rel(got, want) <= 1e-5
    assert torch.allclose(vae.decode(z).sample, want.clamp(-1, 1), atol=1e-5)


@torch.no_grad()
def test_official_vae_two_res_blocks(official):
    """a14b's Wan2.1 VAE uses the real num_res_blocks = 2 (the t2v one has 1)."""
    ref = official["a14b"]
    vae = open_checkpoint(ref.root, variant=tiny.TINY_VARIANT["a14b"]).vae()
    assert vae.config.num_res_blocks == 2
    z = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(4))
    assert _rel(_raw_decode(vae, z), ref.vae.decode(z, scale=[0.0, 1.0])) <= 1e-5


@torch.no_grad()
def test_official_umt5_matches(official):
    ref = official["t2v"]
    te = open_checkpoint(ref.root, variant="wan2.1-t2v-1.3b").text_encoder()
    assert te.config._attn_implementation == "eager"
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    want = ref.text_encoder(ids, mask)
    got = te(input_ids=ids, attention_mask=mask).last_hidden_state
    assert _rel(got, want) <= 1e-5


def test_transformer_state_dict_and_config(official):
    ckpt = open_checkpoint(official["a14b"].root, variant="wan2.2-t2v-a14b")
    sd = ckpt.transformer_state_dict("dit_low")
    model = ckpt.transformer("dit_low")
    assert set(sd) == set(model.state_dict())
    assert all(v.dtype == torch.float32 for v in sd.values())
    cfg = ckpt.transformer_config("dit_high")
    assert cfg["num_attention_heads"] * cfg["attention_head_dim"] == 64 and cfg["text_dim"] == 64
    with pytest.raises(KeyError):
        ckpt.transformer("dit")


# ---- diffusers layout == the modules that wrote it ---------------------------------------------


@pytest.mark.parametrize("kind", tiny.KINDS)
@torch.no_grad()
def test_diffusers_layout_identical(diffusers, kind):
    """Same weights, same classes. Not always bit-equal: tensors read with safe_open sit at
    8/16-byte-aligned addresses, and CPU matmul kernels then sum in another order (~1e-7)."""
    ref = diffusers[kind]
    ckpt = open_checkpoint(ref.root, variant=tiny.TINY_VARIANT[kind])
    assert ckpt.layout == "diffusers" and ckpt.spec.experts == tuple(ref.transformer)
    for i, (expert, module) in enumerate(ref.transformer.items()):
        loaded = ckpt.transformer(expert)
        assert all(torch.equal(v, module.state_dict()[k]) for k, v in loaded.state_dict().items())
        x, t, ctx, _ = _dit_inputs(ckpt.spec.dit.in_channels, kind == "ti2v", seed=i)
        assert _rel(_diffusers_dit(loaded, x, t, ctx), _diffusers_dit(module, x, t, ctx)) <= 1e-6
    ids = torch.randint(3, 256, (1, 9))
    mask = torch.ones_like(ids)
    te = ckpt.text_encoder()
    assert _rel(te(input_ids=ids, attention_mask=mask).last_hidden_state,
                ref.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state) <= 1e-6
    z = torch.randn(1, ref.vae.config.z_dim, 2, 2, 2)
    assert _rel(_raw_decode(ckpt.vae(), z), _raw_decode(ref.vae, z)) <= 1e-6


def test_a14b_experts_follow_diffusers_order(diffusers):
    """diffusers' WanPipeline runs `transformer` while t >= boundary (high noise), `transformer_2` below."""
    ref = diffusers["a14b"]
    ckpt = open_checkpoint(ref.root, variant="wan2.2-t2v-a14b")
    sd = ckpt.transformer_state_dict("dit_high")
    assert torch.equal(sd["proj_out.weight"], ref.transformer["dit_high"].proj_out.weight)
    assert not torch.equal(ckpt.transformer_state_dict("dit_low")["proj_out.weight"], sd["proj_out.weight"])


# ---- tokenizer, fingerprints -------------------------------------------------------------------


def test_tokenizer_json_and_autotokenizer(official, diffusers):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    for root in (official["t2v"].root, diffusers["t2v"].root):
        text = open_checkpoint(root, variant="wan2.1-t2v-1.3b").tokenizer_json()
        ids = Tokenizer.from_str(text).encode("a cat walks").ids
        assert ids[-1] == 1 and 2 not in ids  # '</s>' appended, no <unk>
    hf = AutoTokenizer.from_pretrained(str(official["t2v"].root / "google" / "umt5-xxl"))
    assert hf("a cat walks")["input_ids"] == ids and hf.pad_token_id == 0


def test_tokenizer_from_spiece_model(official, tmp_path):
    """No tokenizer.json: spiece.model converts through transformers' fast-tokenizer conversion."""
    spm = pytest.importorskip("sentencepiece")
    from tokenizers import Tokenizer

    root = tmp_path / "c"
    shutil.copytree(official["t2v"].root, root)
    tok_dir = root / "google" / "umt5-xxl"
    shutil.rmtree(tok_dir)
    tok_dir.mkdir()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(tiny.WORDS[i:] + tiny.WORDS[:i]) for i in range(len(tiny.WORDS))) * 20)
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tok_dir / "spiece"), vocab_size=45,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer", "extra_ids": 0}))
    text = open_checkpoint(root, variant="wan2.1-t2v-1.3b").tokenizer_json()
    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "spiece.model"))
    assert Tokenizer.from_str(text).encode("a cat walks").ids == [*sp.encode("a cat walks"), 1]


def test_fingerprint_stable_and_sensitive(official, tmp_path):
    root = tmp_path / "c"
    shutil.copytree(official["t2v"].root, root)
    a, b = (open_checkpoint(root, variant="wan2.1-t2v-1.3b") for _ in range(2))
    comps = ("dit", "text_encoder", "vae", "tokenizer")
    before = {c: a.fingerprint(c) for c in comps}
    assert before == {c: b.fingerprint(c) for c in comps} and len(set(before.values())) == 4
    vae_file = root / "Wan2.1_VAE.pth"
    vae_file.write_bytes(vae_file.read_bytes() + b"\0")  # size and mtime change
    c = open_checkpoint(root, variant="wan2.1-t2v-1.3b")
    assert c.fingerprint("vae") != before["vae"] and c.fingerprint("dit") == before["dit"]


# ---- detection ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", tiny.KINDS)
def test_tiny_dims_ask_for_variant(official, diffusers, kind):
    for root in (official[kind].root, diffusers[kind].root):
        with pytest.raises(PackageError) as err:
            detect_variant(root)
        msg = str(err.value)
        assert "\n" not in msg and "--variant" in msg and tiny.TINY_VARIANT[kind] in msg and str(root) in msg


def _fake_official(root: Path, dim: int, in_dim: int, vae: str, experts: tuple[str, ...] = (".",)) -> Path:
    """Config files and empty weight files only: detection reads no weights."""
    for sub in experts:
        (root / sub).mkdir(parents=True, exist_ok=True)
        (root / sub / "config.json").write_text(json.dumps({"dim": dim, "in_dim": in_dim, "model_type": "t2v"}))
    (root / vae).write_bytes(b"")
    return root


def test_detect_real_sizes(tmp_path):
    assert detect_variant(_fake_official(tmp_path / "a", 1536, 16, "Wan2.1_VAE.pth")) == "wan2.1-t2v-1.3b"
    assert detect_variant(_fake_official(tmp_path / "b", 5120, 16, "Wan2.1_VAE.pth")) == "wan2.1-t2v-14b"
    assert detect_variant(_fake_official(tmp_path / "c", 3072, 48, "Wan2.2_VAE.pth")) == "wan2.2-ti2v-5b"
    two = ("high_noise_model", "low_noise_model")
    assert detect_variant(_fake_official(tmp_path / "d", 5120, 16, "Wan2.1_VAE.pth", two)) == "wan2.2-t2v-a14b"
    flf = _fake_official(tmp_path / "f", 5120, 36, "Wan2.1_VAE.pth")
    (flf / "config.json").write_text(json.dumps({"dim": 5120, "in_dim": 36, "model_type": "flf2v"}))
    assert detect_variant(flf) == "wan2.1-flf2v-14b-720p"
    (flf / "config.json").write_text(json.dumps({"dim": 5120, "in_dim": 36, "model_type": "i2v"}))
    with pytest.raises(PackageError, match="wan2.1-i2v-14b-480p, wan2.1-i2v-14b-720p"):  # same files: ask
        detect_variant(flf)
    d = tmp_path / "e"
    for sub, cfg in (("transformer", {"num_attention_heads": 40, "attention_head_dim": 128, "in_channels": 16}),
                     ("vae", {"z_dim": 16})):
        (d / sub).mkdir(parents=True)
        (d / sub / "config.json").write_text(json.dumps(cfg))
    (d / "model_index.json").write_text(json.dumps({"transformer": ["diffusers", "WanTransformer3DModel"],
                                                    "transformer_2": [None, None]}))
    assert detect_variant(d) == "wan2.1-t2v-14b"


# ---- bad folders: one line naming the file -------------------------------------------------------


def _one_line(err: pytest.ExceptionInfo, *names: str) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    for n in names:
        assert n in msg, msg
    return msg


@pytest.mark.parametrize(("kind", "variant", "says"), [
    ("t2v", "wan2.2-t2v-a14b", "expert"), ("a14b", "wan2.1-t2v-14b", "expert"), ("t2v", "wan2.2-ti2v-5b", "VAE"),
    ("ti2v", "wan2.1-t2v-1.3b", "VAE")])
def test_wrong_variant(official, kind, variant, says):
    with pytest.raises(PackageError) as err:
        open_checkpoint(official[kind].root, variant=variant)
    _one_line(err, str(official[kind].root), variant, says)


def test_missing_shard(official, tmp_path):
    root = tmp_path / "c"
    shutil.copytree(official["a14b"].root, root)
    (root / "low_noise_model" / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(PackageError) as err:
        open_checkpoint(root, variant="wan2.2-t2v-a14b")
    _one_line(err, "low_noise_model/diffusion_pytorch_model.safetensors.index.json", "00002-of-00002")


def test_truncated_safetensors(official, tmp_path):
    root = tmp_path / "c"
    shutil.copytree(official["t2v"].root, root)
    f = root / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(PackageError) as err:
        open_checkpoint(root, variant="wan2.1-t2v-1.3b")
    _one_line(err, str(f), "truncated")


def test_truncated_pth(official, tmp_path):
    root = tmp_path / "c"
    shutil.copytree(official["t2v"].root, root)
    f = root / "models_t5_umt5-xxl-enc-bf16.pth"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(PackageError) as err:
        open_checkpoint(root, variant="wan2.1-t2v-1.3b")
    _one_line(err, str(f))


def test_unknown_and_missing_keys(official, tmp_path):
    root = tmp_path / "c"
    shutil.copytree(official["t2v"].root, root)
    f = root / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(f))
    save_file({**sd, "blocks.0.extra.weight": torch.zeros(2), "lora_up.weight": torch.zeros(2)}, str(f))
    with pytest.raises(PackageError) as err:
        open_checkpoint(root, variant="wan2.1-t2v-1.3b")
    _one_line(err, str(f), "2 unexpected", "lora_up.weight")

    sd.pop("blocks.1.ffn.2.bias")
    save_file(sd, str(f))
    ckpt = open_checkpoint(root, variant="wan2.1-t2v-1.3b")  # lazy: found when the module loads
    with pytest.raises(PackageError) as err:
        ckpt.transformer("dit")
    _one_line(err, str(f), "missing 1 key", "blocks.1.ffn.net.2.bias")


def test_missing_component(official, tmp_path):
    root = tmp_path / "c"
    shutil.copytree(official["ti2v"].root, root)
    (root / "Wan2.2_VAE.pth").unlink()
    with pytest.raises(PackageError) as err:
        open_checkpoint(root, variant="wan2.2-ti2v-5b")
    _one_line(err, "VAE", "missing")
    with pytest.raises(PackageError) as err:
        open_checkpoint(tmp_path / "nowhere")
    _one_line(err, "nowhere")
