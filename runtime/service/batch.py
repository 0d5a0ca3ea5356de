"""`vidrt batch jobs.jsonl --out DIR`: every line a job (vidrt.service.jobs.JobRequest fields, plus an
optional "output" name), run across Ray worker actors that keep the model resident.

Resumable by request: a clip is published atomically (temp + rename) and its stats JSON (with the
request's hash, `request_key`: the request, the model package's identity, the contents of its LoRA
files and start image) before it, so a clip that exists is finished. An unnamed job's file is named
after that hash, so reordering or adding lines keeps the old names; a named one is skipped only when
its stats JSON says it was made from the same request (change a named line's prompt and it is made
again). A file at a line's output (or its stats path) that vidrt batch did not make (no stats JSON
with a request_key) is never replaced without overwrite=True (`--overwrite`). The whole file is
checked against the model before Ray starts: every bad line is named in one line.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vidrt.errors import OutputError, UsageError, spelled_as
from vidrt.package.registry import ModelSpec
from vidrt.request import Settings
from vidrt.service.jobs import JOB_FIELDS, JobRequest, package_identity

if TYPE_CHECKING:
    from vidrt.package.manifest import BakedLora

SUMMARY = "batch-summary.json"


MAX_LISTED = 20  # bad lines named in the one-line error


@dataclass(frozen=True)
class BatchLine:
    line: int
    job: JobRequest
    settings: Settings
    output: Path
    named: bool = False  # an "output" name was given (else the name is the request's hash)
    key: str = ""  # the request's key with the package's identity (JobRequest.key): what its stats record

    @property
    def stats_path(self) -> Path:
        return self.output.with_name(self.output.stem + ".json") if self.output.suffix else \
            self.output.with_name(self.output.name + ".json")


def read_jobs(path: str | os.PathLike[str], spec: ModelSpec, package: str | os.PathLike[str],
              out_dir: Path, warn: Callable[[str], None] = lambda s: None) -> list[BatchLine]:
    """Every line read and checked against the model (settings, LoRA files against the DiT's keys and
    shapes), before any work; UsageError naming every bad line. warn: LoRA keys that match nothing."""
    from vidrt.lora import LoraMerger
    from vidrt.package.manifest import load_manifest

    merger = LoraMerger(Path(package), load_manifest(package, verify=False), warn)
    identity = package_identity(package)
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8-sig")  # a BOM (Windows editors write one) is not part of line 1
    except FileNotFoundError:
        raise UsageError(f"{p} does not exist") from None
    except IsADirectoryError:
        raise UsageError(f"{p} is a folder; give a .jsonl file with one job per line") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"{p} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise UsageError(f"{p} cannot be read ({exc.strerror})") from None
    lines: list[BatchLine] = []
    # every path a line writes (its clip and its stats JSON) -> who writes it; the run summary is the batch's
    claimed: dict[Path, str] = {out_dir / SUMMARY: "the batch's summary"}  # (a line's clip cannot be named so)
    errors: list[str] = []
    checked: dict[tuple[str, str | None], str | None] = {}  # (LoRA path, expert) -> its refusal (read once)
    for number, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        where = f"{p.name} line {number}"
        try:
            line = _read_line(raw, number, where, spec, package, out_dir, identity, merger.manifest.baked_loras)
            _check_loras(line, where, checked, merger)
        except UsageError as exc:  # every message names its line, whatever check raised it
            errors.append(str(exc) if str(exc).startswith(f"{where}:") else f"{where}: {exc}")
            continue
        clash = next(((q, claimed[q]) for q in (line.output, line.stats_path) if q in claimed), None)
        if clash is not None and not clash[1].startswith("line"):
            errors.append(f"{p.name} line {number}: writes {clash[0].name}, which is {clash[1]} file; give the line "
                          f"another \"output\" name")
            continue
        if clash is not None:  # one file written twice: each run would remake one of them, for ever
            errors.append(f"{p.name} line {number}: writes {clash[0].name}, like {clash[1]}; give each line its "
                          f"own \"output\" name (the clip's name without its suffix is its stats file's: "
                          f"NAME.json) or drop the duplicate")
            continue
        claimed.update({line.output: f"line {number}", line.stats_path: f"line {number}"})
        lines.append(line)
    if len(errors) == 1:
        raise UsageError(errors[0])
    if errors:  # every bad line at once, so one edit fixes the file
        shown = "; ".join(errors[:MAX_LISTED]) + (f"; and {len(errors) - MAX_LISTED} more" if len(errors) > MAX_LISTED
                                                   else "")
        raise UsageError(f"{len(errors)} bad lines: {shown}")
    if not lines:
        raise UsageError(f"{p} has no jobs; write one JSON object per line, e.g. {{\"prompt\": \"a cat\"}}")
    return lines


def _read_line(raw: str, number: int, where: str, spec: ModelSpec, package: str | os.PathLike[str],
               out_dir: Path, identity: str, baked: Sequence[BakedLora] = ()) -> BatchLine:
    """One line as a job; identity: the package's (package_identity); baked: the package's manifest
    `baked_loras` (they fill a recipe's LoRA slot)."""
    if raw.startswith("\ufeff"):  # the file's own BOM was dropped: this one came with a file pasted onto it
        raise UsageError(f"{where}: starts with a byte order mark (an invisible character editors put at the "
                         f"start of a file, not JSON); delete it (files joined together carry one per file)")
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{where}: not JSON ({exc.msg} at column {exc.colno})") from None
    name = data.pop("output", None) if isinstance(data, dict) else None
    job = JobRequest.from_dict(data, where, extra_fields=("output",))
    if job.model is not None and job.model != spec.name and \
            Path(job.model).expanduser().resolve() != Path(package).resolve():
        raise UsageError(f"{where}: model {job.model!r} is not this batch's model ({spec.name}, {package}); "
                         f"one batch runs one model: leave \"model\" out of the line to use this one, or run the "
                         f"line in a batch of its own with --model {job.model}")
    try:
        with spelled_as(JOB_FIELDS):  # a line's fields by their JSON names, not `vidrt run`'s flags
            settings = job.settings(spec, baked=baked)
    except UsageError as exc:
        raise UsageError(f"{where}: {exc}") from None
    key = job.key(identity)
    return BatchLine(number, job, settings, out_dir / (_output_name(name, key, job.suffix, where) + job.suffix),
                     name is not None, key)


def _check_loras(line: BatchLine, where: str, checked: dict[tuple[str, str | None], str | None],
                 merger: Any) -> None:
    """Every LoRA file of a line read as `vidrt run --lora` reads it (missing, not safetensors, truncated,
    NaN/Inf values) and its keys and shapes checked against the DiT of every expert it applies to
    (LoraMerger.check: another architecture, another model size), before any work: a bad file would
    fail its clips on the workers, every run."""
    from vidrt.lora import read_lora
    from vidrt.service.jobs import lora_ref

    for ref in (lora_ref(x, lambda p: f"loras {p}") for x in line.job.loras or ()):  # the request's own
        key = (ref.path, ref.expert)
        if key not in checked:
            try:
                with spelled_as(JOB_FIELDS):  # its refusals name the line's fields (loras), not `vidrt run`'s flags
                    read_lora(ref.path, ref.label)  # the values (NaN/Inf); not kept: a batch may name many files
                    for expert in merger.manifest.model.experts:
                        merger.check_header(expert, replace(ref, strength=1.0))  # a 0-strength one is checked too
                checked[key] = None
            except UsageError as exc:
                checked[key] = str(exc)
        if checked[key] is not None:
            raise UsageError(f"{where}: {checked[key]}")
    if line.job.loras:  # the same file twice (or two byte-identical files): the worker's merge would refuse it
        with spelled_as(JOB_FIELDS):
            merger.applied(line.job.settings(merger.manifest.model, lora_label=lambda p: f"loras {p}",
                                             baked=merger.manifest.baked_loras).loras)


def made_from(line: BatchLine) -> str | None:
    """The request_key its stats file records: the request vidrt batch (or serve) made that file from; None
    when there is no such file, or it is not one vidrt made."""
    try:
        key = json.loads(line.stats_path.read_text(encoding="utf-8")).get("request_key")
    except (OSError, ValueError, AttributeError):
        return None
    return key if isinstance(key, str) else None


def is_done(line: BatchLine) -> bool:
    """A line is done when its clip exists and was made from this very request: an unnamed clip's name
    is its request's key; a named one's stats file (<name>.json) records the key it was made from."""
    if not line.output.exists():
        return False
    return not line.named or made_from(line) == line.key


def not_ours(line: BatchLine) -> list[Path]:
    """The line's clip and stats paths that hold something vidrt batch did not make (no stats JSON with a
    request_key beside it): replaced only with --overwrite, as `vidrt run` replaces an existing file."""
    if made_from(line) is not None:
        return []
    return [q for q in (line.output, line.stats_path) if q.exists() or q.is_symlink()]


def _output_name(name: Any, key: str, suffix: str, where: str) -> str:
    if name is None:
        return key
    if not isinstance(name, str) or not name or name.startswith(".") or "/" in name or "\\" in name:
        raise UsageError(f"{where}: output must be a plain file name like \"clip-01\", got {json.dumps(name)[:40]}")
    if suffix and name.lower().endswith(suffix):
        name = name[: -len(suffix)]
    if not name:
        raise UsageError(f"{where}: output name is empty")
    return name


def run_batch(jobs_file: str, out_dir: str, package: str | os.PathLike[str], *, address: str | None = None,
              workers: int | None = None, threads: int | None = None, backend: str = "auto",
              use_gpu: bool | None = None, quiet: bool = False, overwrite: bool = False,
              echo: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
              checkpoint: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Run every unfinished line; returns (and writes to DIR/batch-summary.json) the summary.
    overwrite: replace files at the lines' outputs that vidrt batch did not make (else OutputError, before
    any work). checkpoint(): called once Ray is up, once the workers are, and every second while clips
    run; it raises to stop the batch (the CLI: a Ctrl-C that Python swallowed while Ray forked its
    processes, vidrt.cli.app.raise_if_signalled)."""
    from vidrt.package.manifest import load_manifest
    from vidrt.service.scaleout import _remove, check_out_dir, connect_ray, require_ray, write_json_atomic
    from vidrt.video import check_replaceable, clean_stale_temps, output_format

    require_ray("batch", local=address is None)
    if workers is not None and workers < 1:
        raise UsageError(f"--workers {workers} must be at least 1")
    if threads is not None and threads < 1:
        raise UsageError(f"--threads {threads} must be at least 1")
    spec = load_manifest(package, verify=False).model
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder")
    lines = read_jobs(jobs_file, spec, package, out, warn=lambda s: echo(f"warning: {s}"))
    check_out_dir(out)
    clean_stale_temps(out)
    todo = [b for b in lines if not is_done(b)]
    foreign = [(b, q) for b in todo for q in not_ours(b)]
    if foreign and not overwrite:
        shown = ", ".join(f"{q.name} (line {b.line})" for b, q in foreign[:MAX_LISTED])
        more = f" and {len(foreign) - MAX_LISTED} more" if len(foreign) > MAX_LISTED else ""
        raise OutputError(f"--out {out} already has {shown}{more}, not made by vidrt batch; pass --overwrite to "
                          f"replace {'it' if len(foreign) == 1 else 'them'}, or give those lines other \"output\" "
                          f"names")
    stale = [b for b in todo if b.output.exists()]
    replaced = [b for b in todo if b in stale or any(f is b for f, _ in foreign)]
    for b in replaced:  # all checked before any is removed: `vidrt run --overwrite`'s rule, per line
        try:
            if b.output.exists():
                check_replaceable(b.output, output_format(b.output))
            if b.stats_path.is_dir():
                raise OutputError(f"{b.stats_path} is a folder, where the line's stats JSON goes; refusing to "
                                  f"replace it: move it, or give the line another \"output\" name")
        except OutputError as exc:
            raise OutputError(f"line {b.line}: {exc}") from None
    for b in replaced:  # removed first: a crash while it is remade must not leave the old clip looking done
        names = " and ".join(q.name for q in not_ours(b))
        echo(f"line {b.line}: {b.output.name} was made from another request; making it again" if made_from(b)
             else f"line {b.line}: replacing {names} (--overwrite)")
        _remove(b.output)
        b.stats_path.unlink(missing_ok=True)
    summary: dict[str, Any] = {"jobs_file": str(jobs_file), "model": spec.name, "clips": len(lines),
                               "skipped": len(lines) - len(todo), "remade": len(stale), "completed": 0, "failed": [],
                               "workers": 0,
                               "retries": 0, "seconds": 0.0, "seconds_after_start": 0.0, "clips_per_hour": None}
    if todo:
        import ray

        started = connect_ray(address, "batch")
        try:
            checkpoint()  # a Ctrl-C swallowed while Ray started its processes: stop before any clip
            asyncio.run(_drive(summary, lines, todo, out, package, workers, threads, backend, use_gpu, quiet, echo,
                               checkpoint))
        finally:
            if started:
                ray.shutdown()
    write_json_atomic(out / SUMMARY, summary)
    _print_summary(summary, out, echo)
    return summary


async def _drive(summary: dict[str, Any], lines: list[BatchLine], todo: list[BatchLine], out: Path,
                 package: str | os.PathLike[str], workers: int | None, threads: int | None, backend: str,
                 use_gpu: bool | None, quiet: bool, echo: Callable[[str], None],
                 checkpoint: Callable[[], None] = lambda: None) -> None:
    from tqdm import tqdm
    from vidrt.service.scaleout import JobManager

    t0 = time.monotonic()
    manager = JobManager(package, out, workers=workers, threads=threads, backend=backend, use_gpu=use_gpu)
    bar = None
    warning = manager.capacity_warning()
    if warning:
        echo(f"warning: {warning}")
    try:
        if not quiet:
            echo(f"{len(todo)} clips to make ({summary['skipped']} already in {out}); starting workers...")
        await manager.start()
        checkpoint()  # one swallowed while the workers started
        ready = time.monotonic()
        jobs = [manager.submit(b.job, b.settings, output=b.output, job_id=f"line{b.line}", tag=b.line) for b in todo]
        bar = tqdm(total=len(lines), initial=summary["skipped"], unit="clip", file=sys.stderr, disable=quiet,
                   dynamic_ncols=True, desc="clips")
        waiting = {asyncio.ensure_future(j.done.wait()): j for j in jobs}
        while waiting:
            finished, _ = await asyncio.wait(waiting, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
            checkpoint()  # and one swallowed while Ray restarted a worker
            for fut in finished:
                job = waiting.pop(fut)
                bar.update(1)
                if job.status == "completed":
                    summary["completed"] += 1
                else:
                    summary["failed"].append({"line": job.tag, "error": job.error or job.status})
                    bar.write(f"line {job.tag}: {job.error or job.status}")
            running = [j for j in jobs if j.status == "in_progress"]
            bar.set_postfix_str(" ".join(f"L{j.tag}:{j.percent:.0f}%" for j in running[:6])
                                + (f" failed {len(summary['failed'])}" if summary["failed"] else ""))
        end = time.monotonic()
        summary["retries"] = manager.retries
        summary["workers"] = sum(s.ready for s in manager.slots)
        summary["seconds"] = round(end - t0, 3)
        summary["seconds_after_start"] = round(end - ready, 3)
        if summary["completed"]:
            summary["clips_per_hour"] = round(summary["completed"] * 3600.0 / max(end - ready, 1e-9), 1)
    finally:
        if bar is not None:
            bar.close()
        await manager.shutdown()


def _print_summary(s: dict[str, Any], out: Path, echo: Callable[[str], None]) -> None:
    rate = f", {s['clips_per_hour']} clips/hour on {s['workers']} workers" if s["clips_per_hour"] else ""
    retries = f", {s['retries']} retried after a worker died" if s["retries"] else ""
    echo(f"{s['clips']} clips: {s['completed']} made, {s['skipped']} skipped (already done), "
         f"{len(s['failed'])} failed in {s['seconds']:.1f} s{rate}{retries}; summary in {out / SUMMARY}")
    for f in s["failed"]:
        echo(f"  failed: line {f['line']}: {f['error']}")

