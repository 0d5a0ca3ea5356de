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
    # EasyCache runs the whole graph and keeps its latent-sized cache on the host: no device item, a note
    easy = CliRunner().invoke(cli, ["plan", "wan2.1-t2v-1.3b", "--size", "832x480", "--cache", "easycache"])
    assert "residuals" not in easy.output and "pieces" not in easy.output
    assert "note: easycache keeps v - x per CFG row" in easy.output
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
    latents = 2 * 16 * 21 * 90 * 160  # [2, 16, 21, 90, 160]: 3 piece inputs beyond the whole graph's one, bf16
    expected = 4 * (3 * 2 * tokens * d + 2 * 512 * d + 2 * tokens * 128 + 2 * 7 * d) + 3 * latents * 2
    assert pieces_tensor_bytes(spec, 1280, 720, 81, 2) == expected
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


# ---- device tensors between engines: TensorOps on the device (vidrt.backends.device_ops) ------------------


def _ops() -> tuple[Any, FakeCuda]:
    from vidrt.backends.cuda import BufferPool, Stream
    from vidrt.backends.device_ops import DeviceOps

    cuda = FakeCuda()
    return DeviceOps(cuda, BufferPool(cuda), Stream(cuda)), cuda


def _on_device(ops: Any, host: np.ndarray, to_host: Any = None) -> Any:
    from vidrt.backends.cuda import DeviceTensor

    t = DeviceTensor(ops.pool, ops.pool.take(host.nbytes), tuple(host.shape), host.dtype, ops.stream.handle, to_host)
    ops.cuda.copy_htod(t.ptr, np.ascontiguousarray(host), ops.stream.handle)
    return t


@pytest.mark.parametrize("kind", ["f32", "bf16", "f16"])
def test_device_ops_compute_what_numpy_does(kind: str) -> None:
    """The residual arithmetic and FBCache's metric on device tensors, per storage dtype, against numpy
    on the same values (bf16: rounded to nearest even on the way back, as to_bf16_bits does)."""
    from vidrt.backends.tensorrt import from_bf16_bits, to_bf16_bits

    ops, cuda = _ops()
    rng = np.random.default_rng(1)
    a32, b32 = (rng.standard_normal((2, 7, 33)).astype(np.float32) for _ in range(2))
    if kind == "bf16":
        a, b, back = to_bf16_bits(a32), to_bf16_bits(b32), from_bf16_bits
        ref = lambda x: from_bf16_bits(to_bf16_bits(x))  # noqa: E731
    elif kind == "f16":
        a, b, back = a32.astype(np.float16), b32.astype(np.float16), None
        ref = lambda x: x.astype(np.float16).astype(np.float32)  # noqa: E731
    else:
        a, b, back, ref = a32, b32, None, (lambda x: x)
    da, db = _on_device(ops, a, back), _on_device(ops, b, back)
    fa, fb = (ops.to_host(t).astype(np.float32) for t in (da, db))  # the values as stored
    np.testing.assert_array_equal(ops.to_host(ops.sub(da, db)).astype(np.float32), ref(fa - fb))
    total = ops.add(da, db)
    np.testing.assert_array_equal(ops.to_host(total).astype(np.float32), ref(fa + fb))
    same = ops.sub(da, db, out=total)  # written in place into an existing buffer
    assert same is total and same.ptr == total.ptr
    assert ops.rel_l1(da, db) == pytest.approx(float(np.abs(fa - fb).mean() / np.abs(fb).mean()), rel=1e-6)
    assert cuda.launches.count(f"vidrt_axpby_{kind}") == 3 and cuda.launches.count(f"vidrt_absdiff_{kind}") == 1
    assert not [c for c in cuda.copies if c[0] == "dtoh" and c[1] > 16 and c[1] != a.nbytes]  # only the 16-byte sums
    del da, db, total, same
    ops.close()
    ops.pool.close()
    assert cuda.mem == {}


def test_device_rows_keep_256_byte_alignment_and_concat_joins_them() -> None:
    ops, cuda = _ops()
    aligned = _on_device(ops, np.arange(2 * 64, dtype=np.float32).reshape(2, 64))  # 256-byte rows
    view = ops.rows(aligned, 1, 2)
    assert view.base is aligned and view.ptr == aligned.ptr + 256  # a view, no copy
    odd = _on_device(ops, np.arange(2 * 15, dtype=np.float32).reshape(2, 15))  # 60-byte rows
    row = ops.rows(odd, 1, 2)
    assert row.base is None and row.ptr % 256 == 0 and ("dtod", 60) in cuda.copies  # copied to an aligned buffer
    np.testing.assert_array_equal(ops.to_host(row), np.arange(15, 30, dtype=np.float32)[None])
    joined = ops.concat([ops.rows(odd, 0, 1), row])
    np.testing.assert_array_equal(ops.to_host(joined), ops.to_host(odd))
    np.testing.assert_array_equal(ops.to_host(view), np.arange(64, 128, dtype=np.float32)[None])
    host = np.ones((2, 3), np.float32)  # host arrays stay on the host
    assert ops.rows(host, 0, 1).base is host and isinstance(ops.concat([host, host]), np.ndarray)
    del view, aligned, odd, row, joined
    ops.close()
    ops.pool.close()
    assert cuda.mem == {}


def test_fakes_refuse_what_the_docs_forbid() -> None:
    """The fakes encode setTensorAddress's and enqueueV3's rules (so the tests above would catch a backend
    that broke them): unaligned or host pointers, too-small buffers, memory freed before the stream is
    synchronised, a buffer read on another stream before its writer synchronised."""
    plan = FakePlan(inputs={"x": (FLOAT, [((4,), (4,), (4,))])}, outputs={"y": (FLOAT, lambda s: (4,))},
                    compute=lambda f: {"y": f["x"] * 2})
    cuda = FakeCuda()
    fake = FakeTensorRT(cuda, plans={b"p": plan})
    engine = fake.module().Runtime(None).deserialize_cuda_engine(b"p")
    ctx = engine.create_execution_context("USER_MANAGED")
    ctx.set_device_memory(cuda.malloc(1 << 20), 1 << 20)
    ctx.set_input_shape("x", (4,))
    buf = cuda.malloc(16)
    with pytest.raises(AssertionError, match="256-byte aligned"):
        ctx.set_tensor_address("x", buf + 4)
    with pytest.raises(AssertionError, match="not in any live device allocation"):
        ctx.set_tensor_address("x", np.zeros(4, np.float32).ctypes.data // 256 * 256)
    small = cuda.malloc(8)
    ctx.set_tensor_address("x", buf)
    ctx.set_tensor_address("y", small)
    with pytest.raises(AssertionError, match="run past the end"):
        ctx.execute_async_v3(1)
    out = cuda.malloc(16)
    ctx.set_tensor_address("y", out)
    s1, s2 = cuda.stream_create(), cuda.stream_create()
    assert ctx.execute_async_v3(s1)
    with pytest.raises(AssertionError, match="before the stream is synchronised"):
        cuda.free(buf)
    other = engine.create_execution_context("USER_MANAGED")  # a second context reading y on another stream
    other.set_device_memory(cuda.malloc(1 << 20), 1 << 20)
    other.set_input_shape("x", (4,))
    other.set_tensor_address("x", out)
    other.set_tensor_address("y", buf)
    with pytest.raises(AssertionError, match="has not synchronised"):
        other.execute_async_v3(s2)
    assert other.execute_async_v3(s1)  # the same stream: ordered after the writer, fine
    cuda.stream_sync(s1)
    cuda.free(buf)  # after synchronisation: fine


# ---- the step-caching DiT pieces chained on the device, through the whole pipeline -------------------------


def _bind_dims(specs: tuple[Any, ...], shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for t in specs:
        for d, v in zip(t.shape, shapes[t.name], strict=True):
            if isinstance(d, str):
                factor, _, name = d.rpartition("*")
                sizes[name] = v // (int(factor) if factor else 1)
    return sizes


def bundled_ranges(spec: Any) -> dict[str, tuple[int, int]]:
    """Every named dimension of the bundled model's 64x64x17 clip, batch 1-2: the fake plans' profile."""
    _, f, h, w = spec.latent_shape(64, 64, 17)
    return {"batch": (1, 2), "seq": (1, spec.text.text_len), "tokens": (spec.num_tokens(64, 64, 17),) * 2,
            "frames": (f, f), "height": (h, h), "width": (w, w), "lat_h": (h, h), "lat_w": (w, w),
            "out_h": (64, 64), "out_w": (64, 64)}


def _ort_backed_plans(package: Path, manifest: Manifest, ranges: dict[str, tuple[int, int]]) -> dict[bytes, FakePlan]:
    """A fake plan per component that runs the component's own ONNX graph in ONNX Runtime: the TensorRT
    backend's whole machinery (buffers, addresses, device tensors, streams, the kernels between pieces)
    runs for real around the graphs' true arithmetic."""
    from trt_fakes import INT64
    from vidrt.backends.ort import OrtEngine

    dtypes = {"float32": FLOAT, "int64": INT64}
    plans = {}
    for name, comp in manifest.components.items():
        c = comp.contract
        lo = {k: v[0] for k, v in ranges.items()}
        hi = {k: v[1] for k, v in ranges.items()}
        session = OrtEngine(name, package / comp.artifact.file, c)

        fixed = {k: a for k, (a, b) in ranges.items() if a == b}  # e.g. tokens, for patch_embed's output

        def out_shape(t: Any, c: Any = c, fixed: dict[str, int] = fixed) -> Any:
            return lambda shapes: C.resolve_shape(t.shape, {**fixed, **_bind_dims(c.inputs, shapes)})

        plans[name.encode()] = FakePlan(
            inputs={t.name: (dtypes[t.dtype], [(C.resolve_shape(t.shape, lo), C.resolve_shape(t.shape, hi),
                                                C.resolve_shape(t.shape, hi))]) for t in c.inputs},
            outputs={t.name: (dtypes[t.dtype], out_shape(t)) for t in c.outputs},
            compute=lambda feeds, e=session: e.run(feeds))
    return plans


@pytest.fixture(scope="module")
def trt_tiny(tmp_path_factory: Any) -> Any:
    """The bundled model (its DiT pieces included) behind the TensorRT backend on the fakes, and on
    ONNX Runtime: a factory of (pipeline, FakeCuda) pairs."""
    from vidrt.models import default_package
    from vidrt.package.manifest import load_manifest
    from vidrt.pipeline import Pipeline

    package = default_package()
    assert package is not None
    manifest = load_manifest(package)
    spec = manifest.model
    plans = _ort_backed_plans(package, manifest, bundled_ranges(spec))
    root = tmp_path_factory.mktemp("plans")
    entries = tuple(dataclasses.replace(e, profiles=((64, 64, 1),) if e.component in (C.VAE_FIRST, C.VAE_STEP)
                                        else ()) for e in _entries(root, "10.13.0.35", "8.9", "fp32",
                                                                   tuple(manifest.components)))
    with_plans = dataclasses.replace(manifest, engines=entries)

    def make(trt: bool) -> tuple[Any, FakeCuda | None]:
        pipe = Pipeline.load(package, warn=lambda s: None)
        if not trt:
            return pipe, None
        cuda = FakeCuda()
        fake = FakeTensorRT(cuda, plans=plans)
        pipe.backend = TrtBackend(BackendOptions(backend="tensorrt"), with_plans, root, trt_mod=fake.module(),
                                  cuda=cuda, compute_capability="8.9")
        return pipe, cuda

    return make


@pytest.mark.parametrize("cache,cfg_batch", [("magcache", 2), ("fbcache:0.2", 2), ("magcache", 1)])
def test_cached_run_on_tensorrt_keeps_the_pieces_tensors_on_the_device(trt_tiny: Any, cache: str,
                                                                       cfg_batch: int) -> None:
    """The whole pipeline with --cache on the TensorRT backend (fakes around the pieces' real graphs):
    the same clip and the same skips as on ONNX Runtime, and per denoising step nothing of the residual
    stream crosses PCIe: the host -> device copies are the small DiT inputs (latents, timesteps), the
    device -> host ones noise_pred (once per call of the head) and FBCache's 16-byte sums."""
    from vidrt.request import Request

    req = Request(prompt="a red circle moving left", seed=5, steps=8, cache=cache)
    ref_pipe, _ = trt_tiny(False)
    ref_pipe.cfg_batch = cfg_batch
    ref = ref_pipe.run(req)
    pipe, cuda = trt_tiny(True)
    pipe.cfg_batch = cfg_batch
    marks: list[int] = []
    got = pipe.run(req, progress=lambda stage, done, total: marks.append(len(cuda.copies)) if stage == "denoise"
                   else None)
    assert got.stats.cache.block_stack_skips == ref.stats.cache.block_stack_skips > 0
    assert got.stats.cache.block_stack_runs == ref.stats.cache.block_stack_runs
    np.testing.assert_allclose(got.frames.astype(np.int16), ref.frames.astype(np.int16), atol=1)
    spec = pipe.manifest.model
    c, f, h, w = spec.latent_shape(64, 64, 17)
    latent_bytes = 2 * spec.dit.in_channels * f * h * w * 4
    noise_pred_bytes = cfg_batch * spec.dit.out_channels * f * h * w * 4  # one head call: cfg_batch rows
    stream_bytes = spec.dit.dim * spec.num_tokens(64, 64, 17) * 4  # one row of the residual stream
    assert stream_bytes >= latent_bytes // 2  # (so the size test below can tell them apart)
    for a, b in zip(marks[1:], marks[2:], strict=False):  # steps 3.. (step 1 computes the context embedding)
        step = cuda.copies[a:b]
        assert all(n < stream_bytes for kind, n in step if kind == "htod"), step
        down = [n for kind, n in step if kind == "dtoh"]
        assert sorted(set(down) - {16}) == [noise_pred_bytes], step
        assert down.count(noise_pred_bytes) == (1 if cfg_batch == 2 else 2)  # noise_pred, per head call
    # the residual stream, context embedding and RoPE lived on the device: every kernel went through the ops
    assert any(n.startswith("vidrt_axpby_f32") for n in cuda.launches)
    assert got.stats.cache.residual_bytes == ref.stats.cache.residual_bytes
    pipe.backend.close()
    assert cuda.mem == {}


def test_missing_nvrtc_is_one_line_naming_the_install() -> None:
    """Here cuda-python is installed but libnvrtc is not: compiling the kernels says what to install."""
    pytest.importorskip("cuda.bindings.nvrtc")
    from vidrt.backends.kernels import INSTALL_NVRTC, SOURCE, compile_cubin
    from vidrt.errors import DeviceError

    try:
        compile_cubin(SOURCE, (8, 9))
    except DeviceError as exc:
        assert INSTALL_NVRTC in str(exc) and "\n" not in str(exc)
    else:  # a machine with the CUDA runtime compiler: the cubin is real
        pass


def test_the_tensorrt_extra_brings_nvrtc_of_the_wheels_cuda_major() -> None:
    import re

    import tomllib

    root = Path(__file__).resolve().parent.parent
    trt = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]["tensorrt"]
    major = re.match(r"tensorrt-cu(\d+)", next(r for r in trt if r.startswith("tensorrt-cu"))).group(1)  # type: ignore[union-attr]
    nvrtc = next(r for r in trt if r.startswith("nvidia-cuda-nvrtc"))
    assert nvrtc.startswith(f"nvidia-cuda-nvrtc-cu{major}") and f"<{int(major) + 1}" in nvrtc
