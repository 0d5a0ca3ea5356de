"""Tiled, streamed Wan VAE decode (DESIGN.md §5).

The decoder is two graphs with explicit causal caches (contracts.VAE_FIRST / VAE_STEP): the first
latent frame decodes to 1 video frame, every later one (with the caches of the previous call) to
`stride_t` = 4 frames. A latent video [z, F, h, w] therefore becomes 1 + 4·(F - 1) frames.

Spatially the frame is cut into tiles of one fixed latent shape (so one engine / one TensorRT
profile serves every tile). Each tile runs its own cache chain; the pixels of overlapping tiles are
blended with linear ramps that sum to 1. The loop is frame-major: for each latent frame every tile
is decoded, the tiles are blended and the finished video frames are yielded at once, so a writer
can encode them while the next latent frame decodes. Peak memory is one tile's working set plus
every tile's caches (held between latent frames) plus one chunk of frames, never the whole clip.

Why tiling is only approximate: every conv pads the tile border with zeros where the untiled
decoder sees real neighbours, and the mid-block attention is global over the frame. The overlap
hides the first; the second is small in a trained decoder (see tests/test_vae_decode.py).

Units: "cells" are latent pixels, "px" are video pixels; `scale` px per cell (8 for Wan2.1, 16 for
Wan2.2, i.e. `ModelSpec.vae.stride[1]`).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from vidrt.errors import UsageError, arg
from vidrt.package.contracts import VAE_FRAMES, VAE_LATENT, Contract, cache_in, cache_out, resolve_shape

# Default tile overlap in latent cells. The decoder's theoretical spatial receptive field is about
# 17 cells in radius per latent frame (Wan2.1: 11 3x3 convs at 1x, then 7 at 2x, 7 at 4x, 8 at 8x
# resolution), but its effective field is far narrower. Measured with the tiny decoders (a tile
# cropped from the frame vs the untiled decode, mean |error| per cell of distance from the tile
# border, 12 latent frames): 0.30, 0.21, 0.14, 0.08, 0.04, 0.02, then a floor of ~0.01 that comes
# from the global mid-block attention; the profile stops growing after ~5 latent frames (the causal
# caches do not spread the border error further and further). So the border damage is ~5 cells
# deep. 8 cells of overlap (diffusers' Wan2.1 default too: 256 px tiles at a 192 px stride) with a
# ramp over the middle half (BLEND_FRACTION) keeps the outer 2 cells of every tile out of the
# output and puts the 50/50 point 4 cells from both borders. More overlap = better seams, more work.
DEFAULT_OVERLAP = 8

# The blend ramp covers this fraction of the overlap, centred in it. A ramp over the whole overlap
# gives the tile-border pixels (the worst ones) real weight: on the tiny decoders a ramp of 1.0 was
# 5 dB worse than 0.5, and 0.25 / 0 (a hard seam in the middle) no better than 0.5.
BLEND_FRACTION = 0.5

# Activation estimate, in units of the largest cache slot (2 frames of the widest conv input). ORT's
# CPU Conv lowers each 3x3x3 conv to a GEMM over an im2col buffer of 27 taps x up to 4 frames, so a
# step's peak intermediate memory is tens of slots. Measured with the arena off (tests/test_vae_decode
# prints it): 42-47 slots for the tiny Wan2.1 decoder, 29 for the tiny Wan2.2 one. 48 errs on the
# high side. A TensorRT backend (implicit-GEMM convs + a workspace) should pass its own figure.
# Those figures are of the Conv3d graphs: packages exported with the Conv3ds as Conv2ds (the default
# since vidrt.export.onnx_optimize.conv3d_as_conv2d) hold ~1.6x the activations on ONNX Runtime CPU
# (bundled decoder step at 256x256 px: 92 -> 145 MiB peak), so on that path 48 undercounts.
ACTIVATION_SLOTS = 48.0
# ONNX Runtime CPU on the Conv2d-tap graphs (what `vidrt export` writes since conv3d_as_conv2d): every
# tap's Conv2d output is a whole activation, and the NCHWc layout pads 8 channels to 16. Measured by
# tests/test_vae_decode.py::test_peak_memory_tiled_vs_untiled (tiny Wan2.1 decoder, arena off), 3 latent
# frames: 138 / 559 / 898 MiB untiled at 128 / 256 / 384 px, where 48 slots estimated 67 / 268 / 603:
# ~115 slots at the worst point (256 px). With the narrow convs as frame pairs (onnx_optimize's
# _replace_conv_frame_pairs): 109 / 440 / 930 MiB, against 144 / 576 / 1296 estimated with 125 slots.
# The CPU decode plan (Pipeline's decode_plan) uses this figure.
ORT_ACTIVATION_SLOTS = 125.0


class Engine(Protocol):
    """What the decoder needs from a backend: a subset of vidrt.backends.base.Engine."""

    contract: Contract

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


# ---- tile plan ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class AxisPlan:
    """Tiles along one axis (rows or columns) of the latent frame.

    Tiles are `tile` cells long and start at `starts`; consecutive tiles overlap by at least the
    requested overlap. We need one fixed tile shape, so unlike diffusers (which cuts smaller edge
    tiles) the last tile is shifted inward to end exactly at the border: same shape, a larger
    overlap with its neighbour, no padding, so the frame border is decoded exactly as the untiled
    decoder would (both see the decoder's own zero padding there). Only when the frame is smaller
    than the tile (fixed-shape engines) is the latent padded, by repeating its edge.

    `blends[i]` = (start_px, width_px): where, in frame pixels, the weight passes linearly from tile
    i to tile i+1. The ramp is `blend * overlap * scale` px wide (plan_tiles), centred in the two
    tiles' common span, so the pixels next to either tile's border get no weight.
    """

    length: int  # frame extent, cells
    tile: int  # tile extent, cells (> length only when padded)
    scale: int  # px per cell
    starts: tuple[int, ...]  # tile origins, cells, ascending
    blends: tuple[tuple[int, int], ...]  # len(starts) - 1 ramps, frame px

    @property
    def count(self) -> int:
        return len(self.starts)

    @property
    def pad(self) -> int:
        """Cells of edge padding appended to the latent on this axis (0 unless the frame < tile)."""
        return max(0, self.tile - self.length)

    def support(self, i: int) -> tuple[int, int]:
        """[lo, hi) frame px where tile i has a non-zero weight."""
        lo = self.starts[i] * self.scale
        hi = min(self.starts[i] + self.tile, self.length) * self.scale
        if i > 0:
            lo = self.blends[i - 1][0]
        if i + 1 < self.count:
            start, width = self.blends[i]
            hi = start + width
        return lo, hi

    def weights(self, i: int) -> np.ndarray:
        """float32 [hi - lo]: tile i's blend weight over its support (see `support`)."""
        lo, hi = self.support(i)
        px = np.arange(lo, hi, dtype=np.float64) + 0.5  # pixel centres: ramps never hit exactly 0 or 1
        w = np.ones(hi - lo, dtype=np.float64)
        if i > 0:  # ramp up across the blend with the previous tile
            start, width = self.blends[i - 1]
            w = np.minimum(w, (px - start) / width) if width else w
        if i + 1 < self.count:  # ramp down across the blend with the next tile
            start, width = self.blends[i]
            w = np.minimum(w, 1.0 - (px - start) / width) if width else w
        return np.clip(w, 0.0, 1.0).astype(np.float32)


@dataclass(frozen=True)
class TilePlan:
    """How one latent frame [z, h, w] is cut into fixed-shape tiles. Pure data; see `plan_tiles`."""

    rows: AxisPlan
    cols: AxisPlan
    overlap: int  # requested overlap, cells

    @property
    def tile_shape(self) -> tuple[int, int]:
        """(tile_h, tile_w) in cells: the shape every engine call sees."""
        return self.rows.tile, self.cols.tile

    @property
    def origins(self) -> tuple[tuple[int, int], ...]:
        """(y, x) cell origin of every tile, row-major."""
        return tuple((y, x) for y in self.rows.starts for x in self.cols.starts)

    @property
    def count(self) -> int:
        return self.rows.count * self.cols.count

    @property
    def frame_px(self) -> tuple[int, int]:
        """(H, W) of the decoded frame."""
        return self.rows.length * self.rows.scale, self.cols.length * self.cols.scale


def _plan_axis(length: int, tile: int, overlap: int, scale: int, pad: bool, blend_px: int) -> AxisPlan:
    if length < 1 or tile < 1 or scale < 1:
        raise ValueError(f"bad axis: length {length}, tile {tile}, scale {scale}")
    if tile >= length:  # one tile; pad the latent up to the tile only for fixed-shape engines
        return AxisPlan(length, tile if pad else length, scale, (0,), ())
    if not 0 <= overlap <= tile // 2:
        # more overlap than half a tile would let three tiles meet at one pixel
        raise ValueError(f"overlap {overlap} must be between 0 and half the tile ({tile} cells)")
    stride = tile - overlap
    starts = list(range(0, length - tile, stride)) + [length - tile]
    width = blend_px
    blends: list[tuple[int, int]] = []
    prev_end = 0
    for a, b in zip(starts[:-1], starts[1:], strict=True):
        lo, hi = b * scale, (a + tile) * scale  # common span of tiles a and b, px
        start = (lo + hi - width) // 2  # centred in the common span
        start = max(start, prev_end, lo)  # never before the previous ramp ends
        start = min(start, hi - width)
        blends.append((start, width))
        prev_end = start + width
    return AxisPlan(length, tile, scale, tuple(starts), tuple(blends))


def plan_tiles(lat_h: int, lat_w: int, tile_h: int, tile_w: int, *, scale: int,
               overlap: int = DEFAULT_OVERLAP, blend: float = BLEND_FRACTION, pad_to_tile: bool = False) -> TilePlan:
    """Tile a lat_h x lat_w latent frame with tile_h x tile_w tiles overlapping by >= `overlap` cells.

    With pad_to_tile=False (ONNX Runtime: dynamic shapes) a tile larger than the frame shrinks to
    the frame; with True (a fixed-shape engine) the latent is edge-padded up to the tile instead.
    """
    if not 0.0 <= blend <= 1.0:
        raise ValueError(f"blend must be a fraction of the overlap in [0, 1], got {blend}")
    blend_px = round(overlap * scale * blend)
    return TilePlan(_plan_axis(lat_h, tile_h, overlap, scale, pad_to_tile, blend_px),
                    _plan_axis(lat_w, tile_w, overlap, scale, pad_to_tile, blend_px), overlap)


def untiled_plan(lat_h: int, lat_w: int, *, scale: int) -> TilePlan:
    return plan_tiles(lat_h, lat_w, lat_h, lat_w, scale=scale, overlap=0)


# ---- memory plan -------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes needed to decode with one tile plan (fp32 everywhere).

    cache_bytes: one tile's cache set. work_bytes: the rest of one engine call (latent in, frames
    out, activations). Between latent frames every tile's caches and one chunk of blended frames
    stay in host memory.
    """

    cache_bytes: int
    work_bytes: int
    tiles: int
    chunk_bytes: int  # blended float32 frames [n, H, W, 3]
    cells: int  # latent cells of one tile

    @property
    def device_bytes(self) -> int:
        """One engine call: caches in + caches out + work. What must fit on a GPU."""
        return 2 * self.cache_bytes + self.work_bytes

    @property
    def tile_bytes(self) -> int:
        """Alias of device_bytes (the name residency.py uses)."""
        return self.device_bytes

    @property
    def host_bytes(self) -> int:
        """Held between latent frames: all tiles' caches + the frame chunk."""
        return self.tiles * self.cache_bytes + self.chunk_bytes

    def total(self, same_memory: bool) -> int:
        """Peak of the budgeted memory. same_memory (ONNX Runtime on the CPU): the running tile's
        input caches are among the held ones, so the peak is held + its new caches + work."""
        if same_memory:
            return self.host_bytes + self.cache_bytes + self.work_bytes
        return self.device_bytes

    @property
    def cache_bytes_per_cell(self) -> float:
        return self.cache_bytes / self.cells


def _tensor_bytes(shape: tuple[int, ...], dtype: str) -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize


def estimate_memory(step: Contract, plan: TilePlan, activation_slots: float = ACTIVATION_SLOTS) -> MemoryEstimate:
    """Memory for decoding with `plan`, from the step graph's contract (cache shapes are symbolic
    in lat_h/lat_w, e.g. [1, 96, 2, "8*lat_h", "8*lat_w"], so their bytes per latent cell follow)."""
    th, tw = plan.tile_shape
    s = plan.rows.scale
    sizes = {"lat_h": th, "lat_w": tw, "out_h": th * s, "out_w": tw * s}
    slot_bytes = [_tensor_bytes(resolve_shape(t.shape, sizes), t.dtype) for t in step.outputs if t.name != VAE_FRAMES]
    frames = step.output(VAE_FRAMES)
    frame_bytes = _tensor_bytes(resolve_shape(frames.shape, sizes), frames.dtype)
    latent = step.input(VAE_LATENT)
    latent_bytes = _tensor_bytes(resolve_shape(latent.shape, sizes), latent.dtype)
    work = latent_bytes + frame_bytes + int(activation_slots * max(slot_bytes, default=0))
    n_frames = frames.shape[2] if isinstance(frames.shape[2], int) else 4
    h_px, w_px = plan.frame_px
    chunk = n_frames * h_px * w_px * 3 * 4
    return MemoryEstimate(sum(slot_bytes), work, plan.count, chunk, th * tw)


def _axis_count(length: int, tile: int, overlap: int) -> int:
    return 1 if tile >= length else math.ceil((length - tile) / (tile - overlap)) + 1


def choose_tile(step: Contract, lat_h: int, lat_w: int, budget_bytes: int, *, scale: int,
                overlap: int = DEFAULT_OVERLAP, same_memory: bool = True,
                activation_slots: float = ACTIVATION_SLOTS, budget_name: str = "VAE memory budget",
                fix: str | None = None) -> TilePlan:
    """The cheapest tile plan whose memory fits `budget_bytes`; UsageError naming `budget_name` and
    `fix` when even the smallest tiles do not fit (default: raise `vae_memory`, as the caller spells it).

    Untiled when the whole frame fits. Otherwise, among every tile shape (th, tw) with both sides
    >= 2 * overlap (or the full frame extent) that fits, pick the one that decodes the fewest cells
    in total (tiles x tile area: redundant overlap work), then the fewest tiles. same_memory=True
    when the engine runs in host memory (ONNX Runtime CPU): the resident caches count against the
    same budget; a GPU backend passes False and its device budget.
    """
    full = untiled_plan(lat_h, lat_w, scale=scale)
    if estimate_memory(step, full, activation_slots).total(same_memory) <= budget_bytes:
        return full
    lo = max(1, 2 * overlap)
    best: tuple[tuple[int, int, int], TilePlan] | None = None
    for th in range(min(lo, lat_h), lat_h + 1):
        if th < lo and th != lat_h:
            continue
        for tw in range(min(lo, lat_w), lat_w + 1):
            if tw < lo and tw != lat_w:
                continue
            n = _axis_count(lat_h, th, overlap) * _axis_count(lat_w, tw, overlap)
            key = (n * th * tw, n, -th * tw)
            if best is not None and key >= best[0]:
                continue
            plan = plan_tiles(lat_h, lat_w, th, tw, scale=scale, overlap=overlap)
            if estimate_memory(step, plan, activation_slots).total(same_memory) <= budget_bytes:
                best = (key, plan)
    if best is None:
        fix = fix or f"raise {arg('vae_memory')} (e.g. 2GB) or leave it out (auto)"
        small = plan_tiles(lat_h, lat_w, min(lo, lat_h), min(lo, lat_w), scale=scale, overlap=overlap)
        need = estimate_memory(step, small, activation_slots).total(same_memory)
        have = f"{budget_bytes} bytes" if budget_bytes < 2**20 else f"{budget_bytes / 2**20:.1f} MiB"
        raise UsageError(f"{budget_name} {have} is too small: the smallest tiles "
                         f"({small.tile_shape[0]}x{small.tile_shape[1]} latent cells) need "
                         f"{need / 2**20:.1f} MiB; {fix}")
    return best[1]


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), else physical memory (POSIX sysconf)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# Share of the available RAM the automatic budget gives the VAE on CPU (the DiT and text encoder
# sessions are released or idle by then, but the process and the video writer still need room).
AUTO_BUDGET_FRACTION = 0.5


def auto_budget_bytes(fraction: float = AUTO_BUDGET_FRACTION) -> int:
    return int(available_memory_bytes() * fraction)


_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}


def parse_bytes(text: str, flag: str | None = None) -> int:
    """'4G', '4GiB', '512M', '1.5GB', '1000000B' -> bytes (--vae-memory, `vidrt plan/build --gpu-memory`,
    --workspace). A unit is required (a bare "24" meant as GB would plan for 24 bytes: the B unit says
    bytes), and the size must be more than 0 bytes; else UsageError naming `flag` (default: the caller's
    spelling of vae_memory) and the form to write."""
    flag = flag or arg("vae_memory")
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS:
        raise UsageError(f"{flag} {text!r} is not a memory size; write it with a unit, e.g. 6GB or 512MiB")
    if not unit:
        raise UsageError(f"{flag} {text} has no unit; write it like {m.group(1)}GB or {m.group(1)}GiB "
                         f"({m.group(1)}B if you mean bytes)")
    size = int(float(m.group(1)) * _UNITS[unit])
    if size <= 0:
        raise UsageError(f"{flag} {text} must be more than 0 bytes; write a size like 6GB")
    return size


# ---- decode ------------------------------------------------------------------------------------


def denormalize(latents: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """[z, F, h, w] normalised (what the DiT produces) -> the VAE's latent space: z * std + mean."""
    if latents.ndim != 4 or latents.shape[0] != len(mean) or len(mean) != len(std):
        raise ValueError(f"latents {latents.shape} do not match {len(mean)} mean / {len(std)} std channels")
    m = np.asarray(mean, dtype=np.float32)[:, None, None, None]
    s = np.asarray(std, dtype=np.float32)[:, None, None, None]
    return latents.astype(np.float32) * s + m


DECODE_ORDERS = ("frame", "tile")


def iter_decode(latents: np.ndarray, first: Engine, step: Engine | Callable[[], Engine], plan: TilePlan, *,
                mean: Sequence[float], std: Sequence[float],
                release_first: Callable[[], None] | None = None, order: str = "frame") -> Iterator[np.ndarray]:
    """Decode normalised latents [z, F, h, w] latent frame by latent frame.

    order "frame" (frame-major): every tile of latent frame 0, then every tile of frame 1, ...; each
    chunk is yielded as soon as its latent frame is done, and every tile's caches are held between
    latent frames (memory grows with the frame area). order "tile" (tile-major): each tile's whole
    causal chain, one tile after another: only one tile's caches are alive at a time (memory bounded
    by the tile), both engines stay open, and the blended frames are assembled in one float32 clip
    buffer [T, H, W, 3] (host) and yielded, chunk by chunk, at the end. Same values either way: every
    tile's chain is independent and blending is a sum.

    `step` may be a function that opens the step engine: it is called after latent frame 0, once
    `release_first` has released the first-frame engine, so the two never hold device memory at
    the same time (the residency plan's "decode frame 0" and "decode" stages).

    Yields float32 [n, H, W, 3] in [-1, 1], n = 1 for the first latent frame and 4 after. Float,
    not uint8: blending and previews want the exact values and quantising is the writer's job
    (video.to_uint8), and a chunk is small (4 x 720 x 1280 x 3 x 4 B = 44 MB).
    """
    z, n_lat, h, w = latents.shape
    if (h, w) != (plan.rows.length, plan.cols.length):
        raise ValueError(f"latent frame {h}x{w} does not match the tile plan's {plan.rows.length}x{plan.cols.length}")
    lat = denormalize(latents, mean, std)
    th, tw = plan.tile_shape
    n_caches = sum(1 for name in first.contract.output_names if name.startswith("cache_out_"))
    H, W = plan.frame_px
    # Separable blend weights per tile: rows x cols, over each tile's support only.
    row_w = [plan.rows.weights(i) for i in range(plan.rows.count)]
    col_w = [plan.cols.weights(j) for j in range(plan.cols.count)]
    if order not in DECODE_ORDERS:
        raise ValueError(f"decode order {order!r}: use one of {DECODE_ORDERS}")
    if order == "tile":
        step_now: Engine = step() if not hasattr(step, "run") else step  # type: ignore[operator,assignment]
        yield from _tile_major(lat, first, step_now, plan, n_caches, row_w, col_w)
        return
    caches: list[dict[str, np.ndarray]] = [{} for _ in range(plan.count)]
    step_engine: Engine = step if not callable(step) or hasattr(step, "run") else first  # type: ignore[assignment]
    for f in range(n_lat):
        if f == 1:  # frame 0 done on every tile: the first-frame engine goes, the step engine comes
            if release_first is not None:
                release_first()
            if not hasattr(step, "run"):
                step_engine = step()  # type: ignore[operator]
        frame = lat[:, f]  # [z, h, w]
        if plan.rows.pad or plan.cols.pad:  # only for fixed-shape engines on a frame smaller than the tile
            frame = np.pad(frame, ((0, 0), (0, plan.rows.pad), (0, plan.cols.pad)), mode="edge")
        out: np.ndarray | None = None
        k = 0
        for i, y in enumerate(plan.rows.starts):
            for j, x in enumerate(plan.cols.starts):
                feeds = {VAE_LATENT: np.ascontiguousarray(frame[None, :, None, y:y + th, x:x + tw])}
                if f == 0:
                    res = first.run(feeds)
                else:
                    feeds.update({cache_in(c): caches[k][cache_out(c)] for c in range(n_caches)})
                    res = step_engine.run(feeds)
                # Keep this tile's caches for the next latent frame (host memory; a GPU backend
                # could keep them on the device when its budget allows).
                caches[k] = {cache_out(c): res[cache_out(c)] for c in range(n_caches)}
                tile = res[VAE_FRAMES][0].transpose(1, 2, 3, 0)  # [1,3,n,th*s,tw*s] -> [n, th*s, tw*s, 3]
                if plan.count == 1:  # untiled: the engine's output as is (crop any padding)
                    out = np.ascontiguousarray(tile[:, :H, :W], dtype=np.float32)
                    continue
                if out is None:
                    out = np.zeros((tile.shape[0], H, W, 3), dtype=np.float32)
                (y0, y1), (x0, x1) = plan.rows.support(i), plan.cols.support(j)
                oy, ox = y * plan.rows.scale, x * plan.cols.scale  # tile origin, px
                weight = row_w[i][:, None, None] * col_w[j][None, :, None]  # [y1-y0, x1-x0, 1]
                out[:, y0:y1, x0:x1] += tile[:, y0 - oy:y1 - oy, x0 - ox:x1 - ox] * weight
                k += 1
        assert out is not None
        yield out


def _tile_major(lat: np.ndarray, first: Engine, step: Engine, plan: TilePlan, n_caches: int,
                row_w: list[np.ndarray], col_w: list[np.ndarray]) -> Iterator[np.ndarray]:
    """iter_decode's tile-major order: one tile's cache chain alive at a time."""
    z, n_lat, _, _ = lat.shape
    th, tw = plan.tile_shape
    H, W = plan.frame_px
    if plan.rows.pad or plan.cols.pad:
        lat = np.pad(lat, ((0, 0), (0, 0), (0, plan.rows.pad), (0, plan.cols.pad)), mode="edge")
    chunks: list[np.ndarray | None] = [None] * n_lat  # float32 [n, H, W, 3] per latent frame
    for i, y in enumerate(plan.rows.starts):
        for j, x in enumerate(plan.cols.starts):
            cache: dict[str, np.ndarray] = {}
            for f in range(n_lat):
                feeds = {VAE_LATENT: np.ascontiguousarray(lat[None, :, f, None, y:y + th, x:x + tw]), **cache}
                res = first.run(feeds) if f == 0 else step.run(feeds)
                cache = {cache_in(c): res[cache_out(c)] for c in range(n_caches)}  # the previous set goes
                tile = res[VAE_FRAMES][0].transpose(1, 2, 3, 0)  # [n, th*s, tw*s, 3]
                if plan.count == 1:
                    chunks[f] = np.ascontiguousarray(tile[:, :H, :W], dtype=np.float32)
                    continue
                out = chunks[f]
                if out is None:
                    out = chunks[f] = np.zeros((tile.shape[0], H, W, 3), dtype=np.float32)
                (y0, y1), (x0, x1) = plan.rows.support(i), plan.cols.support(j)
                oy, ox = y * plan.rows.scale, x * plan.cols.scale
                weight = row_w[i][:, None, None] * col_w[j][None, :, None]
                out[:, y0:y1, x0:x1] += tile[:, y0 - oy:y1 - oy, x0 - ox:x1 - ox] * weight
            del cache
    for chunk in chunks:
        assert chunk is not None
        yield chunk


def decode(latents: np.ndarray, first: Engine, step: Engine, plan: TilePlan, *,
           mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """The whole clip at once: float32 [1 + 4 (F - 1), H, W, 3] in [-1, 1]. Prefer iter_decode."""
    return np.concatenate(list(iter_decode(latents, first, step, plan, mean=mean, std=std)), axis=0)
