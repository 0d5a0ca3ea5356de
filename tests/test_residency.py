"""The residency plan: parameter formulas against the measured counts and real modules, the byte
arithmetic against actual buffers, and the decisions on a 24 GB card."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from click.testing import CliRunner
from trt_fakes import BF16, FLOAT, FakeCuda, FakePlan, FakeTensorRT
from vidrt.backends.cuda import Stream
from vidrt.backends.residency import (
    VAE_CACHE_SLOTS,
    VAE_DECODER_PARAMS,
    GiB,
    dit_param_count,
    dit_sizes,
    dit_weight_bytes,
    io_bytes,
    make_plan,
    text_param_count,
)
from vidrt.backends.tensorrt import ScratchArena, TrtEngine
from vidrt.package import contracts as C
from vidrt.package.contracts import resolve_shape
from vidrt.package.registry import VARIANTS, DiTConfig, TextConfig

BUDGET_24GB = 24 * 10**9
TINY_DIT = DiTConfig(dim=64, ffn_dim=128, num_layers=2, num_heads=2, freq_dim=32, text_dim=64)
TINY_TEXT = TextConfig(vocab_size=256, d_model=64, d_ff=128, num_layers=2, num_heads=4, num_buckets=32)
TINY = dataclasses.replace(VARIANTS["wan2.1-t2v-1.3b"], name="tiny", dit=TINY_DIT, text=TINY_TEXT)


def test_dit_param_formula_matches_the_measured_counts() -> None:
    # reference/wan_official.md: params measured by meta-device instantiation of the official WanModel
    assert dit_param_count(VARIANTS["wan2.1-t2v-1.3b"].dit) == 1_418_996_800  # 1.419 B
    assert dit_param_count(VARIANTS["wan2.1-t2v-14b"].dit) == 14_288_491_584  # 14.288 B
    assert dit_param_count(VARIANTS["wan2.2-t2v-a14b"].dit) == 14_288_491_584
    assert dit_param_count(VARIANTS["wan2.2-ti2v-5b"].dit) == 4_999_787_712  # 5.000 B
    assert text_param_count(TextConfig()) == 5_680_910_336  # umT5-XXL encoder, 5.68 B


def test_param_formulas_match_real_modules_of_a_tiny_config() -> None:
    pytest.importorskip("torch")
    from diffusers import WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    dit = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=16,
                                out_channels=16, text_dim=64, freq_dim=32, ffn_dim=128, num_layers=2)
    assert sum(p.numel() for p in dit.parameters()) == dit_param_count(TINY_DIT)
    te = UMT5EncoderModel(UMT5Config(vocab_size=256, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                     relative_attention_num_buckets=32, feed_forward_proj="gated-gelu"))
    assert sum(p.numel() for p in te.parameters()) == text_param_count(TINY_TEXT)


def test_vae_cache_table_matches_a_trace_of_the_full_size_decoders() -> None:
    torch = pytest.importorskip("torch")
    from diffusers import AutoencoderKLWan
    from vidrt.export.components import VAEFirstGraph, count_vae_caches

    configs = {"wan2.1": {}, "wan2.2": dict(base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True,
                                            in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16,
                                            latents_mean=[0.0] * 48, latents_std=[1.0] * 48)}
    for kind, cfg in configs.items():
        with torch.device("meta"):
            vae = AutoencoderKLWan(**cfg)
        n = count_vae_caches(vae)
        with torch.no_grad():
            caches = VAEFirstGraph(vae, n)(torch.zeros(1, vae.config.z_dim, 1, 3, 5, device="meta"))[1:]
        assert tuple((c.shape[1], c.shape[3] // 3) for c in caches) == VAE_CACHE_SLOTS[kind]
        params = sum(p.numel() for p in [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()])
        assert params == VAE_DECODER_PARAMS[kind]


def test_io_bytes_are_the_contract_shapes_times_dtypes() -> None:
    spec = VARIANTS["wan2.2-ti2v-5b"]
    contract = C.dit_contract(spec, "float16")
    sizes = dit_sizes(spec, 1280, 704, 121, 2)
    arrays = [np.zeros(resolve_shape(t.shape, sizes), np.dtype(t.dtype)) for t in contract.inputs + contract.outputs]
    assert io_bytes(contract, sizes) == sum(a.nbytes for a in arrays)
    assert arrays[1].shape == (2, 27_280)  # TI2V: per-token timestep


def test_plan_io_matches_the_tensorrt_backends_actual_buffers() -> None:
    """The plan's I/O item for the tiny DiT equals what the TensorRT backend allocates for a plan
    whose profile max is the planned shape (two independent computations of the same bytes)."""
    spec, (w, h, frames) = TINY, (64, 48, 9)
    plan = make_plan(spec, w, h, frames, BUDGET_24GB, "bf16")
    io_item = next(i for s in plan.stages for i in s.items if i.name == "dit I/O")
    contract = C.dit_contract(spec, "bfloat16")
    # The expectation by hand, not from the plan's own dit_sizes: Wan VAE stride 4 (time) x 8 x 8,
    # 16 latent channels, 1 + (9 - 1) / 4 = 3 latent frames of 48/8 x 64/8; CFG batch 2 (the profile
    # maximum the backend sizes its buffers for); 512 text rows of text_dim 64.
    shapes = {C.LATENTS: (2, 16, 3, 6, 8), C.TIMESTEP: (2,), C.CONTEXT: (2, 512, 64)}
    lo = {n: (1, *s[1:]) for n, s in shapes.items()}
    dtypes = {C.LATENTS: BF16, C.TIMESTEP: FLOAT, C.CONTEXT: BF16}
    fake_plan = FakePlan(inputs={n: (dtypes[n], [(lo[n], s, s)]) for n, s in shapes.items()},
                         outputs={C.VELOCITY: (BF16, lambda s: s[C.LATENTS])},
                         compute=lambda x: {C.VELOCITY: x[C.LATENTS]})
    cuda = FakeCuda()
    mod = FakeTensorRT(cuda, plans={b"p": fake_plan}).module()
    stream = Stream(cuda)
    engine = TrtEngine("dit", b"p", contract, trt_mod=mod, runtime=mod.Runtime(None), cuda=cuda, stream=stream,
                       arena=ScratchArena(cuda, stream))
    assert engine.device_bytes == io_item.bytes
    assert plan.all_resident  # the tiny model fits a 24 GB card whole


def test_weights_by_precision() -> None:
    cfg = VARIANTS["wan2.2-t2v-a14b"].dit
    bf16, fp8 = dit_weight_bytes(cfg, "bf16"), dit_weight_bytes(cfg, "fp8", "linear")
    n = dit_param_count(cfg)
    assert 2 * n < bf16 < 2.1 * n  # + the fp32 norms, modulation and time projection
    assert n < fp8 < bf16 and dit_weight_bytes(cfg, "fp8", "ffn") > fp8
    assert dit_weight_bytes(cfg, "fp32") == 4 * n


def test_5b_fp8_720p_fits_24gb_per_stage() -> None:
    plan = make_plan(VARIANTS["wan2.2-ti2v-5b"], 1280, 704, 121, BUDGET_24GB, "fp8")
    assert plan.fits and not plan.all_resident and not plan.streamed
    names = [s.name for s in plan.stages]
    assert names == ["text", "denoise", "decode"] and plan.decode_order == "tile"  # bounded by the tile
    assert plan.stages[0].release == (C.TEXT_ENCODER,)  # the text encoder leaves before denoising
    assert all(s.peak <= plan.budget for s in plan.stages)


def test_a14b_swaps_experts_and_streams_weights_on_24gb() -> None:
    spec = VARIANTS["wan2.2-t2v-a14b"]
    for precision in ("fp8", "bf16"):
        plan = make_plan(spec, 1280, 720, 81, BUDGET_24GB, precision)
        assert [s.name for s in plan.stages] == ["text", "denoise high", "denoise low", "decode"]
        assert plan.stages[1].load == ("dit_high",) and plan.stages[1].release == ("dit_high",)
        assert plan.fits and all(s.peak <= plan.budget for s in plan.stages)
        assert set(plan.streamed) == {"dit_high", "dit_low"}
    assert make_plan(spec, 1280, 720, 81, BUDGET_24GB, "bf16").streamed["dit_low"] > \
        make_plan(spec, 1280, 720, 81, BUDGET_24GB, "fp8").streamed["dit_low"]
    big = make_plan(spec, 1280, 720, 81, 140 * GiB, "bf16")
    assert big.all_resident and big.cfg_batch == 2 and not big.streamed


def test_too_small_a_card_is_reported_not_overcommitted() -> None:
    plan = make_plan(VARIANTS["wan2.2-t2v-a14b"], 1280, 720, 81, 8 * GiB, "fp8")
    assert not plan.fits and "DOES NOT FIT" in plan.table()


def test_the_vae_note_speaks_of_the_decode_order_chosen() -> None:
    """4 GB for 1.3B at 832x480x81: the tile-major decode fits (frame-major, with every tile's caches held,
    would not even at the smallest tiles); the plan used to say "the VAE does not fit even with the smallest
    tiles" about the order it did not choose (a tester's report)."""
    plan = make_plan(VARIANTS["wan2.1-t2v-1.3b"], 832, 480, 81, 4 * GiB, "bf16")
    decode = next(s for s in plan.stages if s.name == "decode")
    assert plan.decode_order == "tile" and decode.peak <= plan.budget
    assert not any("smallest tiles" in n for n in plan.notes)
    tiny = make_plan(VARIANTS["wan2.1-t2v-1.3b"], 832, 480, 81, GiB // 2, "bf16")  # no order fits: said
    assert any("smallest tiles" in n for n in tiny.notes)


def test_plan_command_for_a_variant_without_weights() -> None:
    from vidrt.cli.app import cli

    res = CliRunner().invoke(cli, ["plan", "wan2.2-ti2v-5b", "--size", "1280x704", "--frames", "121",
                                   "--gpu-memory", "24GB", "--precision", "fp8"])
    assert res.exit_code == 0, res.output
    assert "wan2.2-ti2v-5b 1280x704x121, DiT fp8" in res.output and "fits" in res.output
    bad = CliRunner().invoke(cli, ["plan", "wan2.2-ti2v-5b", "--size", "1000x700"])
    assert bad.exit_code != 0


def test_plan_of_a_package_shows_its_precision_and_exits_4_when_nothing_fits(capsys) -> None:
    """The bundled package: its DiT's own precision in the header (not the variant default bf16), the
    fixed tactic-scratch reserve named as such, and exit 4 (DeviceError, as `vidrt run` on TensorRT) with
    a one-line error when the clip fits no card planned for; exit 0 when one fits."""
    from cli_helpers import vidrt
    from vidrt.models import default_package
    from vidrt.package.manifest import load_manifest

    package = default_package()
    own = load_manifest(package, verify=False).components["dit"].precision
    code, err = vidrt(capsys, "plan", package, "--size", "64x64", "--gpu-memory", "1GB")
    assert code == 4 and err.startswith("error: 64x64x17 does not fit the card: it needs ") and \
        err.count("\n") == 1, err
    code, err = vidrt(capsys, "plan", package, "--size", "64x64", "--gpu-memory", "1GB,1.5GB")
    assert code == 4 and "does not fit any of these cards" in err, err
    res = CliRunner().invoke(cli_group(), ["plan", str(package), "--size", "64x64", "--gpu-memory", "4GB"])
    assert res.exit_code == 0, res.output
    assert res.output.startswith(f"vidrt-tiny-shapes 64x64x17, DiT {own}, ") and "fits" in res.output
    assert "GiB fixed tactic-scratch reserve" in res.output
    res = CliRunner().invoke(cli_group(), ["plan", str(package), "--size", "64x64", "--gpu-memory", "4GB,8GB",
                                           "--precision", "bf16"])
    assert res.exit_code == 0 and res.output.startswith("vidrt-tiny-shapes 64x64x17, DiT bf16\n"), res.output


def cli_group():
    from vidrt.cli.app import cli

    return cli


def test_plan_command_summarises_several_cards() -> None:
    from vidrt.cli.app import cli

    res = CliRunner().invoke(cli, ["plan", "wan2.1-t2v-1.3b", "--size", "832x480", "--frames", "81",
                                   "--gpu-memory", "8GB,12GB,16GB,24GB"])
    assert res.exit_code == 0, res.output
    rows = [line.split() for line in res.output.splitlines()[2:]]
    assert [r[0] for r in rows] == ["8GB", "12GB", "16GB", "24GB"]
    # umT5 (12.5 GiB) cannot sit on an 8 or 12 GB card: the plan runs it on the CPU there (--t5_cpu)
    assert [(r[2], r[3]) for r in rows] == [("yes", "cpu"), ("yes", "cpu"), ("yes", "gpu"), ("yes", "gpu")]
