"""Procedural "moving shapes" clips for the embedded tiny model, and a pixel-only judge of clips.

One shape (circle, square, triangle) of one colour on a plain black background moves left,
right, up or down at a constant speed. 17 frames (4k+1) of 64x64 at 8 fps by default.
Prompts follow the grammar "a {colour} {shape} moving {direction}".

`classify_clip` reads a decoded clip (uint8 [F, H, W, 3]) and says which colour dominates the
non-background pixels and which way the object's centroid moves; the tests use it on frames
decoded by the runtime, the trainer uses it to measure grid accuracy. numpy only.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (35, 200, 60),
    "blue": (45, 70, 235),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "purple": (165, 55, 210),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
DIRECTIONS: dict[str, tuple[int, int]] = {  # (dx, dy) in image coordinates: y grows downwards
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
}
BACKGROUND: tuple[int, int, int] = (0, 0, 0)

NUM_FRAMES = 17  # 4k+1: the Wan VAE's temporal stride is 4
SIZE = 64
FPS = 8
RADIUS = (0.10, 0.18)  # of the frame size
SPEED = (0.7, 1.4)  # pixels per frame at 64x64 (scaled with the frame size)

# every word of the prompt grammar, "a" and "moving" included (the tokenizer's vocabulary)
WORDS: tuple[str, ...] = ("a", *COLOURS, *SHAPES, "moving", *DIRECTIONS)


def prompt_for(colour: str, shape: str, direction: str) -> str:
    return f"a {colour} {shape} moving {direction}"


def grid() -> list[tuple[str, str, str]]:
    """All 72 (colour, shape, direction) combinations, in a fixed order."""
    return list(itertools.product(COLOURS, SHAPES, DIRECTIONS))


@dataclass(frozen=True)
class ClipSpec:
    colour: str
    shape: str
    direction: str
    radius: float  # pixels (circumradius for the triangle, half side for the square)
    start: tuple[float, float]  # (x, y) of the centre in frame 0, pixels
    speed: float  # pixels per frame

    @property
    def prompt(self) -> str:
        return prompt_for(self.colour, self.shape, self.direction)

    def centre(self, frame: int) -> tuple[float, float]:
        dx, dy = DIRECTIONS[self.direction]
        return self.start[0] + dx * self.speed * frame, self.start[1] + dy * self.speed * frame


def random_spec(rng: np.random.Generator, colour: str | None = None, shape: str | None = None,
                direction: str | None = None, size: int = SIZE, frames: int = NUM_FRAMES) -> ClipSpec:
    """A random clip; the object stays fully inside the frame for all `frames` frames."""
    colour = colour or str(rng.choice(list(COLOURS)))
    shape = shape or str(rng.choice(SHAPES))
    direction = direction or str(rng.choice(list(DIRECTIONS)))
    radius = float(rng.uniform(*RADIUS)) * size
    speed = float(rng.uniform(*SPEED)) * size / SIZE
    travel = speed * (frames - 1)
    margin = radius + 1.0
    dx, dy = DIRECTIONS[direction]

    def axis(d: int) -> float:
        lo, hi = margin, size - margin
        if d > 0:
            hi -= travel
        elif d < 0:
            lo += travel
        return float(rng.uniform(lo, max(lo, hi)))

    return ClipSpec(colour, shape, direction, radius, (axis(dx), axis(dy)), speed)


def _coverage(shape: str, radius: float, cx: float, cy: float, size: int) -> np.ndarray:
    """[size, size] float32 in [0, 1]: anti-aliased coverage from an (approximate) signed distance."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    px, py = xs - cx, ys - cy
    if shape == "circle":
        dist = np.sqrt(px * px + py * py) - radius
    elif shape == "square":
        dist = np.maximum(np.abs(px), np.abs(py)) - radius * 0.85
    elif shape == "triangle":  # equilateral, pointing up; circumradius `radius`, inradius radius/2
        c, s = np.float32(np.sqrt(3) / 2), np.float32(0.5)
        dist = np.maximum.reduce([py, c * px - s * py, -c * px - s * py]) - radius * 0.5
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.clip(0.5 - dist, 0.0, 1.0).astype(np.float32)


def render(spec: ClipSpec, size: int = SIZE, frames: int = NUM_FRAMES) -> np.ndarray:
    """-> uint8 [frames, size, size, 3]."""
    bg = np.asarray(BACKGROUND, dtype=np.float32)
    fg = np.asarray(COLOURS[spec.colour], dtype=np.float32)
    out = np.empty((frames, size, size, 3), dtype=np.uint8)
    for f in range(frames):
        a = _coverage(spec.shape, spec.radius, *spec.centre(f), size)[..., None]
        out[f] = np.round(bg + a * (fg - bg)).astype(np.uint8)
    return out


PICTURE_RADIUS = 8.0  # px at 64x64: a centred shape this size can travel 22 px in any direction and stay inside


def picture(colour: str, shape: str, size: int = SIZE) -> np.ndarray:
    """uint8 [size, size, 3]: one centred shape on black, a start picture for the image mode (the evaluation
    grid of export/train_tiny_i2v.py and the tests; docs/ ships two)."""
    spec = ClipSpec(colour, shape, "right", PICTURE_RADIUS * size / SIZE, (size / 2, size / 2), 0.0)
    return render(spec, size=size, frames=1)[0]


def to_model(frames_uint8: np.ndarray) -> np.ndarray:
    """uint8 [F, H, W, 3] -> float32 [3, F, H, W] in [-1, 1] (the VAE's pixel convention)."""
    return (frames_uint8.astype(np.float32) / 127.5 - 1.0).transpose(3, 0, 1, 2).copy()


def to_uint8(video: np.ndarray) -> np.ndarray:
    """float [3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3] (clamped)."""
    v = np.clip((np.asarray(video, dtype=np.float32) + 1.0) * 127.5, 0, 255)
    return np.round(v).astype(np.uint8).transpose(1, 2, 3, 0)


# --------------------------------------------------------------------------------------------
# judging a clip from its pixels alone

_MIN_DIFF = 60.0  # max-channel distance from the background for a pixel to count as object
_MIN_PIXELS = 8  # fewer object pixels than this in the whole clip: no colour
_MIN_TRAVEL = 2.0  # pixels at 64x64 (scaled): less centroid travel than this: no direction


def _background(frames: np.ndarray) -> np.ndarray:
    """Median colour of the clip's border pixels (the object rarely touches the border)."""
    border = np.concatenate([frames[:, 0], frames[:, -1], frames[:, :, 0], frames[:, :, -1]], axis=1)
    return np.median(border.reshape(-1, 3).astype(np.float32), axis=0)


def classify_clip(frames_uint8: np.ndarray) -> tuple[str | None, str | None]:
    """(colour, direction) of a clip uint8 [F, H, W, 3], judged from pixels only.

    colour:    the palette colour that most object pixels (those far from the background colour)
               point to, by cosine similarity of (pixel - background) to (palette - background),
               each pixel weighted by its distance from the background. None if no object is seen.
    direction: sign of the dominant axis of the least-squares velocity of the object's centroid
               (weighted by distance from the background) over the frames that show the object.
               None if the centroid travels less than ~2 pixels (at 64x64).
    """
    frames = np.asarray(frames_uint8)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 [F, H, W, 3], got {frames.shape}")
    f32 = frames.astype(np.float32)
    bg = _background(frames)
    diff = f32 - bg  # [F, H, W, 3]
    dist = np.abs(diff).max(axis=-1)  # [F, H, W]
    mask = dist > _MIN_DIFF
    if mask.sum() < _MIN_PIXELS:
        return None, None

    # colour: weighted vote of object pixels
    names = list(COLOURS)
    refs = np.asarray([COLOURS[n] for n in names], dtype=np.float32) - bg  # [6, 3]
    refs /= np.linalg.norm(refs, axis=1, keepdims=True) + 1e-6
    pix = diff[mask]  # [N, 3]
    weights = dist[mask]
    cos = (pix / (np.linalg.norm(pix, axis=1, keepdims=True) + 1e-6)) @ refs.T  # [N, 6]
    votes = np.bincount(cos.argmax(axis=1), weights=weights, minlength=len(names))
    colour = names[int(votes.argmax())]

    # direction: centroid velocity
    num_f, h, w = mask.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    wts = np.where(mask, dist, 0.0)
    mass = wts.sum(axis=(1, 2))
    seen = mass > 0
    if seen.sum() < 2:
        return colour, None
    t = np.arange(num_f, dtype=np.float32)[seen]
    cx = (wts * xs).sum(axis=(1, 2))[seen] / mass[seen]
    cy = (wts * ys).sum(axis=(1, 2))[seen] / mass[seen]
    tc = t - t.mean()
    denom = float((tc * tc).sum())
    vx, vy = float((tc * cx).sum()) / denom, float((tc * cy).sum()) / denom
    travel = max(abs(vx), abs(vy)) * (num_f - 1)
    if travel < _MIN_TRAVEL * max(h, w) / SIZE:
        return colour, None
    if abs(vx) >= abs(vy):
        return colour, ("right" if vx > 0 else "left")
    return colour, ("down" if vy > 0 else "up")


def score(results: list[tuple[tuple[str | None, str | None], tuple[str, str]]]) -> dict[str, float]:
    """results: [((got_colour, got_direction), (want_colour, want_direction))] -> fractions right."""
    n = max(1, len(results))
    col = sum(g[0] == w[0] for g, w in results)
    dirn = sum(g[1] == w[1] for g, w in results)
    both = sum(g[0] == w[0] and g[1] == w[1] for g, w in results)
    return {"n": len(results), "colour": col / n, "direction": dirn / n, "both": both / n}


__all__ = [
    "COLOURS", "SHAPES", "DIRECTIONS", "BACKGROUND", "WORDS", "NUM_FRAMES", "SIZE", "FPS",
    "ClipSpec", "prompt_for", "grid", "random_spec", "render", "picture", "to_model", "to_uint8",
    "classify_clip", "score",
]
