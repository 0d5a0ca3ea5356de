"""LoRA at load time (issue 12 item 3) against diffusers `load_lora_weights` + `set_adapters`.

Tiny random Wan2.1 (session package of conftest.py) and Wan2.2 A14B checkpoints; the LoRA files are
written here, one per key format of shared/reference/fast_paths.md A.2, with random A/B. Both sides run
the same 4-step CFG-free Euler recipe from the same noise (4 DiT calls: cheap, and every step sees the
merged weights). Where diffusers has no reader for a format (VideoX-Fun `lora_unet__`, DiffSynth
`.default.`) the file holds the same tensors as one diffusers reads (kohya, PEFT) and vidrt must give
identical frames for both; where diffusers ignores a key kind (`diff_m`, a norm's `.diff`, A.3) the
reference is diffusers run on weights merged by hand (the test says which).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tiny import TINY_VARIANT, write_diffusers_checkpoint
from vidrt.errors import UsageError
from vidrt.package import contracts as C
from vidrt.package.recipes import LoraRef
from vidrt.pipeline import Pipeline
from vidrt.request import Request

pytest.importorskip("peft")  # diffusers' LoRA loading needs it

PROMPT = "a red cat walks on the beach"
W, H, F = 64, 64, 9
RANK = 4
LINEARS = (("self_attn.q", "attn1.to_q"), ("self_attn.k", "attn1.to_k"), ("self_attn.v", "attn1.to_v"),
           ("self_attn.o", "attn1.to_out.0"), ("cross_attn.q", "attn2.to_q"), ("cross_attn.k", "attn2.to_k"),
           ("cross_attn.v", "attn2.to_v"), ("cross_attn.o", "attn2.to_out.0"), ("ffn.0", "ffn.net.0.proj"),
           ("ffn.2", "ffn.net.2"))
NUM_BLOCKS = 2
MIN_DB = 70.0  # a correct merge measures ~90 dB here; an unscaled alpha or diff_b lands far lower


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def random_pairs(seed: int, transformer, alpha: float | None) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
    """(block, original module) -> {A, B[, alpha]} for every block Linear, shaped from the model."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for b in range(NUM_BLOCKS):
        for orig, diff in LINEARS:
            weight = transformer.get_submodule(f"blocks.{b}.{diff}").weight
            n_out, n_in = weight.shape
            part = {"A": torch.randn(RANK, n_in, generator=g) / n_in**0.5,
                    "B": torch.randn(n_out, RANK, generator=g) * 1.0}
            if alpha is not None:
                part["alpha"] = torch.tensor(alpha)
            out[(b, orig)] = part
    return out


def write_lora(path, pairs, fmt: str, extra: dict[str, torch.Tensor] | None = None):
    """The same tensors under one key format of fast_paths.md A.2 (block modules: write_any_lora)."""
    return write_any_lora(path, pairs, fmt, extra)


def distill_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    class Distill(FlowMatchEulerDiscreteScheduler):
        def set_timesteps(self, num_inference_steps=None, device=None, **_):
            return super().set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25], device=device)

    return Distill(num_train_timesteps=1000, shift=5.0)


def diffusers_pipe(root):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(root, scheduler=distill_scheduler())
    pipe.text_encoder.config._attn_implementation = "eager"
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_frames(pipe, noise: np.ndarray) -> np.ndarray:
    out = pipe(prompt=PROMPT, height=H, width=W, num_frames=F, num_inference_steps=4, guidance_scale=1.0,
               latents=torch.from_numpy(noise)[None], output_type="np").frames[0]
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def ours(pipe: Pipeline, noise: np.ndarray, loras=()) -> np.ndarray:
    req = Request(prompt=PROMPT, width=W, height=H, num_frames=F, recipe="lightx2v-4step", seed=0,
                  loras=tuple(loras))
    return pipe.run(req, noise=noise).frames


@pytest.fixture(scope="module")
def t2v(tiny_t2v_checkpoint, tiny_t2v_package):
    pipe = Pipeline.load(tiny_t2v_package)
    noise = np.random.default_rng(5).standard_normal(pipe.manifest.model.latent_shape(W, H, F), dtype=np.float32)
    return tiny_t2v_checkpoint, pipe, noise


def test_every_key_format_and_two_loras_match_diffusers(t2v, tmp_path):
    root, pipe, noise = t2v
    ref_pipe = diffusers_pipe(root)
    tr = ref_pipe.transformer
    plain = ours(pipe, noise)
    assert psnr(plain, diffusers_frames(ref_pipe, noise)) >= MIN_DB

    p1 = random_pairs(1, tr, alpha=2.0)  # alpha/rank = 0.5
    p2 = random_pairs(2, tr, alpha=None)  # PEFT without alpha: scale 1
    files = {fmt: write_lora(tmp_path / f"{fmt}.safetensors", p1, fmt)
             for fmt in ("original", "mixed", "kohya", "videox")}
    files.update({fmt: write_lora(tmp_path / f"{fmt}.safetensors", p2, fmt) for fmt in ("peft", "diffsynth")})
    results = {}
    for fmt, path in files.items():
        got = ours(pipe, noise, [LoraRef(str(path), 1.0)])
        results[fmt] = got
        if fmt in ("videox", "diffsynth"):
            continue  # diffusers reads neither: checked against kohya / peft below
        ref_pipe.load_lora_weights(str(path), adapter_name=fmt)
        ref_pipe.set_adapters([fmt], [1.0])
        value = psnr(got, diffusers_frames(ref_pipe, noise))
        ref_pipe.delete_adapters(fmt)
        print(f"{fmt}: {value:.1f} dB vs diffusers; {psnr(got, plain):.1f} dB vs no LoRA")
        assert value >= MIN_DB, fmt
        assert psnr(got, plain) < 40.0, "the LoRA must change the clip, or this test shows nothing"
    assert np.array_equal(results["videox"], results["kohya"])
    assert np.array_equal(results["diffsynth"], results["peft"])
    assert psnr(results["original"], results["peft"]) < 40.0  # different LoRAs, different clips

    # two LoRAs at once, different strengths (one negative)
    ref_pipe.load_lora_weights(str(files["original"]), adapter_name="one")
    ref_pipe.load_lora_weights(str(files["peft"]), adapter_name="two")
    ref_pipe.set_adapters(["one", "two"], [0.7, -0.4])
    got = ours(pipe, noise, [LoraRef(str(files["original"]), 0.7), LoraRef(str(files["peft"]), -0.4)])
    value = psnr(got, diffusers_frames(ref_pipe, noise))
    print(f"two LoRAs (0.7, -0.4): {value:.1f} dB vs diffusers")
    assert value >= MIN_DB
    # a strength change recomputes from the base weights; back to no LoRA gives the plain clip again
    assert np.array_equal(ours(pipe, noise), plain)


def test_diff_b_matches_diffusers(t2v, tmp_path):
    """LightX2V full bias deltas on some modules: diffusers turns them into PEFT lora_B.bias; with only some
    modules covered its default low_cpu_mem_usage path leaves biases on the meta device, hence False."""
    root, pipe, noise = t2v
    ref_pipe = diffusers_pipe(root)
    tr = ref_pipe.transformer
    pairs = random_pairs(3, tr, alpha=8.0)
    g = torch.Generator().manual_seed(4)
    biases = {f"diffusion_model.blocks.{b}.{orig}.diff_b": torch.randn(tr.get_submodule(f"blocks.{b}.{diff}").weight
                                                                       .shape[0], generator=g) * 0.3
              for b in range(NUM_BLOCKS) for orig, diff in LINEARS[:5]}
    path = write_lora(tmp_path / "diff_b.safetensors", pairs, "original", biases)
    got = ours(pipe, noise, [LoraRef(str(path), 0.8)])
    ref_pipe.load_lora_weights(str(path), adapter_name="db", low_cpu_mem_usage=False)
    ref_pipe.set_adapters(["db"], [0.8])
    value = psnr(got, diffusers_frames(ref_pipe, noise))
    no_bias = ours(pipe, noise, [LoraRef(str(write_lora(tmp_path / "nb.safetensors", pairs, "original")), 0.8)])
    print(f"diff_b: {value:.1f} dB vs diffusers; {psnr(got, no_bias):.1f} dB vs the same LoRA without diff_b")
    assert value >= MIN_DB
    assert psnr(got, no_bias) < 50.0


def test_diff_m_and_norm_diff_match_hand_merged_weights(t2v, tmp_path):
    """diffusers drops `blocks.N.diff_m` and norm `.diff` (fast_paths.md A.3), so the reference here is
    diffusers' WanPipeline on weights merged by hand: scale_shift_table += s * diff_m, norm_q += s * diff."""
    root, pipe, noise = t2v
    ref_pipe = diffusers_pipe(root)
    tr = ref_pipe.transformer
    g = torch.Generator().manual_seed(6)
    s = 0.6
    extra = {}
    with torch.no_grad():
        for b in range(NUM_BLOCKS):
            dm = torch.randn(tr.blocks[b].scale_shift_table.shape, generator=g) * 0.6
            dn = torch.randn(tr.blocks[b].attn1.norm_q.weight.shape, generator=g) * 1.0
            extra[f"diffusion_model.blocks.{b}.diff_m"] = dm
            extra[f"diffusion_model.blocks.{b}.self_attn.norm_q.diff"] = dn
            tr.blocks[b].scale_shift_table += s * dm
            tr.blocks[b].attn1.norm_q.weight += s * dn
    path = write_lora(tmp_path / "diff_m.safetensors", {}, "original", extra)
    got = ours(pipe, noise, [LoraRef(str(path), s)])
    value = psnr(got, diffusers_frames(ref_pipe, noise))
    print(f"diff_m + norm diff: {value:.1f} dB vs diffusers on hand-merged weights")
    assert value >= MIN_DB
    assert psnr(got, ours(pipe, noise)) < 40.0


def test_bad_loras_refused_or_reported(t2v, tmp_path):
    root, pipe, noise = t2v
    from diffusers import WanTransformer3DModel  # noqa: F401  (the tiny model's shapes come from its config)

    # another architecture: SD-style keys
    sd15 = tmp_path / "sd15.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4)}, str(sd15))
    with pytest.raises(UsageError, match="not a LoRA for this Wan DiT"):
        Pipeline.load(pipe.package, loras=[(str(sd15), 1.0)])
    # another model size: a 1.3B-wide LoRA on this 64-wide model
    wide = tmp_path / "wide.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, 1536),
               "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(1536, 4)}, str(wide))
    with pytest.raises(UsageError, match="does not fit this model"):
        Pipeline.load(pipe.package, loras=[(str(wide), 1.0)])
    # I2V keys on a T2V model (LightX2V's Wan2.2-I2V LoRAs): reported once by name, the rest applied
    ref = diffusers_pipe(root).transformer
    mixed = write_lora(tmp_path / "i2v.safetensors", random_pairs(7, ref, 4.0), "original",
                       {"diffusion_model.blocks.0.cross_attn.k_img.lora_down.weight": torch.zeros(4, 64),
                        "diffusion_model.blocks.0.cross_attn.k_img.lora_up.weight": torch.zeros(64, 4)})
    warnings: list[str] = []
    loaded = Pipeline.load(pipe.package, loras=[(str(mixed), 1.0)], warn=warnings.append)
    assert len(warnings) == 1 and "k_img" in warnings[0] and "2 key(s)" in warnings[0], warnings
    assert loaded.loras[0].strength == 1.0
    with pytest.raises(UsageError, match="no such file"):
        Pipeline.load(pipe.package, loras=[(str(tmp_path / "missing.safetensors"), 1.0)])
    not_st = tmp_path / "junk.safetensors"
    not_st.write_bytes(b"\xff" * 64)
    with pytest.raises(UsageError, match="not a safetensors LoRA file"):
        Pipeline.load(pipe.package, loras=[(str(not_st), 1.0)])


def test_damaged_loras_and_strengths_refused_before_any_work(t2v, tmp_path):
    """Each a one-line UsageError naming the file (and key) before any merge: ranks that differ, a
    non-scalar alpha, integer weights, NaN/Inf values, a truncated file, a folder, a NaN/Inf strength."""
    _, pipe, _ = t2v
    q = "diffusion_model.blocks.0.self_attn.q"

    def refused(tensors: dict[str, torch.Tensor], *needles: str, name: str = "bad.safetensors") -> None:
        path = tmp_path / name
        save_file(tensors, str(path))
        with pytest.raises(UsageError) as err:
            Pipeline.load(pipe.package, loras=[(str(path), 1.0)])
        assert str(path) in str(err.value) and "\n" not in str(err.value)
        for needle in needles:
            assert needle in str(err.value), str(err.value)

    ok = {f"{q}.lora_down.weight": torch.ones(4, 64), f"{q}.lora_up.weight": torch.ones(64, 4)}
    refused({f"{q}.lora_down.weight": torch.ones(4, 64), f"{q}.lora_up.weight": torch.ones(64, 8)},
            "rank 4", "[64, 8]", "blocks.0")
    refused({**ok, f"{q}.alpha": torch.ones(3)}, "alpha", "[3]")
    refused({**ok, f"{q}.lora_up.weight": torch.ones(64, 4, dtype=torch.int32)}, "I32", "lora_up")
    for bad in (float("nan"), float("inf")):
        refused({**ok, f"{q}.lora_down.weight": torch.full((4, 64), bad)}, "NaN or Inf", "lora_down")
    whole = tmp_path / "whole.safetensors"
    save_file(ok, str(whole))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(whole.read_bytes()[:-100])
    with pytest.raises(UsageError, match="truncated or damaged .*re-download it"):
        Pipeline.load(pipe.package, loras=[(str(cut), 1.0)])
    with pytest.raises(UsageError, match="is a folder"):
        Pipeline.load(pipe.package, loras=[(str(tmp_path), 1.0)])
    for strength in (float("nan"), float("inf")):
        with pytest.raises(UsageError, match="not a finite number"):
            Pipeline.load(pipe.package, loras=[(str(whole), strength)])
        with pytest.raises(UsageError, match="not a finite number"):
            Pipeline.load(pipe.package, loras=[LoraRef(str(whole), strength)])
    for arg in (f"{whole}:abc", f"{whole}:nan", f"{whole}:inf", f"{whole}:"):
        with pytest.raises(UsageError, match=r"not a finite number.*FILE\[:STRENGTH\]"):
            Pipeline.load(pipe.package, loras=[arg])
    # Request takes the same plain forms as Pipeline.load(loras=)
    assert Request(prompt="x", loras=(str(whole), (str(whole), 0.5))).loras == (  # type: ignore[arg-type]
        LoraRef(str(whole), 1.0), LoraRef(str(whole), 0.5))


@pytest.fixture(scope="module")
def a14b(tmp_path_factory):
    from vidrt.export.package import export_package

    root = tmp_path_factory.mktemp("lora-a14b")
    write_diffusers_checkpoint(root, "a14b")
    return root, export_package(root, root / "package", variant=TINY_VARIANT["a14b"], progress=False)


@pytest.mark.slow  # its own A14B export + diffusers (~2 min idle): `make test-all`, kept out of CI's 90 minutes
def test_a14b_one_lora_per_expert_matches_diffusers(a14b, tmp_path):
    """Lightning / LightX2V A14B: a high-noise LoRA into `transformer`, a low-noise one into `transformer_2`
    (diffusers load_into_transformer_2=True); the 4-step recipe runs 2 steps on each expert."""
    root, package = a14b
    pipe = Pipeline.load(package)
    noise = np.random.default_rng(8).standard_normal(pipe.manifest.model.latent_shape(W, H, F), dtype=np.float32)
    ref_pipe = diffusers_pipe(root)
    high = write_lora(tmp_path / "high.safetensors", random_pairs(9, ref_pipe.transformer, 4.0), "original")
    low = write_lora(tmp_path / "low.safetensors", random_pairs(10, ref_pipe.transformer_2, None), "peft")
    got = ours(pipe, noise, [LoraRef(str(high), 1.0, "dit_high"), LoraRef(str(low), 0.9, "dit_low")])
    ref_pipe.load_lora_weights(str(high), adapter_name="high")
    ref_pipe.load_lora_weights(str(low), adapter_name="low", load_into_transformer_2=True)
    ref_pipe.transformer.set_adapters(["high"], [1.0])
    ref_pipe.transformer_2.set_adapters(["low"], [0.9])
    value = psnr(got, diffusers_frames(ref_pipe, noise))
    print(f"A14B per-expert LoRAs: {value:.1f} dB vs diffusers")
    assert value >= MIN_DB
    assert psnr(got, ours(pipe, noise)) < 40.0


def test_export_lora_bakes_the_same_weights(t2v, tmp_path):
    """`vidrt export --lora` writes W0 + s * dW into the DiT's data file (export/package_extras.bake_loras):
    the baked package makes the same clip as the LoRA applied at load time."""
    import shutil
    from dataclasses import replace

    from vidrt.export.package_extras import bake_loras
    from vidrt.package.manifest import load_manifest, write_manifest

    root, pipe, noise = t2v
    lora = write_lora(tmp_path / "bake.safetensors", random_pairs(11, diffusers_pipe(root).transformer, 2.0),
                      "kohya")
    baked = tmp_path / "baked"
    shutil.copytree(pipe.package, baked)
    manifest = load_manifest(baked, verify=False)
    changed = bake_loras(baked, manifest.components, "dit", [LoraRef(str(lora), 0.6)])
    assert "dit" in changed
    write_manifest(baked, replace(manifest, components={**manifest.components, **changed}))
    at_load = ours(pipe, noise, [LoraRef(str(lora), 0.6)])
    assert np.array_equal(ours(Pipeline.load(baked), noise), at_load)
    assert psnr(at_load, ours(pipe, noise)) < 40.0


def test_export_refuses_a_damaged_lora_before_any_work(tiny_t2v_checkpoint, tmp_path, capsys):
    """`vidrt export --lora` reads the LoRA before exporting (it used to fail only when baking, after the
    encoders): exit 2, one line naming the file, nothing written."""
    from vidrt.cli.app import main

    q = "diffusion_model.blocks.0.self_attn.q"
    nan = tmp_path / "nan.safetensors"
    save_file({f"{q}.lora_down.weight": torch.full((4, 64), float("nan")),
               f"{q}.lora_up.weight": torch.ones(64, 4)}, str(nan))
    out = tmp_path / "pkg"
    with pytest.raises(SystemExit) as exit_:
        main(["export", "--model", str(tiny_t2v_checkpoint), "--variant", TINY_VARIANT["t2v"], "--out", str(out),
              "--lora", str(nan)])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and "\n" not in err, err
    assert f"--lora {nan}: tensor {q}.lora_down.weight holds NaN or Inf" in err, err
    assert not out.exists()


# ---- image-to-video DiTs (issue 16 item 3) ------------------------------------------------------

# Wan2.1 I2V/FLF2V image branch (fast_paths.md A.1): per block, and the CLIP-token MLP (global)
IMAGE_BLOCK = (("cross_attn.k_img", "attn2.add_k_proj"), ("cross_attn.v_img", "attn2.add_v_proj"))
IMAGE_GLOBAL = (("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"),
                ("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2"))


def i2v_pairs(seed: int, transformer, alpha: float | None, image_mlp: bool) -> dict:
    """random_pairs over the block Linears plus k_img/v_img of every block, and (image_mlp) img_emb's
    two Linears without alpha (diffusers' converter scales no img_emb alpha and refuses the key)."""
    g = torch.Generator().manual_seed(seed)
    out = random_pairs(seed, transformer, alpha)
    mods = [((b, o), f"blocks.{b}.{d}") for b in range(NUM_BLOCKS) for o, d in IMAGE_BLOCK]
    mods += [((None, o), d) for o, d in IMAGE_GLOBAL] if image_mlp else []
    for key, module in mods:
        n_out, n_in = transformer.get_submodule(module).weight.shape
        out[key] = {"A": torch.randn(RANK, n_in, generator=g) / n_in**0.5, "B": torch.randn(n_out, RANK, generator=g)}
        if alpha is not None and key[0] is not None:
            out[key]["alpha"] = torch.tensor(alpha)
    return out


def write_any_lora(path, pairs, fmt: str, extra: dict | None = None):
    """write_lora for block and global modules: (block or None, original module) -> {A, B[, alpha]}."""
    diff_of = dict(LINEARS + IMAGE_BLOCK + IMAGE_GLOBAL)
    sd = {}
    for (b, orig), part in pairs.items():
        at = "" if b is None else f"blocks.{b}."
        stem, down, up = {
            "peft": (f"transformer.{at}{diff_of[orig]}", "lora_A.weight", "lora_B.weight"),
            "original": (f"diffusion_model.{at}{orig}", "lora_down.weight", "lora_up.weight"),
            "mixed": (f"diffusion_model.{at}{orig}", "lora_A.weight", "lora_B.weight"),
            "kohya": (f"lora_unet_{(at + orig).replace('.', '_')}", "lora_down.weight", "lora_up.weight"),
            "videox": (f"lora_unet__{(at + orig).replace('.', '_')}", "lora_down.weight", "lora_up.weight"),
            "diffsynth": (f"{at}{orig}", "lora_A.default.weight", "lora_B.default.weight"),
        }[fmt]
        sd[f"{stem}.{down}"], sd[f"{stem}.{up}"] = part["A"], part["B"]
        if "alpha" in part:
            sd[f"{stem}.alpha"] = part["alpha"]
    sd.update(extra or {})
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def wan21_i2v_dit(tmp_path_factory):
    """A tiny Wan2.1 I2V checkpoint (CLIP branch live), its DiT alone exported with its weight records
    (no package: the LoRA path is the DiT's), diffusers' WanImageToVideoPipeline of the same folder, and
    one set of DiT inputs (36 channels, 512 text rows, 5 CLIP tokens)."""
    from diffusers import WanImageToVideoPipeline
    from tiny import write_diffusers_wan21_i2v
    from vidrt.export.checkpoints import open_checkpoint
    from vidrt.export.onnx_export import export_dit, weight_refs

    root = tmp_path_factory.mktemp("lora-wan21-i2v")
    write_diffusers_wan21_i2v(root)
    ckpt = open_checkpoint(root, "wan2.1-i2v-14b-480p")
    path = root / "dit.onnx"
    contract = export_dit(None, path, ckpt.spec, state_dict=ckpt.transformer_readers("dit"),  # as vidrt export
                          config=ckpt.transformer_config("dit"), external_data=True)
    pipe = WanImageToVideoPipeline.from_pretrained(root, scheduler=distill_scheduler())
    rng = np.random.default_rng(13)
    feeds = {C.LATENTS: rng.standard_normal((1, 36, 3, 8, 8), dtype=np.float32),
             C.TIMESTEP: np.array([700.0], np.float32),
             C.CONTEXT: rng.standard_normal((1, 512, 64), dtype=np.float32),
             C.IMAGE_EMBEDS: rng.standard_normal((1, 5, 16), dtype=np.float32)}
    return path, contract, weight_refs(path), pipe, feeds


def _vidrt_dit(dit, loras) -> tuple[np.ndarray, set[str]]:
    """The exported DiT on ONNX Runtime with the LoRAs merged as vidrt.lora.LoraMerger merges them
    (lora_deltas -> merge_into from the memory-mapped base -> add_external_initializers)."""
    from vidrt.backends.ort import OrtEngine
    from vidrt.lora import base_reader, lora_deltas, merge_into, read_lora

    path, contract, weights, _, feeds = dit
    deltas = lora_deltas([(read_lora(p), s) for p, s in loras], weights, pytest.fail)
    merged = merge_into(deltas, weights, base_reader(path.with_name("dit.onnx.data"), weights)) if deltas else {}
    return OrtEngine("dit", path, contract, weights=merged).run(feeds)[C.VELOCITY], set(deltas)


def _diffusers_dit(dit, adapters) -> np.ndarray:
    _, _, _, pipe, feeds = dit
    for name, (path, _) in adapters.items():
        pipe.load_lora_weights(str(path), adapter_name=name, low_cpu_mem_usage=False)
    if adapters:
        pipe.set_adapters(list(adapters), [s for _, s in adapters.values()])
    try:
        with torch.no_grad():
            out = pipe.transformer(torch.from_numpy(feeds[C.LATENTS]), torch.from_numpy(feeds[C.TIMESTEP]),
                                   torch.from_numpy(feeds[C.CONTEXT]),
                                   encoder_hidden_states_image=torch.from_numpy(feeds[C.IMAGE_EMBEDS]),
                                   return_dict=False)[0]
    finally:
        if adapters:
            pipe.delete_adapters(list(adapters))
    return out.numpy()


MIN_SNR_DB = 95.0  # DiT output, fp32 both sides: ~115 dB measured; a wrong scale or module lands far lower


def snr_db(got: np.ndarray, ref: np.ndarray) -> float:
    return float(10 * np.log10(np.mean(ref.astype(np.float64) ** 2) / np.mean((got - ref).astype(np.float64) ** 2)))


def test_i2v_loras_match_diffusers_on_the_image_branch(wan21_i2v_dit, tmp_path):
    """Issue 16 item 3 on a tiny Wan2.1 I2V DiT: LoRAs with k_img / v_img (every block) and img_emb keys,
    in every key format, against diffusers' WanImageToVideoPipeline.load_lora_weights (DiT output,
    signal-to-error in dB). A T2V LoRA leaves the image branch untouched, as diffusers does (it fills
    add_k_proj/add_v_proj with zero LoRAs, `_maybe_expand_t2v_lora_for_i2v`)."""
    dit = wan21_i2v_dit
    tr = dit[3].transformer
    plain, _ = _vidrt_dit(dit, [])
    assert snr_db(plain, _diffusers_dit(dit, {})) >= MIN_SNR_DB  # the export itself
    with_mlp, blocks_only = i2v_pairs(1, tr, alpha=2.0, image_mlp=True), i2v_pairs(2, tr, 8.0, image_mlp=False)
    bias = {f"diffusion_model.blocks.{b}.cross_attn.k_img.diff_b": torch.randn(64) * 0.3 for b in range(NUM_BLOCKS)}
    files = {"original": write_any_lora(tmp_path / "original.safetensors", with_mlp, "original", bias),
             "mixed": write_any_lora(tmp_path / "mixed.safetensors", with_mlp, "mixed"),
             "kohya": write_any_lora(tmp_path / "kohya.safetensors", blocks_only, "kohya"),
             "videox": write_any_lora(tmp_path / "videox.safetensors", blocks_only, "videox"),
             "peft": write_any_lora(tmp_path / "peft.safetensors", i2v_pairs(3, tr, None, True), "peft"),
             "diffsynth": write_any_lora(tmp_path / "diffsynth.safetensors", i2v_pairs(3, tr, None, True), "diffsynth")}
    got = {}
    figures = []
    for fmt, path in files.items():
        got[fmt], params = _vidrt_dit(dit, [(path, 0.8)])
        assert {"blocks.1.attn2.add_k_proj.weight", "blocks.0.attn2.add_v_proj.weight"} <= params, fmt
        if fmt in ("original", "mixed", "peft"):
            assert "condition_embedder.image_embedder.ff.net.2.weight" in params, fmt
        if fmt in ("videox", "diffsynth"):
            continue  # diffusers reads neither: equal to kohya / peft below
        value = snr_db(got[fmt], _diffusers_dit(dit, {fmt: (path, 0.8)}))
        figures.append(f"{fmt} {value:.1f} dB")
        assert value >= MIN_SNR_DB, fmt
        assert snr_db(got[fmt], plain) < 40.0, "the LoRA must change the output"
    assert np.array_equal(got["videox"], got["kohya"]) and np.array_equal(got["diffsynth"], got["peft"])
    # the image branch matters: the same LoRA without its k_img/v_img/img_emb keys gives another output
    text_only = {k: v for k, v in with_mlp.items() if k[1] in dict(LINEARS)}
    no_image = write_any_lora(tmp_path / "no_image.safetensors", text_only, "original")
    assert snr_db(_vidrt_dit(dit, [(no_image, 0.8)])[0], got["original"]) < 40.0

    # a T2V LoRA (no image keys) on the I2V DiT: nothing merged into the image branch; = diffusers
    t2v = write_lora(tmp_path / "t2v.safetensors", random_pairs(4, tr, 4.0), "original")
    out, params = _vidrt_dit(dit, [(t2v, 1.0)])
    assert not any("add_k_proj" in p or "add_v_proj" in p or "image_embedder" in p for p in params)
    value = snr_db(out, _diffusers_dit(dit, {"t2v": (t2v, 1.0)}))
    figures.append(f"T2V LoRA {value:.1f} dB")
    assert value >= MIN_SNR_DB
    print("I2V LoRAs vs diffusers (DiT output):", ", ".join(figures))


def test_equal_parameters_keep_their_own_initializers(tmp_path):
    """A LoRA is merged by initializer name, so the DiT export keeps one initializer per parameter even
    where two parameters hold the same values (onnxscript's DeduplicateInitializersPass would give them
    one shared tensor, and a diff_b on one module would change both). Zero text-path biases, as the
    bundled model trains them, are the case that happened."""
    from dataclasses import replace

    from diffusers import WanTransformer3DModel
    from tiny import diffusers_configs
    from vidrt.export.onnx_export import export_dit, weight_refs
    from vidrt.package.registry import DiTConfig, get_variant

    torch.manual_seed(0)
    config = diffusers_configs("t2v")[0]
    model = WanTransformer3DModel(**config)
    spec = get_variant("wan2.1-t2v-1.3b")
    spec = replace(spec, dit=DiTConfig(dim=64, ffn_dim=128, num_layers=2, num_heads=2, in_channels=16,
                                       out_channels=16, text_dim=64, freq_dim=32))
    zeroed = [f"blocks.{b}.attn2.{p}.bias" for b in range(2) for p in ("to_k", "to_v")]
    with torch.no_grad():
        for name in zeroed:
            model.get_parameter(name).zero_()
    path = tmp_path / "dit.onnx"
    export_dit(model, path, spec, external_data=True)
    records = weight_refs(path)
    assert set(zeroed) <= set(records), sorted(set(zeroed) - set(records))
    assert len({records[n].initializer for n in zeroed}) == len(zeroed)  # four tensors, not one
