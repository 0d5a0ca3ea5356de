"""Issue 14's fifteen TensorRT-path defects, one test each (numbered as in the issue). Fakes of
TensorRT and cuda-python (tests/trt_fakes.py) encode what the docs say: per-profile scratch that
grows once weights stream, CUDA graphs that keep the pointers they were captured with, TF32 on by
default in a builder config, IStreamReaderV2 deserialisation."""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from test_tensorrt import _contract, _dit_plan, _engine, _entries, _vae_plan, _write_package
from trt_fakes import FLOAT, FakeCuda, FakePlan, FakeTensorRT
from vidrt.backends.base import BackendOptions
from vidrt.backends.cuda import Stream
from vidrt.backends.residency import EngineReport, GiB, load_reports, make_plan, text_weight_bytes
from vidrt.backends.tensorrt import ScratchArena, TrtBackend, TrtEngine
from vidrt.package import contracts as C
from vidrt.package.registry import VARIANTS, TextConfig

ROOT = Path(__file__).resolve().parent.parent
BUDGET_24GB = 24 * 10**9


def _feeds(batch: int, f: int = 3, h: int = 6, w: int = 8) -> dict[str, np.ndarray]:
    return {C.LATENTS: np.ones((batch, 16, f, h, w), np.float32), C.TIMESTEP: np.zeros(batch, np.float32),
            C.CONTEXT: np.zeros((batch, 512, 64), np.float32)}


# 1. the VAE tile at run time is the tile the engines were built for ------------------------------------


def test_1_run_time_tile_is_the_built_tile(tmp_path: Path) -> None:
    from vidrt.backends.tensorrt import built_vae_tile

    spec = VARIANTS["wan2.1-t2v-1.3b"]  # 832x480: latent 60x104, 8 px per cell
    comps = (C.TEXT_ENCODER, "dit", C.VAE_FIRST, C.VAE_STEP)
    entries = tuple(dataclasses.replace(e, profiles=((32 * 8, 34 * 8, 1),)) if e.component in (C.VAE_FIRST, C.VAE_STEP)
                    else e for e in _entries(tmp_path, "10.13.0.35", "8.9", "bf16", comps))
    assert built_vae_tile({e.component: e for e in entries}, 8) == (34, 32)  # (tile_h, tile_w) cells
    plan = make_plan(spec, 832, 480, 81, BUDGET_24GB, "bf16", vae_tile=(34, 32))
    assert plan.vae_tile.tile_shape == (34, 32) and plan.vae_tile.frame_px == (480, 832)
    big = make_plan(spec, 832, 480, 81, BUDGET_24GB, "bf16", vae_tile=(64, 112))  # engine tile > frame: padded
    assert big.vae_tile.tile_shape == (64, 112) and (big.vae_tile.rows.pad, big.vae_tile.cols.pad) == (4, 8)
    tiny_budget = make_plan(spec, 832, 480, 81, 3 * GiB, "bf16", vae_tile=(60, 104))
    assert not tiny_budget.fits  # the plan checks the built tile, it does not pick another one


# 3. decode memory: first engine released after frame 0, arena shrinks, reports used --------------------


def test_3_first_frame_engine_is_released_before_the_step_engine_opens() -> None:
    from vidrt.vae_decode import iter_decode, plan_tiles

    events: list[str] = []
    plan_first, c_first = _vae_plan()
    cache = (1, 5, 2, 2, 3)

    class Eng:
        def __init__(self, name: str) -> None:
            self.name, self.contract = name, c_first

        def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            events.append(f"run {self.name}")
            return {C.VAE_FRAMES: np.zeros((1, 3, 4 if self.name == "step" else 1, 16, 24), np.float32),
                    C.cache_out(0): np.zeros(cache, np.float32)}

    def open_step() -> Eng:
        events.append("open step")
        return Eng("step")

    tiles = plan_tiles(2, 3, 2, 3, scale=8)
    lat = np.zeros((4, 3, 2, 3), np.float32)
    list(iter_decode(lat, Eng("first"), open_step, tiles, mean=[0.0] * 4, std=[1.0] * 4,
                     release_first=lambda: events.append("release first")))
    assert events == ["run first", "release first", "open step", "run step", "run step"]


def test_3_scratch_arena_shrinks_when_the_largest_user_leaves() -> None:
    cuda = FakeCuda()
    stream = Stream(cuda)
    arena = ScratchArena(cuda, stream)
    a, b = SimpleNamespace(mem=None), SimpleNamespace(mem=None)
    for ctx in (a, b):
        ctx.set_device_memory = (lambda c: lambda p, s: setattr(c, "mem", (p, s)))(ctx)
    arena.bind(1, a, 300)  # the DiT
    arena.bind(2, b, 50)  # a VAE engine
    arena.unbind(1)  # the DiT is released before decoding
    assert arena.size == 50 and b.mem == (arena.ptr, 50) and sum(len(m) for m in cuda.mem.values()) == 50
    arena.unbind(2)
    assert arena.ptr is None and cuda.mem == {}


def test_3_decode_stages_count_one_vae_engine_and_use_its_report() -> None:
    spec = VARIANTS["wan2.2-ti2v-5b"]
    reports = {C.VAE_FIRST: EngineReport(300 * 2**20), C.VAE_STEP: EngineReport(700 * 2**20)}
    plan = make_plan(spec, 1280, 704, 121, BUDGET_24GB, "fp8", reports=reports, vae_tile=(44, 80),
                     decode_order="frame")
    first, step = (s for s in plan.stages if s.name.startswith("decode"))
    names = [i.name for i in step.items]
    assert "vae_decode_first weights" not in names and "vae_decode_step weights" in names
    assert next(i for i in step.items if i.name == "vae_decode_step activations").bytes == 700 * 2**20
    assert next(i for i in first.items if i.name == "vae_decode_first activations").bytes == 300 * 2**20
    assert first.release == (C.VAE_FIRST,)


# 4. CFG as two batch-1 calls: a batch-1 profile and scratch sized for the profile in use ----------------


def test_4_dit_plans_have_batch_1_and_batch_2_profiles() -> None:
    from vidrt.export.build_engines import dit_profiles

    spec = VARIANTS["wan2.1-t2v-1.3b"]
    profiles = dit_profiles(spec, C.dit_contract(spec, "bfloat16"), ((832, 480),), 81)
    assert [p[C.LATENTS] for p in profiles] == [((1, 16, 21, 60, 104),) * 3, ((2, 16, 21, 60, 104),) * 3]


def test_4_scratch_is_sized_for_the_profile_in_use() -> None:
    plan = _dit_plan([(3, 6, 8)])
    one = [(a, b, c) for a, b, c in [((1, 16, 3, 6, 8),) * 3]]
    two = [((2, 16, 3, 6, 8),) * 3]
    plan = dataclasses.replace(plan, inputs={
        C.LATENTS: (plan.inputs[C.LATENTS][0], one + two),
        C.TIMESTEP: (FLOAT, [((1,),) * 3, ((2,),) * 3]),
        C.CONTEXT: (plan.inputs[C.CONTEXT][0], [((1, 512, 64),) * 3, ((2, 512, 64),) * 3])},
        profile_memory=[10 << 20, 20 << 20])
    engine, cuda, fake = _engine(plan, _contract())
    engine.run(_feeds(1))
    assert fake.engines[0].contexts[0].device_memory[1] == 10 << 20
    engine.run(_feeds(2))
    assert fake.engines[0].contexts[0].device_memory[1] == 20 << 20


def test_4_the_plan_takes_the_batch_1_profiles_scratch_from_the_report() -> None:
    spec = VARIANTS["wan2.2-ti2v-5b"]
    big, small = 30 * GiB, 2 * GiB
    plan = make_plan(spec, 1280, 704, 121, BUDGET_24GB, "fp8",
                     reports={"dit": EngineReport(big, profiles=((1280, 704, 121, 1, small),
                                                                  (1280, 704, 121, 2, big)))})
    assert plan.cfg_batch == 1
    act = next(i for s in plan.stages for i in s.items if i.name == "dit activations")
    assert act.bytes == small


# 5. host RAM: plans deserialised from the file, no bytes kept; `vidrt plan` prints host RAM ------------


def test_5_plans_stream_from_the_file_and_no_bytes_are_kept(tmp_path: Path) -> None:
    comps = (C.TEXT_ENCODER, "dit", C.VAE_FIRST, C.VAE_STEP)
    m = _write_package(tmp_path, engines=_entries(tmp_path, "10.13.0.35", "8.9", "bf16", comps))
    cuda = FakeCuda()
    fake = FakeTensorRT(cuda, plans={b"dit": _dit_plan([(3, 6, 8)])})
    backend = TrtBackend(BackendOptions(backend="tensorrt"), m, trt_mod=fake.module(), cuda=cuda,
                         compute_capability="8.9")
    backend.open("dit", tmp_path / "dit.onnx", _contract())
    assert fake.deserialized == ["reader"]
    assert not any(isinstance(v, (bytes, bytearray)) for v in vars(backend).values())
    assert not any(isinstance(v, dict) and any(isinstance(x, (bytes, bytearray)) for x in v.values())
                   for v in vars(backend).values())
    backend.close()


def test_5_plan_reports_the_host_ram_of_streamed_weights() -> None:
    spec = VARIANTS["wan2.2-t2v-a14b"]
    plan = make_plan(spec, 1280, 720, 81, BUDGET_24GB, "bf16")
    assert plan.streamed
    weights = next(i for s in plan.stages for i in s.items if i.name.startswith("dit_low weights")).bytes
    # TensorRT keeps a streamable engine's weights in host memory: at least one expert's full weights
    assert plan.host_bytes >= weights + plan.streamed["dit_low"]
    assert re.search(r"host RAM \d+\.\d\d GiB", plan.table())


# 6. a captured graph replays its own pointers: dropped when the arena moves ---------------------------


def test_6_graphs_are_dropped_when_the_arena_reallocates() -> None:
    plan, contract = _vae_plan()
    engine, cuda, fake = _engine(plan, contract, name=C.VAE_STEP, cuda_graph=True)
    feeds = {C.VAE_LATENT: np.ones((1, 4, 1, 2, 3), np.float32), C.cache_in(0): np.zeros((1, 5, 2, 2, 3), np.float32)}
    for _ in range(3):
        engine.run(feeds)  # captured on the 2nd call, replayed on the 3rd
    assert cuda.calls.count("graph_launch") == 2
    other = SimpleNamespace(set_device_memory=lambda p, s: None)
    engine._arena.bind(99, other, 64 << 20)  # a larger engine opens: the arena moves
    out = engine.run(feeds)  # must not replay the graph on the freed scratch
    assert out[C.VAE_FRAMES][0, 0, 0, 0, 0] == 24


# 7. VAE caches stay on the device between steps ---------------------------------------------------------


def test_7_vae_caches_stay_on_the_device(tmp_path: Path) -> None:
    comps = (C.TEXT_ENCODER, "dit", C.VAE_FIRST, C.VAE_STEP)
    m = _write_package(tmp_path, engines=_entries(tmp_path, "10.13.0.35", "8.9", "bf16", comps))
    plan, contract = _vae_plan()
    cuda = FakeCuda()
    fake = FakeTensorRT(cuda, plans={C.VAE_STEP.encode(): plan})
    backend = TrtBackend(BackendOptions(backend="tensorrt"), m, trt_mod=fake.module(), cuda=cuda,
                         compute_capability="8.9")
    step = backend.open(C.VAE_STEP, tmp_path / "vae_decode_step.onnx", contract)
    cache: Any = np.zeros((1, 5, 2, 2, 3), np.float32)
    copies = []
    for i in range(4):
        before = (cuda.calls.count("htod"), cuda.calls.count("dtoh"))
        out = step.run({C.VAE_LATENT: np.full((1, 4, 1, 2, 3), i, np.float32), C.cache_in(0): cache})
        copies.append((cuda.calls.count("htod") - before[0], cuda.calls.count("dtoh") - before[1]))
        cache = out[C.cache_out(0)]
    assert copies[1:] == [(1, 1)] * 3  # the latent in, the frames out; the caches never cross PCIe
    # the copies that remain go through page-locked buffers (pageable ones are not asynchronous),
    # except DeviceTensor.numpy(), an explicit synchronous read-back
    assert set(cuda.copy_kinds) == {"pinned"}
    assert np.asarray(cache)[0, 0, 0, 0, 0] == 4  # the values are right when they are read back
    del cache, out
    backend.close()
    assert cuda.mem == {}


# 8. cuda-python pinned to the TensorRT wheel's CUDA major ------------------------------------------------


def test_8_cuda_python_is_pinned_to_the_tensorrt_wheels_cuda_major() -> None:
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    trt = extras["tensorrt"]
    wheel = next(r for r in trt if r.startswith("tensorrt-cu"))
    major = int(re.match(r"tensorrt-cu(\d+)", wheel).group(1))  # type: ignore[union-attr]
    for extra in ("tensorrt", "dev"):
        cuda = next(r for r in extras[extra] if r.startswith("cuda-python"))
        assert f">={major}." in cuda and f"<{major + 1}" in cuda, (extra, cuda)
    assert any(r.startswith("polygraphy") for r in trt) and any(r.startswith("nvidia-modelopt") for r in trt)


# 9. multi-GPU: probe leaves the device as it was; builds run on --device N and carry its capability ------


def _two_gpus() -> tuple[Any, list[int]]:
    sets: list[int] = []
    current = [0]
    props = {0: SimpleNamespace(name=b"RTX 3090\0", major=8, minor=6, totalGlobalMem=24 * 2**30),
             1: SimpleNamespace(name=b"RTX 4090\0", major=8, minor=9, totalGlobalMem=24 * 2**30)}

    def set_device(i: int) -> tuple[int]:
        sets.append(i)
        current[0] = i
        return (0,)

    rt = SimpleNamespace(cudaDriverGetVersion=lambda: (0, 12040), cudaRuntimeGetVersion=lambda: (0, 12060),
                         cudaGetDeviceCount=lambda: (0, 2), cudaGetDeviceProperties=lambda i: (0, props[i]),
                         cudaSetDevice=set_device, cudaGetDevice=lambda: (0, current[0]),
                         cudaMemGetInfo=lambda: (0, 20 * 2**30, 24 * 2**30))
    return rt, sets


def test_9_probe_restores_the_current_device() -> None:
    from vidrt.backends.cuda import probe

    rt, sets = _two_gpus()
    p = probe(rt)
    assert [d.compute_capability for d in p.devices] == ["8.6", "8.9"]
    assert sets[-1] == 0  # device 0 is current again, as before the probe


def test_9_build_runs_on_the_chosen_device_and_labels_its_capability(tmp_path: Path, monkeypatch: Any) -> None:
    import vidrt.export.build_engines as be
    from vidrt.backends.cuda import probe

    rt, _ = _two_gpus()
    monkeypatch.setattr(be, "probe", lambda: probe(rt))
    _write_package(tmp_path)
    cuda = FakeCuda()
    fake = FakeTensorRT(cuda, plans={b"plan": _dit_plan([(3, 6, 8)])})
    m = be.build_package(tmp_path, be.BuildOptions("bf16", components=("dit",), sizes=((832, 480),), frames=81),
                         trt_mod=fake.module(), cuda=cuda, device=1, log=lambda s: None)
    assert fake.builds and all(b["device"] == 1 for b in fake.builds)
    assert {e.compute_capability for e in m.engines} == {"8.9"}


# 10. VAE graphs at opset 18 --------------------------------------------------------------------------------


# The encoder has the decoder's mid-block attention: at opset 23 TensorRT would get one 384/1024-wide
# IAttention head; it is exported at opset 18 like the decoder.
@pytest.mark.parametrize("variant,export_fn,stage_name,component", [
    ("wan2.1-t2v-1.3b", "export_vae_decoder", "vae", C.VAE_STEP),
    ("wan2.2-i2v-a14b", "export_vae_encoder", "vae_encoder", C.VAE_ENCODE_STEP)])
def test_10_vae_is_exported_at_opset_18_when_the_package_asks_23(tmp_path: Path, monkeypatch: Any, variant: str,
                                                                   export_fn: str, stage_name: str,
                                                                   component: str) -> None:
    import vidrt.export.package as pkg

    seen: list[int] = []

    def fake_export(vae: Any, first: Path, step: Path, spec: Any, opset: int, **kw: Any) -> Any:
        seen.append(opset)
        Path(first).write_bytes(b"x")
        Path(step).write_bytes(b"x")
        c = C.Contract(inputs=(), outputs=())
        return c, c

    monkeypatch.setattr(pkg, export_fn, fake_export)
    ckpt = SimpleNamespace(spec=VARIANTS[variant], vae=lambda: None)
    stage = next(s for s in pkg._stages(ckpt, tmp_path, 23, "bf16") if s.name == stage_name)  # type: ignore[arg-type]
    result = stage.run()
    assert seen == [18] and result.components[component].opset == 18


# 11. TF32 off -------------------------------------------------------------------------------------------------


def test_11_builds_clear_tf32(tmp_path: Path) -> None:
    from vidrt.export.build_engines import BuildOptions, build_plan

    cuda = FakeCuda()
    fake = FakeTensorRT(cuda, plans={b"plan": _dit_plan([(3, 6, 8)])})
    (tmp_path / "vae.onnx").write_bytes(b"onnx")
    build_plan(fake.module(), tmp_path / "vae.onnx", [], BuildOptions("fp32"), tmp_path / "timing.cache")
    assert "TF32" not in fake.builds[-1]["flags"]


# 12. umT5 weight bytes: `wo` stays fp32 --------------------------------------------------------------------


def test_12_umt5_bf16_bytes_match_the_exported_module() -> None:
    torch = pytest.importorskip("torch")
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = TextConfig(vocab_size=256, d_model=64, d_ff=128, num_layers=2, num_heads=4, num_buckets=32)
    te = UMT5EncoderModel(UMT5Config(vocab_size=256, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                     relative_attention_num_buckets=32, feed_forward_proj="gated-gelu"))
    keep = tuple(te._keep_in_fp32_modules or ())
    assert keep  # transformers keeps UMT5's `wo` in fp32
    for name, p in te.named_parameters():  # as export/onnx_export.py export_text_encoder casts it
        if not any(k in name.split(".") for k in keep):
            p.data = p.data.to(torch.bfloat16)
    assert text_weight_bytes(cfg, "bf16") == sum(p.numel() * p.element_size() for p in te.parameters())
    assert round(text_weight_bytes(TextConfig(), "bf16") / GiB, 2) == 12.46


# 13. one FP8 scope default ------------------------------------------------------------------------------


def test_13_one_fp8_scope_default_everywhere() -> None:
    from vidrt.backends.residency import DEFAULT_FP8_SCOPE, dit_weight_bytes, plan_for_package
    from vidrt.cli.trt import plan_cmd
    from vidrt.export.quantize_fp8 import fp8_config, quantize_dit

    defaults = {inspect.signature(quantize_dit).parameters["scope"].default,
                inspect.signature(fp8_config).parameters["scope"].default,
                inspect.signature(make_plan).parameters["fp8_scope"].default,
                inspect.signature(plan_for_package).parameters["fp8_scope"].default,
                inspect.signature(dit_weight_bytes).parameters["fp8_scope"].default,
                next(p.default for p in plan_cmd.params if p.name == "fp8_scope")}
    assert defaults == {DEFAULT_FP8_SCOPE}


# 14. one bad report does not drop the others ---------------------------------------------------------------


def test_14_a_bad_report_entry_keeps_the_rest(tmp_path: Path) -> None:
    comps = (C.TEXT_ENCODER, "dit", C.VAE_FIRST, C.VAE_STEP)
    m = _write_package(tmp_path, engines=_entries(tmp_path, "10.13.0.35", "8.9", "bf16", comps))
    folder = tmp_path / "trt-10.13.0.35-sm89-bf16"
    (folder / "report.json").write_text(json.dumps({"engines": {
        C.TEXT_ENCODER: {"build_seconds": 3},  # a failed build's entry: no device memory figure
        "dit": {"device_memory_bytes": 5, "weight_bytes": 7}}}))
    reports = load_reports(tmp_path, m, "bf16")
    assert reports["dit"].device_memory_bytes == 5 and C.TEXT_ENCODER not in reports


# 15. a failed capture falls back to eager ---------------------------------------------------------------------


def test_15_failed_graph_capture_falls_back_to_eager() -> None:
    plan, contract = _vae_plan()
    engine, cuda, fake = _engine(plan, contract, name=C.VAE_STEP, cuda_graph=True)
    cuda.fail_instantiate = True
    cache = np.zeros((1, 5, 2, 2, 3), np.float32)
    for i in range(4):
        out = engine.run({C.VAE_LATENT: np.full((1, 4, 1, 2, 3), i, np.float32), C.cache_in(0): cache})
        cache = np.asarray(out[C.cache_out(0)])
        assert out[C.VAE_FRAMES][0, 0, 0, 0, 0] == 24 * i
    assert cuda.calls.count("begin_capture") == 1 and not cuda.capturing  # tried once, then eager
    assert fake.engines[0].executions == 4


def test_fakes_follow_the_docs_streaming_changes_the_scratch() -> None:
    plan = dataclasses.replace(_dit_plan([(3, 6, 8)]), streamable=8 << 20, streaming_scratch=5 << 20)
    cuda = FakeCuda()
    fake = FakeTensorRT(cuda, plans={b"p": plan})
    mod = fake.module()
    stream = Stream(cuda)
    TrtEngine("dit", b"p", _contract(), trt_mod=mod, runtime=mod.Runtime(None), cuda=cuda, stream=stream,
              arena=ScratchArena(cuda, stream), streamed_bytes=2 << 20)
    ctx = fake.engines[0].contexts[0]
    assert ctx.device_memory is not None and ctx.device_memory[1] == plan.device_memory + (5 << 20)


_ = FakePlan  # re-exported for readers of this file


# ---- installable on a GPU box: `vidrt doctor` names what is missing and the one install line -------------


def test_doctor_names_the_missing_pieces_and_the_extras_install_line() -> None:
    import tomllib
    from click.testing import CliRunner
    from vidrt.backends.tensorrt import INSTALL_TENSORRT
    from vidrt.cli.app import cli

    assert INSTALL_TENSORRT == 'pip install "vidrt[tensorrt]"'
    assert "tensorrt" in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    res = CliRunner().invoke(cli, ["doctor"])
    assert res.exit_code == 0, res.output
    # here: no GPU, TensorRT only as stubs
    assert f"TensorRT: {INSTALL_TENSORRT}" in res.output and "missing for the TensorRT path:" in res.output


# ---- decode memory bounded by the tile: tile-major order -------------------------------------------------


def test_tile_major_decode_holds_one_tiles_caches_and_gives_the_same_frames() -> None:
    import weakref

    from vidrt.backends.ort import OrtBackend
    from vidrt.models import default_package
    from vidrt.package.manifest import artifact_path, load_manifest
    from vidrt.vae_decode import iter_decode, plan_tiles

    package = default_package()
    assert package is not None
    m = load_manifest(package, verify=False)
    backend = OrtBackend(BackendOptions(backend="onnxruntime"))
    live: list[int] = [0]
    peak: list[int] = [0]

    class Counting:
        """The ORT engine, counting the cache arrays alive (weakrefs: freed when the decoder drops them)."""

        def __init__(self, name: str) -> None:
            comp = m.components[name]
            self.engine = backend.open(name, artifact_path(package, comp.artifact.file), comp.contract)
            self.contract = self.engine.contract

        def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            out = self.engine.run(feeds)
            for n, v in out.items():
                if n.startswith("cache_out_"):
                    live[0] += 1
                    weakref.finalize(v, lambda: live.__setitem__(0, live[0] - 1))
            peak[0] = max(peak[0], live[0])
            return out

    spec = m.model
    _, f, h, w = spec.latent_shape(64, 64, 17)
    lat = np.random.default_rng(3).standard_normal((spec.vae.z_dim, f, h, w)).astype(np.float32)
    tiles = plan_tiles(h, w, 6, 6, scale=spec.vae.stride[1], overlap=2)
    assert tiles.count == 4
    n_caches = sum(1 for n in m.components[C.VAE_STEP].contract.input_names if n.startswith("cache_in_"))
    out = {}
    for order in ("frame", "tile"):
        first, step = Counting(C.VAE_FIRST), Counting(C.VAE_STEP)
        live[0] = peak[0] = 0
        out[order] = np.concatenate(list(iter_decode(lat, first, step, tiles, mean=spec.vae.latents_mean,
                                                     std=spec.vae.latents_std, order=order)))
        peak_sets = peak[0] / n_caches
        if order == "frame":
            assert peak_sets == tiles.count + 1  # every tile's caches + the running tile's new ones
        else:
            assert peak_sets == 2  # one tile: its caches in + its new caches out
    np.testing.assert_array_equal(out["frame"], out["tile"])


# ---- per-stage GPU time and peak memory for --stats-json --------------------------------------------------


def test_backend_reports_gpu_seconds_per_stage_and_peak_memory(tmp_path: Path) -> None:
    comps = (C.TEXT_ENCODER, "dit", C.VAE_FIRST, C.VAE_STEP)
    m = _write_package(tmp_path, engines=_entries(tmp_path, "10.13.0.35", "8.9", "bf16", comps))
    cuda = FakeCuda()
    plan = dataclasses.replace(_dit_plan([(3, 6, 8)]), device_memory=5 << 20)
    fake = FakeTensorRT(cuda, plans={b"dit": plan})
    backend = TrtBackend(BackendOptions(backend="tensorrt"), m, trt_mod=fake.module(), cuda=cuda,
                         compute_capability="8.9")
    engine = backend.open("dit", tmp_path / "dit.onnx", _contract())
    for _ in range(3):
        engine.run(_feeds(2))
    held = sum(len(b) for b in cuda.mem.values())  # I/O buffers + the 5 MiB arena
    stats = backend.gpu_stats()
    assert stats["gpu_seconds"] == {"denoise": pytest.approx(0.003)}  # FakeCuda: 1 ms per event pair
    assert stats["engine_calls"] == {"dit": 3} and stats["peak_device_bytes"] == held
    backend.close()


# ---- smaller cards: umT5 on the CPU when the plan says so; prompt embeddings cached on disk ----------------


def test_small_card_runs_umt5_on_the_cpu_and_a_repeated_prompt_skips_it(tmp_path: Path, monkeypatch: Any) -> None:
    from test_pipeline import _PlannedBackend
    from vidrt.models import default_package
    from vidrt.pipeline import Pipeline
    from vidrt.request import Request

    package = default_package()
    assert package is not None
    pipe = Pipeline.load(package, embedding_cache=tmp_path / "emb", warn=lambda s: None)
    req = Request(prompt="a red circle moving left", seed=3, steps=4)
    reference = pipe.run(req).frames

    # The tiny model's umT5 is small, so no budget makes the plan move it; the 1.3B's is (8/12 GB cards:
    # test_residency.py::test_plan_command_summarises_several_cards). Here the plan is asked for it.
    import vidrt.pipeline as pipeline_module

    real_plan = pipeline_module.plan_for_package
    monkeypatch.setattr(pipeline_module, "plan_for_package",
                        lambda *a, **k: real_plan(*a, **{**k, "text_device": "cpu"}))
    budget = 2**40
    small = Pipeline.load(package, warn=lambda s: None)
    small.backend = backend = _PlannedBackend(small.backend, budget)
    small._engines.clear()
    frames = small.run(req).frames
    assert small.text_backend is not None  # umT5 went to ONNX Runtime CPU ...
    assert ("run", C.TEXT_ENCODER, None) not in backend.events  # ... not to the planned device backend
    assert any(e[0] == "run" and e[1] == "dit" for e in backend.events)
    assert frames is not None and reference is not None
    assert np.array_equal(frames, reference)  # the same clip, wherever umT5 ran

    # the first run cached the prompt embeddings: the same prompt again runs no text encoder
    runs = []
    te = pipe.engine(C.TEXT_ENCODER)
    real = te.run
    te.run = lambda feeds: runs.append(1) or real(feeds)  # type: ignore[method-assign]
    again = pipe.run(req).frames
    assert runs == [] and pipe.embeddings is not None and pipe.embeddings.hits == 1
    assert np.array_equal(again, reference)
    pipe.run(Request(prompt="a blue square moving up", seed=3, steps=4))  # a new prompt: encoded
    assert runs  # encoded (one call per prompt row)


# ---- vidrt build --check: polygraphy's comparator against ONNX Runtime -------------------------------------


def _matmul_onnx(path: Path, k: float) -> Path:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4])
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], (np.eye(4) * k).ravel().tolist())
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def test_check_engine_passes_a_match_and_fails_a_mismatch(tmp_path: Path) -> None:
    pytest.importorskip("polygraphy", reason="polygraphy is not installed (dev extra)")
    from vidrt.export.check_engines import _onnx_runner, check_engine

    ref = _matmul_onnx(tmp_path / "a.onnx", 1.0)
    shapes = {"x": ((2, 4), "float32")}
    # the engine's runner is TensorRT's on a GPU; here an ONNX Runtime runner stands in for it
    same = check_engine(ref, _onnx_runner(_matmul_onnx(tmp_path / "same.onnx", 1.0)), shapes, "fp32")
    off = check_engine(ref, _onnx_runner(_matmul_onnx(tmp_path / "off.onnx", 1.01)), shapes, "fp32")
    assert same["passed"] and same["outputs"]["y"]["max_abs"] == 0.0
    assert not off["passed"] and off["outputs"]["y"]["mean_abs"] > 1e-3


def test_build_check_writes_the_comparison_into_the_report(tmp_path: Path) -> None:
    from vidrt.export.build_engines import BuildOptions, build_package

    _write_package(tmp_path)
    seen: list[tuple[str, Any, str]] = []

    def checker(onnx: Path, plan: Any, shapes: Any, precision: str, ranges: Any) -> dict[str, Any]:
        seen.append((onnx.name, shapes, precision))
        return {"passed": True, "atol": 1e-3}

    fake = FakeTensorRT(FakeCuda()).module()
    build_package(tmp_path, BuildOptions("bf16", sizes=((832, 480),), frames=81, check=True), trt_mod=fake,
                  compute_capability="8.9", total_memory=24 * 2**30, log=lambda s: None, checker=checker,
                  builder=lambda *a, **k: (b"plan", {"device_memory_bytes": 1}))
    report = json.loads((tmp_path / "trt-10.13.0.35-sm89-bf16" / "report.json").read_text())["engines"]
    assert report["dit"]["check"] == {"passed": None, "skipped": "bfloat16 inputs"}  # numpy has no bf16
    assert report[C.VAE_STEP]["check"]["passed"] is True
    te = next(s for n, s, _ in seen if n == "text_encoder.onnx")
    assert te == {C.INPUT_IDS: ((2, 128), "int64"), C.ATTENTION_MASK: ((2, 128), "int64")}
    assert {p for n, _, p in seen if n.startswith("vae")} == {"fp32"}


def test_make_gpu_check_skips_here_with_its_reason() -> None:
    import subprocess
    import sys

    from vidrt.backends.cuda import probe

    if probe().ok:
        pytest.skip("a GPU is here: run `make gpu-check` itself")
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("gpu-check skipped: ") and 'pip install "vidrt[tensorrt]"' in done.stdout


def test_engine_runs_on_the_tensorrt_11_api() -> None:
    plan = _dit_plan([(3, 6, 8)])
    cuda = FakeCuda()
    fake = FakeTensorRT(cuda, version="11.4.0.106", plans={b"plan": plan})
    mod = fake.module()
    stream = Stream(cuda)
    engine = TrtEngine("dit", b"plan", _contract(), trt_mod=mod, runtime=mod.Runtime(None), cuda=cuda,
                       stream=stream, arena=ScratchArena(cuda, stream))
    out = engine.run(_feeds(2))
    assert out[C.VELOCITY].shape == (2, 16, 3, 6, 8) and type(fake.engines[0]).__name__ == "FakeEngine11"
