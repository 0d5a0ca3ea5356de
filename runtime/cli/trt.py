"""`vidrt build`, `vidrt plan`, `vidrt doctor` (registered on the `vidrt` group in runtime/cli/app.py)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click
from vidrt.errors import DeviceError, UsageError

if TYPE_CHECKING:
    from vidrt.backends.residency import ResidencyPlan
    from vidrt.package.registry import ModelSpec


def _sizes(value: str | None) -> tuple[tuple[int, int], ...]:
    if not value:
        return ()
    out = []
    for part in value.split(","):
        w, sep, h = part.strip().lower().partition("x")
        if not sep or not w.isdigit() or not h.isdigit():
            raise UsageError(f"size {part!r} is not WIDTHxHEIGHT; write sizes like 832x480,1280x720")
        out.append((int(w), int(h)))
    return tuple(out)


def _bytes(value: str, flag: str) -> int:
    from vidrt.vae_decode import parse_bytes

    return parse_bytes(value, flag)


@click.command("build")
@click.argument("package", type=click.Path(file_okay=False))
@click.option("--precision", type=click.Choice(["fp16", "bf16", "fp8", "fp32"]), required=True,
              help="Engine precision; the DiT graph must have been exported (or quantised) at it.")
@click.option("--sizes", help="Resolution buckets WxH[,WxH...], one optimisation profile each (default: the model's).")
@click.option("--frames", type=int, help="Video frames, 4k+1 (default: the model's).")
@click.option("--workspace", default="4GiB", show_default=True, help="Builder scratch memory limit.")
@click.option("--optimization-level", type=click.IntRange(0, 5), default=3, show_default=True)
@click.option("--weight-streaming", is_flag=True, help="DiT plans that can stream weights from host memory.")
@click.option("--vae-tile", help="VAE tile in latent cells HxW (default: from the residency plan for this GPU).")
@click.option("--gpu-memory", help="Memory to plan the VAE tile for (default: this GPU's).")
@click.option("--component", "components", multiple=True, help="Build only this component (repeatable).")
@click.option("--cache-pieces", is_flag=True,
              help="Also build the DiT's step-caching pieces, for `vidrt run --cache` on TensorRT.")
@click.option("--no-refit", "no_refit", is_flag=True,
              help="DiT plans that cannot be refitted (LoRAs then only baked in with vidrt export --lora).")
@click.option("--device", type=click.IntRange(0), default=0, show_default=True,
              help="GPU to build on (its compute capability goes into the plans).")
@click.option("--check", is_flag=True,
              help="Compare every engine with ONNX Runtime on the same random inputs (polygraphy); into report.json.")
def build_cmd(package: str, precision: str, sizes: str | None, frames: int | None, workspace: str,
              optimization_level: int, weight_streaming: bool, vae_tile: str | None, gpu_memory: str | None,
              components: tuple[str, ...], cache_pieces: bool, no_refit: bool, device: int, check: bool) -> None:
    """Build TensorRT engines for a model package (needs TensorRT and the target GPU). The DiT plans are
    refittable (LoRAs at load time) unless --no-refit."""
    from vidrt.export.build_engines import BuildOptions, build_package

    tile = None
    if vae_tile:
        (th, tw), = _sizes(vae_tile)
        tile = (th, tw)
    opts = BuildOptions(precision=precision, sizes=_sizes(sizes), frames=frames,
                        workspace_bytes=_bytes(workspace, "--workspace"),
                        optimization_level=optimization_level, weight_streaming=weight_streaming, vae_tile=tile,
                        gpu_memory=_bytes(gpu_memory, "--gpu-memory") if gpu_memory else None, components=components,
                        check=check, cache_pieces=cache_pieces, refit=not no_refit)
    manifest = build_package(Path(package), opts, log=click.echo, device=device)
    click.echo(f"{len(manifest.engines)} plan(s) recorded in {Path(package) / 'manifest.json'}")


@click.command("plan")
@click.argument("model")
@click.option("--size", required=True, help="WIDTHxHEIGHT, e.g. 1280x704.")
@click.option("--frames", type=int, help="Video frames, 4k+1 (default: the model's).")
@click.option("--gpu-memory", default="24GB", show_default=True,
              help="Device memory to plan for (GB = 10^9 bytes, GiB = 2^30: a '24 GB' RTX 4090 has 24GiB); "
                   "several, comma-separated (8GB,12GB,16GB,24GB), print one summary line per card.")
@click.option("--precision", type=click.Choice(["bf16", "fp16", "fp8", "fp32"]),
              help="DiT engine precision (default: a package's own DiT precision; bf16 for a variant).")
@click.option("--fp8-scope", type=click.Choice(["linear", "ffn"]), default="ffn", show_default=True,
              help="fp8: quantise all block matrices, or only the feed-forward ones.")
@click.option("--text-encoder", type=click.Choice(["auto", "gpu", "cpu"]), default="auto", show_default=True,
              help="Where umT5 runs: the GPU, or ONNX Runtime on the CPU (host RAM); auto = the GPU if the clip fits.")
@click.option("--image", "image", is_flag=True,
              help="Plan an image-to-video clip: the VAE encoder (+ Wan2.1's CLIP) stage, encoded once and released "
                   "before denoising (image-to-video-only models plan it without the flag).")
@click.option("--cache", "cache", metavar="METHOD[:THRESHOLD]",
              help="Plan a step-cached run (teacache, magcache, fbcache: the DiT as pieces; easycache): the "
                   "residual buffers and the tensors between the pieces, on the device through denoising.")
def plan_cmd(model: str, size: str, frames: int | None, gpu_memory: str, precision: str | None, fp8_scope: str,
             text_encoder: str, image: bool, cache: str | None) -> None:
    """Device-memory plan for a clip: per stage peak, what stays resident, the VAE tile.
    MODEL is a package folder or a variant name (no weights needed). Exits 4 (DeviceError, as `vidrt run`
    on TensorRT refuses the same clip) when it fits no card planned for."""
    from vidrt.backends.residency import make_plan, plan_for_package
    from vidrt.caching import parse_cache
    from vidrt.package.registry import VARIANTS, get_variant

    method = str(parse_cache(cache))  # UsageError naming the valid forms
    (width, height), = _sizes(size)
    budgets = [_bytes(b.strip(), "--gpu-memory") for b in gpu_memory.split(",") if b.strip()]
    text_device = None if text_encoder == "auto" else text_encoder
    plans = []
    for budget in budgets:
        if Path(model).is_dir():
            from vidrt.package.manifest import load_manifest

            manifest = load_manifest(model, verify=False)
            n = frames or manifest.model.sampling.frames
            _check_image(manifest.model, image)
            own = manifest.components[manifest.model.experts[0]].precision  # the package's DiT, as exported
            plans.append(plan_for_package(Path(model), manifest, width, height, n, budget, precision or own,
                                          fp8_scope, text_device=text_device, image=image or None, cache=method))
        elif model in VARIANTS:
            spec = get_variant(model)
            _check_image(spec, image)
            plans.append(make_plan(spec, width, height, frames or spec.sampling.frames, budget, precision or "bf16",
                                   fp8_scope=fp8_scope, text_device=text_device, image=image or None, cache=method))
        else:
            raise UsageError(f"{model!r} is neither a package folder nor a variant ({', '.join(VARIANTS)})")
    if len(plans) == 1:
        click.echo(plans[0].table())
    else:
        _summary(plans, gpu_memory)
    if not any(p.fits for p in plans):  # as `vidrt run` on TensorRT refuses it: DeviceError, exit 4
        least = min(plans, key=lambda p: p.peak - p.budget)
        cards = "the card" if len(plans) == 1 else "any of these cards"
        raise DeviceError(f"{least.width}x{least.height}x{least.frames} does not fit {cards}: it needs "
                          f"{least.peak / 2**30:.2f} GiB of GPU memory and {least.budget / 2**30:.2f} GiB are planned "
                          f"for {_over(least)}")


def _over(plan: ResidencyPlan) -> str:
    """The stages over the budget and the fix for each kind: umT5's stage does not shrink with the clip
    (run it on the CPU), the others do."""
    over = [s for s in plan.stages if s.peak > plan.budget]
    fixes = []
    if any(s.name == "text" for s in over) and plan.text_device != "cpu":
        fixes.append("run the text encoder on the CPU (--text-encoder cpu)")
    if any(s.name != "text" for s in over):
        fixes.append("lower --size or --frames")
    stages = ", ".join(f"{s.name} {s.peak / 2**30:.2f} GiB" for s in over)
    return f"(over: {stages}); " + ", ".join([*fixes, "or plan a larger card (--gpu-memory)"])


def _summary(plans: list[ResidencyPlan], gpu_memory: str) -> None:
    """One line per card."""
    p0 = plans[0]
    click.echo(f"{p0.model} {p0.width}x{p0.height}x{p0.frames}, DiT {p0.precision}")
    click.echo(f"{'card':>8}  {'peak GiB':>8}  {'fits':<4}  {'text':<4}  {'CFG':<3}  {'decode':<6}  {'VAE tiles':>9}  "
               f"{'streamed GiB/call':>17}  {'host RAM GiB':>12}")
    for label, p in zip((b.strip() for b in gpu_memory.split(",") if b.strip()), plans, strict=True):
        click.echo(f"{label:>8}  {p.peak / 2**30:>8.2f}  {'yes' if p.fits else 'NO':<4}  {p.text_device:<4}  "
                   f"{'x2' if p.cfg_batch == 2 else '2x1':<3}  {p.decode_order:<6}  {p.vae_tile.count:>9}  "
                   f"{sum(p.streamed.values()) / 2**30 / max(len(p.streamed), 1):>17.2f}  "
                   f"{p.host_bytes / 2**30:>12.2f}")


def _check_image(spec: ModelSpec, image: bool) -> None:
    if image and spec.image is None:
        raise UsageError(f"--image: {spec.name} is a text-to-video model (no image encoder); drop --image")


@click.command("doctor")
@click.argument("package", required=False)
def doctor_cmd(package: str | None) -> None:
    """What this machine can run: GPU, driver, CUDA, TensorRT, onnxruntime, backends. With PACKAGE, a
    package that cannot be read (missing, malformed) is reported and the exit code is its error's (3)."""
    from vidrt.backends.doctor import diagnose

    report = diagnose(package)
    for line in report.lines():
        click.echo(line)
    if report.package_exit:
        raise SystemExit(report.package_exit)


__all__ = ["build_cmd", "plan_cmd", "doctor_cmd"]
