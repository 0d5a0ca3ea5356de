"""ONNX export: every graph through ONNX Runtime (CPU) against its torch module, the package, full-size graphs.

Two tiny diffusers-format packages (t2v: Wan2.1 VAE, 16-ch DiT; ti2v: Wan2.2 VAE, 48-ch DiT with
per-token timestep) are exported once per module and shared by the parity tests. Relative error
= max|onnx - torch| / max|torch|.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from tiny import TINY_VARIANT
from vidrt.export import package as package_mod
from vidrt.export.components import stack_rope
from vidrt.export.onnx_export import export_dit, export_text_encoder, export_vae_decoder, graph_io
from vidrt.package import contracts as C
from vidrt.package.contracts import cache_in
from vidrt.package.manifest import load_manifest
from vidrt.package.registry import VARIANTS

RTOL = 1e-4


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float64) - ref).max() / max(np.abs(ref).max(), 1e-12))


def session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class Exported:
    def __init__(self, tiny, pkg: Path) -> None:
        self.tiny, self.pkg = tiny, pkg
        self.manifest = load_manifest(pkg)


@pytest.fixture(scope="module")
def t2v(tiny_t2v, tiny_t2v_package) -> Exported:
    return Exported(tiny_t2v, tiny_t2v_package)  # the session's (conftest): shared with test_pipeline & co.


@pytest.fixture(scope="module")
def ti2v(tiny_ti2v_export) -> Exported:
    tiny, package, _ = tiny_ti2v_export
    return Exported(tiny, package)  # shared with test_pipeline and test_i2v (conftest)


@pytest.fixture(params=["t2v", "ti2v"])
def pkg(request) -> Exported:
    return request.getfixturevalue(request.param)


# ---- the package ------------------------------------------------------------------------------


def test_package_has_every_file_and_verified_manifest(t2v: Exported) -> None:
    names = {p.name for p in t2v.pkg.iterdir()}
    assert {"manifest.json", "tokenizer.json", "text_encoder.onnx", "dit.onnx", "vae_decode_first.onnx",
            "vae_decode_step.onnx"} <= names
    m = t2v.manifest  # load_manifest verified every sha256
    pieces = {f"dit.{piece}" for piece in C.DIT_PIECES}  # step caching (vidrt.export.dit_split)
    assert set(m.components) == {"text_encoder", "dit", "vae_decode_first", "vae_decode_step"} | pieces
    assert set(m.export_inputs) == {"tokenizer", "text_encoder", "dit", "vae"}
    assert m.model.name == TINY_VARIANT["t2v"] and m.components["dit"].opset == 18
    assert not [p for p in names if p.endswith(".tmp") or p.startswith(".dit") or p.startswith(".vae")]


def test_graph_io_matches_contract(pkg: Exported) -> None:
    """Names, dtypes and dims of every graph are exactly its contract's (the runtime feeds by contract)."""
    for comp in pkg.manifest.components.values():
        io = graph_io(pkg.pkg / comp.artifact.file)
        specs = comp.contract.inputs + comp.contract.outputs
        assert list(io) == [t.name for t in specs], comp.name
        for t in specs:
            assert io[t.name] == (t.dtype, t.shape), (comp.name, t.name)


def test_second_export_skips_every_stage(t2v: Exported, monkeypatch) -> None:
    def boom(*a, **k):
        raise AssertionError("stage was re-exported")

    for fn in ("export_dit", "export_text_encoder", "export_vae_decoder"):
        monkeypatch.setattr(package_mod, fn, boom)
    package_mod.export_package(t2v.tiny.root, t2v.pkg, TINY_VARIANT["t2v"], progress=False)
    load_manifest(t2v.pkg)


def test_changed_file_is_redone(t2v: Exported, tmp_path: Path, monkeypatch) -> None:
    """A file whose hash no longer matches is written again even though its inputs did not change."""
    pkg = tmp_path / "pkg"
    shutil.copytree(t2v.pkg, pkg)
    (pkg / "tokenizer.json").write_text("{}")
    for fn in ("export_dit", "export_text_encoder", "export_vae_decoder"):
        monkeypatch.setattr(package_mod, fn, lambda *a, **k: pytest.fail("unchanged stage re-exported"))
    package_mod.export_package(t2v.tiny.root, pkg, TINY_VARIANT["t2v"], progress=False)
    assert (pkg / "tokenizer.json").read_bytes() == (t2v.pkg / "tokenizer.json").read_bytes()
    load_manifest(pkg)


def test_graphs_name_no_folder_of_the_exporting_machine(t2v: Exported) -> None:
    """torch.onnx writes each node's Python stack trace (absolute paths) into the graph; the export drops them,
    so a package names no folder and exports of one checkpoint are byte-identical wherever they ran."""
    import sys

    import vidrt

    folders = {str(Path(vidrt.__file__).resolve().parent.parent).encode(), sys.prefix.encode(),
               str(t2v.pkg).encode()}
    for f in sorted(t2v.pkg.glob("*.onnx")):
        data = f.read_bytes()
        assert not [d for d in folders if d in data], f.name
        assert b"pkg.torch.onnx.stack_trace" not in data, f.name


def test_missing_cpu_form_is_redone(t2v: Exported, tmp_path: Path, monkeypatch) -> None:
    """The VAE stage is not reused when its step graph's AVX-512 form (manifest cpu_artifacts) is gone:
    it is exported again, and nothing else is."""
    pkg = tmp_path / "pkg"
    shutil.copytree(t2v.pkg, pkg)
    assert "avx512f" in t2v.manifest.components["vae_decode_step"].cpu_artifacts  # the tiny VAE: 8 channels
    (pkg / "vae_decode_step.avx512f.onnx").unlink()
    for fn in ("export_dit", "export_text_encoder"):
        monkeypatch.setattr(package_mod, fn, lambda *a, **k: pytest.fail("unchanged stage re-exported"))
    package_mod.export_package(t2v.tiny.root, pkg, TINY_VARIANT["t2v"], progress=False)
    assert (pkg / "vae_decode_step.avx512f.onnx").is_file()
    load_manifest(pkg)


def test_fp16_package_reexports_only_the_dit(t2v: Exported, tmp_path: Path, monkeypatch) -> None:
    pkg = tmp_path / "pkg16"
    shutil.copytree(t2v.pkg, pkg)
    for fn in ("export_text_encoder", "export_vae_decoder"):  # T5 stays fp32 for fp16, the VAE is fp32
        monkeypatch.setattr(package_mod, fn, lambda *a, **k: pytest.fail("fp32 stage re-exported"))
    package_mod.export_package(t2v.tiny.root, pkg, TINY_VARIANT["t2v"], precision="fp16", progress=False)
    m = load_manifest(pkg)
    assert m.components["dit"].precision == "fp16" and m.components["text_encoder"].precision == "fp32"
    inits = {i.name: i.data_type for i in onnx.load(str(pkg / "dit.onnx")).graph.initializer}
    fp16 = [n for n, t in inits.items() if t == onnx.TensorProto.FLOAT16]
    assert any("to_q" in n for n in fp16) and not any("scale_shift_table" in n or "time_embedder" in n for n in fp16)
    # ORT CPU runs the fp16 graph; compare with the fp32 torch model, loosely
    x, t, ctx = _dit_inputs(t2v.manifest.model, 2, 2, 4, 4, seed=3)
    with torch.no_grad():
        ref = t2v.tiny.transformer["dit"](x, t, ctx, return_dict=False)[0].numpy()
    got = session(pkg / "dit.onnx").run(None, {"hidden_states": x.numpy().astype(np.float16), "timestep": t.numpy(),
                                               "encoder_hidden_states": ctx.numpy().astype(np.float16)})[0]
    assert got.dtype == np.float16 and rel_err(got, ref) < 2e-2


# ---- parity: ONNX Runtime vs torch ------------------------------------------------------------


@pytest.mark.parametrize("batch,seq,real", [(2, 16, 16), (1, 7, 5), (3, 29, 11)])
def test_text_encoder_matches_torch(t2v: Exported, batch: int, seq: int, real: int) -> None:
    g = torch.Generator().manual_seed(seq)
    ids = torch.randint(1, 256, (batch, seq), generator=g)
    mask = torch.zeros(batch, seq, dtype=torch.int64)
    mask[:, :real] = 1
    ids[:, real:] = 0
    with torch.no_grad():
        ref = t2v.tiny.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    got = session(t2v.pkg / "text_encoder.onnx").run(None, feed)[0]
    assert rel_err(got, ref) <= RTOL


def _dit_inputs(spec, batch: int, frames: int, h: int, w: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, spec.dit.in_channels, frames, h, w, generator=g)
    ctx = torch.randn(batch, spec.text.text_len, spec.dit.text_dim, generator=g)
    if spec.per_token_timestep:  # TI2V image mode: latent frame 0 at t=0, the rest at t
        t = torch.full((batch, frames, h // 2, w // 2), 731.0)
        t[:, 0] = 0.0
        t = t.flatten(1)
    else:
        t = torch.tensor([731.0, 250.0][:batch])
    return x, t, ctx


@pytest.mark.parametrize("shape", [(2, 2, 4, 4), (1, 3, 6, 8), (2, 1, 10, 2)])
def test_dit_matches_torch(pkg: Exported, shape) -> None:
    spec = pkg.manifest.model
    x, t, ctx = _dit_inputs(spec, *shape, seed=sum(shape))
    with torch.no_grad():
        ref = pkg.tiny.transformer["dit"](x, t, ctx, return_dict=False)[0].numpy()
    got = session(pkg.pkg / "dit.onnx").run(None, {"hidden_states": x.numpy(), "timestep": t.numpy(),
                                                   "encoder_hidden_states": ctx.numpy()})[0]
    assert got.shape == ref.shape and rel_err(got, ref) <= RTOL


def decode_with_graphs(pkg: Path, z: np.ndarray) -> np.ndarray:
    """The runtime's loop: first graph on latent frame 0, then the step graph, caches chained."""
    first, step = session(pkg / "vae_decode_first.onnx"), session(pkg / "vae_decode_step.onnx")
    out = first.run(None, {"latent": z[:, :, :1]})
    frames, caches = [out[0]], out[1:]
    for i in range(1, z.shape[2]):
        out = step.run(None, {"latent": z[:, :, i:i + 1], **{cache_in(j): c for j, c in enumerate(caches)}})
        frames.append(out[0])
        caches = out[1:]
    return np.concatenate(frames, axis=2)


@pytest.mark.parametrize("lat", [(3, 4, 6), (2, 5, 3)])
def test_vae_graphs_chained_match_decode(pkg: Exported, lat) -> None:
    spec = pkg.manifest.model
    z = torch.randn(1, spec.vae.z_dim, *lat, generator=torch.Generator().manual_seed(lat[1]))
    with torch.no_grad():
        ref = pkg.tiny.vae.decode(z, return_dict=False)[0].numpy()
    got = decode_with_graphs(pkg.pkg, z.numpy())
    sh, sw = spec.vae.stride[1:]
    assert got.shape == ref.shape == (1, 3, 1 + 4 * (lat[0] - 1), lat[1] * sh, lat[2] * sw)
    assert rel_err(got, ref) <= RTOL


def test_meta_export_equals_normal_export(t2v: Exported, tmp_path: Path) -> None:
    """The package's DiT was traced on the meta device with weights attached afterwards. The normal
    export here also goes through the external-data path (what graphs over 1.5 GiB of weights get)."""
    spec = t2v.manifest.model
    (tmp_path / "dit.onnx.data").write_bytes(b"stale")
    export_dit(t2v.tiny.transformer["dit"], tmp_path / "dit.onnx", spec, external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dit.onnx", "dit.onnx.data"]  # renamed into place
    assert (tmp_path / "dit.onnx.data").stat().st_size > 100_000  # the weights, not the stale bytes
    x, t, ctx = _dit_inputs(spec, 1, 3, 6, 4, seed=9)
    feed = {"hidden_states": x.numpy(), "timestep": t[:1].numpy(), "encoder_hidden_states": ctx.numpy()}
    normal = session(tmp_path / "dit.onnx").run(None, feed)[0]
    meta = session(t2v.pkg / "dit.onnx").run(None, feed)[0]
    assert np.abs(normal - meta).max() <= 1e-6


def test_stack_rope_is_identical_and_removes_scatternd(t2v: Exported) -> None:
    model = t2v.tiny.transformer["dit"]
    x, t, ctx = _dit_inputs(t2v.manifest.model, 2, 2, 4, 6, seed=5)
    with torch.no_grad():
        ref = model(x, t, ctx, return_dict=False)[0]
        with stack_rope(model) as swapped:
            got = model(x, t, ctx, return_dict=False)[0]
    assert swapped == 4 and torch.equal(got, ref)
    ops = {n.op_type for n in onnx.load(str(t2v.pkg / "dit.onnx")).graph.node}
    assert "ScatterND" not in ops and "GatherND" not in {n.op_type for n in onnx.load(
        str(t2v.pkg / "vae_decode_step.onnx")).graph.node}


def test_text_encoder_bf16_exports(t2v: Exported, tmp_path: Path) -> None:
    """bf16 is the only low precision T5 gets (fp16 overflows); ORT CPU cannot run it, so check the graph."""
    import copy

    te = copy.deepcopy(t2v.tiny.text_encoder)
    contract = export_text_encoder(te, tmp_path / "te.onnx", t2v.manifest.model, precision="bf16")
    io = graph_io(tmp_path / "te.onnx")
    assert io["last_hidden_state"][0] == "float32" == contract.outputs[0].dtype
    types = {i.data_type for i in onnx.load(str(tmp_path / "te.onnx")).graph.initializer}
    assert onnx.TensorProto.BFLOAT16 in types


# ---- full-size graphs, traced on the meta device, written without weights ----------------------


def _full_dit_config(spec) -> dict:
    d = spec.dit
    return dict(patch_size=d.patch_size, num_attention_heads=d.num_heads, attention_head_dim=d.head_dim,
                in_channels=d.in_channels, out_channels=d.out_channels, text_dim=d.text_dim, freq_dim=d.freq_dim,
                ffn_dim=d.ffn_dim, num_layers=d.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                eps=d.eps, rope_max_seq_len=1024)


# Measured on the 2-core dev box (shared with other jobs, load 2-3): TI2V-5B (30 layers) 68 s, 14B (40 layers) 80 s;
# 117 s / 220 s at load 6-7. Graph files without weights: 22 MB / 29 MB.
@pytest.mark.slow
@pytest.mark.parametrize("variant", ["wan2.2-ti2v-5b", "wan2.1-t2v-14b"])
def test_full_size_dit_graph(variant: str, tmp_path: Path) -> None:
    spec = VARIANTS[variant]
    path = tmp_path / "dit.onnx"
    export_dit(None, path, spec, config=_full_dit_config(spec), include_weights=False)
    io = graph_io(path)
    c, dim = spec.dit.in_channels, spec.text.text_len
    assert io["hidden_states"] == ("float32", ("batch", c, "frames", "height", "width"))
    assert io["timestep"] == ("float32", ("batch", "tokens") if spec.per_token_timestep else ("batch",))
    assert io["encoder_hidden_states"] == ("float32", ("batch", dim, 4096))
    assert io["noise_pred"] == ("float32", ("batch", c, "frames", "height", "width"))
    assert path.stat().st_size < 50 * 2**20  # the graph alone: no weights inside


# Measured on 2 shared cores: 34 s (81 s at load 7). Graph only: 7.3 MB. Slow: it would add a fifth to `make test`.
@pytest.mark.slow
def test_full_size_text_encoder_graph(tmp_path: Path) -> None:
    from transformers import UMT5Config, UMT5EncoderModel
    from vidrt.export.components import eager_attention, text_encoder_graph_spec
    from vidrt.export.onnx_export import export_graph

    spec = VARIANTS["wan2.1-t2v-1.3b"]
    t = spec.text
    cfg = UMT5Config(vocab_size=t.vocab_size, d_model=t.d_model, d_kv=t.d_model // t.num_heads, d_ff=t.d_ff,
                     num_layers=t.num_layers, num_heads=t.num_heads, relative_attention_num_buckets=t.num_buckets,
                     feed_forward_proj="gated-gelu", dropout_rate=0.0)
    with torch.device("meta"):
        model = UMT5EncoderModel(cfg).eval()
    with eager_attention(model):
        export_graph(text_encoder_graph_spec(model, spec), tmp_path / "te.onnx", include_weights=False)
    io = graph_io(tmp_path / "te.onnx")
    assert io == {"input_ids": ("int64", ("batch", "seq")), "attention_mask": ("int64", ("batch", "seq")),
                  "last_hidden_state": ("float32", ("batch", "seq", 4096))}


# Measured on 2 shared cores, both graphs: Wan2.1 24 s, Wan2.2 29 s (102 s / 106 s at load 6-7); 2.9 / 3.2 MB
# without weights. Slow only to keep `make test` near 3 minutes.
@pytest.mark.slow
@pytest.mark.parametrize("variant", ["wan2.1-t2v-1.3b", "wan2.2-ti2v-5b"])
def test_full_size_vae_graphs(variant: str, tmp_path: Path) -> None:
    from diffusers import AutoencoderKLWan

    spec = VARIANTS[variant]
    wan22 = dict(base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, in_channels=12, out_channels=12,
                 patch_size=2, scale_factor_spatial=16)
    with torch.device("meta"):
        vae = AutoencoderKLWan(**(wan22 if spec.vae.kind == "wan2.2" else {}))
    first, step = export_vae_decoder(vae, tmp_path / "first.onnx", tmp_path / "step.onnx", spec, include_weights=False)
    assert len(step.inputs) == len(step.outputs) == 33  # latent/frames + 32 caches
    io = graph_io(tmp_path / "step.onnx")
    assert io["latent"] == ("float32", (1, spec.vae.z_dim, 1, "lat_h", "lat_w"))
    assert io["frames"] == ("float32", (1, 3, 4, "out_h", "out_w"))
    assert all(io[t.name] == (t.dtype, t.shape) for t in step.inputs + step.outputs)


def test_concurrent_export_waits_for_the_lock(t2v: Exported, tmp_path: Path) -> None:
    import fcntl
    import threading

    pkg = tmp_path / "pkg"
    shutil.copytree(t2v.pkg, pkg)
    (pkg / ".dit.onnx.abc123").mkdir()  # a killed export's temp folder: cleaned up
    done = threading.Event()
    with open(pkg / package_mod.LOCK_FILE, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another export is running
        worker = threading.Thread(target=lambda: (package_mod.export_package(
            t2v.tiny.root, pkg, TINY_VARIANT["t2v"], progress=False), done.set()))
        worker.start()
        time.sleep(0.5)
        assert not done.is_set()
        fcntl.flock(held, fcntl.LOCK_UN)
    worker.join(30)
    assert done.is_set() and not (pkg / ".dit.onnx.abc123").exists()


# Each case exports its graph twice (minutes on a loaded 2-core CI machine): `make test` runs each
# architecture once (umT5; the Wan2.1 and the TI2V DiT; the Wan2.2 VAE), `make test-all` the rest too.
@pytest.mark.parametrize("kind,component", [
    ("t2v", "text_encoder"), ("t2v", "dit"), ("ti2v", "dit"), ("ti2v", "vae"),
    pytest.param("t2v", "vae", marks=pytest.mark.slow),  # the Wan2.1 VAE (the Wan2.2 one runs in make test)
    pytest.param("ti2v", "text_encoder", marks=pytest.mark.slow)])  # the same umT5 as t2v's
def test_optimizer_equals_torchs_own(kind: str, component: str, request, tmp_path: Path, monkeypatch) -> None:
    """vidrt.export.onnx_optimize leaves out onnxscript's quadratic multi-output rewrite rules; on the
    Wan graphs that must change nothing: the graph equals the one torch's ONNXProgram.optimize() makes."""
    from torch.onnx._internal.exporter import _onnx_program
    from vidrt.export import onnx_export

    pkg: Exported = request.getfixturevalue(kind)
    spec, tiny = pkg.manifest.model, pkg.tiny

    def export(folder: Path) -> list[Path]:
        folder.mkdir()
        if component == "text_encoder":
            export_text_encoder(tiny.text_encoder, folder / "te.onnx", spec)
        elif component == "dit":
            export_dit(next(iter(tiny.transformer.values())), folder / "dit.onnx", spec)
        else:
            export_vae_decoder(tiny.vae, folder / "first.onnx", folder / "step.onnx", spec)
        return sorted(folder.glob("*.onnx"))

    ours = export(tmp_path / "ours")
    monkeypatch.setattr(onnx_export, "optimize_model",  # (dedupe_initializers: torch always dedupes, as ours here)
                        lambda model, **_: _onnx_program.onnxscript_apis.optimize(model))
    torchs = export(tmp_path / "torch")
    for a, b in zip(ours, torchs, strict=True):
        ga, gb = onnx.load(str(a)).graph, onnx.load(str(b)).graph
        assert [n.op_type for n in ga.node] == [n.op_type for n in gb.node], a.name
        assert ga == gb, a.name


# ---- streamed weights: RAM of a meta-device export ----------------------------------------------

_EXPORT_RSS = """
import json, sys
from pathlib import Path
from vidrt.export.onnx_export import export_dit
from vidrt.export.weights import WeightFiles, load, safetensors_header, stored
from vidrt.package.registry import VARIANTS

mode, folder, out = sys.argv[1:]
f = Path(folder) / "diffusion_pytorch_model.safetensors"
names = {k: k for k in safetensors_header(f)}
wf = WeightFiles((f,), "safetensors")
open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM: count from here
weights = None if mode == "trace" else stored(wf, names) if mode == "stream" else load(wf, names, None)
export_dit(None, out, VARIANTS["wan2.1-t2v-1.3b"], state_dict=weights,
           config=json.loads((Path(folder) / "config.json").read_text()), external_data=True,
           include_weights=mode != "trace")
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(int(status["VmHWM"].split()[0]) * 1024)
"""


@pytest.mark.slow  # two exports of a 0.43 GB DiT in subprocesses: minutes on CI (make test-all)
def test_streamed_export_holds_about_one_tensor(tmp_path: Path) -> None:
    """A meta-device DiT export that reads its weights as it writes them (what `vidrt export` does)
    peaks far below one that loads them first: bf16 file -> fp32 graph, the eager way holds the bf16
    tensors and their fp32 copies, and onnxscript's constant folder materialises every transposed
    weight. Same outputs either way."""
    import subprocess
    import sys

    from diffusers import WanTransformer3DModel
    from vidrt.export.random_weights import randomise_

    cfg = dict(patch_size=(1, 2, 2), num_attention_heads=8, attention_head_dim=128, in_channels=16, out_channels=16,
               text_dim=4096, freq_dim=256, ffn_dim=4096, num_layers=6, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads")
    model = randomise_(WanTransformer3DModel(**cfg), 5).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "ckpt")
    fp32_bytes = 4 * sum(p.numel() for p in model.parameters())  # ~0.42 GB
    largest = 4 * max(p.numel() for p in model.parameters())  # 16 MiB (a 1024 x 4096 matrix in fp32)
    del model
    peaks, outputs = {}, {}
    for mode in ("trace", "eager", "stream"):
        out = tmp_path / mode / "dit.onnx"
        out.parent.mkdir()
        done = subprocess.run([sys.executable, "-c", _EXPORT_RSS, mode, str(tmp_path / "ckpt"), str(out)],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        peaks[mode] = int(done.stdout.split()[-1])
        if mode == "trace":  # the graph alone, no weights: what tracing and saving cost
            continue
        x, t, ctx = _dit_inputs(VARIANTS["wan2.1-t2v-1.3b"], 1, 3, 6, 4, seed=2)
        feed = {"hidden_states": x.numpy(), "timestep": t[:1].numpy(), "encoder_hidden_states": ctx.numpy()}
        outputs[mode] = session(out).run(None, feed)[0]
    print(f"peak RSS from the weights on: graph only {peaks['trace'] / 2**20:.0f} MiB, eager "
          f"{peaks['eager'] / 2**20:.0f} MiB, streamed {peaks['stream'] / 2**20:.0f} MiB, fp32 weights "
          f"{fp32_bytes / 2**20:.0f} MiB, largest tensor {largest / 2**20:.0f} MiB")
    # Streaming holds about one tensor at a time: its bf16 read, fp32 cast and transposed copy (3 x the
    # largest fp32 tensor) on top of what tracing the graph costs, plus 64 MiB of allocator slack.
    # Reading every tensor up front (bf16: half of fp32_bytes, 200 MiB) breaks this bound.
    assert peaks["stream"] <= peaks["trace"] + 3 * largest + 64 * 2**20
    assert np.array_equal(outputs["eager"], outputs["stream"])  # same weights, laid out differently
    assert peaks["eager"] - peaks["stream"] > 0.9 * fp32_bytes  # at least the fp32 copy is never all held
