"""TensorRT path, second half of issues 13 and 16, without a GPU (fakes in tests/trt_fakes.py):
the image-to-video encoders as engines (`vidrt build` profiles, the backend keeping the encoder's
causal caches on the device), `vidrt plan --image / --cache`, and the step-caching DiT pieces
chained on the device."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from test_tensorrt import _entries
from trt_fakes import FLOAT, FakeCuda, FakePlan, FakeTensorRT
from vidrt.backends.base import BackendOptions
from vidrt.backends.residency import GiB, make_plan, vae_step_contract
from vidrt.backends.tensorrt import TrtBackend
from vidrt.errors import PackageError
from vidrt.package import contracts as C
from vidrt.package.manifest import SCHEMA_VERSION, Component, Manifest, make_artifact, write_manifest
from vidrt.package.registry import VARIANTS

I2V = VARIANTS["wan2.1-i2v-14b-480p"]
FLF2V = VARIANTS["wan2.1-flf2v-14b-720p"]
ENC_CACHES: list[tuple[int | str, ...]] = [(1, 3, 2, "8*lat_h", "8*lat_w"), (1, 6, 2, "lat_h", "lat_w")]


def _i2v_package(root: Path, spec: Any = I2V, encoder_precision: str = "fp32",
                 engines: tuple[Any, ...] = ()) -> Manifest:
    """A manifest with every component of a Wan2.1 I2V package (graphs are placeholder bytes)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "tokenizer.json").write_text("{}")
    vae_step = vae_step_contract(spec)
    enc_first, enc_step = C.vae_encoder_contracts(spec, ENC_CACHES)
    comps = {}
    for name, contract, prec in ((C.TEXT_ENCODER, C.text_encoder_contract(spec), "bf16"),
                                 *((e, C.dit_contract(spec, "bfloat16"), "bf16") for e in spec.experts),
                                 (C.VAE_FIRST, C.Contract(vae_step.inputs[:1], vae_step.outputs), "fp32"),
                                 (C.VAE_STEP, vae_step, "fp32"),
                                 (C.VAE_ENCODE_FIRST, enc_first, encoder_precision),
                                 (C.VAE_ENCODE_STEP, enc_step, encoder_precision),
                                 (C.IMAGE_ENCODER, C.image_encoder_contract(spec), "fp32")):
        (root / f"{name}.onnx").write_bytes(name.encode() * 10)
        comps[name] = Component(name, make_artifact(root, f"{name}.onnx"), contract, prec, 18)
    m = Manifest(SCHEMA_VERSION, spec, make_artifact(root, "tokenizer.json"), comps, engines=engines)
    write_manifest(root, m)
    return m


def _fake_builder(built: list[tuple[str, list[Any]]]) -> Any:
    def builder(trt: Any, onnx: Path, profiles: list[Any], options: Any, cache: Path, *, streamable: bool,
                refittable: tuple[str, ...] = ()) -> Any:
        built.append((onnx.stem, profiles))
        return onnx.name.encode(), {"device_memory_bytes": 1 << 20}
    return builder


# ---- vidrt build: the VAE encoder and CLIP engines --------------------------------------------------------


@pytest.mark.parametrize("spec", [I2V, FLF2V], ids=lambda s: s.name)
def test_build_makes_encoder_and_clip_engines_with_the_clip_sizes_profiles(tmp_path: Path, spec: Any) -> None:
    from vidrt.export.build_engines import BuildOptions, build_package

    _i2v_package(tmp_path, spec)
    built: list[tuple[str, list[Any]]] = []
    fake = FakeTensorRT(FakeCuda()).module()
    m = build_package(tmp_path, BuildOptions("bf16", sizes=((832, 480), (480, 832)), frames=81), trt_mod=fake,
                      compute_capability="8.9", total_memory=80 * GiB, builder=_fake_builder(built),
                      log=lambda s: None)
    profiles = dict(built)
    assert {C.VAE_ENCODE_FIRST, C.VAE_ENCODE_STEP, C.IMAGE_ENCODER} <= set(profiles)
    assert {e.component for e in m.engines} == set(m.components)  # every component, the encoders included
    # the encoder runs untiled on the whole frame: one static profile per size bucket (latent 60x104 / 104x60)
    first, step = profiles[C.VAE_ENCODE_FIRST], profiles[C.VAE_ENCODE_STEP]
    assert [p[C.VAE_VIDEO] for p in first] == [((1, 3, 1, 480, 832),) * 3, ((1, 3, 1, 832, 480),) * 3]
    assert [p[C.VAE_VIDEO] for p in step] == [((1, 3, 4, 480, 832),) * 3, ((1, 3, 4, 832, 480),) * 3]
    assert step[0][C.cache_in(1)] == ((1, 6, 2, 60, 104),) * 3 and step[1][C.cache_in(0)] == ((1, 3, 2, 832, 480),) * 3
    # CLIP: the start image (FLF2V: start and end stacked) at the tower's fixed side
    images = 2 if spec.image.last_image else 1
    assert profiles[C.IMAGE_ENCODER] == [{C.PIXEL_VALUES: ((images, 3, 224, 224),) * 3}]
    entry = next(e for e in m.engines if e.component == C.VAE_ENCODE_STEP)
    assert entry.profiles == ((832, 480, 81), (480, 832, 81))


def test_build_refuses_a_reduced_precision_vae_encoder(tmp_path: Path) -> None:
    from vidrt.export.build_engines import BuildOptions, build_package

    _i2v_package(tmp_path, encoder_precision="bf16")
    with pytest.raises(PackageError, match="vae_encode_first.onnx is bf16: the Wan VAE is built in fp32 only"):
        build_package(tmp_path, BuildOptions("bf16"), trt_mod=FakeTensorRT(FakeCuda()).module(),
                      compute_capability="8.9", builder=_fake_builder([]), log=lambda s: None)


def _encoder_plans(spec: Any, lat: tuple[int, int]) -> dict[bytes, FakePlan]:
    """Fake encoder plans of the ENC_CACHES contract at one latent size: a causal recurrence whose
    latent depends on every earlier chunk through the caches (so a lost or stale cache shows)."""
    h, w = lat
    z = spec.vae.z_dim
    c0, c1 = (1, 3, 2, 8 * h, 8 * w), (1, 6, 2, h, w)

    def static(shape: tuple[int, ...]) -> list[tuple[tuple[int, ...], ...]]:
        return [(shape, shape, shape)]

    def pool(v: np.ndarray) -> np.ndarray:  # [1, 3, T, 8h, 8w] -> [1, 3, h, w]
        return v.mean(axis=2).reshape(1, 3, h, 8, w, 8).mean(axis=(3, 5))

    def first(x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        p = pool(x[C.VAE_VIDEO])
        return {C.VAE_LATENT: np.repeat(p[:, :1], z, axis=1)[:, :, None],
                C.cache_out(0): np.repeat(x[C.VAE_VIDEO], 2, axis=2),
                C.cache_out(1): np.concatenate([p, p], axis=1)[:, :, None].repeat(2, axis=2)}

    def step(x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        p = pool(x[C.VAE_VIDEO]) + 0.5 * x[C.cache_in(1)][:, :3, 0]
        return {C.VAE_LATENT: np.repeat(p[:, :1], z, axis=1)[:, :, None] + x[C.cache_in(0)].mean(),
                C.cache_out(0): x[C.VAE_VIDEO][:, :, 2:] - x[C.cache_in(0)],
                C.cache_out(1): np.concatenate([p, p], axis=1)[:, :, None].repeat(2, axis=2)}

    lat_spec = (1, z, 1, h, w)
    first_plan = FakePlan(inputs={C.VAE_VIDEO: (FLOAT, static((1, 3, 1, 8 * h, 8 * w)))},
                          outputs={C.VAE_LATENT: (FLOAT, lambda s: lat_spec), C.cache_out(0): (FLOAT, lambda s: c0),
                                   C.cache_out(1): (FLOAT, lambda s: c1)}, compute=first)
    step_plan = FakePlan(inputs={C.VAE_VIDEO: (FLOAT, static((1, 3, 4, 8 * h, 8 * w))),
                                 C.cache_in(0): (FLOAT, static(c0)), C.cache_in(1): (FLOAT, static(c1))},
                         outputs={C.VAE_LATENT: (FLOAT, lambda s: lat_spec), C.cache_out(0): (FLOAT, lambda s: c0),
                                  C.cache_out(1): (FLOAT, lambda s: c1)}, compute=step)
    return {C.VAE_ENCODE_FIRST.encode(): first_plan, C.VAE_ENCODE_STEP.encode(): step_plan}


class _HostEngine:
    """The same fake plan run in numpy: the reference the TensorRT chain must equal."""

    def __init__(self, plan: FakePlan, contract: C.Contract) -> None:
        self.plan, self.contract = plan, contract

    def run(self, feeds: dict[str, Any]) -> dict[str, np.ndarray]:
        return self.plan.compute({k: np.asarray(v, np.float32) for k, v in feeds.items()})

    def close(self) -> None:
        pass


def test_encoder_engines_keep_their_caches_on_the_device_and_encode_like_the_host(tmp_path: Path) -> None:
    from vidrt.vae_encode import encode

    comps = tuple(_i2v_package(tmp_path / "p").components)
    m = _i2v_package(tmp_path / "p", engines=_entries(tmp_path / "p", "10.13.0.35", "8.9", "bf16", comps))
    lat = (2, 3)
    plans = _encoder_plans(I2V, lat)
    cuda = FakeCuda()
    fake = FakeTensorRT(cuda, plans=plans)
    backend = TrtBackend(BackendOptions(backend="tensorrt"), m, trt_mod=fake.module(), cuda=cuda,
                         compute_capability="8.9")
    contracts = {n: m.components[n].contract for n in (C.VAE_ENCODE_FIRST, C.VAE_ENCODE_STEP)}
    first = backend.open(C.VAE_ENCODE_FIRST, tmp_path / "p/vae_encode_first.onnx", contracts[C.VAE_ENCODE_FIRST])
    step = backend.open(C.VAE_ENCODE_STEP, tmp_path / "p/vae_encode_step.onnx", contracts[C.VAE_ENCODE_STEP])
    video = np.random.default_rng(0).uniform(-1, 1, (3, 13, 8 * lat[0], 8 * lat[1])).astype(np.float32)
    norm = dict(mean=[0.1] * I2V.vae.z_dim, std=[2.0] * I2V.vae.z_dim)
    htod_before = cuda.calls.count("htod")
    got = encode(video, first, step, **norm)
    # 4 calls (1 + 3 steps of 4 frames): one upload each (the video chunk); the caches never cross PCIe
    assert cuda.calls.count("htod") - htod_before == 4
    host = encode(video, *(_HostEngine(plans[n.encode()], contracts[n]) for n in contracts), **norm)  # type: ignore[arg-type]
    np.testing.assert_allclose(got, host, rtol=1e-6, atol=1e-6)
    assert got.shape == (I2V.vae.z_dim, 4, *lat)
    assert backend.gpu_stats()["gpu_seconds"] == {"image": pytest.approx(0.004)}  # its own stage
    backend.close()
    assert cuda.mem == {}


# ---- vidrt plan --image / --cache --------------------------------------------------------------------------


def test_plan_shows_the_image_stage_released_before_denoising_also_when_all_is_resident() -> None:
    ti2v = VARIANTS["wan2.2-ti2v-5b"]
    for budget in (24 * 10**9, 141 * 10**9):  # per stage on 24 GB; everything else resident on an H200
        plan = make_plan(ti2v, 1280, 704, 121, budget, "fp8", image=True)
        names = [s.name for s in plan.stages]
        image = plan.stages[names.index("image")]
        assert set(image.load) == set(image.release) == {C.VAE_ENCODE_FIRST, C.VAE_ENCODE_STEP}
        later = plan.stages[names.index("image") + 1:]
        assert later and not any(C.VAE_ENCODE_STEP in s.load for s in later)
        assert not any(i.name.startswith("vae_encode") for s in later for i in s.items)
    assert plan.all_resident and names == ["image", "all stages"]
    # the encoders' room is counted: an image clip never plans a smaller peak than the text-only one
    text_only = make_plan(ti2v, 1280, 704, 121, 141 * 10**9, "fp8")
    assert plan.peak >= text_only.peak


def test_plan_command_image_and_cache_flags(capsys: Any) -> None:
    from cli_helpers import assert_error, vidrt
    from vidrt.cli.app import cli

    res = CliRunner().invoke(cli, ["plan", "wan2.2-ti2v-5b", "--size", "1280x704", "--frames", "121", "--image",
                                   "--cache", "magcache", "--precision", "fp8"])
    assert res.exit_code == 0, res.output
    out = res.output
    assert "vae_encode_step weights" in out and "release vae_encode_first, vae_encode_step" in out
    assert "magcache residuals" in out and "dit pieces' tensors" in out and "dit pieces weights" in out
    plain = CliRunner().invoke(cli, ["plan", "wan2.2-ti2v-5b", "--size", "1280x704", "--frames", "121",
                                     "--precision", "fp8"])
    assert "vae_encode" not in plain.output and "residuals" not in plain.output
    # EasyCache runs the whole graph: its buffer, no pieces
    easy = CliRunner().invoke(cli, ["plan", "wan2.1-t2v-1.3b", "--size", "832x480", "--cache", "easycache"])
    assert "easycache residuals" in easy.output and "pieces" not in easy.output
    assert_error(*vidrt(capsys, "plan", "wan2.1-t2v-1.3b", "--size", "832x480", "--image"), 2, "text-to-video model",
                 "drop --image")
    assert_error(*vidrt(capsys, "plan", "wan2.1-t2v-1.3b", "--size", "832x480", "--cache", "fastest"), 2,
                 "unknown method")


def test_plan_counts_the_pieces_tensors_and_residuals_by_the_formula() -> None:
    from vidrt.backends.residency import PIECE_METHODS, cache_residual_bytes, pieces_tensor_bytes
    from vidrt.caching import PIECES_NEEDED

    assert set(PIECE_METHODS) == PIECES_NEEDED
    spec = VARIANTS["wan2.1-t2v-14b"]
    tokens, d = spec.num_tokens(1280, 720, 81), spec.dit.dim  # 75,600 tokens x 5120
    assert tokens == 75_600
    assert cache_residual_bytes(spec, 1280, 720, 81, "magcache") == 2 * tokens * d * 4
    expected = 4 * (3 * 2 * tokens * d + 2 * 512 * d + 2 * tokens * 128 + 2 * 7 * d)
    assert pieces_tensor_bytes(spec, 1280, 720, 81) == expected
    base = make_plan(spec, 1280, 720, 81, 200 * 10**9, "fp8")
    cached = make_plan(spec, 1280, 720, 81, 200 * 10**9, "fp8", cache="teacache:0.1")
    grown = max(s.peak for s in cached.stages if "dit" in s.load or s.name == "all stages") - \
        max(s.peak for s in base.stages if "dit" in s.load or s.name == "all stages")
    assert grown == expected + 2 * tokens * d * 4


def test_gpu_stats_put_the_encoders_in_the_image_stage(tmp_path: Path) -> None:
    m = _i2v_package(tmp_path)
    m = dataclasses.replace(m, engines=_entries(tmp_path, "10.13.0.35", "8.9", "bf16", tuple(m.components)))
    backend = TrtBackend(BackendOptions(backend="tensorrt"), m, trt_mod=FakeTensorRT(FakeCuda()).module(),
                         cuda=FakeCuda(), compute_capability="8.9")
    for name in (C.VAE_ENCODE_FIRST, C.IMAGE_ENCODER, "dit", C.VAE_STEP):
        backend._ran(name, 1000.0)
    assert backend.gpu_stats()["gpu_seconds"] == {"image": 2.0, "denoise": 1.0, "decode": 1.0}
    backend.close()


def test_vae_encoder_is_exported_at_the_vae_opset(tmp_path: Path, monkeypatch: Any) -> None:
    """The encoder has the decoder's mid-block attention: at opset 23 TensorRT would get one 384/1024-wide
    IAttention head (test_trt_defects.py::test_10); it is exported at opset 18 like the decoder."""
    from types import SimpleNamespace

    import vidrt.export.package as pkg

    seen: list[int] = []

    def fake_export(vae: Any, first: Path, step: Path, spec: Any, opset: int, **kw: Any) -> Any:
        seen.append(opset)
        Path(first).write_bytes(b"x")
        Path(step).write_bytes(b"x")
        c = C.Contract(inputs=(), outputs=())
        return c, c

    monkeypatch.setattr(pkg, "export_vae_encoder", fake_export)
    ckpt = SimpleNamespace(spec=VARIANTS["wan2.2-i2v-a14b"], vae=lambda: None)
    stage = next(s for s in pkg._stages(ckpt, tmp_path, 23, "bf16") if s.name == "vae_encoder")  # type: ignore[arg-type]
    result = stage.run()
    assert seen == [18] and result.components[C.VAE_ENCODE_STEP].opset == 18
