"""Conditioning images: decode, check and preprocess exactly as the official Wan code (torch-free).

    pixels = load_image("start.png")                                # uint8 [H, W, 3], EXIF orientation applied
    w, h = output_size(pixels.shape[1], pixels.shape[0], "area_bicubic", 832 * 480, 16)
    x = preprocess(pixels, w, h, "area_bicubic")                    # float32 [3, h, w] in [-1, 1]

Two resize rules, named in the manifest (`ImageConditioning.resize`, i2v.md §4):

  "area_bicubic"   Wan2.1 I2V/FLF2V and Wan2.2 I2V-A14B (W21/W22 wan/image2video.py WanI2V.generate):
                   the output keeps the image's aspect inside the area `max_area`, each side floored to a
                   multiple of VAE stride x patch (16); the image is *stretched* to it by torch's bicubic
                   interpolation (a = -0.75, half-pixel centres, edge clamp, no antialias, no clamp of the
                   overshoot), applied to the [-1, 1] tensor. Reimplemented here as two separable matrices.
  "cover_lanczos"  Wan2.2 TI2V-5B (W22 wan/textimage2video.py WanTI2V.i2v): `best_output_size` picks the
                   size (multiples of 32), Pillow LANCZOS scales the image to cover it, centre crop.

One deliberate difference from the official size rule: W21 computes `sqrt(max_area * h / w) // 16`
in floating point, so an image whose aspect equals the target's exactly (832x480 at area 832*480)
lands one latent row short (sqrt gives 479.99999..., official output 832x464). vidrt floors the exact
square root (integer arithmetic), so that image gives 832x480. Every other size is the official one.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
from vidrt.errors import UsageError, arg

RESIZE_RULES = ("area_bicubic", "cover_lanczos")
MIN_SIDE_PX = 16  # below this there is nothing to condition on (a 1x1 image is a mistake)
MAX_PIXELS = 64 * 2**20  # 64 megapixels: a 8192x8192 photo decodes to 192 MB of RGB; bigger is refused
MAX_SIDE_PX = 16384


def _describe(source: object) -> str:
    return f"image {source}" if isinstance(source, (str, Path)) else "the image array"


def load_image(source: str | Path | bytes | np.ndarray, flag: str | None = None) -> np.ndarray:
    """A path (any format Pillow reads: PNG, JPEG, WebP, BMP, TIFF, GIF...), a file's bytes (`vidrt serve`'s
    upload, checked in memory before anything is written) or a uint8 [H, W, 3] array -> uint8 [H, W, 3] RGB,
    EXIF orientation applied. Raises UsageError, one line naming `flag` (and the path) and the fix, for: a
    missing/unreadable file, a size outside MIN_SIDE_PX..MAX_SIDE_PX or over MAX_PIXELS, CMYK, 16-bit or
    float samples, an animated image, an array of the wrong shape or dtype. `flag`: how messages name the
    source (default: the caller's spelling of `image`, vidrt.errors.arg)."""
    import io

    flag = flag or arg("image")
    if isinstance(source, np.ndarray):
        return _check_array(source, flag)
    if not isinstance(source, (str, Path, bytes)):
        raise UsageError(f"{flag} must be a file path or a uint8 [H, W, 3] array, not {type(source).__name__}")
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(source, bytes):
        what, opened = flag, io.BytesIO(source)  # messages name the field only: no path was involved
    else:
        path = Path(source)
        if not path.is_file():
            raise UsageError(f"{flag} {path} does not exist or is not a file")
        what, opened = f"{flag} {path}", path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(opened)
            _check_header(img, what)
            img = ImageOps.exif_transpose(img)  # phones store portraits rotated + an orientation tag
            img.load()
    except UsageError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        kind = "is not an image Pillow can read" if isinstance(exc, UnidentifiedImageError) else "is too large"
        raise UsageError(f"{what} {kind}; use a PNG or JPEG of at most {MAX_PIXELS // 2**20} megapixels") \
            from None
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt data
        reason = " ".join(str(exc).split())[:120]
        raise UsageError(f"{what} cannot be decoded ({reason}); re-save it as PNG or JPEG") from None
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))  # transparent = white, as viewers show it
        img = Image.alpha_composite(background, img)
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def _check_header(img: object, what: str) -> None:
    """What the file header tells before decoding: animation, colour model, bit depth, size. what: how
    messages name the image ("--image start.png", "input_reference")."""
    from PIL import Image

    assert isinstance(img, Image.Image)
    if getattr(img, "is_animated", False) or getattr(img, "n_frames", 1) > 1:
        raise UsageError(f"{what} is animated ({getattr(img, 'n_frames', '?')} frames); "
                         f"give one still frame (PNG or JPEG)")
    if img.mode == "CMYK":
        raise UsageError(f"{what} is CMYK (print colours); convert it to RGB, e.g. save it as PNG")
    raw = " ".join(str(t.args) for t in getattr(img, "tile", []) or [])
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F") or ";16" in raw or "48" in raw:
        raise UsageError(f"{what} has 16-bit or float samples ({img.mode}); save it as 8-bit PNG or JPEG")
    _check_size(img.width, img.height, what)


def _check_size(width: int, height: int, what: str) -> None:
    if min(width, height) < MIN_SIDE_PX:
        raise UsageError(f"{what} is {width}x{height}; it needs at least {MIN_SIDE_PX} pixels per side")
    if max(width, height) > MAX_SIDE_PX or width * height > MAX_PIXELS:
        raise UsageError(f"{what} is {width}x{height}, over the limit of {MAX_PIXELS // 2**20} megapixels "
                         f"({MAX_SIDE_PX} px per side); scale it down")


def _check_array(a: np.ndarray, flag: str) -> np.ndarray:
    if a.ndim != 3 or a.shape[2] != 3:
        raise UsageError(f"{flag}: the image array has shape {a.shape}; give uint8 [height, width, 3] (RGB)")
    if a.dtype != np.uint8:
        raise UsageError(f"{flag}: the image array is {a.dtype}; give uint8 [height, width, 3] (0..255 RGB)")
    _check_size(a.shape[1], a.shape[0], f"{flag}: the image array")
    return np.ascontiguousarray(a)


# ---- output size ------------------------------------------------------------------------------


def area_size(width: int, height: int, max_area: int, multiple: int) -> tuple[int, int]:
    """Wan2.1/A14B: the image's aspect inside `max_area`, sides floored to `multiple` (16) -> (w, h).
    W21 wan/image2video.py: lat_h = round(sqrt(max_area * h / w) // 8 // 2 * 2), computed here
    exactly: floor(sqrt(x) / m) = isqrt(floor(x / m^2)) for x >= 0 (see the module docstring)."""
    out_h = multiple * math.isqrt(max_area * height // (width * multiple * multiple))
    out_w = multiple * math.isqrt(max_area * width // (height * multiple * multiple))
    return out_w, out_h


def best_output_size(width: int, height: int, dw: int, dh: int, area: int) -> tuple[int, int]:
    """TI2V: W22 wan/utils/utils.py best_output_size, same float arithmetic -> (w, h), multiples of (dw, dh).
    Floors the width first or the height first and keeps the one whose aspect is closer (ties: height)."""
    ratio = width / height
    ow = (area * ratio) ** 0.5
    oh = area / ow
    ow1 = int(ow // dw * dw)
    oh1 = int(area / ow1 // dh * dh)
    oh2 = int(oh // dh * dh)
    ow2 = int(area / oh2 // dw * dw)
    r1, r2 = ow1 / oh1, ow2 / oh2
    if max(ratio / r1, r1 / ratio) < max(ratio / r2, r2 / ratio):
        return ow1, oh1
    return ow2, oh2


def output_size(width: int, height: int, rule: str, max_area: int, multiple: int) -> tuple[int, int]:
    """(w, h) of the clip for an image of width x height, by the model's rule (see the module docstring)."""
    if rule == "area_bicubic":
        w, h = area_size(width, height, max_area, multiple)
    elif rule == "cover_lanczos":
        try:
            w, h = best_output_size(width, height, multiple, multiple, max_area)
        except ZeroDivisionError:  # one side floors to 0 (the official code crashes the same way)
            w, h = 0, 0
    else:
        raise ValueError(f"unknown resize rule {rule!r}")
    if min(w, h) < multiple:  # one side would floor below one latent cell (TI2V: the official code divides by 0)
        side = "narrow" if width < height else "wide" if width > height else "small"
        raise UsageError(f"a {width}x{height} image is too {side} for this model's output area of {max_area} "
                         f"pixels (one side would be under {multiple} px); crop it closer to a square or give "
                         f"{arg('size', 'WxH')}")
    return w, h


# ---- resampling -------------------------------------------------------------------------------


def _cubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
    """float64 [n_out, n_in]: torch.nn.functional.interpolate(mode='bicubic', align_corners=False,
    antialias=False) along one axis (ATen upsample_bicubic2d: src = (dst + 0.5) * n_in/n_out - 0.5,
    not clamped; 4 taps at floor(src)-1..+2 with indices clamped to the edge; Keys cubic, a = -0.75)."""
    # ATen's coordinate: scale = float32(n_in) / n_out, then src = scale * (dst + 0.5) - 0.5 compiled
    # as one fused multiply-add (a single float32 rounding). Emulating that matters on strong
    # rescales, where src is in the hundreds and a float32 ulp moves t by ~3e-5 (measured against
    # torch 2.13: weights equal to 6e-7 this way, 2.5e-5 with plain float64 or float32 arithmetic).
    scale = np.float64(np.float32(np.float32(n_in) / np.float32(n_out)))
    src = ((np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32).astype(np.float64)
    base = np.floor(src)
    t = src - base
    m = np.zeros((n_out, n_in), dtype=np.float64)

    def k1(x: np.ndarray) -> np.ndarray:  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def k2(x: np.ndarray) -> np.ndarray:  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    weights = (k2(t + 1), k1(t), k1(1 - t), k2(2 - t))
    rows = np.arange(n_out)
    for offset, w in zip((-1, 0, 1, 2), weights, strict=True):
        idx = np.clip(base.astype(np.int64) + offset, 0, n_in - 1)
        np.add.at(m, (rows, idx), w)
    return m


def bicubic_resize(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """float32 [C, H, W] -> [C, height, width], torch bicubic (see _cubic_matrix); no clamp."""
    _, h, w = x.shape
    rows, cols = _cubic_matrix(h, height), _cubic_matrix(w, width)
    out = np.einsum("oh,chw,pw->cop", rows, x.astype(np.float64), cols, optimize=True)
    return out.astype(np.float32)


def to_unit_range(pixels: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [3, H, W] in [-1, 1] (torchvision to_tensor, then (x - 0.5) / 0.5)."""
    x = pixels.astype(np.float32).transpose(2, 0, 1) / np.float32(255.0)
    return (x - np.float32(0.5)) / np.float32(0.5)


def preprocess(pixels: np.ndarray, width: int, height: int, rule: str) -> np.ndarray:
    """uint8 [H0, W0, 3] -> float32 [3, height, width] in [-1, 1] (area_bicubic may overshoot slightly,
    as the official code does), by the model's rule (module docstring)."""
    if rule == "area_bicubic":
        return bicubic_resize(to_unit_range(pixels), height, width)
    if rule != "cover_lanczos":
        raise ValueError(f"unknown resize rule {rule!r}")
    from PIL import Image

    img = Image.fromarray(pixels)
    scale = max(width / img.width, height / img.height)
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.LANCZOS)
    x1, y1 = (img.width - width) // 2, (img.height - height) // 2
    img = img.crop((x1, y1, x1 + width, y1 + height))
    return to_unit_range(np.asarray(img, dtype=np.uint8))


# OpenAI CLIP's normalisation, used by the ViT-H/14 tower of Wan2.1 I2V (W21 wan/modules/clip.py
# CLIPModel: T.Normalize(mean, std); the same values in laion's preprocessor_config.json).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_pixels(pixels: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> CLIP pixel_values float32 [3, size, size], as W21 CLIPModel.visual does it: the
    [-1, 1] image bicubic-stretched to size x size (torch kernel, no antialias, no crop), back to [0, 1]
    (x * 0.5 + 0.5), then normalised with CLIP_MEAN / CLIP_STD. (diffusers' CLIPImageProcessor resizes
    the short side and centre-crops instead: other values for non-square images, i2v.md §5.)"""
    x = bicubic_resize(to_unit_range(pixels), size, size) * np.float32(0.5) + np.float32(0.5)
    mean = np.asarray(CLIP_MEAN, np.float32)[:, None, None]
    std = np.asarray(CLIP_STD, np.float32)[:, None, None]
    return ((x - mean) / std).astype(np.float32)


__all__ = ["RESIZE_RULES", "clip_pixels", "CLIP_MEAN", "CLIP_STD", "load_image", "area_size", "best_output_size",
           "output_size", "bicubic_resize", "to_unit_range", "preprocess"]
