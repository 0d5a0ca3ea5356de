"""Engines for a tiny package on a real GPU: build them, compare each with ONNX Runtime, and one
end-to-end clip against ONNX Runtime (PSNR >= 35 dB at fp16). Skipped without a GPU + TensorRT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from vidrt.package import contracts as C
from vidrt.package.contracts import resolve_shape

pytestmark = pytest.mark.gpu

SIZE, FRAMES = (64, 64), 9  # tiny: 64x64 px, 9 frames -> latent 3 x 8 x 8 (Wan2.1 VAE)


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny import write_diffusers_checkpoint
    from vidrt.export.build_engines import BuildOptions, build_package
    from vidrt.export.package import export_package

    root = tmp_path_factory.mktemp("trt")
    ckpt = write_diffusers_checkpoint(root / "ckpt", "t2v")
    pkg = export_package(ckpt.root, root / "pkg", variant="wan2.1-t2v-1.3b", opset=23, precision="fp16",
                         progress=False)
    build_package(pkg, BuildOptions("fp16", sizes=(SIZE,), frames=FRAMES, vae_tile=(8, 8)), log=print)
    return pkg


def _feeds(contract: C.Contract, sizes: dict[str, int], rng: np.random.Generator) -> dict[str, np.ndarray]:
    out = {}
    for t in contract.inputs:
        shape = resolve_shape(t.shape, sizes)
        if t.dtype.startswith("int"):
            out[t.name] = rng.integers(0, 200, shape).astype(t.dtype)
        elif t.name == C.TIMESTEP:
            out[t.name] = np.full(shape, 500.0, np.float32)
        else:
            out[t.name] = rng.standard_normal(shape).astype(np.float32)
    if C.ATTENTION_MASK in out:
        out[C.ATTENTION_MASK] = np.ones_like(out[C.ATTENTION_MASK])
    return out


def test_each_engine_matches_onnxruntime(package: Path) -> None:
    from vidrt.backends.base import BackendOptions
    from vidrt.backends.ort import OrtBackend
    from vidrt.backends.tensorrt import TrtBackend
    from vidrt.package.manifest import artifact_path, load_manifest

    m = load_manifest(package)
    spec = m.model
    _, f, h, w = spec.latent_shape(*SIZE, FRAMES)
    sizes = {"batch": 2, "seq": 12, "frames": f, "height": h, "width": w, "tokens": spec.num_tokens(*SIZE, FRAMES),
             "lat_h": 8, "lat_w": 8, "out_h": 64, "out_w": 64}
    trt_backend = TrtBackend(BackendOptions(backend="tensorrt"), m, package)
    ort_backend = OrtBackend(BackendOptions(backend="onnxruntime"))
    rng = np.random.default_rng(0)
    for name, comp in m.components.items():
        path = artifact_path(package, comp.artifact.file)
        feeds = _feeds(comp.contract, sizes, rng)
        got = trt_backend.open(name, path, comp.contract).run(feeds)
        want = ort_backend.open(name, path, comp.contract).run(feeds)
        for out in comp.contract.output_names:
            a, b = np.asarray(got[out], np.float32), np.asarray(want[out], np.float32)
            err = np.abs(a - b).mean() / (np.abs(b).mean() + 1e-6)
            assert err < 2e-2, f"{name}.{out}: mean relative error {err:.4f}"
    trt_backend.close()


def test_end_to_end_clip_matches_onnxruntime(package: Path) -> None:
    from vidrt.pipeline import Pipeline
    from vidrt.request import Request

    req = Request(prompt="a red cat walks on the beach", width=SIZE[0], height=SIZE[1], num_frames=FRAMES,
                  steps=4, seed=1)
    trt = Pipeline.load(package, backend="tensorrt").run(req).frames
    ort = Pipeline.load(package, backend="onnxruntime").run(req).frames
    assert trt is not None and ort is not None and trt.shape == ort.shape
    mse = np.mean((trt.astype(np.float64) - ort.astype(np.float64)) ** 2)
    psnr = 10 * np.log10(255.0**2 / max(mse, 1e-12))
    assert psnr >= 35.0, f"PSNR {psnr:.1f} dB"


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


def test_lora_refit_matches_onnxruntime(package: Path, tmp_path: Path) -> None:
    """A LoRA refitted into the refittable DiT plan (vidrt build's default) makes the clip ONNX Runtime
    makes with the same LoRA; a strength change and removing the LoRA refit from the base weights
    (the no-LoRA clip comes back). Also checks the plan was recorded refittable and the refit is counted."""
    from safetensors.numpy import save_file
    from vidrt.package.manifest import load_manifest
    from vidrt.package.recipes import LoraRef
    from vidrt.pipeline import Pipeline
    from vidrt.request import Request

    m = load_manifest(package)
    assert next(e for e in m.engines if e.component == "dit").refit == "REFIT_INDIVIDUAL"
    dim, rank = m.model.dit.dim, 4
    rng = np.random.default_rng(7)
    tensors = {}
    for b in range(m.model.dit.num_layers):
        for module in ("self_attn.q", "self_attn.o", "cross_attn.v", "ffn.0"):
            out = m.model.dit.ffn_dim if module == "ffn.0" else dim
            stem = f"diffusion_model.blocks.{b}.{module}"
            tensors[f"{stem}.lora_down.weight"] = (0.3 * rng.standard_normal((rank, dim))).astype(np.float32)
            tensors[f"{stem}.lora_up.weight"] = (0.3 * rng.standard_normal((out, rank))).astype(np.float32)
    lora = tmp_path / "style.safetensors"
    save_file(tensors, str(lora))
    trt = Pipeline.load(package, backend="tensorrt")
    ort = Pipeline.load(package, backend="onnxruntime")
    base = Request(prompt="a red cat walks on the beach", width=SIZE[0], height=SIZE[1], num_frames=FRAMES,
                   steps=4, seed=1)
    plain = ort.run(base).frames
    for strength in (1.0, 0.5, 0.0):
        req = Request(prompt=base.prompt, width=SIZE[0], height=SIZE[1], num_frames=FRAMES, steps=4, seed=1,
                      loras=(LoraRef(str(lora), strength),) if strength else ())
        got = trt.run(req)
        want = ort.run(req).frames
        assert got.frames is not None and want is not None and plain is not None
        value = _psnr(got.frames, want)
        print(f"strength {strength}: TensorRT vs ONNX Runtime {value:.1f} dB; vs no LoRA {_psnr(want, plain):.1f} dB;"
              f" refit {got.stats.gpu.get('lora_refit_seconds', 0):.3f} s")
        assert value >= 35.0, f"strength {strength}: PSNR {value:.1f} dB"
        if strength:
            assert _psnr(want, plain) < 35.0  # the LoRA changes the clip, or this test shows nothing
            assert int(got.stats.gpu.get("lora_refit_bytes", 0)) > 0
