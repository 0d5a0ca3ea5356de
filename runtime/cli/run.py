"""`vidrt run`: options -> Request -> Pipeline.run -> streamed video file, with a progress bar."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import click
from vidrt.errors import OutputError, UsageError
from vidrt.package.recipes import LoraRef
from vidrt.request import Request

MAX_THREADS = 256  # ONNX Runtime makes one OS thread each: 100000 would exhaust the machine


def _read_prompt(prompt: str | None, prompt_file: str | None) -> str:
    if prompt is not None and prompt_file is not None:
        raise UsageError("give either --prompt or --prompt-file, not both")
    if prompt_file == "-":  # stdin, as UTF-8 whatever the locale says
        try:
            return sys.stdin.buffer.read().decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise UsageError(f"--prompt-file - (stdin) is not UTF-8 text (byte {exc.start}); send UTF-8") from None
    if prompt_file is not None:
        try:
            return Path(prompt_file).read_bytes().decode("utf-8-sig")  # a BOM is not part of the prompt
        except FileNotFoundError:
            raise UsageError(f"--prompt-file {prompt_file} does not exist") from None
        except UnicodeDecodeError as exc:
            raise UsageError(f"--prompt-file {prompt_file} is not UTF-8 text (byte {exc.start}); "
                             f"save it as UTF-8") from None
        except OSError as exc:
            raise UsageError(f"--prompt-file {prompt_file} cannot be read ({exc.strerror})") from None
    if prompt is None:
        raise UsageError('no prompt: pass --prompt "a red circle moving left" or --prompt-file FILE')
    return prompt


def lora_refs(both: tuple[str, ...], high: tuple[str, ...], low: tuple[str, ...]) -> tuple[LoraRef, ...]:
    """--lora / --lora-high-noise / --lora-low-noise FILE[:STRENGTH] -> LoraRef; missing files refused now."""
    from vidrt.lora import parse_lora_arg

    out = []
    for flag, values, expert in (("--lora", both, None), ("--lora-high-noise", high, "dit_high"),
                                 ("--lora-low-noise", low, "dit_low")):
        for value in values:
            path, strength = parse_lora_arg(value, flag)
            if Path(path).is_dir():
                raise UsageError(f"{flag} {path} is a folder; give the path of a .safetensors LoRA file in it")
            if not Path(path).is_file():
                raise UsageError(f"{flag} {path}: no such file; give the path of a .safetensors LoRA")
            out.append(LoraRef(path, strength, expert, label=f"{flag} {path}"))
    return tuple(out)


def check_stats_path(stats: Path, out_path: Path, overwrite: bool) -> None:
    """Refuse a --stats-json path before any work: a folder, the output itself, an existing file without
    --overwrite, a missing or unwritable folder (a read-only mount: tried by creating a file there)."""
    if stats.is_dir():
        raise UsageError(f"--stats-json {stats} is a folder; give a file path")
    if stats.absolute().resolve() == out_path.absolute().resolve():
        raise UsageError(f"--stats-json {stats} is the output video's path (-o); give the stats another name")
    if (stats.exists() or stats.is_symlink()) and not overwrite:
        raise OutputError(f"--stats-json {stats} exists; pass --overwrite to replace it or choose another path")
    folder = stats.absolute().parent
    if not folder.is_dir():
        raise OutputError(f"--stats-json {stats}: its folder does not exist; create it or choose another path")
    try:  # access() says nothing of a read-only mount for root; creating a file does
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{stats.name}.", suffix=".probe"):
            pass
    except OSError as exc:
        raise OutputError(f"cannot write --stats-json {stats} ({exc.strerror or exc}); "
                          f"choose a writable folder") from None


def parse_timesteps(value: str | None) -> tuple[float, ...] | None:
    """"1000,750,500,250" -> (1000.0, 750.0, 500.0, 250.0); range checks happen in resolve()."""
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value.split(","))
    except ValueError:
        raise UsageError(f"--timesteps {value!r} is not a comma-separated number list; write it like "
                         f"1000,750,500,250") from None


class _Progress:
    """One tqdm bar per stage (denoise steps, decoded frames) with ETA; silent with --quiet."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bar: Any = None
        self.stage = ""

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = tqdm(total=total, desc=stage, unit="step" if stage == "denoise" else "frame",
                            file=sys.stderr, leave=True, dynamic_ncols=True)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def run_command(**kw: Any) -> None:
    """`-o -`: the clip is made as an mp4 in a private temp folder (mp4 needs a seekable file) and copied
    to stdout when complete; the temp folder goes whatever happens. Everything else: `_run`."""
    if kw["output"] != "-":
        _run(**kw, label=kw["output"])
        return
    if sys.stdout.isatty():
        raise UsageError("-o - writes the video to stdout, which is a terminal here; redirect it "
                         "(vidrt run ... -o - > clip.mp4) or give a file name")
    stdout_dir = Path(tempfile.mkdtemp(prefix="vidrt-stdout-"))
    try:
        _run(**{**kw, "output": str(stdout_dir / "clip.mp4")}, label="stdout")
        with open(stdout_dir / "clip.mp4", "rb") as f:
            shutil.copyfileobj(f, sys.stdout.buffer)
        sys.stdout.buffer.flush()
    finally:
        shutil.rmtree(stdout_dir, ignore_errors=True)


def _run(*, label: str, prompt: str | None, prompt_file: str | None, model: str | None, negative_prompt: str | None,
                size: str | None, frames: int | None, steps: int | None, guidance: float | None,
                guidance_low_noise: float | None, shift: float | None, seed: int | None, scheduler: str | None,
                timesteps: str | None, recipe: str | None, backend: str, threads: int | None,
                lora: tuple[str, ...] = (), lora_high_noise: tuple[str, ...] = (),
                lora_low_noise: tuple[str, ...] = (),
                cache: str | None = None,
                vae_memory: str | None, fps: int | None, crf: int | None, output: str, overwrite: bool,
                stats_json: str | None, quiet: bool, device: int = 0, embedding_cache: str | None = None,
                image: str | None = None, last_image: str | None = None) -> None:
    from vidrt.backends import BACKENDS
    from vidrt.caching import check_cache
    from vidrt.cli.app import parse_size
    from vidrt.models import default_package
    from vidrt.package.manifest import load_manifest
    from vidrt.pipeline import Pipeline, decode_plan
    from vidrt.request import missing_recipe_lora, resolve
    from vidrt.text import check_prompt
    from vidrt.vae_decode import parse_bytes
    from vidrt.video import VideoWriter, check_crf, clean_stale_temps, clip_metadata, output_format

    # Every value is checked before any heavy work (hashing the package, loading engines).
    text = _read_prompt(prompt, prompt_file)
    check_prompt(text)
    wh = parse_size(size)
    vae_bytes = parse_bytes(vae_memory, "--vae-memory") if vae_memory not in (None, "auto") else None
    if threads is not None and not 1 <= threads <= MAX_THREADS:
        raise UsageError(f"--threads {threads} is out of range; use 1..{MAX_THREADS} (default: all cores)")
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if fps is not None and not 1 <= fps <= 240:
        raise UsageError(f"--fps {fps} is out of range; use 1..240")
    out_path = Path(output)  # drops a trailing '/': the format is read from `output` as typed
    fmt = output_format(output)  # refuses unknown suffixes before any work; "shots.v1/": a PNG folder
    check_crf(fmt, crf)  # per codec: H.264 1..51 (browser-playable), VP9 0..63
    if out_path.exists() and not overwrite:
        raise OutputError(f"{out_path} exists; pass --overwrite to replace it or choose another -o")
    if stats_json is not None:
        check_stats_path(Path(stats_json), out_path, overwrite)
    package = model if model is not None else default_package()
    if package is None:
        raise UsageError("no --model given and this build ships no default model; pass --model PACKAGE")
    request = Request(prompt=text, negative_prompt=negative_prompt, width=wh[0] if wh else None,
                      height=wh[1] if wh else None, num_frames=frames, steps=steps, guidance=guidance,
                      guidance_low_noise=guidance_low_noise, shift=shift, seed=seed, scheduler=scheduler,
                      timesteps=parse_timesteps(timesteps), recipe=recipe, image=image,
                      last_image=last_image, cache=cache).seeded()  # one seed for the run, metadata, --stats-json
    loras = lora_refs(lora, lora_high_noise, lora_low_noise)
    spec_only = load_manifest(package, verify=False)  # the model's limits; Pipeline.load checks the hashes
    # also reads and checks --image and derives the size from it; settings.loras: --lora's, the recipe's
    settings = resolve(request, spec_only.model, loras=loras)
    check_cache(spec_only, settings.cache)  # pieces and tables present, before any engine loads
    # a LoRA baked into the package (manifest baked_loras) fills the recipe's slot as a --lora does
    missing = missing_recipe_lora(settings.recipe, spec_only.model, settings.loras, baked=spec_only.baked_loras)
    if missing is not None:  # a distillation recipe without its LoRA makes noise: refused, not run
        raise UsageError(missing)
    if fmt.kind == "still" and settings.num_frames != 1:
        raise UsageError(f"-o {out_path.name}: a .png holds one frame and this clip has {settings.num_frames}; "
                         f"pass --frames 1, or a folder path ending in '/' for PNG frames")
    if image is not None and not quiet:
        how = "as given by --size" if wh else "the image's aspect in the model's area"
        click.echo(f"image {image} -> {settings.width}x{settings.height} ({how})", err=True)
    decode_plan(spec_only, settings, vae_bytes)  # a --vae-memory too small fails now, not after denoising
    clean_stale_temps(out_path.parent if str(out_path.parent) else Path("."))

    if not quiet and (seed is None or seed == -1):
        click.echo(f"seed {request.seed} (random; --seed {request.seed} makes this clip again)", err=True)
    warnings: list[str] = []

    def warn(msg: str) -> None:
        warnings.append(msg)
        click.echo(f"warning: {msg}", err=True)

    pipe = Pipeline.load(package, backend=backend, device=f"cuda:{device}", threads=threads, warn=warn,
                         embedding_cache=embedding_cache, loras=loras)
    settings = replace(settings, loras=pipe.applied_loras(settings.loras))  # each file once, none baked twice
    metadata = clip_metadata(settings, pipe.manifest.model.name)  # same metadata as batch and serve write
    progress = _Progress(quiet)
    fps_out = fps or pipe.manifest.model.sampling.fps
    try:
        with VideoWriter(output, fps=fps_out, crf=crf, metadata=metadata, overwrite=overwrite) as writer:
            result = pipe.run(request, on_frames=writer.write, progress=progress, vae_memory_bytes=vae_bytes,
                              keep_text_encoder=False)
    finally:
        progress.close()
    stats = result.stats
    if stats_json is not None:
        record = {"settings": asdict(settings), "output": label, "stats": stats.to_dict(),
                  "warnings": warnings}
        tmp = Path(stats_json + f".{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            os.replace(tmp, stats_json)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise OutputError(f"cannot write --stats-json {stats_json} ({exc.strerror})") from None
    if not quiet:
        click.echo(stats.table(), err=True)
        frames_word = "frame" if settings.num_frames == 1 else "frames"
        click.echo(f"wrote {label} ({settings.num_frames} {frames_word}, {settings.width}x{settings.height}, "
                   f"{fps_out} fps, seed {settings.seed})", err=True)
