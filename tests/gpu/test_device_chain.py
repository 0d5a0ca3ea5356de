"""On a real GPU (skipped elsewhere): the NVRTC kernels behind TensorOps against numpy, and a step-cached
clip whose DiT pieces are chained on the device against the same clip on ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

SIZE, FRAMES = (64, 64), 9


@pytest.mark.parametrize("kind", ["f32", "bf16", "f16"])
def test_device_ops_on_the_gpu_match_numpy(kind: str) -> None:
    from vidrt.backends.cuda import BufferPool, CudaRuntime, DeviceTensor, Stream
    from vidrt.backends.device_ops import DeviceOps
    from vidrt.backends.tensorrt import from_bf16_bits, to_bf16_bits

    cuda = CudaRuntime(0)
    pool, stream = BufferPool(cuda), Stream(cuda)
    ops = DeviceOps(cuda, pool, stream)
    rng = np.random.default_rng(0)
    a32, b32 = (rng.standard_normal((2, 1000, 37)).astype(np.float32) for _ in range(2))
    conv = {"f32": (lambda x: x, None), "bf16": (to_bf16_bits, from_bf16_bits),
            "f16": (lambda x: x.astype(np.float16), None)}[kind]
    tensors = []
    for host in (conv[0](a32), conv[0](b32)):
        t = DeviceTensor(pool, pool.take(host.nbytes), host.shape, host.dtype, stream.handle, conv[1])
        cuda.copy_htod(t.ptr or 0, np.ascontiguousarray(host), stream.handle)
        tensors.append(t)
    da, db = tensors
    fa, fb = (ops.to_host(t).astype(np.float32) for t in (da, db))
    back = {"f32": lambda x: x, "bf16": lambda x: from_bf16_bits(to_bf16_bits(x)),
            "f16": lambda x: x.astype(np.float16).astype(np.float32)}[kind]
    np.testing.assert_array_equal(ops.to_host(ops.sub(da, db)).astype(np.float32), back(fa - fb))
    np.testing.assert_array_equal(ops.to_host(ops.add(da, db)).astype(np.float32), back(fa + fb))
    assert ops.rel_l1(da, db) == pytest.approx(float(np.abs(fa - fb).mean() / np.abs(fb).mean()), rel=1e-6)
    np.testing.assert_array_equal(ops.to_host(ops.concat([ops.rows(da, 1, 2), ops.rows(da, 0, 1)])),
                                  np.concatenate([ops.to_host(da)[1:], ops.to_host(da)[:1]]))
    del da, db, tensors
    ops.close()
    pool.close()
    stream.close()


@pytest.fixture(scope="module")
def cached_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny import write_diffusers_checkpoint
    from vidrt.export.build_engines import BuildOptions, build_package
    from vidrt.export.package import export_package

    root = tmp_path_factory.mktemp("trt-pieces")
    ckpt = write_diffusers_checkpoint(root / "ckpt", "t2v")
    pkg = export_package(ckpt.root, root / "pkg", variant="wan2.1-t2v-1.3b", opset=23, precision="fp16",
                         progress=False)
    build_package(pkg, BuildOptions("fp16", sizes=(SIZE,), frames=FRAMES, vae_tile=(8, 8), cache_pieces=True),
                  log=print)
    return pkg


@pytest.mark.parametrize("cache", ["teacache:0.3", "fbcache:0.1"])
def test_cached_clip_with_pieces_on_the_device_matches_onnxruntime(cached_package: Path, cache: str) -> None:
    from vidrt.pipeline import Pipeline
    from vidrt.request import Request

    req = Request(prompt="a red cat walks on the beach", width=SIZE[0], height=SIZE[1], num_frames=FRAMES,
                  steps=8, seed=1, cache=cache)
    trt = Pipeline.load(cached_package, backend="tensorrt").run(req)
    ort = Pipeline.load(cached_package, backend="onnxruntime").run(req)
    assert trt.frames is not None and ort.frames is not None
    mse = np.mean((trt.frames.astype(np.float64) - ort.frames.astype(np.float64)) ** 2)
    psnr = 10 * np.log10(255.0**2 / max(mse, 1e-12))
    t, o = trt.stats.cache, ort.stats.cache
    print(f"{cache}: TensorRT vs ONNX Runtime {psnr:.1f} dB; block-stack runs {t.block_stack_runs} vs "
          f"{o.block_stack_runs}; GPU {trt.stats.gpu}")
    assert t.block_stack_runs + t.block_stack_skips == 8
    assert psnr >= 35.0, f"PSNR {psnr:.1f} dB"
