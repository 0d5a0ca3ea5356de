"""LoRAs at load time on TensorRT (issue 12 item 3, issue 13 item 4): refittable DiT plans from `vidrt
build`, LoRA-merged weights refitted in place (vidrt.backends.refit), without a GPU. The fakes in
tests/trt_fakes.py (FakeRefitter, FakeWeights, the builder's network and flags) enforce the documented
contract: unknown names, wrong dtypes and sizes are rejected, a refit fails while a combined weight is
missing, the refit reads the weights through their pointers when it runs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_tensorrt import _contract, _dit_plan, _entries, _write_package
from trt_fakes import BF16, FLOAT, HALF, FakeCuda, FakeRefitter, FakeTensorRT, FakeWeights
from vidrt.backends.base import BackendOptions
from vidrt.backends.refit import as_prototype
from vidrt.backends.tensorrt import TrtBackend, from_bf16_bits, to_bf16_bits
from vidrt.errors import DeviceError, UsageError
from vidrt.package import contracts as C
from vidrt.package.manifest import WeightRef, load_manifest, make_artifact, write_manifest

Q_W, Q_B, K_W = "model.blocks.0.attn1.to_q.weight", "model.blocks.0.attn1.to_q.bias", "model.blocks.0.attn1.to_k.weight"
HEAD = "model.proj_out.weight"
COMPS = (C.TEXT_ENCODER, "dit", C.VAE_FIRST, C.VAE_STEP)


def _base(dtype: str) -> dict[str, np.ndarray]:
    """Base weights as stored in the package (bf16 as uint16 bits); Linear weights [in, out] (transposed)."""
    rng = np.random.default_rng(1)
    values = {Q_W: rng.standard_normal((4, 4)), Q_B: rng.standard_normal(4), K_W: rng.standard_normal((4, 4)),
              HEAD: rng.standard_normal((4, 2))}
    if dtype == "bfloat16":
        return {n: to_bf16_bits(v) for n, v in values.items()}
    return {n: v.astype(dtype) for n, v in values.items()}


def _package(root: Path, dtype: str = "bfloat16", refit: str = "REFIT_INDIVIDUAL") -> dict[str, np.ndarray]:
    """A package whose DiT records four parameters in its external-data file, with plans for this GPU."""
    m = _write_package(root, engines=_entries(root, "10.13.0.35", "8.9", "bf16", COMPS))
    base = _base(dtype)
    refs, blob = {}, b""
    for init, value in base.items():
        param = init.removeprefix("model.")
        refs[param] = WeightRef(init, param.endswith("weight"), len(blob), value.nbytes, dtype, value.shape)
        blob += value.tobytes()
    (root / "dit.onnx.data").write_bytes(blob)
    dit = dataclasses.replace(m.components["dit"], artifact=make_artifact(root, "dit.onnx", "dit.onnx.data"),
                              weights=refs)
    engines = tuple(dataclasses.replace(e, refit=refit if e.component == "dit" else "") for e in m.engines)
    write_manifest(root, dataclasses.replace(m, components={**m.components, "dit": dit}, engines=engines))
    return base


def _plan(base: dict[str, np.ndarray], trt_dtype: Any = BF16, names: tuple[str, ...] = (Q_W, Q_B, K_W, HEAD),
          combined: tuple[frozenset[str], ...] = ()) -> Any:
    """The DiT plan: its refittable weights as built (base values), velocity = 2 x + t + mean(q bias)."""
    def held(v: np.ndarray) -> np.ndarray:
        f = from_bf16_bits(v) if v.dtype == np.uint16 else v.astype(np.float32)
        return to_bf16_bits(f) if trt_dtype is BF16 else f.astype(np.float16 if trt_dtype is HALF else np.float32)

    plan = _dit_plan([(3, 6, 8)])
    compute = plan.compute
    return dataclasses.replace(
        plan, weights={n: (trt_dtype, held(base[n])) for n in names}, combined=combined, refittable=True,
        compute=lambda x: {C.VELOCITY: compute(x)[C.VELOCITY] + x[Q_B].mean()})


def _backend(root: Path, plan: Any, manifest: Any = None) -> tuple[TrtBackend, FakeTensorRT]:
    m = manifest or load_manifest(root, verify=True)
    fake = FakeTensorRT(FakeCuda(), plans={b"dit": plan})
    backend = TrtBackend(BackendOptions(backend="tensorrt"), m, root, trt_mod=fake.module(), cuda=fake.cuda,
                         compute_capability="8.9")
    return backend, fake


def _bits(x: np.ndarray) -> np.ndarray:
    return to_bf16_bits(x)


def _feeds() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {C.LATENTS: rng.standard_normal((1, 16, 3, 6, 8)).astype(np.float32), C.TIMESTEP: np.ones(1, np.float32),
            C.CONTEXT: rng.standard_normal((1, 512, 64)).astype(np.float32)}


def test_refit_applies_merged_weights_from_the_base_and_restores_it(tmp_path: Path) -> None:
    base = _package(tmp_path)
    backend, fake = _backend(tmp_path, _plan(base))
    rng = np.random.default_rng(2)
    merged1 = {Q_W: _bits(rng.standard_normal((4, 4))), Q_B: _bits(rng.standard_normal(4))}
    engine = backend.open("dit", tmp_path / "dit.onnx", _contract(), weights=merged1)
    held = fake.engines[-1]
    assert np.array_equal(held.weights[Q_W], merged1[Q_W]) and np.array_equal(held.weights[Q_B], merged1[Q_B])
    assert np.array_equal(held.weights[K_W], base[K_W])
    plain = 2 * _feeds()[C.LATENTS] + 1
    out = engine.run(_feeds())[C.VELOCITY]
    assert np.allclose(out, plain + from_bf16_bits(merged1[Q_B]).mean(), atol=0.05, rtol=0.01)

    # another set (a strength change, another LoRA): the weights only the first set changed go back to base
    merged2 = {Q_W: _bits(rng.standard_normal((4, 4))), HEAD: _bits(rng.standard_normal((4, 2)))}
    backend.refit(engine, merged2)
    assert np.array_equal(held.weights[Q_W], merged2[Q_W]) and np.array_equal(held.weights[HEAD], merged2[HEAD])
    assert np.array_equal(held.weights[Q_B], base[Q_B])
    assert held.refits[-1] == (backend.stream.handle, tuple(sorted((Q_W, Q_B, HEAD))))  # on the engine's stream
    # no LoRA: every weight is the base again, and the engine computes what it computed before any LoRA
    backend.refit(engine, {})
    assert all(np.array_equal(held.weights[n], base[n]) for n in base)
    assert np.allclose(engine.run(_feeds())[C.VELOCITY], plain + from_bf16_bits(base[Q_B]).mean(), atol=0.05, rtol=0.01)
    backend.refit(engine, {})  # nothing differs from the base: no refit at all
    assert len(held.refits) == 3
    assert all(not r.set for r in held.refitters)  # every weight unset after its refit (RefitterDoc)
    stats = backend.gpu_stats()
    # bytes set (bf16): q, q bias; then q, head, q bias (restored); then q, head (restored)
    assert stats["lora_refit_bytes"] == (32 + 8) + (32 + 16 + 8) + (32 + 16) and stats["lora_refit_seconds"] >= 0
    backend.close()


def test_refit_supplies_the_weights_tensorrt_combined(tmp_path: Path) -> None:
    """get_missing_weights: q and k were optimised together; a LoRA on q alone must also supply k (its base
    value), or refit_cuda_engine fails (FakeRefitter refuses while any is missing)."""
    base = _package(tmp_path)
    backend, fake = _backend(tmp_path, _plan(base, combined=(frozenset({Q_W, K_W}),)))
    merged = {Q_W: _bits(np.full((4, 4), 0.5))}
    backend.open("dit", tmp_path / "dit.onnx", _contract(), weights=merged)
    held = fake.engines[-1]
    assert held.refits[-1][1] == tuple(sorted((Q_W, K_W)))
    assert np.array_equal(held.weights[Q_W], merged[Q_W]) and np.array_equal(held.weights[K_W], base[K_W])
    backend.close()


@pytest.mark.parametrize(("stored", "built"), [("float32", HALF), ("float32", BF16), ("bfloat16", FLOAT)])
def test_refit_casts_to_the_dtype_the_plan_was_built_with(tmp_path: Path, stored: str, built: Any) -> None:
    """set_named_weights rejects a dtype other than the prototype's (pyCoreDoc): the merged arrays, in the
    package's dtype, are cast to the plan's."""
    base = _package(tmp_path, dtype=stored)
    backend, fake = _backend(tmp_path, _plan(base, trt_dtype=built))
    value = np.linspace(-1, 1, 16).reshape(4, 4)
    merged = {Q_W: _bits(value) if stored == "bfloat16" else value.astype(stored)}
    backend.open("dit", tmp_path / "dit.onnx", _contract(), weights=merged)
    got = fake.engines[-1].weights[Q_W]
    as_float = from_bf16_bits(got) if built is BF16 else got.astype(np.float32)
    assert np.allclose(as_float, value, atol=0.01) and not fake.engines[-1].refitters[-1].rejected
    backend.close()


def test_fake_refitter_enforces_the_documented_contract() -> None:
    """What the refit code relies on the fake to refuse (pyCoreDoc RefitterDoc): otherwise a wrong name,
    dtype or size, or a forgotten missing weight, would pass the tests above."""
    base = _base("bfloat16")
    plan = _plan(base, combined=(frozenset({Q_W, K_W}),))
    fake = FakeTensorRT(FakeCuda(), plans={b"dit": plan})
    engine = fake.module().Runtime(None).deserialize_cuda_engine(b"dit")
    refitter = FakeRefitter(engine, None)
    arr = np.ascontiguousarray(base[Q_W])
    assert not refitter.set_named_weights("blocks.0.attn1.to_q.weight", FakeWeights(BF16, arr.ctypes.data, 16))
    assert not refitter.set_named_weights(Q_W, FakeWeights(FLOAT, arr.ctypes.data, 16))  # dtype
    assert not refitter.set_named_weights(Q_W, FakeWeights(BF16, arr.ctypes.data, 8))  # size
    assert refitter.get_weights_prototype("nope").size == -1
    assert refitter.set_named_weights(Q_W, FakeWeights(BF16, arr.ctypes.data, 16))
    assert refitter.get_missing_weights() == [K_W] and not refitter.refit_cuda_engine()
    with pytest.raises(AssertionError):
        refitter.max_threads = 0
    assert not refitter.unset_named_weights(K_W)  # never set


def test_as_prototype_converts_between_the_float_formats() -> None:
    x = np.array([1.5, -2.25, 3.0], np.float32)
    assert np.array_equal(as_prototype(x, BF16), to_bf16_bits(x))
    assert as_prototype(to_bf16_bits(x), HALF).dtype == np.float16
    assert np.array_equal(as_prototype(to_bf16_bits(x), FLOAT), x)
    with pytest.raises(DeviceError, match="cannot refit FP8"):
        as_prototype(x, type("T", (), {"name": "FP8"})())


def test_lora_on_a_plan_built_without_refit_is_refused_in_one_line(tmp_path: Path) -> None:
    base = _package(tmp_path, refit="")
    backend, fake = _backend(tmp_path, _plan(base))
    with pytest.raises(UsageError) as err:
        backend.open("dit", tmp_path / "dit.onnx", _contract(), weights={Q_W: base[Q_W]})
    msg = str(err.value)
    assert "\n" not in msg and "dit plan was built without refit" in msg
    assert f"vidrt build {tmp_path} --precision bf16" in msg and "vidrt export --lora FILE" in msg
    assert fake.deserialized == []  # refused before the plan was read
    engine = backend.open("dit", tmp_path / "dit.onnx", _contract())  # without a LoRA it runs
    with pytest.raises(UsageError, match="built without refit"):
        backend.refit(engine, {Q_W: base[Q_W]})
    backend.close()


def test_whole_graph_refuses_a_weight_it_cannot_refit_a_piece_skips_what_it_lacks(tmp_path: Path) -> None:
    base = _package(tmp_path)
    backend, fake = _backend(tmp_path, _plan(base, names=(Q_W, Q_B, K_W)))  # HEAD not refittable
    with pytest.raises(DeviceError, match=r"dit plan cannot refit 1 weight\(s\).*model.proj_out.weight"):
        backend.open("dit", tmp_path / "dit.onnx", _contract(), weights={HEAD: base[HEAD]})
    backend.close()
    # a step-caching piece holds a part of the DiT's weights: it takes the ones it has
    m = load_manifest(tmp_path)
    piece = "dit.blocks_rest"
    comps = {**m.components, piece: dataclasses.replace(m.components["dit"], name=piece, weights={})}
    engines = (*m.engines, dataclasses.replace(next(e for e in m.engines if e.component == "dit"), component=piece))
    m = dataclasses.replace(m, components=comps, engines=engines)  # (a piece's own contract does not matter here)
    backend, fake = _backend(tmp_path, _plan(base, names=(Q_W, Q_B, K_W)), m)
    merged = {Q_W: _bits(np.ones((4, 4))), HEAD: base[HEAD]}
    backend.open(piece, tmp_path / "dit.onnx", _contract(), weights=merged)
    assert np.array_equal(fake.engines[-1].weights[Q_W], merged[Q_W])
    backend.close()


# ---- vidrt build: refittable DiT plans ------------------------------------------------------------------


def _build(root: Path, fake: FakeTensorRT, **options: Any) -> tuple[Any, list[str]]:
    from vidrt.export.build_engines import BuildOptions, build_package

    logs: list[str] = []
    m = build_package(root, BuildOptions(options.pop("precision", "bf16"), sizes=((48, 32),), frames=5, **options),
                      trt_mod=fake.module(), compute_capability="8.9", total_memory=24 * 2**30, log=logs.append)
    return m, logs


def _build_fake(base: dict[str, np.ndarray], version: str = "10.13.0.35", **kw: Any) -> FakeTensorRT:
    return FakeTensorRT(FakeCuda(), version=version, plans={b"plan": _plan(base, **kw)})


def test_build_makes_the_dit_refittable_and_records_it(tmp_path: Path) -> None:
    base = _package(tmp_path)
    fake = _build_fake(base)
    m, logs = _build(tmp_path, fake)
    by = {e.component: e for e in m.engines}
    assert by["dit"].refit == "REFIT_INDIVIDUAL" and by[C.TEXT_ENCODER].refit == by[C.VAE_STEP].refit == ""
    assert load_manifest(tmp_path).engines == m.engines  # recorded in manifest.json
    dit_build = next(b for b in fake.builds if b.get("marked"))
    assert "REFIT_INDIVIDUAL" in dit_build["flags"] and "REFIT" not in dit_build["flags"]
    assert sorted(dit_build["marked"]) == sorted(base)  # every recorded parameter, by initializer name
    assert sum("REFIT_INDIVIDUAL" in b["flags"] for b in fake.builds) == 1  # text encoder, VAE: plain
    report = json.loads((tmp_path / "trt-10.13.0.35-sm89-bf16" / "report.json").read_text())
    assert report["engines"]["dit"]["refit"] == {"flag": "REFIT_INDIVIDUAL", "marked": 4, "weights": 4, "lost": [],
                                                 "lost_count": 0}
    # --no-refit: plain plans, and a LoRA on them is refused with the rebuild command
    m, _ = _build(tmp_path, fake, refit=False)
    assert all(e.refit == "" for e in m.engines)


def test_build_rebuilds_without_refit_when_a_marked_bias_is_not_refittable(tmp_path: Path) -> None:
    """TensorRT 11.3's known issue: under refit "A GEMM bias can be dropped and treated as zero, and that
    bias is not exposed through the refit API". A plan whose refit API lacks a marked weight is rebuilt
    plain (correct output, LoRAs refused) with a warning naming it."""
    base = _package(tmp_path)
    fake = _build_fake(base, names=(Q_W, K_W, HEAD))  # the bias is gone
    m, logs = _build(tmp_path, fake)
    assert next(e for e in m.engines if e.component == "dit").refit == ""
    warning = next(line for line in logs if line.startswith("warning: dit"))
    assert Q_B in warning and "rebuilding dit without refit" in warning
    dit_builds = [b for b in fake.builds if "marked" in b and b.get("profiles") and
                  len(b["profiles"]) == 2 and C.LATENTS in b["profiles"][0]]
    assert ["REFIT_INDIVIDUAL" in b["flags"] for b in dit_builds] == [True, False]


@pytest.mark.parametrize("version", ["11.3.0.9", "11.3.1.4"])
def test_tensorrt_11_3_builds_no_refittable_plan(tmp_path: Path, version: str) -> None:
    base = _package(tmp_path)
    fake = _build_fake(base, version=version)
    m, logs = _build(tmp_path, fake)
    built = [e for e in m.engines if e.tensorrt_version == version]
    assert len(built) == 4 and all(e.refit == "" for e in built)
    assert not any("REFIT_INDIVIDUAL" in b["flags"] for b in fake.builds)
    assert any("11.3 known issue" in line for line in logs)
    m11_4, _ = _build(tmp_path, _build_fake(base, version="11.4.0.106"))
    assert next(e for e in m11_4.engines if e.component == "dit" and e.tensorrt_version == "11.4.0.106").refit


def test_which_plans_are_refittable(tmp_path: Path) -> None:
    from vidrt.export.build_engines import BuildOptions, refit_names

    _package(tmp_path)
    m = load_manifest(tmp_path)
    names, why = refit_names("dit", m, BuildOptions("fp8"), "10.13.0.35")
    assert names == () and "baked in before quantising" in why
    names, why = refit_names("dit.blocks_rest", dataclasses.replace(m, components={
        **m.components, "dit.blocks_rest": m.components["dit"]}), BuildOptions("bf16"), "10.13.0.35")
    assert names == tuple(sorted(base_name for base_name in _base("bfloat16"))) and why == ""
    assert refit_names(C.VAE_STEP, m, BuildOptions("bf16"), "10.13.0.35") == ((), "")
    names, why = refit_names("dit", m, BuildOptions("bf16"), "10.1.0.27")  # kREFIT_INDIVIDUAL: 10.2+
    assert names == () and "REFIT_INDIVIDUAL" in why


# ---- the pipeline: one engine per graph, refitted in place ------------------------------------------------


class _RefitInPlace:
    """A backend that behaves as TensorRT towards the pipeline (an open engine is refitted in place, a
    non-refittable plan checked first) over ONNX Runtime: `refit` remakes the wrapped session with the
    merged weights it is given, so the clip shows whether those were right. Records every call."""

    name = "onnxruntime"

    def __init__(self, inner: Any) -> None:
        self.inner, self.calls = inner, []
        self.cpu_features = inner.cpu_features  # the same graph forms as the ONNX Runtime pipeline it is compared with
        self.paths: dict[str, tuple[Path, Any]] = {}

    def device_memory(self) -> None:
        return None

    def stream_weights(self, streamed: Any) -> None:
        pass

    def check_refit(self, name: str) -> None:
        self.calls.append(("check", name, 0))

    def tensor_ops(self) -> Any:
        return self.inner.tensor_ops()

    def open(self, name: str, path: Path, contract: Any, weights: Any = None) -> Any:
        self.paths[name] = (path, contract)
        self.calls.append(("open", name, len(weights or {})))
        return _Swappable(self.inner.open(name, path, contract, weights))

    def refit(self, engine: Any, weights: Any) -> None:
        self.calls.append(("refit", engine.name, len(weights)))
        self.last = dict(weights)
        path, contract = self.paths[engine.name]
        engine.inner.close()
        engine.inner = self.inner.open(engine.name, path, contract, weights)


class _Swappable:
    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.inner, attr)

    def run(self, feeds: Any) -> Any:
        return self.inner.run(feeds)

    def close(self) -> None:
        self.inner.close()


def test_pipeline_refits_the_open_dit_from_the_base_when_the_lora_set_changes() -> None:
    """The same clips as ONNX Runtime's session-per-set path, for LoRA 1.0 -> 0.5 -> none -> 1.0, with one
    DiT engine refitted in place; the merged weights at 0.5 are the base plus half the 1.0 delta (from the
    base, not onto the merged weights); removing the LoRA hands the refit an empty set (base restored)."""
    from vidrt.models import default_package
    from vidrt.package.recipes import LoraRef
    from vidrt.pipeline import Pipeline
    from vidrt.request import Request

    package = default_package()
    assert package is not None
    lora = str(package / "fast_lora.safetensors")
    ort = Pipeline.load(package, warn=lambda s: None)
    pipe = Pipeline.load(package, warn=lambda s: None)
    pipe.backend = backend = _RefitInPlace(pipe.backend)
    base = pipe._merger.base("dit")
    half_merged: dict[str, np.ndarray] = {}
    for strength in (1.0, 0.5, 0.0, 1.0):
        req = Request(prompt="a red circle moving left", seed=3, steps=2,
                      loras=(LoraRef(lora, strength),) if strength else ())
        want, got = ort.run(req).frames, pipe.run(req).frames
        assert want is not None and got is not None and np.array_equal(got, want), strength
        half_merged = backend.last if strength == 0.5 else half_merged
    dit_calls = [c for c in backend.calls if c[1] == "dit"]
    assert [c[0] for c in dit_calls] == ["check", "open", "check", "refit", "refit", "check", "refit"]
    assert dit_calls[1][2] > 0 and dit_calls[4][2] == 0  # opened with the merged set; no LoRA: an empty set
    full_merged = pipe._merger.merged("dit", (LoraRef(lora, 1.0),))[1]
    assert set(half_merged) == set(full_merged)
    for name in list(full_merged)[:8]:
        half = half_merged[name].astype(np.float64) - base(name)
        full = full_merged[name].astype(np.float64) - base(name)
        assert np.abs(full).max() > 0 and np.allclose(half, full / 2, atol=1e-6), name


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


def test_loras_reach_the_step_caching_pieces_on_both_paths() -> None:
    """Issue 13 item 4: with --cache the DiT runs as pieces, and a LoRA reaches them as it reaches the
    whole graph (same initializer names; each piece gets the part of the merged set it holds). MagCache
    at threshold 0 never skips, so its clip equals the uncached clip with the same LoRA; on the refit
    path (one engine per piece, refitted in place) the clips equal ONNX Runtime's session-per-set ones."""
    from vidrt.models import default_package
    from vidrt.package.recipes import LoraRef
    from vidrt.pipeline import Pipeline
    from vidrt.request import Request

    package = default_package()
    assert package is not None
    lora = str(package / "fast_lora.safetensors")
    ort = Pipeline.load(package, warn=lambda s: None)
    req = Request(prompt="a red circle moving left", seed=5, steps=3, loras=(LoraRef(lora, 0.8),))
    whole = ort.run(req).frames
    pieces = ort.run(dataclasses.replace(req, cache="magcache:0"))
    assert pieces.stats.cache.block_stack_skips == 0 and pieces.stats.lora_merge_bytes > 0
    assert _psnr(pieces.frames, whole) >= 70.0
    no_lora = ort.run(dataclasses.replace(req, cache="magcache:0", loras=())).frames
    assert _psnr(no_lora, whole) < 40.0  # the LoRA changes the clip: the pieces did take it

    pipe = Pipeline.load(package, warn=lambda s: None)
    pipe.backend = backend = _RefitInPlace(pipe.backend)
    for strength in (0.8, 0.0, 0.5):
        r = dataclasses.replace(req, cache="magcache:0", loras=(LoraRef(lora, strength),) if strength else ())
        want, got = ort.run(r).frames, pipe.run(r).frames
        assert want is not None and got is not None and np.array_equal(got, want), strength
    refits = {c[1]: c[2] for c in backend.calls if c[0] == "refit"}
    opened = {c[1]: c[2] for c in backend.calls if c[0] == "open" and c[1].startswith("dit.")}
    merged = set(pipe._merger.merged("dit", (LoraRef(lora, 1.0),))[1])
    expected = {p: len(merged & {ref.initializer for ref in pipe.manifest.components[p].weights.values()})
                for p in opened}
    assert opened == expected and sum(expected.values()) >= len(merged)  # each piece: the part it holds
    assert expected["dit.blocks_rest"] > 0 and refits == expected  # the last set (0.5) refitted the same
    checked = {c[1] for c in backend.calls if c[0] == "check"}  # every plan a LoRA run may refit, before work
    assert checked == {"dit", *(f"dit.{p}" for p in C.DIT_PIECES)}


def test_stats_table_shows_the_refit_next_to_the_merge() -> None:
    from vidrt.stats import RunStats

    stats = RunStats(lora_merge_seconds=0.5, lora_merge_bytes=2**20)
    assert stats.table().splitlines()[-1] == "LoRA merge 0.500 s, 1.0 MiB merged"  # ONNX Runtime
    stats.gpu = {"lora_refit_seconds": 0.25, "lora_refit_bytes": 3 * 2**20}  # TensorRT's gpu_stats()
    assert stats.table().splitlines()[-1] == "LoRA merge 0.500 s, 1.0 MiB merged; refit 0.250 s, 3.0 MiB"
    assert stats.to_dict()["gpu"]["lora_refit_bytes"] == 3 * 2**20


# ---- end to end: the TensorRT backend (fakes) around the bundled model's real graphs, with LoRAs ------------


def _refittable_ort_plans(package: Path, manifest: Any, ranges: dict[str, tuple[int, int]]) -> dict[bytes, Any]:
    """test_trt_device's ONNX-Runtime-backed fake plans, the DiT's (whole and pieces) refittable: each
    holds the recorded weights its graph has, and computes with the values it holds now (a session made
    with the weights that differ from the base, as ONNX Runtime's LoRA path makes one)."""
    import hashlib

    from test_trt_device import _ort_backed_plans
    from vidrt.backends.ort import OrtEngine
    from vidrt.lora import base_reader

    plans = _ort_backed_plans(package, manifest, ranges)
    whole = manifest.components["dit"]
    assert whole.artifact.data_file is not None
    read = base_reader(package / whole.artifact.data_file, whole.weights)
    for name, comp in manifest.components.items():
        if name.partition(".")[0] != "dit":
            continue
        base = {ref.initializer: np.array(read(ref.initializer)) for ref in comp.weights.values()}
        sessions: dict[str, Any] = {}

        def compute(feeds: dict[str, Any], name: str = name, comp: Any = comp, base: Any = base,
                    sessions: Any = sessions) -> Any:
            changed = {n: feeds[n] for n in base if not np.array_equal(feeds[n], base[n])}
            key = hashlib.sha256(b"".join(n.encode() + changed[n].tobytes() for n in sorted(changed))).hexdigest()
            if key not in sessions:
                sessions[key] = OrtEngine(name, package / comp.artifact.file, comp.contract, weights=changed or None)
            return sessions[key].run({k: v for k, v in feeds.items() if k in comp.contract.input_names})

        plans[name.encode()] = dataclasses.replace(plans[name.encode()], compute=compute, refittable=True,
                                                   weights={n: (FLOAT, v) for n, v in base.items()})
    return plans


def test_tensorrt_pipeline_with_loras_makes_onnxruntimes_clips() -> None:
    """The pipeline on the TensorRT backend (fakes around the bundled model's real graphs: its buffers,
    device tensors and refits run for real, the graphs' arithmetic in ONNX Runtime) with a LoRA, then
    another strength, then none, with and without step caching: the clips ONNX Runtime makes."""
    from vidrt.models import default_package
    from vidrt.package.recipes import LoraRef
    from vidrt.pipeline import Pipeline
    from vidrt.request import Request

    package = default_package()
    assert package is not None
    manifest = load_manifest(package)
    spec = manifest.model
    from test_trt_device import bundled_ranges

    plans = _refittable_ort_plans(package, manifest, bundled_ranges(spec))
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)  # the plans' folder; the package's files beside them (refit reads base weights there)
        for item in package.iterdir():
            (root / item.name).symlink_to(item)
        entries = tuple(dataclasses.replace(
            e, profiles=((64, 64, 1),) if e.component in (C.VAE_FIRST, C.VAE_STEP) else (),
            refit="REFIT_INDIVIDUAL" if e.component.partition(".")[0] == "dit" else "")
            for e in _entries(root, "10.13.0.35", "8.9", "fp32", tuple(manifest.components)))
        cuda = FakeCuda()
        fake = FakeTensorRT(cuda, plans=plans)
        pipe = Pipeline.load(package, warn=lambda s: None)
        pipe.backend = TrtBackend(BackendOptions(backend="tensorrt"), dataclasses.replace(manifest, engines=entries),
                                  root, trt_mod=fake.module(), cuda=cuda, compute_capability="8.9")
        ort = Pipeline.load(package, warn=lambda s: None)
        lora = str(package / "fast_lora.safetensors")
        no_lora = {cache: ort.run(Request(prompt="a red circle moving left", seed=5, steps=4, cache=cache)).frames
                   for cache in (None, "magcache")}
        for cache in (None, "magcache"):
            for strength in (1.0, 0.4, 0.0):
                req = Request(prompt="a red circle moving left", seed=5, steps=4, cache=cache,
                              loras=(LoraRef(lora, strength),) if strength else ())
                got, want = pipe.run(req), ort.run(req)
                np.testing.assert_allclose(got.frames.astype(np.int16), want.frames.astype(np.int16), atol=1,
                                           err_msg=f"cache {cache}, strength {strength}")
                assert got.stats.gpu["lora_refit_bytes"] > 0  # every run changed the set: refitted
                if strength:
                    assert np.abs(got.frames.astype(np.int16) - no_lora[cache].astype(np.int16)).max() > 8
        # refitted: the whole graph and the pieces the LoRA reaches (it has only block keys: not the head)
        assert set(pipe.backend._refits) == {"dit", "dit.block0", "dit.blocks_rest"}
        pipe.backend.close()
        assert cuda.mem == {}
