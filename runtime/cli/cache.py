"""`vidrt cache split | calibrate | plan` (registered on the `vidrt` group in runtime/cli/app.py)."""

from __future__ import annotations

from pathlib import Path

import click
from vidrt.errors import UsageError

# Prompts for calibration when none are given: the bundled model's own words (a closed vocabulary);
# other models take anything. Two prompts x two seeds is what the bundled tables were measured with.
DEFAULT_PROMPTS = ("a red circle moving left", "a blue square moving up")


@click.group("cache")
def cache_group() -> None:
    """Step caching: DiT pieces, calibrated tables, the skip plan of a run."""


@cache_group.command("split")
@click.argument("package", type=click.Path(file_okay=False))
def split_cmd(package: str) -> None:
    """Cut the package's DiT into the pieces step caching runs (packages exported before them)."""
    try:
        from vidrt.export.package import add_dit_pieces
    except ImportError as exc:
        from vidrt.cli.app import export_extras_missing

        raise export_extras_missing("cutting the DiT needs", exc) from None
    add_dit_pieces(package)
    click.echo(f"added the DiT pieces to {package}")


@cache_group.command("calibrate")
@click.argument("package", type=click.Path(file_okay=False))
@click.option("--prompt", "prompts", multiple=True, help="Calibration prompt (repeatable; default: two examples).")
@click.option("--seed", "seeds", type=int, multiple=True, help="Seed (repeatable; default: 0 and 1).")
@click.option("--steps", type=int, help="Denoising steps (default: the model's).")
@click.option("--size", help="WIDTHxHEIGHT to calibrate at (default: the model's first size).")
@click.option("--frames", type=int, help="Video frames, 4k+1 (default: the model's).")
@click.option("--backend", default="auto", show_default=True, help="auto, onnxruntime or tensorrt.")
@click.option("--threads", type=int, help="CPU threads for ONNX Runtime (default: all cores).")
def calibrate_cmd(package: str, prompts: tuple[str, ...], seeds: tuple[int, ...], steps: int | None,
                  size: str | None, frames: int | None, backend: str, threads: int | None) -> None:
    """Measure MagCache ratios and TeaCache coefficients with the package's own sampler; store them in
    its manifest."""
    from vidrt.cache_calibrate import calibrate
    from vidrt.cli.app import parse_size

    table = calibrate(Path(package), list(prompts or DEFAULT_PROMPTS), list(seeds or (0, 1)), steps, backend,
                      threads, log=lambda msg: click.echo(msg, err=True), size=parse_size(size), frames=frames)
    cond = table.mag_ratios[2::2]
    click.echo(f"cache table: {table.steps} steps, shift {table.shift}; MagCache cond ratios "
               f"{', '.join(f'{v:.4f}' for v in cond[:3])} ... {', '.join(f'{v:.4f}' for v in cond[-3:])}; "
               f"TeaCache fit {'yes' if table.teacache_e0 else 'no'}")


@cache_group.command("plan")
@click.argument("package", type=click.Path(file_okay=False), required=False)
@click.option("--cache", "cache", required=True, help="teacache or magcache, optionally :THRESHOLD.")
@click.option("--steps", type=int, help="Denoising steps (default: the model's).")
@click.option("--shift", type=float, help="Flow-matching sigma shift (default: the model's).")
@click.option("--size", help="WIDTHxHEIGHT (TI2V's per-token timesteps depend on it).")
@click.option("--frames", type=int, help="Video frames, 4k+1.")
def plan_cmd(package: str | None, cache: str, steps: int | None, shift: float | None, size: str | None,
             frames: int | None) -> None:
    """Show which steps run the DiT block stack (C) and which reuse its cached residual (s), before a run."""
    from vidrt.cli.app import _default_model, parse_size
    from vidrt.pipeline import Pipeline
    from vidrt.request import Request

    package = package or _default_model()
    if package is None:
        raise UsageError("no package given and no bundled model found; pass a package folder")
    wh = parse_size(size)
    pipe = Pipeline.load(package, warn=lambda msg: None)
    mask = pipe.cache_mask(Request(prompt="-", steps=steps, shift=shift, cache=cache, num_frames=frames,
                                   width=wh[0] if wh else None, height=wh[1] if wh else None))
    click.echo(f"{mask}  ({mask.count('C')}/{len(mask)} block-stack runs)")
