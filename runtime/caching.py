"""Step caching: skip the DiT's block stack on steps where it barely changes (fast_paths.md part C).

The denoise loop asks a `CachePolicy` for each step's DiT output (every CFG row at once); the policy
decides whether the blocks run. With no cache the policy runs the whole graph every step: the same
loop, a policy that never skips (DESIGN.md §9).

    none       the whole DiT graph every step
    teacache   static mask from the time embedding's relative L1 change, polynomial-rescaled (C.1)
    magcache   static mask from the block-stack residual's magnitude-ratio table (C.2)
    fbcache    dynamic: block 0's residual against the last computed step's (C.4, diffusers' rule)
    easycache  dynamic: the output's change predicted from the input's change (C.3); whole graph

TeaCache/MagCache/FBCache cache the residual of the block stack in token space, R = x_L - x_0
(FBCache: x_L - x_1), and always run the embeddings and the head. One decision serves both CFG
halves (C.6: the published cond/uncond masks coincide). Two-expert models (A14B) start a new
window at the expert switch: state and residuals are dropped, the retention steps apply again.

Where the tensors live is the backend's business: the pieces' outputs are the backend's tensor
handles and the residual arithmetic goes through its `TensorOps` (vidrt.backends.base): numpy arrays
on ONNX Runtime; on TensorRT device tensors chained by address from piece to piece, the residual
kept on the device, and only noise_pred (out of the head) copied back per step. One code path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from vidrt import cache_tables as T
from vidrt.backends.base import HOST_OPS, Engine, TensorOps
from vidrt.errors import UsageError, arg, command_or
from vidrt.package import contracts as C
from vidrt.package.manifest import Manifest

METHODS = ("none", "teacache", "magcache", "easycache", "fbcache")
PIECES_NEEDED = {"teacache", "magcache", "fbcache"}


@dataclass(frozen=True)
class CacheChoice:
    """What `--cache METHOD[:THRESHOLD]` asked for (threshold None: the method's published default)."""

    method: str = "none"
    threshold: float | None = None

    def __str__(self) -> str:
        return self.method if self.threshold is None else f"{self.method}:{self.threshold:g}"


def parse_cache(text: str | None) -> CacheChoice:
    """"magcache", "teacache:0.08" -> CacheChoice. Raises UsageError naming the valid forms."""
    if text is None or text == "":
        return CacheChoice()
    method, _, thresh = text.strip().lower().partition(":")
    if method not in METHODS:
        raise UsageError(f"{arg('cache')} {text!r}: unknown method; use one of {', '.join(METHODS)} "
                         f"(optionally METHOD:THRESHOLD, e.g. magcache:0.12)")
    if not thresh:
        return CacheChoice(method)
    try:
        value = float(thresh)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 10.0 or method == "none":
        raise UsageError(f"{arg('cache')} {text!r}: the threshold must be a number in 0..10 after a method, "
                         f"e.g. {method if method != 'none' else 'magcache'}:0.12")
    return CacheChoice(method, value)


# ---- static masks (pure functions of the plan; tests compare them with the reference code) -----


def teacache_mask(signals: list[np.ndarray], coefficients: tuple[float, ...], threshold: float,
                  use_ret_steps: bool) -> list[bool]:
    """TeaCache4Wan2.1 `teacache_forward` decisions for one run (True = the blocks run).

    signals: the modulated input per step (e0 with use_ret_steps, else e); accumulate
    poly(mean|s - s_prev| / mean|s_prev|) and skip while the sum stays under `threshold`.
    Forced: the first 5 steps (use_ret_steps) or the first one, and the last one without it."""
    steps = len(signals)
    ret = T.TEACACHE_RET_STEPS if use_ret_steps else 1
    cutoff = steps if use_ret_steps else steps - 1
    poly = np.poly1d(coefficients)
    acc, prev, out = 0.0, None, []
    for i, s in enumerate(signals):
        if i < ret or i >= cutoff or prev is None:
            compute, acc = True, 0.0
        else:
            acc += float(poly(float(np.abs(s - prev).mean() / np.abs(prev).mean())))
            compute = acc >= threshold
            if compute:
                acc = 0.0
        prev = s
        out.append(compute)
    return out


def nearest_interp(values: np.ndarray, length: int) -> np.ndarray:
    """MagCache's resampling of a per-step table to another step count (nearest index)."""
    if length == 1:
        return values[-1:]
    idx = np.round(np.arange(length) * (len(values) - 1) / (length - 1)).astype(int)
    return values[idx]


def magcache_ratios(table: tuple[float, ...], steps: int) -> np.ndarray:
    """An interleaved cond/uncond table resampled per branch to 2*steps entries."""
    r = np.asarray(table, dtype=np.float64)
    if len(r) == 2 * steps:
        return r
    return np.stack([nearest_interp(r[0::2], steps), nearest_interp(r[1::2], steps)], axis=1).reshape(-1)


def magcache_mask(ratios: np.ndarray, threshold: float, k: int, retention_ratio: float) -> list[bool]:
    """MagCache4Wan2.1 `magcache_forward` decisions for one run (True = the blocks run).

    ratios: 2*steps, cond/uncond interleaved (call index cnt = 2*step + branch). After
    int(2*steps*retention_ratio) calls, per branch: ratio *= ratios[cnt], n += 1, err += |1 - ratio|;
    skip while err < threshold and n <= k, else run and reset. One decision per step: the blocks run
    when either branch would run them (the published masks coincide, fast_paths.md C.6)."""
    calls = len(ratios)
    start = int(calls * retention_ratio)
    ratio, n, err = [1.0, 1.0], [0, 0], [0.0, 0.0]
    run = []
    for cnt in range(calls):
        b = cnt % 2
        compute = True
        if cnt >= start:
            ratio[b] *= float(ratios[cnt])
            n[b] += 1
            err[b] += abs(1.0 - ratio[b])
            if err[b] < threshold and n[b] <= k:
                compute = False
            else:
                ratio[b], n[b], err[b] = 1.0, 0, 0.0
        run.append(compute)
    return [run[2 * i] or run[2 * i + 1] for i in range(calls // 2)]


def segments(experts: list[str]) -> list[tuple[int, int]]:
    """[start, end) step ranges of consecutive steps on one expert (A14B: high noise, then low)."""
    out, start = [], 0
    for i in range(1, len(experts) + 1):
        if i == len(experts) or experts[i] != experts[start]:
            out.append((start, i))
            start = i
    return out


def mask_string(mask: list[bool]) -> str:
    """C = the block stack runs, s = its cached residual is reused (the notation of fast_paths.md C.2)."""
    return "".join("C" if m else "s" for m in mask)


# ---- the DiT, whole or in pieces ---------------------------------------------------------------


@dataclass
class CacheStats:
    method: str = "none"
    block_stack_runs: int = 0
    block_stack_skips: int = 0
    residual_bytes: int = 0  # the largest residual buffer held at once (bytes, host or device)
    mask: str = ""  # static methods: the plan shown before the run

    def to_dict(self) -> dict[str, object]:
        return {"method": self.method, "block_stack_runs": self.block_stack_runs,
                "block_stack_skips": self.block_stack_skips, "residual_bytes": self.residual_bytes,
                "mask": self.mask}


_SHARED = {C.ROPE_COS, C.ROPE_SIN}  # [1, L, 1, d]: the same for every row


class ExpertDiT:
    """One DiT expert for one clip: the whole graph, or its pieces with the step-invariant text
    embedding and RoPE computed once (kept where the backend keeps them: on TensorRT, on the device
    for the whole clip). Rows = CFG rows (cond, uncond); `cfg_batch` 1 runs them one at a time (the
    memory plan's choice), with the same result. `ops`: the backend's TensorOps (its tensor handles:
    numpy arrays, or device tensors); the pieces' outputs are such handles, `whole` and `head` return
    numpy noise_pred."""

    def __init__(self, engine: Callable[[str], Engine], expert: str, context: np.ndarray, cfg_batch: int,
                 ops: TensorOps = HOST_OPS) -> None:
        self._engine, self.expert, self.context, self.cfg_batch = engine, expert, context, cfg_batch
        self.ops = ops
        self.rows = len(context)
        self._context_emb: Any = None
        self._rope: dict[str, Any] | None = None

    def run(self, piece: str | None, pool: dict[str, Any]) -> dict[str, Any]:
        """Run the whole graph (piece None) or one piece on the inputs its contract names, taken from
        `pool` (so a piece whose contract gains inputs, e.g. image conditioning, is fed by name)."""
        engine = self._engine(self.expert if piece is None else C.dit_piece(self.expert, piece))
        feeds = {name: pool[name] for name in engine.contract.input_names}
        if self.cfg_batch >= self.rows:
            return engine.run(feeds)
        parts = [engine.run({k: v if k in _SHARED else self.ops.rows(v, r, r + 1) for k, v in feeds.items()})
                 for r in range(self.rows)]
        # RoPE [1, L, 1, d] is the same for every row: one copy, not one per row (fed whole to every row)
        return {k: parts[0][k] if k in _SHARED else self.ops.concat([p[k] for p in parts]) for k in parts[0]}

    def latents(self, x: np.ndarray) -> np.ndarray:
        return np.broadcast_to(x, (self.rows, *x.shape))

    def timesteps(self, t_row: np.ndarray) -> np.ndarray:
        return np.broadcast_to(t_row, (self.rows, *t_row.shape))

    def whole(self, x: np.ndarray, t_row: np.ndarray) -> np.ndarray:
        pool = {C.LATENTS: self.latents(x), C.TIMESTEP: self.timesteps(t_row), C.CONTEXT: self.context}
        return self.run(None, pool)[C.VELOCITY]

    def time_embed(self, t_row: np.ndarray, x: np.ndarray) -> tuple[Any, Any]:
        """(temb e, timestep_proj e0) for every row; they depend on t only (`x` gives TI2V its shape).
        Backend tensor handles (`ops.to_host` for numpy)."""
        out = self.run(C.TIME_EMBED, {C.TIMESTEP: self.timesteps(t_row), C.LATENTS: self.latents(x)})
        return out[C.TEMB], out[C.TIMESTEP_PROJ]

    def embed(self, x: np.ndarray, t_row: np.ndarray) -> dict[str, Any]:
        """tokens x_0 and everything the blocks and the head read besides the residual stream."""
        pool = {C.LATENTS: self.latents(x), C.TIMESTEP: self.timesteps(t_row), C.CONTEXT: self.context}
        if self._context_emb is None:
            self._context_emb = self.run(C.TEXT_EMBED, pool)[C.CONTEXT_EMB]
        patch = self.run(C.PATCH_EMBED, pool)
        if self._rope is None:
            self._rope = {C.ROPE_COS: patch[C.ROPE_COS], C.ROPE_SIN: patch[C.ROPE_SIN]}
        temb, e0 = self.time_embed(t_row, x)
        return {**pool, C.TOKENS: patch[C.TOKENS], C.TEMB: temb, C.TIMESTEP_PROJ: e0,
                C.CONTEXT_EMB: self._context_emb, **self._rope}

    def blocks(self, piece: str, x: Any, emb: dict[str, Any]) -> Any:
        return self.run(piece, {**emb, C.TOKENS: x})[C.BLOCK_OUT]

    def head(self, x: Any, emb: dict[str, Any]) -> np.ndarray:
        out: np.ndarray = self.run(C.HEAD, {**emb, C.TOKENS: x})[C.VELOCITY]
        return out


# ---- policies ---------------------------------------------------------------------------------


@dataclass
class NeverSkip:
    """No cache: the whole graph, every step."""

    stats: CacheStats = field(default_factory=CacheStats)

    def step(self, i: int, dit: ExpertDiT, x: np.ndarray, t_row: np.ndarray) -> np.ndarray:
        self.stats.block_stack_runs += 1
        return dit.whole(x, t_row)

    def new_expert(self) -> None:
        pass


@dataclass
class StaticMask:
    """TeaCache / MagCache: the blocks run where mask[i]; elsewhere x_L = x_0 + R of the last run.
    R is a backend tensor handle (TensorRT: on the device, overwritten in place each time it is made)."""

    mask: list[bool]
    stats: CacheStats
    residual: Any = None

    def step(self, i: int, dit: ExpertDiT, x: np.ndarray, t_row: np.ndarray) -> np.ndarray:
        ops = dit.ops
        emb = dit.embed(x, t_row)
        x0 = emb[C.TOKENS]
        if self.mask[i] or self.residual is None:
            x_last = dit.blocks(C.BLOCKS_REST, dit.blocks(C.BLOCK0, x0, emb), emb)
            self.residual = ops.sub(x_last, x0, out=self.residual)
            self.stats.residual_bytes = max(self.stats.residual_bytes, ops.nbytes(self.residual))
            self.stats.block_stack_runs += 1
        else:
            x_last = ops.add(x0, self.residual)
            self.stats.block_stack_skips += 1
        return dit.head(x_last, emb)

    def new_expert(self) -> None:
        self.residual = None


@dataclass
class FirstBlock:
    """First Block Cache (diffusers hooks/first_block_cache.py): block 0 always runs; the rest runs
    iff mean|r1 - r1_prev| / mean|r1_prev| > threshold, r1 = block 0's residual and r1_prev the one
    of the last step that ran the rest; otherwise x_L = x_1 + (x_L - x_1 of that step). The metric
    is over both CFG rows at once (one decision, fast_paths.md C.6)."""

    threshold: float
    stats: CacheStats
    head_residual: Any = None  # backend tensor handles (TensorRT: on the device)
    tail_residual: Any = None

    def step(self, i: int, dit: ExpertDiT, x: np.ndarray, t_row: np.ndarray) -> np.ndarray:
        ops = dit.ops
        emb = dit.embed(x, t_row)
        x1 = dit.blocks(C.BLOCK0, emb[C.TOKENS], emb)
        r1 = ops.sub(x1, emb[C.TOKENS])
        compute = self.head_residual is None or self.tail_residual is None or \
            ops.rel_l1(r1, self.head_residual) > self.threshold
        if compute:
            x_last = dit.blocks(C.BLOCKS_REST, x1, emb)
            self.head_residual, self.tail_residual = r1, ops.sub(x_last, x1, out=self.tail_residual)
            self.stats.residual_bytes = max(self.stats.residual_bytes,
                                            ops.nbytes(r1) + ops.nbytes(self.tail_residual))
            self.stats.block_stack_runs += 1
        else:
            x_last = ops.add(x1, self.tail_residual)
            self.stats.block_stack_skips += 1
        return dit.head(x_last, emb)

    def new_expert(self) -> None:
        self.head_residual = self.tail_residual = None


@dataclass
class EasyCache:
    """EasyCache (fast_paths.md C.3), on the whole graph: k = mean|v_c - v_c'| / mean|x_c - x_c'| between
    the two latest computed steps (cond row); per step acc += k * mean|x_t - x_t-1| / mean|v_c|; the DiT
    is skipped while acc < threshold (output = x + (v - x) of the last computed step, per row), else it
    runs and acc resets. Forced: the first 10 steps and the last one."""

    threshold: float
    steps: int
    stats: CacheStats
    acc: float = 0.0
    k: float | None = None
    prev_x: np.ndarray | None = None
    last: tuple[np.ndarray, np.ndarray] | None = None  # (x, v) of the latest computed step
    cache: np.ndarray | None = None  # v - x per row
    since_switch: int = 0

    def step(self, i: int, dit: ExpertDiT, x: np.ndarray, t_row: np.ndarray) -> np.ndarray:
        forced = self.since_switch < T.EASYCACHE_RET_STEPS or i >= self.steps - 1
        self.since_switch += 1
        skip = False
        if not forced and self.k is not None and self.prev_x is not None and self.last is not None \
                and self.cache is not None:
            self.acc += self.k * float(np.abs(x - self.prev_x).mean()) / float(np.abs(self.last[1][0]).mean())
            skip = self.acc < self.threshold
        self.prev_x = x
        if skip:
            assert self.cache is not None
            self.stats.block_stack_skips += 1
            return x[None] + self.cache
        v = dit.whole(x, t_row)
        self.stats.block_stack_runs += 1
        self.acc = 0.0
        if self.last is not None:
            dx = float(np.abs(x - self.last[0]).mean())
            self.k = float(np.abs(v[0] - self.last[1][0]).mean()) / dx if dx > 0 else None
        self.last = (x, v)
        self.cache = v - x[None]
        self.stats.residual_bytes = max(self.stats.residual_bytes, self.cache.nbytes)
        return v

    def new_expert(self) -> None:
        self.k, self.last, self.cache, self.acc, self.since_switch = None, None, None, 0.0, 0


CachePolicy = NeverSkip | StaticMask | FirstBlock | EasyCache


def needs_pieces(manifest: Manifest, method: str) -> None:
    """Refuse a method that needs the DiT pieces when the package has none, naming the fix."""
    if method not in PIECES_NEEDED:
        return
    missing = [e for e in manifest.model.experts if C.dit_piece(e, C.BLOCK0) not in manifest.components]
    if missing:
        raise UsageError(f"{arg('cache', method)} needs the DiT cut into pieces and this package has none; "
                         + command_or("re-export it with this vidrt (`vidrt export`) or add them with `vidrt cache "
                                      "split PACKAGE`", f"leave {arg('cache')} out or use another method (the "
                                      "server's operator can add the pieces)"))





def check_cache(manifest: Manifest, cache: str) -> CacheChoice:
    """Refuse, before any engine loads, a cache method this package cannot run (no pieces, no table)."""
    choice = parse_cache(cache)
    if choice.method != "none":
        needs_pieces(manifest, choice.method)
    if choice.method == "teacache":
        teacache_coefficients(manifest)
    elif choice.method == "magcache":
        magcache_table(manifest)
    return choice


# ---- choosing the policy for a run ----------------------------------------------------------------


def teacache_coefficients(manifest: Manifest) -> tuple[tuple[float, ...], bool]:
    """(poly1d coefficients, use_ret_steps): the package's calibrated fit, else the published ones
    (the use_ret_steps variant, input e0, where published). Raises UsageError when there are none."""
    table = manifest.cache_table
    if table is not None and (table.teacache_e0 or table.teacache_e):
        return (table.teacache_e0, True) if table.teacache_e0 else (table.teacache_e, False)
    published = T.TEACACHE_COEFFICIENTS.get(manifest.model.name, {})
    if "e0" in published:
        return published["e0"], True
    if "e" in published:
        return published["e"], False
    raise UsageError(f"{arg('cache', 'teacache')}: no TeaCache coefficients for {manifest.model.name}; "
                     + _calibrate_first())


def magcache_table(manifest: Manifest) -> tuple[float, ...]:
    if manifest.cache_table is not None and manifest.cache_table.mag_ratios:
        return manifest.cache_table.mag_ratios
    if manifest.model.name in T.MAGCACHE_RATIOS:
        return T.MAGCACHE_RATIOS[manifest.model.name]
    raise UsageError(f"{arg('cache', 'magcache')}: no MagCache ratios for {manifest.model.name}; "
                     + _calibrate_first())


def _calibrate_first() -> str:
    return command_or("calibrate this package first (`vidrt cache calibrate PACKAGE`)",
                      f"use another {arg('cache')} method (the server's operator can calibrate this one)")


def static_mask(choice: CacheChoice, manifest: Manifest, experts: list[str], t_rows: list[np.ndarray],
                dit: Callable[[str], ExpertDiT], latent_shape: tuple[int, ...]) -> list[bool]:
    """The TeaCache / MagCache mask of a whole run, before it starts (one window per expert)."""
    mask: list[bool] = []
    if choice.method == "teacache":
        coeffs, use_ret = teacache_coefficients(manifest)
        default = 0.2 if manifest.cache_table is not None else \
            T.TEACACHE_DEFAULT_THRESHOLD.get(manifest.model.name, 0.2)
        thresh = choice.threshold if choice.threshold is not None else default
        for a, b in segments(experts):
            x = np.zeros(latent_shape, np.float32)  # shape only (TI2V)
            signals = [_host_row(dit(experts[i]), dit(experts[i]).time_embed(t_rows[i], x)[1 if use_ret else 0])
                       for i in range(a, b)]
            mask += teacache_mask(signals, coeffs, thresh, use_ret)
    else:
        thresh, k, rr = T.MAGCACHE_DEFAULTS
        thresh = choice.threshold if choice.threshold is not None else thresh
        ratios = magcache_ratios(magcache_table(manifest), len(experts))
        for a, b in segments(experts):
            mask += magcache_mask(ratios[2 * a:2 * b], thresh, k, rr)
    return mask


def _host_row(d: ExpertDiT, t: Any) -> np.ndarray:
    """Row 0 of a time embedding, on the host (TeaCache's signal: [6 * dim] or [dim] floats)."""
    row: np.ndarray = d.ops.to_host(d.ops.rows(t, 0, 1))[0]
    return row


def build_policy(choice: CacheChoice, manifest: Manifest, experts: list[str], t_rows: list[np.ndarray],
                 dit: Callable[[str], ExpertDiT], latent_shape: tuple[int, ...]) -> CachePolicy:
    """The policy for one run. experts[i] / t_rows[i]: step i's DiT expert and timestep row."""
    stats = CacheStats(method=str(choice))
    if choice.method == "none":
        return NeverSkip(stats)
    needs_pieces(manifest, choice.method)
    if choice.method in ("teacache", "magcache"):
        mask = static_mask(choice, manifest, experts, t_rows, dit, latent_shape)
        stats.mask = mask_string(mask)
        return StaticMask(mask, stats)
    if choice.method == "fbcache":
        thresh = choice.threshold if choice.threshold is not None else T.FBCACHE_DEFAULT_THRESHOLD
        return FirstBlock(thresh, stats)
    thresh = choice.threshold if choice.threshold is not None else T.EASYCACHE_DEFAULT_THRESHOLD
    return EasyCache(thresh, len(experts), stats)


__all__ = ["METHODS", "CacheChoice", "parse_cache", "teacache_mask", "magcache_mask", "magcache_ratios",
           "nearest_interp", "segments", "mask_string", "CacheStats", "ExpertDiT", "NeverSkip", "StaticMask",
           "FirstBlock", "EasyCache", "CachePolicy", "needs_pieces", "build_policy", "static_mask",
           "teacache_coefficients", "magcache_table", "check_cache"]
