"""`vidrt batch` and `vidrt serve`: many clips on a Ray cluster (docs/scale-out.md). Ray and
FastAPI come with `pip install 'vidrt[serve]'` and are imported only when these commands run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from vidrt.errors import UsageError, VidrtError

_common = [
    click.option("--model", "-m", "model", help="Model package folder, at the same path on every node "
                                                "(default: the bundled model)."),
    click.option("--ray", "address", help="Ray cluster address, e.g. auto or ray://head:10001 "
                                          "(default: start a private local Ray)."),
    click.option("--workers", type=int, help="Worker actors (default: one per GPU; without GPUs one per "
                                             "--threads CPUs)."),
    click.option("--threads", type=int, help="CPU threads per worker for ONNX Runtime (CPU mode: default 1)."),
    click.option("--backend", default="auto", show_default=True, help="auto, onnxruntime or tensorrt."),
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
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def batch_cmd(jobs_file: str, out_dir: str, model: str | None, address: str | None, workers: int | None,
              threads: int | None, backend: str, use_gpu: bool | None, quiet: bool) -> None:
    """Make every clip in a JSON-lines file; finished clips are skipped when run again.

    \b
    One job per line: {"prompt": "a red circle moving left", "size": "832x480", "frames": 81,
      "steps": 50, "seed": 1, "output": "circle-1"}  (fields: vidrt.service.jobs.JobRequest)
    """
    from vidrt.service.batch import run_batch

    summary = run_batch(jobs_file, out_dir, _package(model), address=address, workers=workers, threads=threads,
                        backend=backend, use_gpu=use_gpu, quiet=quiet,
                        echo=lambda s: click.echo(s, err=True))
    if summary["failed"]:
        raise VidrtError(f"{len(summary['failed'])} of {summary['clips']} clips failed (listed above); run the same "
                         f"command again to retry only those")


@click.command("serve")
@_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; other than loopback "
                                                                     "needs --token.")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--token", envvar="VIDRT_SERVE_TOKEN", help="Bearer token clients must send (or VIDRT_SERVE_TOKEN).")
@click.option("--out", "out_dir", default="vidrt-videos", show_default=True, help="Folder for finished clips.")
@click.option("--max-queue", type=int, default=1000, show_default=True, help="Queued jobs before 429.")
@click.option("--max-steps", type=int, default=100, show_default=True, help="Largest steps a request may ask.")
@click.option("--max-frames", type=int, help="Largest frame count (default: the model's default).")
@click.option("--max-size", help="Largest WIDTHxHEIGHT area (default: the model's largest size).")
def serve_cmd(model: str | None, address: str | None, workers: int | None, threads: int | None, backend: str,
              use_gpu: bool | None, host: str, port: int, token: str | None, out_dir: str, max_queue: int,
              max_steps: int, max_frames: int | None, max_size: str | None) -> None:
    """Serve the asynchronous job API: POST /v1/videos, GET /v1/videos/{id}[/content], DELETE.

    Loopback only unless --token is given; the schema is at /openapi.json, docs at /docs.
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
    ray = require_ray("serve")
    try:
        from vidrt.service import server
    except ImportError as exc:
        raise UsageError(f"vidrt serve needs FastAPI ({exc.name} is missing): pip install 'vidrt[serve]'") from None
    server.check_bind(host, token)  # before anything starts
    if address in (None, "auto", "local"):  # the HTTP proxy will run on this machine
        _check_port_free(host, port)
    config = server.ServeConfig(package=_package(model), out_dir=str(Path(out_dir).resolve()), workers=workers,
                                threads=threads, backend=backend, use_gpu=use_gpu, token=token, max_queue=max_queue,
                                max_steps=max_steps, max_frames=max_frames,
                                max_pixels=wh[0] * wh[1] if wh else None)
    started = connect_ray(address, "serve")
    try:
        click.echo("starting workers (each loads the model once)...", err=True)
        url = server.start_server(config, host=host, port=port)
        click.echo(f"serving on {url}  (POST {url}/v1/videos; schema {url}/openapi.json); Ctrl-C stops", err=True)
        server.wait_forever()
    finally:
        try:
            server.stop_server()
        finally:
            if started:
                ray.shutdown()
