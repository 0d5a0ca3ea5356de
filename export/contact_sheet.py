"""docs/tiny-shapes.png: what the bundled model makes. One row per prompt, every 4th frame: on the left its
default sampler (25 UniPC steps with CFG), on the right the `fast` recipe (4 CFG-free Euler steps with its
distillation LoRA) when the package has one, from the same seed.

    python -m vidrt.export.contact_sheet [--out docs/tiny-shapes.png] [--seed 0]

With --image-out (docs/tiny-shapes-i2v.png): the image mode. One row per (picture, prompt): the picture,
a gap, then frames 0, 4, 8, 12, 16 of the clip made from it (default sampler); the pictures are the centred
shapes of `shapes_data.picture`, two of them shipped as docs/tiny-shapes-*.png for `make run IMAGE=...`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import av
import numpy as np
from vidrt.export.shapes_data import picture
from vidrt.models import default_package
from vidrt.pipeline import Pipeline
from vidrt.request import Request

PROMPTS = ("a red circle moving left", "a green square moving right", "a blue triangle moving up",
           "a yellow circle moving down", "a white square moving left", "a purple triangle moving right")
GAP_PX = 2


# image mode rows: (picture colour, picture shape, prompt); the last row's prompt disagrees with its picture
IMAGE_ROWS = (("green", "square", "a green square moving right"), ("red", "circle", "a red circle moving up"),
              ("yellow", "triangle", "a yellow triangle moving left"), ("blue", "circle", "a blue circle moving down"),
              ("white", "triangle", "a white triangle moving right"), ("purple", "square", "a red circle moving left"))


def contact_sheet(pipe: Pipeline, prompts: tuple[str, ...], seed: int, every: int = 4,
                  recipe: str | None = None, images: tuple[np.ndarray, ...] | None = None) -> np.ndarray:
    """-> uint8 [rows * (H + gap), cols * (W + gap), 3]: each row one prompt's frames 0, every, 2*every, ...
    (with `images`: row i is animated from images[i], which is shown first, then a gap)."""
    rows = []
    for i, prompt in enumerate(prompts):
        image = None if images is None else images[i]
        frames = pipe.run(Request(prompt=prompt, seed=seed, recipe=recipe, image=image)).frames  # [F, H, W, 3]
        assert frames is not None
        picked = frames[::every] if image is None else np.concatenate([image[None], frames[::every]])
        padded = np.pad(picked, ((0, 0), (0, GAP_PX), (0, GAP_PX), (0, 0)), constant_values=128)
        if image is not None:  # a wider gap after the picture
            padded[0] = np.pad(image, ((0, GAP_PX), (0, GAP_PX), (0, 0)), constant_values=255)
        rows.append(np.concatenate(list(padded), axis=1))
    return np.concatenate(rows, axis=0)


def save_png(image: np.ndarray, path: Path) -> None:
    codec = av.CodecContext.create("png", "w")
    codec.width, codec.height, codec.pix_fmt = image.shape[1], image.shape[0], "rgb24"
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
    path.write_bytes(b"".join(bytes(p) for p in codec.encode(frame)))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("docs/tiny-shapes.png"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=int, default=2, help="pixel repeat, so 64x64 frames are visible")
    ap.add_argument("--image-out", type=Path, default=None,
                    help="also the image-mode sheet, e.g. docs/tiny-shapes-i2v.png")
    args = ap.parse_args(argv)
    package = default_package()
    if package is None:
        raise SystemExit("no bundled model package (runtime/models/tiny-shapes): export it first")
    pipe = Pipeline.load(package)
    sheet = contact_sheet(pipe, PROMPTS, args.seed)
    if any(r.name == "fast" for r in pipe.manifest.model.recipes):
        gap = np.full((sheet.shape[0], 4 * GAP_PX, 3), 255, np.uint8)
        sheet = np.concatenate([sheet, gap, contact_sheet(pipe, PROMPTS, args.seed, recipe="fast")], axis=1)
    sheet = sheet.repeat(args.scale, axis=0).repeat(args.scale, axis=1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_png(sheet, args.out)
    print(f"wrote {args.out} ({sheet.shape[1]}x{sheet.shape[0]})")
    if args.image_out is not None:
        pics = tuple(picture(c, s) for c, s, _ in IMAGE_ROWS)
        sheet = contact_sheet(pipe, tuple(p for *_, p in IMAGE_ROWS), args.seed, images=pics)
        sheet = sheet.repeat(args.scale, axis=0).repeat(args.scale, axis=1)
        save_png(sheet, args.image_out)
        print(f"wrote {args.image_out} ({sheet.shape[1]}x{sheet.shape[0]})")
        for c, s in (("green", "square"), ("red", "circle")):  # the pictures `make run IMAGE=...` uses
            save_png(picture(c, s), args.image_out.parent / f"tiny-shapes-{c}-{s}.png")


if __name__ == "__main__":
    main()
