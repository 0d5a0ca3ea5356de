"""`vidrt batch` and `vidrt serve`: many clips on a Ray cluster (docs/scale-out.md). Ray and
FastAPI come with `pip install 'vidrt[serve]'` and are imported only when these commands run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from vidrt.errors import DeviceError, UsageError

_common = [
    click.option("--model", "-m", "model", help="Model package folder, at the same path on every node "
                                                "(default: the bundled model)."),
    click.option("--ray", "address", help="Ray cluster address, e.g. auto or ray://head:10001 "
                                          "(default: start a private local Ray)."),
    click.option("--workers", type=int, help="Worker actors (default: one per GPU; without GPUs one per "
                                             "--threads CPUs)."),
    click.option("--threads", type=int, help="CPU threads per worker for ONNX Runtime (CPU mode: default 1)."),
    click.option("--backend", default="auto", show_default=True,
                 help="auto, onnxruntime, onnxruntime-cuda or tensorrt."),
    click.option("--gpu/--cpu", "use_gpu", default=None, help="Schedule workers on GPUs or CPU slots "
                                                              "(default: GPUs when the cluster has any)."),
]


def _options(fn: Any) -> Any:
    for option in reversed(_common):
        fn = option(fn)
    return fn


def _package(model: str | None) -> str:
    from vidrt.models import default_package

    package = model if model is not None else default_package()
    if package is None:
        raise UsageError("no --model given and this build ships no default model; pass --model PACKAGE")
    path = Path(package).expanduser().resolve()  # workers run elsewhere: hand them an absolute path
    if path.is_file():
        raise UsageError(f"--model {package} is a file, not a model package folder; pass the folder that holds "
                         f"manifest.json")
    if not (path / "manifest.json").is_file():
        raise UsageError(f"--model {package} is not a model package (no manifest.json); export one with "
                         f"`vidrt export`")
    return str(path)


def _check_port_free(host: str, port: int) -> None:
    """A local Serve proxy that cannot bind would retry forever: say so before starting Ray."""
    import os
    import socket

    try:
        with socket.create_server((host, port)):
            pass
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise UsageError(f"cannot listen on {host}:{port} ({reason}); pick another --port or stop what "
                         f"uses it") from None


@click.command("batch")
@click.argument("jobs_file", metavar="JOBS.jsonl")
@click.option("--out", "out_dir", required=True, help="Folder for the clips (<name>.mp4 + <name>.json each).")
@_options
@click.option("--overwrite", is_flag=True, help="Replace files in --out that vidrt batch did not make (its own "
                                                "clips of an older request are always made again).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def batch_cmd(jobs_file: str, out_dir: str, model: str | None, address: str | None, workers: int | None,
              threads: int | None, backend: str, use_gpu: bool | None, overwrite: bool, quiet: bool) -> None:
    """Make every clip in a JSON-lines file; finished clips are skipped when run again.

    \b
    One job per line: {"prompt": "a red circle moving left", "size": "832x480", "frames": 81,
      "steps": 50, "seed": 1, "output": "circle-1"}  (fields: vidrt.service.jobs.JobRequest)
    """
    from vidrt.cli.app import raise_if_signalled
    from vidrt.service.batch import run_batch

    summary = run_batch(jobs_file, out_dir, _package(model), address=address, workers=workers, threads=threads,
                        backend=backend, use_gpu=use_gpu, quiet=quiet, overwrite=overwrite,
                        echo=lambda s: click.echo(s, err=True),
                        checkpoint=raise_if_signalled)  # a Ctrl-C swallowed while Ray started stops the batch
    if summary["failed"]:
        # exit 4 (runtime, errors.md): the lines were checked before any work, so what is left failed while
        # running; a transient failure (a worker that died twice) goes away when run again, others need a fix
        raise DeviceError(f"{len(summary['failed'])} of {summary['clips']} clips failed (listed above); fix what "
                          f"they name and run the same command again: finished clips are skipped")


def parse_duration(text: str | None, flag: str) -> float | None:
    """'90s', '30m', '12h', '7d' -> seconds; None or 'forever' -> None."""
    import re

    if text is None or text.strip().lower() == "forever":
        return None
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([smhd])\s*", text.lower())
    if m is None or float(m[1]) <= 0:
        raise UsageError(f"{flag} {text!r} is not a duration; write it like 7d, 12h, 30m, 90s or forever")
    return float(m[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m[2]]


def parse_bytes(text: str, flag: str) -> int:
    """'512KB', '4MB', '1GB', '1048576' -> bytes (KB = 1024 bytes here, as in most upload limits)."""
    import re

    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(|b|k|kb|kib|m|mb|mib|g|gb|gib)\s*", text.lower())
    if m is None or float(m[1]) <= 0:
        raise UsageError(f"{flag} {text!r} is not a size; write it like 512KB, 4MB or 1GB")
    return int(float(m[1]) * 1024 ** {"": 0, "b": 0, "k": 1, "m": 2, "g": 3}[m[2][:1]])


def read_token(token: str | None, token_file: str | None) -> str | None:
    if token_file is None:
        return token
    if token is not None:
        raise UsageError("give --token or --token-file, not both")
    try:
        text = Path(token_file).expanduser().read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--token-file {token_file} cannot be read ({getattr(exc, 'strerror', None) or exc})") \
            from None
    if not text or len(text.split()) != 1:
        raise UsageError(f"--token-file {token_file} must hold one token on one line")
    return text


@click.command("serve")
@_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; other than loopback "
                                                                     "needs a token of 16+ characters.")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--token-file", type=click.Path(dir_okay=False), help="File holding the bearer token clients must "
                                                                    "send (kept out of `ps`).")
@click.option("--token", envvar="VIDRT_SERVE_TOKEN", help="The bearer token itself (or VIDRT_SERVE_TOKEN); "
                                                          "visible to other users in `ps`: prefer --token-file.")
@click.option("--out", "out_dir", default="vidrt-videos", show_default=True,
              help="Folder for finished clips and the job table (vidrt-jobs.sqlite).")
@click.option("--keep", default="forever", show_default=True, help="Remove finished clips this long after they "
                                                                   "finish: 7d, 12h, 30m, or forever.")
@click.option("--max-queue", type=int, default=1000, show_default=True, help="Queued jobs before 429.")
@click.option("--max-steps", type=int, default=100, show_default=True, help="Largest steps a request may ask.")
@click.option("--max-frames", type=int, help="Largest frame count (default: the model's default); requests "
                                             "without a length get the longest 4k+1 up to it.")
@click.option("--max-size", help="Largest WIDTHxHEIGHT area, on the model's size grid (default: the model's "
                                 "largest size); requests without a size get the largest listed size within it.")
@click.option("--max-body", help="Largest request body; larger ones get 413 unread (default 1MB, 16MB when the "
                                 "model takes an input_reference image).")
@click.option("--allow-host", multiple=True, help="Also answer requests whose Host header is this name "
                                                  "(repeatable; '*' turns the check off). Default: loopback names "
                                                  "and the bound address.")
@click.option("--cors-origin", multiple=True, help="Let web pages from this origin call the API "
                                                   "(repeatable; default: none).")
@click.option("--lora-dir", type=click.Path(file_okay=False), help="Folder of LoRA files requests may name in "
                                                                   "\"loras\" (by file name; default: no LoRAs).")
def serve_cmd(model: str | None, address: str | None, workers: int | None, threads: int | None, backend: str,
              use_gpu: bool | None, host: str, port: int, token_file: str | None, token: str | None, out_dir: str,
              keep: str, max_queue: int, max_steps: int, max_frames: int | None, max_size: str | None,
              max_body: str | None, allow_host: tuple[str, ...], cors_origin: tuple[str, ...],
              lora_dir: str | None) -> None:
    """Serve the job API (OpenAI /v1/videos shape) and a web page at /.

    Loopback only unless a token is given; jobs survive restarts (the job table is in --out);
    the schema is at /openapi.json, docs at /docs.
    """
    from vidrt.cli.app import parse_size
    from vidrt.service.scaleout import connect_ray, require_ray

    if not 1 <= port <= 65535:
        raise UsageError(f"--port {port} is out of range; use 1..65535")
    for name, value in (("--workers", workers), ("--threads", threads), ("--max-queue", max_queue),
                        ("--max-steps", max_steps), ("--max-frames", max_frames)):
        if value is not None and value < 1:
            raise UsageError(f"{name} {value} must be at least 1")
    wh = parse_size(max_size)
    keep_seconds = parse_duration(keep, "--keep")
    body_cap = parse_bytes(max_body, "--max-body") if max_body is not None else None
    token = read_token(token, token_file)
    if lora_dir is not None and not Path(lora_dir).is_dir():
        raise UsageError(f"--lora-dir {lora_dir} is not a folder; create it and put the LoRA files there")
    ray = require_ray("serve", local=address is None)
    try:
        from vidrt.service import server
    except ImportError as exc:
        raise UsageError(f"vidrt serve needs FastAPI ({exc.name} is missing): pip install 'vidrt[serve]'") from None
    server.check_bind(host, token)  # before anything starts
    _check_port_free(host, port)
    config = server.ServeConfig(package=_package(model), out_dir=str(Path(out_dir).resolve()), workers=workers,
                                threads=threads, backend=backend, use_gpu=use_gpu, token=token, max_queue=max_queue,
                                max_steps=max_steps, max_frames=max_frames,
                                max_size=wh, max_body=body_cap,
                                allowed_hosts=allow_host, cors_origins=cors_origins_checked(cors_origin),
                                keep_seconds=keep_seconds,
                                lora_dir=str(Path(lora_dir).resolve()) if lora_dir is not None else None)
    server.check_config(config)  # --max-size, --out: before Ray starts (~20 s)
    started = connect_ray(address, "serve")
    try:
        service = server.Service(config, host=host, port=port)
        warning = service.warning()
        if warning:
            click.echo(f"warning: {warning}", err=True)
        r = service.restored
        if any(r.values()):
            click.echo(f"job table: {r['completed']} finished clips, {r['queued']} queued, {r['requeued']} queued "
                       f"again (they were running), {r['failed']} failed on restart", err=True)
        from vidrt.cli.app import raise_if_signalled

        click.echo("starting workers (each loads the model once)...", err=True)
        url = service.url

        def ready() -> None:
            raise_if_signalled()  # a Ctrl-C swallowed while the workers started: stop, do not serve
            click.echo(f"serving on {url}  (web page {url}/ ; POST {url}/v1/videos; schema {url}/openapi.json); "
                       f"Ctrl-C stops", err=True)

        service.state.on_ready = ready
        raise_if_signalled()  # one swallowed while Ray started (Python ignores it in at-fork callbacks)
        service.run()
    finally:
        if started:
            ray.shutdown()


def cors_origins_checked(origins: tuple[str, ...]) -> tuple[str, ...]:
    for origin in origins:
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise UsageError(f"--cors-origin {origin!r} is not an origin; write it like https://app.example.com")
    return origins
