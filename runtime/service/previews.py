"""Still images of a finished clip, for `GET /v1/videos/{id}/content?variant=thumbnail|spritesheet`.

    images = make_previews(Path("clip.mp4"))   # {"thumbnail": JPEG bytes, "spritesheet": JPEG bytes}

thumbnail: the middle frame, at most 640 px on its long side. spritesheet: up to 10 frames evenly
spaced over the clip, left to right then top to bottom (at most 5 per row), each at most 256 px
on its long side. Decoded with PyAV, encoded with Pillow (both already in the runtime's reach:
PyAV's `VideoFrame.to_image` is Pillow). Two decoding passes: one counts frames (WebM does not
always say), one keeps only the chosen ones, so memory stays at one frame plus the tiles.
"""

from __future__ import annotations

import io
from pathlib import Path

MEDIA_TYPE = "image/jpeg"
SUFFIX = ".jpg"
VARIANTS = ("thumbnail", "spritesheet")
THUMB_PX, TILE_PX, TILES, PER_ROW = 640, 256, 10, 5


def _frames(path: Path, wanted: set[int]) -> dict[int, object]:
    import av

    kept: dict[int, object] = {}
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                kept[i] = frame.to_image()
    return kept


def _count(path: Path) -> int:
    import av

    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def _jpeg(image: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85)  # type: ignore[attr-defined]
    return buf.getvalue()


def make_previews(path: Path) -> dict[str, bytes]:
    from PIL import Image

    n = _count(path)
    if n == 0:
        raise ValueError(f"{path} has no video frames")
    picks = sorted({round(i * (n - 1) / max(min(TILES, n) - 1, 1)) for i in range(min(TILES, n))})
    frames = _frames(path, {*picks, n // 2})
    thumb = frames[n // 2].copy()  # type: ignore[attr-defined]
    thumb.thumbnail((THUMB_PX, THUMB_PX))
    tiles = []
    for i in picks:
        tile = frames[i].copy()  # type: ignore[attr-defined]
        tile.thumbnail((TILE_PX, TILE_PX))
        tiles.append(tile)
    w, h = tiles[0].size
    cols = min(len(tiles), PER_ROW)
    rows = -(-len(tiles) // cols)
    sheet = Image.new("RGB", (cols * w, rows * h))
    for k, tile in enumerate(tiles):
        sheet.paste(tile, ((k % cols) * w, (k // cols) * h))
    return {"thumbnail": _jpeg(thumb), "spritesheet": _jpeg(sheet)}
