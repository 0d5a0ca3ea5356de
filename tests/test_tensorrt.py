"""TensorRT backend, CUDA helpers, builder and doctor, without a GPU: fakes of cuda-python and
TensorRT (tests/trt_fakes.py) stand in for the libraries; everything else is the real code."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from trt_fakes import BF16, FLOAT, FakeCuda, FakePlan, FakeTensorRT
from vidrt.backends import open_backend
from vidrt.backends.base import BackendOptions
from vidrt.backends.cuda import Stream, probe
from vidrt.backends.ort import OrtBackend
from vidrt.backends.residency import vae_step_contract
from vidrt.backends.tensorrt import (
    ScratchArena,
    TrtBackend,
    TrtEngine,
    availability,
    engine_dir_name,
    from_bf16_bits,
    load_tensorrt,
    select_engines,
    tensorrt_status,
    to_bf16_bits,
)
from vidrt.errors import DeviceError, PackageError
from vidrt.package import contracts as C
from vidrt.package.manifest import SCHEMA_VERSION, Component, Manifest, load_manifest, make_artifact, write_manifest
from vidrt.package.manifest import Engine as EngineEntry
from vidrt.package.registry import VARIANTS

SPEC = VARIANTS["wan2.1-t2v-1.3b"]


# ---- import / status / probe ----------------------------------------------------------------------


def test_tensorrt_is_reported_missing_here_even_with_stubs_installed() -> None:
    # tensorrt-stubs installs site-packages/tensorrt/*.pyi: `import tensorrt` then succeeds as an
    # empty namespace package. The loader must not mistake that for TensorRT.
    with pytest.raises(DeviceError, match="TensorRT is not installed|TensorRT cannot be loaded") as err:
        load_tensorrt()
    assert str(err.value).endswith("or use backend='onnxruntime'"), err.value  # the Python keyword
    from vidrt.cli.app import CLI_FLAGS
    from vidrt.errors import spelled_as

    with spelled_as(CLI_FLAGS), pytest.raises(DeviceError) as err:
        load_tensorrt()
    assert str(err.value).endswith("or use --backend onnxruntime"), err.value  # under `vidrt`: its flag
    version, why = tensorrt_status()
    assert version is None and "TensorRT" in why


def _fake_cudart(count_err: int = 0, count: int = 1) -> Any:
    err = SimpleNamespace
    names = {0: b"cudaSuccess", 35: b"cudaErrorInsufficientDriver"}
    prop = SimpleNamespace(name=b"NVIDIA GeForce RTX 4090\0\0", major=8, minor=9, totalGlobalMem=24 * 2**30)
    return SimpleNamespace(
        cudaDriverGetVersion=lambda: (0, 12040 if count_err == 0 else 0),
        cudaRuntimeGetVersion=lambda: (0, 12060),
        cudaGetDeviceCount=lambda: (count_err, None if count_err else count),
        cudaGetErrorName=lambda e: (0, names[int(e)]),
        cudaGetErrorString=lambda e: (0, b"CUDA driver version is insufficient for CUDA runtime version"),
        cudaGetDeviceProperties=lambda i: (0, prop),
        cudaSetDevice=lambda i: (0,),
        cudaMemGetInfo=lambda: (0, 20 * 2**30, 24 * 2**30),
        unused=err)


def test_probe_reports_error_35_as_no_gpu() -> None:
    p = probe(_fake_cudart(count_err=35))
    assert not p.ok
    assert p.reason.startswith("no GPU (cudaGetDeviceCount: error 35 cudaErrorInsufficientDriver: CUDA driver")


def test_probe_lists_devices() -> None:
    p = probe(_fake_cudart())
    assert p.ok and p.driver_version == "12.4" and p.runtime_version == "12.6"
    (d,) = p.devices
    assert (d.name, d.compute_capability, d.sm, d.free_bytes) == ("NVIDIA GeForce RTX 4090", "8.9", "89", 20 * 2**30)


def test_probe_on_this_machine_never_raises() -> None:
    p = probe()
    assert p.ok or p.reason  # here: "no GPU (cudaGetDeviceCount: error 35 ...)" or "cuda-python is not installed"


def test_doctor_runs_and_says_why_not(tmp_path: Path) -> None:
    from click.testing import CliRunner
    from vidrt.cli.app import cli

    res = CliRunner().invoke(cli, ["doctor"])
    assert res.exit_code == 0, res.output
    assert "backends:" in res.output and "onnxruntime (cpu)" in res.output
    if not probe().ok:
        assert "no GPU" in res.output or "cuda-python" in res.output
        assert "tensorrt            no" in res.output
    missing = tmp_path / "nonexistent"
    res = CliRunner().invoke(cli, ["doctor", str(missing)])
    assert res.exit_code == 3, res.output  # PackageError's code (docs/errors.md)
    assert f"package       {missing}" in res.output and "backends:" in res.output


def test_build_without_tensorrt_names_no_missing_flag(tmp_path: Path) -> None:
    """`vidrt build` has no --backend: without TensorRT it says engines need it and `run` needs none."""
    from vidrt.backends.tensorrt import BUILD_ELSEWHERE

    with pytest.raises(DeviceError) as err:
        load_tensorrt(BUILD_ELSEWHERE)
    assert "--backend" not in str(err.value) and "ONNX Runtime" in str(err.value)


# ---- dtypes -----------------------------------------------------------------------------------------


def test_bf16_round_trip_and_rounding() -> None:
    exact = np.array([0.0, 1.0, -2.5, 3.140625, 65280.0, -1e-3], np.float32)
    exact = from_bf16_bits(to_bf16_bits(exact))  # representable after one rounding
    np.testing.assert_array_equal(from_bf16_bits(to_bf16_bits(exact)), exact)
    # 1 + 2^-8 lies exactly between 1 and 1 + 2^-7: ties go to even (1.0)
    assert from_bf16_bits(to_bf16_bits(np.array([1 + 2**-8], np.float32)))[0] == 1.0
    assert from_bf16_bits(to_bf16_bits(np.array([1 + 3 * 2**-8], np.float32)))[0] == 1 + 2**-6
    assert np.isnan(from_bf16_bits(to_bf16_bits(np.array([np.nan], np.float32))))[0]
    x = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    assert np.max(np.abs(from_bf16_bits(to_bf16_bits(x)) - x) / np.abs(x)) <= 2**-8


# ---- engine --------------------------------------------------------------------------------------------


def _dit_plan(sizes: list[tuple[int, int, int]]) -> FakePlan:
    """A DiT-shaped plan: bf16 latents/context, fp32 timestep; velocity = 2 x latents + t."""
    profiles = []
    for f, h, w in sizes:
        lo, hi = (1, 16, f, h, w), (2, 16, f, h, w)
        profiles.append((lo, hi, hi))

    def profile_of(shape_fn: Any) -> list[Any]:
        return [shape_fn(p) for p in profiles]

    return FakePlan(
        inputs={C.LATENTS: (BF16, profiles),
                C.TIMESTEP: (FLOAT, profile_of(lambda p: ((p[0][0],), (p[1][0],), (p[2][0],)))),
                C.CONTEXT: (BF16, profile_of(lambda p: ((p[0][0], 512, 64), (p[1][0], 512, 64), (p[2][0], 512, 64))))},
        outputs={C.VELOCITY: (BF16, lambda s: s[C.LATENTS])},
        compute=lambda x: {C.VELOCITY: 2 * x[C.LATENTS] + x[C.TIMESTEP].reshape(-1, 1, 1, 1, 1)},
        device_memory=3 << 20)


def _contract() -> C.Contract:
    spec = dataclasses.replace(SPEC, dit=dataclasses.replace(SPEC.dit, text_dim=64))
    return C.dit_contract(spec, "bfloat16")


def _engine(plan: FakePlan, contract: C.Contract, name: str = "dit", **kw: Any) -> tuple[TrtEngine, FakeCuda, Any]:
    cuda = FakeCuda()
    fake = FakeTensorRT(cuda, plans={b"plan": plan})
    mod = fake.module()
    stream = Stream(cuda)
    engine = TrtEngine(name, b"plan", contract, trt_mod=mod, runtime=mod.Runtime(None), cuda=cuda, stream=stream,
                       arena=ScratchArena(cuda, stream), rebuild="vidrt build PKG --precision bf16", **kw)
    return engine, cuda, fake


def test_engine_runs_with_preallocated_buffers_sized_from_the_profile_max() -> None:
    engine, cuda, fake = _engine(_dit_plan([(3, 6, 8)]), _contract())
    n_lat = 2 * 16 * 3 * 6 * 8
    assert engine.capacity == {C.LATENTS: n_lat * 2, C.TIMESTEP: 2 * 4, C.CONTEXT: 2 * 512 * 64 * 2,
                               C.VELOCITY: n_lat * 2}
    assert sorted(cuda.allocations) == sorted([*engine.capacity.values(), 3 << 20])  # + the scratch arena
    rng = np.random.default_rng(0)
    for batch in (2, 1):  # CFG as one batch-2 call, or two batch-1 calls: same buffers
        lat = rng.standard_normal((batch, 16, 3, 6, 8)).astype(np.float32)
        t = np.full((batch,), 0.5, np.float32)
        out = engine.run({C.LATENTS: lat, C.TIMESTEP: t, C.CONTEXT: np.zeros((batch, 512, 64), np.float32)})
        want = 2 * from_bf16_bits(to_bf16_bits(lat)) + 0.5
        np.testing.assert_allclose(out[C.VELOCITY], from_bf16_bits(to_bf16_bits(want)), rtol=0, atol=0)
        assert out[C.VELOCITY].dtype == np.float32
    assert cuda.allocations.count(3 << 20) == 1
    engine.close()
    assert cuda.mem == {}  # buffers freed, and the arena too once its last user has gone


def test_engine_switches_profiles_and_refuses_shapes_outside_them() -> None:
    engine, cuda, fake = _engine(_dit_plan([(3, 6, 8), (5, 4, 4)]), _contract())
    ctx = fake.engines[0].contexts[0]
    for f, h, w in ((5, 4, 4), (3, 6, 8)):
        lat = np.ones((2, 16, f, h, w), np.float32)
        out = engine.run({C.LATENTS: lat, C.TIMESTEP: np.zeros(2, np.float32),
                          C.CONTEXT: np.zeros((2, 512, 64), np.float32)})
        assert out[C.VELOCITY].shape == lat.shape
    assert ctx.profile_calls[-2:] == [1, 0]
    with pytest.raises(DeviceError, match=r"outside the plan's profiles.*vidrt build PKG --precision bf16"):
        engine.run({C.LATENTS: np.ones((2, 16, 7, 4, 4), np.float32), C.TIMESTEP: np.zeros(2, np.float32),
                    C.CONTEXT: np.zeros((2, 512, 64), np.float32)})


def _vae_plan() -> tuple[FakePlan, C.Contract]:
    shape_lat, shape_cache, shape_frames = (1, 4, 1, 2, 3), (1, 5, 2, 2, 3), (1, 3, 4, 16, 24)
    contract = C.Contract(
        inputs=(C.TensorSpec(C.VAE_LATENT, "float32", shape_lat), C.TensorSpec(C.cache_in(0), "float32", shape_cache)),
        outputs=(C.TensorSpec(C.VAE_FRAMES, "float32", shape_frames),
                 C.TensorSpec(C.cache_out(0), "float32", shape_cache)))
    plan = FakePlan(
        inputs={C.VAE_LATENT: (FLOAT, [(shape_lat,) * 3]), C.cache_in(0): (FLOAT, [(shape_cache,) * 3])},
        outputs={C.VAE_FRAMES: (FLOAT, lambda s: shape_frames), C.cache_out(0): (FLOAT, lambda s: shape_cache)},
        compute=lambda x: {C.VAE_FRAMES: np.full(shape_frames, x[C.VAE_LATENT].sum(), np.float32),
                           C.cache_out(0): x[C.cache_in(0)] + 1})
    return plan, contract


def test_static_vae_step_replays_a_cuda_graph_with_fresh_inputs() -> None:
    plan, contract = _vae_plan()
    engine, cuda, fake = _engine(plan, contract, name=C.VAE_STEP, cuda_graph=True)
    cache = np.zeros((1, 5, 2, 2, 3), np.float32)
    for i in range(4):
        out = engine.run({C.VAE_LATENT: np.full((1, 4, 1, 2, 3), i, np.float32), C.cache_in(0): cache})
        cache = out[C.cache_out(0)]
        assert out[C.VAE_FRAMES][0, 0, 0, 0, 0] == 24 * i  # the graph reads the buffers at launch
        assert cache[0, 0, 0, 0, 0] == i + 1
    assert cuda.calls.count("begin_capture") == 1  # captured on the 2nd call, replayed after
    assert cuda.calls.count("graph_launch") == 3
    assert fake.engines[0].executions == 4


def test_dynamic_engines_do_not_use_graphs() -> None:
    engine, cuda, _ = _engine(_dit_plan([(3, 6, 8)]), _contract(), cuda_graph=True)
    for _ in range(3):
        engine.run({C.LATENTS: np.ones((2, 16, 3, 6, 8), np.float32), C.TIMESTEP: np.zeros(2, np.float32),
                    C.CONTEXT: np.zeros((2, 512, 64), np.float32)})
    assert "begin_capture" not in cuda.calls


def test_a_plan_of_another_version_is_refused_with_the_rebuild_command() -> None:
    cuda = FakeCuda()
    mod = FakeTensorRT(cuda).module()
    stream = Stream(cuda)
    with pytest.raises(DeviceError, match=r"cannot load the dit plan.*rebuild: vidrt build PKG --precision bf16"):
        TrtEngine("dit", b"built by TensorRT 8", _contract(), trt_mod=mod, runtime=mod.Runtime(None), cuda=cuda,
                  stream=stream, arena=ScratchArena(cuda, stream), rebuild="vidrt build PKG --precision bf16")


def test_scratch_arena_is_shared_and_grows_by_rebinding() -> None:
    cuda = FakeCuda()
    stream = Stream(cuda)
    arena = ScratchArena(cuda, stream)
    a, b = SimpleNamespace(mem=None), SimpleNamespace(mem=None)
    for ctx in (a, b):
        ctx.set_device_memory = (lambda c: lambda p, s: setattr(c, "mem", (p, s)))(ctx)
    arena.bind(1, a, 100)
    arena.bind(2, b, 50)
    assert a.mem == b.mem == (arena.ptr, 100)
    arena.bind(3, b, 300)
    assert a.mem == b.mem == (arena.ptr, 300) and len(cuda.mem) == 1
    arena.close()
    assert cuda.mem == {}


# ---- plan selection and open_backend --------------------------------------------------------------------


def _write_package(root: Path, spec: Any = SPEC, dit_precision: str = "bf16", te_precision: str = "bf16",
                   engines: tuple[EngineEntry, ...] = ()) -> Manifest:
    root.mkdir(parents=True, exist_ok=True)
    (root / "tokenizer.json").write_text("{}")
    comps = {}
    vae_step = vae_step_contract(spec)
    vae_first = C.Contract(inputs=vae_step.inputs[:1], outputs=vae_step.outputs)
    for name, contract, prec in ((C.TEXT_ENCODER, C.text_encoder_contract(spec), te_precision),
                                 *((e, C.dit_contract(spec, "bfloat16"), dit_precision) for e in spec.experts),
                                 (C.VAE_FIRST, vae_first, "fp32"), (C.VAE_STEP, vae_step, "fp32")):
        (root / f"{name}.onnx").write_bytes(name.encode() * 10)
        comps[name] = Component(name, make_artifact(root, f"{name}.onnx"), contract, prec, 23)
    m = Manifest(SCHEMA_VERSION, spec, make_artifact(root, "tokenizer.json"), comps, engines=engines)
    write_manifest(root, m)
    return m


def _entries(root: Path, version: str, cc: str, precision: str, comps: tuple[str, ...]) -> tuple[EngineEntry, ...]:
    folder = root / engine_dir_name(version, cc, precision)
    folder.mkdir(exist_ok=True)
    out = []
    for c in comps:
        (folder / f"{c}.plan").write_bytes(c.encode())
        out.append(EngineEntry(c, make_artifact(root, f"{folder.name}/{c}.plan"), precision, version, cc))
    return tuple(out)


def test_select_engines_matches_version_and_gpu(tmp_path: Path) -> None:
    comps = (C.TEXT_ENCODER, "dit", C.VAE_FIRST, C.VAE_STEP)
    entries = _entries(tmp_path, "10.13.0.35", "8.9", "bf16", comps) + _entries(tmp_path, "10.13.0.35", "8.9",
                                                                                "fp8", comps)
    m = _write_package(tmp_path, engines=entries)
    precision, plans = select_engines(m, "10.13.0.35", "8.9")
    assert precision == "fp8" and set(plans) == set(comps)
    assert select_engines(m, "10.13.0.35", "8.9", "bf16")[0] == "bf16"
    with pytest.raises(DeviceError, match=r"built for TensorRT 10.13.0.35 on sm_89; this machine has TensorRT "
                                          r"11.4.0.106 on sm_89; rebuild them: vidrt build PKG --precision fp8"):
        select_engines(m, "11.4.0.106", "8.9", package="PKG")
    with pytest.raises(DeviceError, match="sm_120.*vidrt build"):
        select_engines(m, "10.13.0.35", "12.0")
    partial = dataclasses.replace(m, engines=entries[:3])
    with pytest.raises(DeviceError, match="lack vae_decode_step"):
        select_engines(partial, "10.13.0.35", "8.9")


def test_auto_falls_back_to_onnxruntime_and_tensorrt_says_why(tmp_path: Path) -> None:
    m = _write_package(tmp_path)
    assert isinstance(open_backend(BackendOptions(backend="auto"), m), OrtBackend)
    with_plans = dataclasses.replace(m, engines=_entries(tmp_path, "10.13.0.35", "8.9", "bf16", tuple(m.components)))
    ok, why = availability(with_plans)
    assert not ok and why
    assert isinstance(open_backend(BackendOptions(backend="auto"), with_plans), OrtBackend)
    with pytest.raises(DeviceError, match="TensorRT|GPU"):
        open_backend(BackendOptions(backend="tensorrt"), with_plans)


def test_backend_opens_this_gpus_plans(tmp_path: Path) -> None:
    comps = (C.TEXT_ENCODER, "dit", C.VAE_FIRST, C.VAE_STEP)
    m = _write_package(tmp_path, engines=_entries(tmp_path, "10.13.0.35", "8.9", "bf16", comps))
    cuda = FakeCuda()
    plan = _dit_plan([(3, 6, 8)])
    fake = FakeTensorRT(cuda, plans={b"dit": plan})
    backend = TrtBackend(BackendOptions(backend="tensorrt"), m, trt_mod=fake.module(), cuda=cuda,
                         compute_capability="8.9")
    engine = backend.open("dit", tmp_path / "dit.onnx", _contract())
    assert engine.name == "dit" and backend.precision == "bf16"
    with pytest.raises(DeviceError, match=rf"cannot load the text_encoder plan.*vidrt build {tmp_path} "
                                          r"--precision bf16"):
        backend.open(C.TEXT_ENCODER, tmp_path / "text_encoder.onnx", m.components[C.TEXT_ENCODER].contract)
    backend.close()
    assert cuda.mem == {}


def test_streamed_weights_set_the_engines_budget(tmp_path: Path) -> None:
    """The residency plan's streamed bytes become weight_streaming_budget_v2 = streamable - streamed;
    a plan built without --weight-streaming is refused with the rebuild command."""
    comps = (C.TEXT_ENCODER, "dit", C.VAE_FIRST, C.VAE_STEP)
    m = _write_package(tmp_path, engines=_entries(tmp_path, "10.13.0.35", "8.9", "bf16", comps))
    cuda = FakeCuda()
    streamable = dataclasses.replace(_dit_plan([(3, 6, 8)]), streamable=10 * 2**30)
    fake = FakeTensorRT(cuda, plans={b"dit": streamable})
    backend = TrtBackend(BackendOptions(backend="tensorrt"), m, trt_mod=fake.module(), cuda=cuda,
                         compute_capability="8.9")
    backend.stream_weights({"dit": 3 * 2**30})
    backend.open("dit", tmp_path / "dit.onnx", _contract())
    assert fake.engines[-1].weight_streaming_budget_v2 == 7 * 2**30
    backend.close()

    fake.plans[b"dit"] = _dit_plan([(3, 6, 8)])  # built without --weight-streaming
    backend = TrtBackend(BackendOptions(backend="tensorrt"), m, trt_mod=fake.module(), cuda=cuda,
                         compute_capability="8.9")
    backend.stream_weights({"dit": 3 * 2**30})
    with pytest.raises(DeviceError, match=r"3.0 GiB of the dit weights do not fit.*--weight-streaming"):
        backend.open("dit", tmp_path / "dit.onnx", _contract())
    backend.close()


# ---- builder ------------------------------------------------------------------------------------------


def test_build_writes_plans_reports_and_manifest_entries(tmp_path: Path) -> None:
    from vidrt.export.build_engines import BuildOptions, build_package

    _write_package(tmp_path)
    built: list[tuple[str, list[Any], bool]] = []

    def builder(trt: Any, onnx: Path, profiles: list[Any], options: Any, cache: Path, *, streamable: bool,
                refittable: tuple[str, ...] = ()) -> Any:
        built.append((onnx.name, profiles, streamable))
        cache.write_bytes(b"timing")
        return onnx.name.encode() + b".plan", {"device_memory_bytes": 123, "plan_bytes": 9}

    fake = FakeTensorRT(FakeCuda()).module()
    opts = BuildOptions("bf16", sizes=((832, 480), (480, 832)), frames=81, weight_streaming=True)
    m = build_package(tmp_path, opts, trt_mod=fake, compute_capability="8.9", total_memory=24 * 2**30,
                      builder=builder, log=lambda s: None)
    folder = "trt-10.13.0.35-sm89-bf16"
    assert {e.artifact.file for e in m.engines} == {f"{folder}/{c}.plan" for c in m.components}
    assert load_manifest(tmp_path, verify=True).engines == m.engines  # re-hashed, written
    dit = next(p for n, p, _ in built if n == "dit.onnx")
    assert len(dit) == 4  # per size bucket: a batch-1 and a batch-2 profile
    assert dit[0][C.LATENTS] == ((1, 16, 21, 60, 104),) * 3 and dit[1][C.LATENTS] == ((2, 16, 21, 60, 104),) * 3
    assert dit[2][C.CONTEXT][0] == (1, 512, 4096)
    assert {n for n, _, s in built if s} == {"dit.onnx"}  # weight streaming only for the DiT
    te = next(p for n, p, _ in built if n == "text_encoder.onnx")[0]
    assert te[C.INPUT_IDS] == ((1, 1), (2, 128), (2, 512))
    step = next(p for n, p, _ in built if n == "vae_decode_step.onnx")[0]
    assert all(lo == opt == hi for lo, opt, hi in step.values())  # static: CUDA graph
    report = json.loads((tmp_path / folder / "report.json").read_text())
    assert report["engines"]["dit"]["device_memory_bytes"] == 123
    assert next(e for e in m.engines if e.component == "dit").profiles == ((832, 480, 81), (480, 832, 81))
    # a rebuild replaces the entries instead of adding more
    m2 = build_package(tmp_path, opts, trt_mod=fake, compute_capability="8.9", total_memory=24 * 2**30,
                       builder=builder, log=lambda s: None)
    assert len(m2.engines) == len(m.components)


def test_build_refuses_wrong_precisions(tmp_path: Path) -> None:
    from vidrt.export.build_engines import BuildOptions, build_package

    fake = FakeTensorRT(FakeCuda()).module()
    _write_package(tmp_path / "a", dit_precision="fp32")
    with pytest.raises(PackageError, match="dit.onnx is fp32, a bf16 build needs a bf16 graph"):
        build_package(tmp_path / "a", BuildOptions("bf16"), trt_mod=fake, compute_capability="8.9",
                      builder=lambda *a, **k: (b"", {}), log=lambda s: None)
    _write_package(tmp_path / "b", dit_precision="fp16", te_precision="fp16")
    with pytest.raises(PackageError, match="umT5 overflows in fp16"):
        build_package(tmp_path / "b", BuildOptions("fp16"), trt_mod=fake, compute_capability="8.9",
                      builder=lambda *a, **k: (b"", {}), log=lambda s: None)
    _write_package(tmp_path / "c", dit_precision="fp8")
    with pytest.raises(DeviceError, match="fp8 needs compute capability 8.9"):
        build_package(tmp_path / "c", BuildOptions("fp8"), trt_mod=fake, compute_capability="8.6",
                      builder=lambda *a, **k: (b"", {}), log=lambda s: None)


def test_network_flags_strongly_typed_on_10_only() -> None:
    from vidrt.export.build_engines import network_flags

    assert network_flags(FakeTensorRT(FakeCuda(), version="10.13.0.35").module()) == 1 << 1
    assert network_flags(FakeTensorRT(FakeCuda(), version="11.4.0.106").module()) == 0


# ---- FP8 quantisation recipe (ModelOpt on CPU, optional) -------------------------------------------------


def test_fp8_config_keeps_first_and_last_blocks_and_embedders_high_precision() -> None:
    from vidrt.export.quantize_fp8 import fp8_config, high_precision_filter, kept_blocks

    assert kept_blocks(40) == [0, 1, 2, 37, 38, 39] and kept_blocks(4, 1) == [0, 3]
    names = [c["quantizer_name"] for c in fp8_config(40, "ffn")["quant_cfg"]]
    assert "*blocks.*.ffn.*weight_quantizer" in names and not any("attn1" in n for n in names)
    assert any("attn1" in n for n in (c["quantizer_name"] for c in fp8_config(40, "linear")["quant_cfg"]))
    keep = high_precision_filter(40)
    assert keep("blocks.38.ffn.net.0.proj") and keep("condition_embedder.time_embedder.linear_1")
    assert keep("proj_out") and not keep("blocks.13.ffn.net.2")


def test_fp8_quantisation_of_a_tiny_dit_on_cpu() -> None:
    pytest.importorskip("modelopt.torch.quantization", reason="nvidia-modelopt is not installed")
    torch = pytest.importorskip("torch")
    from diffusers import WanTransformer3DModel
    from vidrt.export.quantize_fp8 import quantize_dit, quantized_layers

    torch.manual_seed(0)
    m = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=16,
                              out_channels=16, text_dim=64, freq_dim=32, ffn_dim=128, num_layers=4).eval()
    batch = dict(hidden_states=torch.randn(1, 16, 2, 8, 8), timestep=torch.tensor([500.0]),
                 encoder_hidden_states=torch.randn(1, 16, 64), return_dict=False)
    with torch.no_grad():
        ref = m(**batch)[0]
        quantize_dit(m, [batch], num_layers=4, keep_blocks=1)
        out = m(**batch)[0]
    assert quantized_layers(m) == ["blocks.1.ffn.net.0.proj", "blocks.1.ffn.net.2", "blocks.2.ffn.net.0.proj",
                                   "blocks.2.ffn.net.2"]
    assert 0 < float((out - ref).norm() / ref.norm()) < 0.05


def test_a_gpu_index_out_of_range_is_named_as_the_caller_wrote_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """`vidrt run --device 3` takes the index (click.IntRange), Pipeline.load(device="cuda:3") a string: the
    refusal on a one-GPU machine names each as it was given."""
    from vidrt.backends import tensorrt as trt_backend
    from vidrt.backends.base import BackendOptions
    from vidrt.cli.app import CLI_FLAGS
    from vidrt.errors import spelled_as

    monkeypatch.setattr(trt_backend, "probe", lambda: probe(_fake_cudart(count=1)))
    options = BackendOptions(backend="tensorrt", device="cuda:3")
    with pytest.raises(DeviceError) as python_call:
        trt_backend.TrtBackend(options, None, trt_mod=SimpleNamespace())  # type: ignore[arg-type]
    with spelled_as(CLI_FLAGS), pytest.raises(DeviceError) as cli_call:
        trt_backend.TrtBackend(options, None, trt_mod=SimpleNamespace())  # type: ignore[arg-type]
    assert str(python_call.value).startswith("device='cuda:3': this machine has 1 GPU(s)"), python_call.value
    assert str(cli_call.value).startswith("--device 3: this machine has 1 GPU(s)"), cli_call.value
