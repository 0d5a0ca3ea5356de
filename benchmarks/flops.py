"""FLOP model of one Wan DiT denoising step, and the machine's measured fp32 matmul peak.

One multiply-add = 2 FLOPs. N = video tokens (latent F x H x W after the (1,2,2) patchify), d = dim,
f = ffn_dim, L = layers, T = 512 text rows (the context is zero-padded to 512 and NOT masked, so
every row costs), d_t = text_dim (4096), C = latent channels, p = prod(patch_size).

Per transformer block, batch 1:
  self-attention projections  Q, K, V, O: four d x d linears over N tokens     8 N d^2
  self-attention matmuls      Q K^T (N x N x d) and P V (N x N x d)            4 N^2 d
  cross-attention projections Q, O over N tokens                               4 N d^2
                              K, V over the T text rows                        4 T d^2
  cross-attention matmuls     Q K^T (N x T x d) and P V (N x T x d)            4 N T d
  feed-forward                d -> f -> d                                      4 N d f
Once per forward: patch embedding 2 N (C p) d, text embedding (d_t -> d -> d) 2 T (d_t d + d^2),
time embedding (freq 256 -> d -> d, then d -> 6d) ~2 (256 d + d^2 + 6 d^2), head 2 N d (C p).
Softmax, norms, RoPE, modulation and GELU are elementwise (O(N d) or O(N^2 h)) and left out.
One step with classifier-free guidance runs the DiT on cond and uncond: x 2.

This extends speed_anchors.md §0.1 (2 N L (6 d^2 + 2 d f) + 4 L N^2 d), which leaves out the
text-side terms: at 480p/720p they are ~1 %, at the few hundred tokens a CPU benchmark can afford
the text K/V projection (4 T d^2 per block) is a third of the step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from vidrt.package.registry import VARIANTS, ModelSpec

TEXT_ROWS = 512


@dataclass(frozen=True)
class DiTFlops:
    tokens: int
    per_block: dict[str, float]  # batch-1 FLOPs of one block, by term
    embed: float  # batch-1 FLOPs outside the blocks
    layers: int
    cfg: bool

    @property
    def forward(self) -> float:
        """One DiT call at batch 1."""
        return self.layers * sum(self.per_block.values()) + self.embed

    @property
    def step(self) -> float:
        """One denoising step (x2 with CFG: cond and uncond)."""
        return self.forward * (2 if self.cfg else 1)

    @property
    def attention_share(self) -> float:
        attn = self.per_block["self_attn_matmul"] + self.per_block["cross_attn_matmul"]
        return self.layers * attn / self.forward

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "per_block": dict(self.per_block), "embed": self.embed,
                "layers": self.layers, "cfg": self.cfg, "forward": self.forward, "step": self.step,
                "attention_share": self.attention_share}


def dit_flops(spec: ModelSpec | str, width: int, height: int, frames: int, *, cfg: bool = True,
              text_rows: int = TEXT_ROWS) -> DiTFlops:
    """FLOPs of one DiT denoising step of `spec` (a ModelSpec or a registry name) at this clip size."""
    if isinstance(spec, str):
        spec = VARIANTS[spec]
    c = spec.dit
    n = spec.num_tokens(width, height, frames)
    d, f, t = c.dim, c.ffn_dim, text_rows
    per_block = {
        "self_attn_proj": 8.0 * n * d * d,
        "self_attn_matmul": 4.0 * n * n * d,
        "cross_attn_proj_q_o": 4.0 * n * d * d,
        "cross_attn_proj_kv_text": 4.0 * t * d * d,
        "cross_attn_matmul": 4.0 * n * t * d,
        "ffn": 4.0 * n * d * f,
    }
    patch = c.in_channels * c.patch_size[0] * c.patch_size[1] * c.patch_size[2]
    out_patch = c.out_channels * c.patch_size[0] * c.patch_size[1] * c.patch_size[2]
    embed = (2.0 * n * patch * d + 2.0 * t * (c.text_dim * d + d * d)
             + 2.0 * (c.freq_dim * d + d * d + 6 * d * d) + 2.0 * n * d * out_patch)
    return DiTFlops(n, per_block, embed, c.num_layers, cfg)


# The models at the size they are made for (speed_anchors.md §0.1; steps = the official defaults).
STANDARD = (
    ("wan2.2-ti2v-5b", 1280, 704, 121),
    ("wan2.2-t2v-a14b", 1280, 720, 81),
    ("wan2.1-t2v-1.3b", 832, 480, 81),
)


def standard_table() -> list[dict[str, Any]]:
    rows = []
    for name, w, h, frames in STANDARD:
        spec = VARIANTS[name]
        fl = dit_flops(spec, w, h, frames)
        steps = spec.sampling.steps
        rows.append({"model": name, "width": w, "height": h, "frames": frames,
                     "latent": spec.latent_shape(w, h, frames),
                     "tokens": fl.tokens, "forward_flops": fl.forward, "step_flops": fl.step, "steps": steps,
                     "clip_flops": fl.step * steps, "attention_share": fl.attention_share,
                     "anchor_formula_forward": anchor_formula(spec, fl.tokens)})
    return rows


def anchor_formula(spec: ModelSpec, tokens: int) -> float:
    """speed_anchors.md §0.1's estimate, for comparison: 2 N L (6 d^2 + 2 d f) + 4 L N^2 d."""
    c = spec.dit
    return 2.0 * tokens * c.num_layers * (6 * c.dim**2 + 2 * c.dim * c.ffn_dim) + 4.0 * c.num_layers * tokens**2 * c.dim


# ---- measured peak --------------------------------------------------------------------------------


def _best_seconds(fn: Any, repeats: int) -> float:
    fn()  # warm-up (thread pools, page faults)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def numpy_gemm_flops(n: int = 2048, repeats: int = 5) -> float:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    out = np.empty((n, n), dtype=np.float32)
    return 2.0 * n**3 / _best_seconds(lambda: np.matmul(a, b, out=out), repeats)


def ort_gemm_flops(n: int = 2048, repeats: int = 5, threads: int | None = None) -> float:
    """One MatMul node on ONNX Runtime's CPU provider (the kernel vidrt's linears run on)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    rng = np.random.default_rng(1)
    b = rng.standard_normal((n, n), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])], "gemm",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])],
        [onnx.numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    a = rng.standard_normal((n, n), dtype=np.float32)
    return 2.0 * n**3 / _best_seconds(lambda: sess.run(None, {"a": a}), repeats)


def measured_peak(n: int = 2048, repeats: int = 5, threads: int | None = None) -> dict[str, float]:
    """Best of several big fp32 GEMMs: numpy (its BLAS) and ONNX Runtime's MatMul."""
    res = {"numpy_gemm_flops": numpy_gemm_flops(n, repeats), "ort_gemm_flops": ort_gemm_flops(n, repeats, threads),
           "gemm_n": float(n)}
    res["peak_flops"] = max(res["numpy_gemm_flops"], res["ort_gemm_flops"])
    return res
