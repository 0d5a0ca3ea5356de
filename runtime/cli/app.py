"""`vidrt` command line. Every failure is one line on stderr and an exit code per class
(2 usage, 3 model/package, 4 runtime/device, 5 output, 130 SIGINT, 143 SIGTERM); --debug shows tracebacks."""

from __future__ import annotations

import signal
import sys
import traceback
from pathlib import Path
from typing import Any

import click
from vidrt.errors import DeviceError, Spelling, UsageError, VidrtError, spelled_as

EXIT_SIGINT, EXIT_SIGTERM = 130, 143
# The library names its arguments by their Python keywords (vidrt.errors.arg); under `vidrt` they are
# these flags (a keyword not listed is --kebab-case: overwrite -> --overwrite, vae_memory -> --vae-memory).
CLI_FLAGS = Spelling({"num_frames": "--frames", "width": "--size", "height": "--size", "scheduler": "--sampler",
                      "text_device": "--text-encoder", "prompts": "--prompt", "seeds": "--seed"})
EXIT_INTERNAL = 1  # an unexpected exception: a vidrt bug (the user-error classes are 2..5)


class Terminated(BaseException):
    """Raised from the SIGTERM handler so `finally` blocks (temp-file cleanup) run, like Ctrl-C."""


_signal_received: int | None = None  # set by the handlers below, read by main()


def _on_sigterm(signum: int, frame: Any) -> None:
    global _signal_received
    _signal_received = signum
    raise Terminated()


def _on_sigint(signum: int, frame: Any) -> None:
    # Python's own handler, plus a record: a KeyboardInterrupt raised while a C extension module is
    # initialising (numpy, onnxruntime, av) reaches us as "ImportError: initialization failed", and
    # that is still the user's Ctrl-C, not a vidrt bug.
    global _signal_received
    _signal_received = signum
    raise KeyboardInterrupt()


def raise_if_signalled() -> None:
    """Re-raise a Ctrl-C / SIGTERM whose exception Python swallowed. An exception raised inside an at-fork
    callback (logging's _releaseLock while Ray starts its processes) or a finalizer is printed and ignored
    (sys.unraisablehook), so a long-running command (vidrt serve) would carry on after the user's Ctrl-C:
    it calls this at its checkpoints (before serving, when the first worker is ready)."""
    if _signal_received == signal.SIGINT:
        raise KeyboardInterrupt()
    if _signal_received is not None:
        raise Terminated()


def _unraisable(args: Any) -> None:
    """sys.unraisablehook: our own KeyboardInterrupt / Terminated swallowed where Python cannot raise (see
    raise_if_signalled) is already recorded in _signal_received: no traceback for it; anything else as usual."""
    if args.exc_type is not None and issubclass(args.exc_type, (KeyboardInterrupt, Terminated)) \
            and _signal_received is not None:
        return
    sys.__unraisablehook__(args)


# The CPU build of torch, as the Makefile installs it (its TORCH / TORCH_INDEX): plain `pip install torch`
# on Linux resolves the multi-GB CUDA build and its nvidia-* wheels.
CPU_TORCH = "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"


def export_extras_missing(what: str, exc: ImportError) -> UsageError:
    """The one-line refusal of a command that needs vidrt[export] (torch, diffusers, onnx...) when one is
    missing: "export needs the export extras (torch is missing): ...", naming the commands that install
    them; without torch the CPU build first (CPU_TORCH), since vidrt[export] alone would pull CUDA's."""
    import importlib.util

    missing = exc.name or "a module"
    fix = "pip install 'vidrt[export]'"
    if importlib.util.find_spec("torch") is None:
        fix = f"install the CPU build of torch first, then the extras: {CPU_TORCH} && {fix}"
    return UsageError(f"{what} the export extras ({missing} is missing): {fix}")


def parse_size(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    parts = value.lower().replace("*", "x").split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise UsageError(f"--size {value!r} is not WIDTHxHEIGHT; write it like 832x480")
    return int(parts[0]), int(parts[1])


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, invoke_without_command=True)
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.version_option(package_name="vidrt")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Wan2.1 / Wan2.2 video generation through compiled engines."""
    ctx.obj = {"debug": debug}
    ctx.with_resource(spelled_as(CLI_FLAGS))  # messages of this command name flags; undone when it ends
    if ctx.invoked_subcommand is None:  # bare `vidrt`: the help, as `vidrt --help` prints it
        click.echo(ctx.get_help())


def _default_model() -> str | None:
    from vidrt.models import default_package

    path = default_package()
    return str(path) if path is not None else None


@cli.command()
@click.option("--prompt", "-p", help="What the clip shows.")
@click.option("--prompt-file", type=click.Path(dir_okay=False, allow_dash=True),
              help="Read the prompt from a UTF-8 text file (- = stdin).")
@click.option("--model", "-m", "model", help="Model package folder (default: the bundled tiny model).")
@click.option("--negative-prompt", help="What to steer away from (default: the model's).")
@click.option("--size", help="WIDTHxHEIGHT in pixels (default: the model's first size; with --image, the image's "
              "aspect in that area).")
@click.option("--image", help="Image-to-video: the first frame (PNG, JPEG, WebP...).")
@click.option("--last-image", help="First-and-last-frame models (Wan2.1 FLF2V): the last frame.")
@click.option("--frames", type=int, help="Video frames, 4k+1 (default: the model's).")
@click.option("--steps", type=int, help="Denoising steps.")
@click.option("--guidance", type=float,
              help="Classifier-free guidance scale (two-expert models: both experts, unless --guidance-low-noise).")
@click.option("--guidance-low-noise", type=float,
              help="Two-expert models (Wan2.2 A14B): the low-noise expert's guidance scale (default: the model's).")
@click.option("--shift", type=float, help="Flow-matching sigma shift.")
@click.option("--seed", type=int, help="Noise seed; -1 or none = a random one (printed, and kept in the file).")
@click.option("--scheduler", "--sampler", "scheduler",
              help="unipc (default), dpm++, or euler (flow-matching Euler, the distilled recipes' sampler).")
@click.option("--timesteps", help="Euler: the unshifted timestep list, e.g. 1000,750,500,250 (one per step).")
@click.option("--recipe", help="A named recipe, e.g. lightx2v-4step or the bundled model's fast (`vidrt info` "
                               "lists them); other flags override its fields.")
@click.option("--lora", "lora", multiple=True, metavar="FILE[:STRENGTH]",
              help="A LoRA (.safetensors, any Wan key format) merged at load time; repeatable.")
@click.option("--lora-high-noise", multiple=True, metavar="FILE[:STRENGTH]",
              help="Two-expert models (A14B): a LoRA for the high-noise expert only; repeatable.")
@click.option("--lora-low-noise", multiple=True, metavar="FILE[:STRENGTH]",
              help="Two-expert models (A14B): a LoRA for the low-noise expert only; repeatable.")
@click.option("--cache", help="Step caching METHOD[:THRESHOLD]: teacache, magcache, easycache or fbcache "
                              "(skips the DiT block stack on steps where it barely changes).")
@click.option("--backend", default="auto", show_default=True,
              help="auto, onnxruntime (CPU), onnxruntime-cuda (ONNX Runtime's CUDA provider) or tensorrt.")
@click.option("--threads", type=int, help="CPU threads for ONNX Runtime (default: all cores).")
@click.option("--device", type=click.IntRange(0), default=0, show_default=True,
              help="GPU to run on (tensorrt, onnxruntime-cuda); `vidrt doctor` lists them.")
@click.option("--embedding-cache", type=click.Path(file_okay=False),
              help="Folder for prompt embeddings: a repeated prompt skips the text encoder.")
@click.option("--vae-memory", help="Memory budget for one VAE tile, e.g. 2GB (default: automatic).")
@click.option("--fps", type=int, help="Frames per second of the file (default: the model's).")
@click.option("--crf", type=int,
              help="Quality, lower is better: H.264 (.mp4/.mov/.mkv) 1..51, default 18; VP9 (.webm) 0..63, default 31.")
@click.option("-o", "--output", default="clip.mp4", show_default=True,
              help="Output .mp4, .webm, .mkv, .mov, .gif, .png (one frame), a folder for PNG frames, "
                   "or - for an mp4 on stdout.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@click.option("--stats-json", type=click.Path(dir_okay=False), help="Write per-stage timings as JSON here.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or table.")
def run(**kw: Any) -> None:
    """Generate a clip from a prompt (and a start image on image-to-video models)."""
    from vidrt.cli.run import run_command

    run_command(**kw)


@cli.command()
@click.argument("package", required=False)
def info(package: str | None) -> None:
    """Describe a model package: variant, sizes, defaults, components, words it knows."""
    from vidrt.package.manifest import load_manifest

    package = package or _default_model()
    if package is None:
        raise UsageError("no package given and no bundled model found; pass a package folder")
    m = load_manifest(package, verify=False)
    spec, d = m.model, m.model.sampling
    click.echo(f"{spec.name}: {spec.description}")
    click.echo(f"  package      {Path(package).resolve()}")
    click.echo(f"  DiT          dim {spec.dit.dim}, {spec.dit.num_layers} layers, {spec.dit.num_heads} heads, "
               f"experts {', '.join(spec.experts)}")
    click.echo(f"  VAE          {spec.vae.kind}, z {spec.vae.z_dim}, stride {'x'.join(map(str, spec.vae.stride))}")
    click.echo(f"  sizes        {', '.join(f'{w}x{h}' for w, h in d.sizes)} (multiples of {spec.spatial_multiple})")
    guidance = (f"{d.guidance_high_noise} high-noise / {d.guidance_low_noise} low-noise, boundary {d.boundary}"
                if d.boundary is not None else f"{d.guidance_low_noise}")
    click.echo(f"  defaults     {d.frames} frames at {d.fps} fps, {d.steps} steps ({d.scheduler}), shift {d.shift}, "
               f"guidance {guidance}")
    from vidrt.backends.ort import cpu_features

    here = cpu_features()
    for name, comp in m.components.items():
        mb = comp.artifact.size_bytes + (comp.artifact.data_size_bytes or 0)
        forms = "".join(f"; {feature} form {art.size_bytes / 1e6:.1f} MB (ONNX Runtime CPU"
                        f"{', this CPU' if feature in here else ''})" for feature, art in comp.cpu_artifacts.items())
        click.echo(f"  {name:<17}{comp.precision}, opset {comp.opset}, {mb / 1e6:.1f} MB{forms}")
    for baked in m.baked_loras:  # `vidrt export --lora`: in the DiT weights already, never merged again
        expert = f" ({baked.expert} only)" if baked.expert else ""
        click.echo(f"  baked LoRA   {baked.file} x{baked.strength:g}{expert}, sha256 {baked.sha256[:12]}")
    click.echo(f"  negative     {d.negative_prompt or '(none)'}")
    if m.vocabulary:
        click.echo(f"  knows        {' '.join(m.vocabulary)}")
    from vidrt.package.recipes import all_recipes, describe

    click.echo("  recipes      (--recipe NAME; flags override its fields)")
    for recipe in all_recipes(spec.recipes).values():
        click.echo(f"    {describe(recipe)}")


@cli.command("export")
@click.option("--model", "model_dir", required=True, help="Checkpoint folder (diffusers or official Wan layout).")
@click.option("--variant", help="Model variant, when it cannot be told from the files.")
@click.option("--out", help="Package folder (default: engines/<variant>).")
@click.option("--opset", type=click.Choice(["18", "23"]), default="18", show_default=True,
              help="18 for ONNX Runtime, 23 for TensorRT (fused Attention / RMSNormalization).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16", "fp8"]), default="fp32", show_default=True,
              help="fp8: the DiT as FP8 Q/DQ (ModelOpt), calibrated on this package's own denoising steps.")
@click.option("--fp8-scope", type=click.Choice(["ffn", "linear"]), default="ffn", show_default=True,
              help="fp8: quantise the feed-forward matrices only, or every block matrix.")
@click.option("--calibration-prompts", type=click.Path(dir_okay=False, exists=True),
              help="fp8: a text file, one calibration prompt per line (default: four built-in prompts).")
@click.option("--lora", "lora", multiple=True, metavar="FILE[:STRENGTH]",
              help="Bake a LoRA into the DiT weights (repeatable); `vidrt run --lora` applies one without this.")
@click.option("--lora-high-noise", multiple=True, metavar="FILE[:STRENGTH]", help="A14B: bake into the high-noise DiT.")
@click.option("--lora-low-noise", multiple=True, metavar="FILE[:STRENGTH]", help="A14B: bake into the low-noise DiT.")
def export_cmd(model_dir: str, variant: str | None, out: str | None, opset: str, precision: str, fp8_scope: str,
               calibration_prompts: str | None, lora: tuple[str, ...], lora_high_noise: tuple[str, ...],
               lora_low_noise: tuple[str, ...]) -> None:
    """Export a Wan checkpoint to a model package (ONNX + tokenizer + manifest). Needs vidrt[export]."""
    try:
        from vidrt.export.package import export_main
    except ImportError as exc:
        raise export_extras_missing("export needs", exc) from None
    prompts = None
    if calibration_prompts:
        from pathlib import Path

        prompts = tuple(p.strip() for p in Path(calibration_prompts).read_text("utf-8").splitlines() if p.strip())
        if not prompts:
            raise UsageError(f"--calibration-prompts {calibration_prompts}: the file has no prompt")
    from vidrt.cli.run import lora_refs

    export_main(model=model_dir, variant=variant, out=out, opset=int(opset), precision=precision,
                fp8_scope=fp8_scope, calibration_prompts=prompts,
                loras=lora_refs(lora, lora_high_noise, lora_low_noise))


from vidrt.cli.cache import cache_group  # noqa: E402  (step caching: runtime/cli/cache.py)
from vidrt.cli.trt import build_cmd, doctor_cmd, plan_cmd  # noqa: E402  (TensorRT commands: runtime/cli/trt.py)

cli.add_command(cache_group)
cli.add_command(build_cmd)
cli.add_command(plan_cmd)
cli.add_command(doctor_cmd)

from vidrt.cli.fleet import batch_cmd, serve_cmd  # noqa: E402  (Ray scale-out: runtime/cli/fleet.py)

cli.add_command(batch_cmd)
cli.add_command(serve_cmd)


@click.command("bench", context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                          "help_option_names": []})
@click.pass_context
def bench_cmd(ctx: click.Context) -> None:
    """Benchmark suite vs diffusers (source checkout only; options: vidrt bench --help)."""
    root = str(Path(__file__).resolve().parent.parent)  # editable install: the repo root holds benchmarks/
    for folder in (root, str(Path.cwd())):
        if (Path(folder) / "benchmarks" / "run.py").is_file() and folder not in sys.path:
            sys.path.insert(0, folder)
    try:
        from benchmarks.run import main as bench_main
    except ImportError as exc:
        raise UsageError(f"vidrt bench runs from a source checkout with the dev extras ({exc}); "
                         f"cd to the repository and run `make bench`") from None
    code = bench_main(list(ctx.args))
    if code:
        sys.exit(code)


cli.add_command(bench_cmd)

def _exit_interrupted() -> None:
    interrupted = _signal_received == signal.SIGINT
    click.echo("interrupted" if interrupted else "terminated", err=True)
    sys.exit(EXIT_SIGINT if interrupted else EXIT_SIGTERM)


def main(argv: list[str] | None = None) -> None:
    global _signal_received
    _signal_received = None
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, _on_sigint)
    sys.unraisablehook = _unraisable
    try:
        cli.main(args=argv, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        sys.exit(EXIT_SIGINT)
    except click.ClickException as exc:  # bad option syntax
        click.echo(f"error: {' '.join(exc.format_message().split())} (see `vidrt --help`)", err=True)
        sys.exit(UsageError.exit_code)
    except VidrtError as exc:
        if _signal_received is not None:  # e.g. a session load that a Ctrl-C cut short, re-raised as ours
            _exit_interrupted()
        if debug:
            traceback.print_exc()
        click.echo(f"error: {' '.join(str(exc).split())}", err=True)  # one line, whatever the message holds
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(EXIT_SIGINT)
    except Terminated:
        click.echo("terminated", err=True)
        sys.exit(EXIT_SIGTERM)
    except MemoryError:
        if debug:
            traceback.print_exc()
        click.echo("error: out of memory; lower --size, --frames or --vae-memory", err=True)
        sys.exit(DeviceError.exit_code)
    except Exception as exc:  # a bug, not a user error: still one line unless --debug
        if _signal_received is not None:  # the signal surfaced as another exception (see _on_sigint)
            _exit_interrupted()
        if debug:
            traceback.print_exc()
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        click.echo(f"internal error: {reason}; rerun with --debug and report it", err=True)
        sys.exit(EXIT_INTERNAL)


if __name__ == "__main__":
    main()
