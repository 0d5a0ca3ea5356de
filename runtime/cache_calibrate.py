"""`vidrt cache calibrate`: measure a package's step-cache tables with its own sampler.

MagCache's calibration (fast_paths.md C.2, `magcache_calibration`): run every step in full and record,
per DiT call, mean over tokens of ||R_t|| / ||R_t-1|| of the block-stack residual R = x_L - x_0
(cond/uncond interleaved, [1.0, 1.0] first). TeaCache-style statistics (C.1): the relative L1 change
of the time embedding e / e0 against that of the DiT output between consecutive steps, fitted with a
degree-4 polynomial (numpy.polyfit), the form of TeaCache's published coefficients. Averaged over
a few prompts and seeds; written into the package's manifest (`cache_table`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from vidrt.caching import CacheStats, ExpertDiT
from vidrt.errors import UsageError, arg
from vidrt.package import contracts as C
from vidrt.package.manifest import CacheTable, load_manifest, write_manifest
from vidrt.request import Request

TEACACHE_DEGREE = 4


def _rel_l1(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean() / max(float(np.abs(b).mean()), 1e-12))


@dataclass
class Recorder:
    """A cache policy that never skips and records the calibration signals (runs the DiT in pieces)."""

    stats: CacheStats = field(default_factory=lambda: CacheStats(method="calibrate"))
    ratios: list[float] = field(default_factory=list)  # 2 per step, cond/uncond interleaved
    e_change: list[float] = field(default_factory=list)  # per step from the second one
    e0_change: list[float] = field(default_factory=list)
    out_change: list[float] = field(default_factory=list)
    _prev: dict[str, np.ndarray] = field(default_factory=dict)

    def step(self, i: int, dit: ExpertDiT, x: np.ndarray, t_row: np.ndarray) -> np.ndarray:
        ops = dit.ops  # the pieces' outputs are backend handles (TensorRT: device tensors); the signals go to numpy
        emb = dit.embed(x, t_row)
        x0 = emb[C.TOKENS]
        residual_t = ops.sub(dit.blocks(C.BLOCKS_REST, dit.blocks(C.BLOCK0, x0, emb), emb), x0)
        out = dit.head(ops.add(x0, residual_t), emb)
        residual = ops.to_host(residual_t)
        emb = {**emb, C.TEMB: ops.to_host(emb[C.TEMB]), C.TIMESTEP_PROJ: ops.to_host(emb[C.TIMESTEP_PROJ])}
        self.stats.block_stack_runs += 1
        rows = [0, 1] if len(residual) > 1 else [0, 0]  # CFG-free: one row stands for both
        prev = self._prev.get("residual")
        if prev is None:
            self.ratios += [1.0, 1.0]
        else:
            norms = np.linalg.norm(residual.astype(np.float64), axis=-1) / \
                np.maximum(np.linalg.norm(prev.astype(np.float64), axis=-1), 1e-12)  # [rows, L]
            self.ratios += [float(norms[r].mean()) for r in rows]
        if "out" in self._prev:
            self.e_change.append(_rel_l1(emb[C.TEMB][0], self._prev["e"]))
            self.e0_change.append(_rel_l1(emb[C.TIMESTEP_PROJ][0], self._prev["e0"]))
            self.out_change.append(_rel_l1(out, self._prev["out"]))
        self._prev = {"residual": residual, "e": emb[C.TEMB][0], "e0": emb[C.TIMESTEP_PROJ][0], "out": out}
        return out

    def new_expert(self) -> None:
        self._prev.pop("residual", None)  # a ratio across experts means nothing: pad like step 0


def fit_teacache(x: list[float], y: list[float]) -> tuple[float, ...]:
    """poly1d coefficients (highest power first) of y ~ poly(x); () when there are too few points."""
    if len(x) <= TEACACHE_DEGREE or float(np.ptp(x)) == 0.0:
        return ()
    return tuple(float(c) for c in np.polyfit(np.asarray(x), np.asarray(y), TEACACHE_DEGREE))


def calibrate(package: str | Path, prompts: list[str], seeds: list[int], steps: int | None = None,
              backend: str = "auto", threads: int | None = None, log: Callable[[str], None] = print, *,
              size: tuple[int, int] | None = None, frames: int | None = None) -> CacheTable:
    """Run the package's sampler on every (prompt, seed) at its defaults (or `steps`, `size` =
    (width, height), `frames`), average the tables, write them into the manifest and return them.
    Raises UsageError when the package has no DiT pieces."""
    from vidrt.caching import needs_pieces
    from vidrt.pipeline import Pipeline

    if not prompts or not seeds:
        raise UsageError(f"calibration needs at least one prompt and one seed ({arg('prompts')}, {arg('seeds')})")
    manifest = load_manifest(package, verify=False)
    needs_pieces(manifest, "magcache")
    pipe = Pipeline.load(package, backend=backend, threads=threads, warn=lambda msg: None)
    runs: list[Recorder] = []
    for prompt in prompts:
        for seed in seeds:
            rec = Recorder()
            request = Request(prompt=prompt, seed=seed, steps=steps, num_frames=frames,
                              width=size[0] if size else None, height=size[1] if size else None)
            result = pipe.run(request, on_frames=lambda chunk: None, policy=rec)
            runs.append(rec)
            log(f"calibrated on {prompt!r} seed {seed}: {len(rec.ratios) // 2} steps")
    s = result.settings
    ratios = np.mean([r.ratios for r in runs], axis=0)
    e, e0, out = ([v for r in runs for v in getattr(r, name)] for name in ("e_change", "e0_change", "out_change"))
    table = CacheTable(steps=s.steps, shift=s.shift, scheduler=s.scheduler,
                       mag_ratios=tuple(round(float(v), 5) for v in ratios),
                       teacache_e=fit_teacache(e, out), teacache_e0=fit_teacache(e0, out))
    fresh = load_manifest(package, verify=False)
    write_manifest(Path(package), replace(fresh, cache_table=table))
    return table


__all__ = ["Recorder", "calibrate", "fit_teacache"]
