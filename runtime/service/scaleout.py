"""Many clips across a fleet: resident-model worker actors on Ray and an asyncio job manager.

    Worker       one per GPU (per CPU slot in CPU mode): loads the model package once, keeps it
                 resident, runs one job at a time through `vidrt.service.jobs.execute_job` into a private
                 scratch folder and returns the finished file's bytes. A threaded actor, so
                 `progress()` and `cancel()` are answered while `run()` works.
    JobManager   owns the queue and the job table; one dispatch loop per worker; polls progress;
                 cancels; when a worker process dies mid-clip (Ray restarts the actor: max_restarts)
                 the job goes back to the front of the queue, for whichever worker is free first,
                 up to `max_attempts` tries. A job turns "completed" only after its file has been
                 published into the output folder (temp beside it, then rename): never before.
                 With a JobStore (store.py) every change of a job is written to SQLite, so a
                 restarted server lists, serves and runs what the last one had (`restore`).

Scratch: a worker encodes into `$TMPDIR/vidrt-worker-<pid>-*`, removed by `close()` when the
manager ends it; a worker that was killed cannot clean up, so every worker that starts (Ray's
restart of a killed one included) and the manager at shutdown remove the folders of dead pids.

`vidrt batch` (batch.py) and `vidrt serve` (server.py) both drive a JobManager. ray is
imported inside functions only: the runtime core never needs it (DESIGN.md §1).
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from vidrt.errors import Cancelled, DeviceError, OutputError, PackageError, Spelling, UsageError, VidrtError
from vidrt.request import Settings
from vidrt.service.jobs import JOB_FIELDS, JobRequest, ProgressEvent, execute_job, lora_ref, package_identity
from vidrt.service.previews import SUFFIX as PREVIEW_SUFFIX
from vidrt.service.previews import VARIANTS, make_previews

ACTIVE = ("queued", "in_progress")
IDLE_CHECK_SECONDS = 5.0  # an idle worker is asked who it is this often (its pid shows a restart by Ray)
LOCAL_OBJECT_STORE_BYTES = 512 * 2**20  # a local Ray's shared memory: finished clips pass through it


def require_ray(command: str, local: bool = False) -> Any:
    """Import ray, or a UsageError naming the extra. local=True (a private Ray on this machine, started
    by connect_ray(None)): every port that Ray opens, its metrics endpoints and dashboard included, is
    bound to 127.0.0.1. Ray decides that when it is first imported (ray_constants.ENABLE_RAY_CLUSTER,
    read from RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER: off = a single-node Ray that resolves the node's address
    to the loopback one; ray/_private/services.py get_node_ip_address), so this must run before any
    `import ray`. A cluster of your own (`ray start`) binds what you tell it to (docs/scale-out.md)."""
    if local and "ray" not in sys.modules:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError:
        raise UsageError(f"vidrt {command} needs Ray: pip install 'vidrt[serve]'") from None
    return ray


def connect_ray(address: str | None, command: str, num_cpus: int | None = None) -> bool:
    """Join the cluster at `address` ("auto" = the local `ray start` cluster), or start a private
    local Ray when None. Returns True when this call started the connection (so it should end it)."""
    ray = require_ray(command, local=not address)
    import logging

    if ray.is_initialized():
        return False
    if address:
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            reason = " ".join(str(exc).split())[:200]
            raise UsageError(f"cannot reach the Ray cluster at --ray {address} ({reason}); start it with "
                             f"`ray start --head` or check the address") from None
    else:
        try:
            ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False,
                     object_store_memory=LOCAL_OBJECT_STORE_BYTES, logging_level=logging.WARNING, log_to_driver=False)
        except BaseException:  # a Ctrl-C while the private Ray starts: end the processes it has started so far
            ray.shutdown()  # (else its GCS and raylet outlive this process until they notice it is gone)
            raise
    return True


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:300] + "...") if len(text) > 300 else text or type(exc).__name__


# ---- the worker (wrapped with ray.remote at run time) ------------------------------------------


class Worker:
    """A model package loaded once; one job at a time (the JobManager never sends two)."""

    def __init__(self, package: str, backend: str = "auto", threads: int | None = None,
                 lora_dir: str | None = None, spelling: Spelling = JOB_FIELDS) -> None:
        """lora_dir: `vidrt serve --lora-dir`, the folder a client's LoRA names were resolved in: its files
        are named in error messages as the client sent them (loras: 'NAME'), never by the server's path.
        spelling: how job errors are worded (execute_job): JOB_FIELDS for a batch line, the API's for serve."""
        from vidrt.pipeline import Pipeline

        self.lora_dir = Path(lora_dir).resolve() if lora_dir is not None else None
        self.spelling = spelling
        self.warnings: list[str] = []
        self.load_error: str | None = None
        try:
            self.pipe = Pipeline.load(package, backend=backend, threads=threads, warn=self.warnings.append)
        except VidrtError as exc:  # reported by info(): a one-line reason beats an actor-creation traceback
            self.load_error = f"{type(exc).__name__}: {exc}"
        sweep_scratch()  # folders of workers that were killed (this process may be the restart of one)
        self.scratch = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-"))
        self._lock = threading.Lock()
        self._current: str | None = None
        self._event: ProgressEvent | None = None
        self._stop: set[str] = set()
        self.jobs_done = 0

    def info(self) -> dict[str, Any]:
        if self.load_error is not None:
            return {"pid": os.getpid(), "host": socket.gethostname(), "error": self.load_error}
        return {"pid": os.getpid(), "host": socket.gethostname(), "model": self.pipe.manifest.model.name,
                "backend": self.pipe.backend.name, "jobs_done": self.jobs_done}

    def close(self) -> None:
        """Remove the scratch folder (the manager calls this before it ends the actor)."""
        shutil.rmtree(self.scratch, ignore_errors=True)

    def progress(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            event = self._event if self._current == job_id else None
        return None if event is None else event.to_dict()

    def cancel(self, job_id: str) -> None:
        with self._lock:
            self._stop.add(job_id)

    def lora_label(self, path: str) -> str:
        """How a job's LoRA is named in its errors: by the job's own field (`loras`, as a jobs.jsonl line or a
        client wrote it), a file of the server's LoRA folder by its bare name."""
        p = Path(path)
        if self.lora_dir is not None and p.parent == self.lora_dir:
            return f"loras: {p.name!r}"
        return f"loras {path}"

    def _missing_lora(self, request: JobRequest) -> str | None:
        """A file of the server's LoRA folder the job names that is gone (removed after the job was queued,
        e.g. across a restart), or one outside that folder: said in the client's terms (its bare name), not
        read_lora's "give the path"."""
        for value in request.loras or ():
            p = Path(lora_ref(value).path)
            if self.lora_dir is not None and p.parent != self.lora_dir:  # a server reads only its own folder
                return not_in_lora_folder(p.name)
            if self.lora_dir is not None and not p.is_file():
                return (f"loras: {p.name!r} is no longer in this server's LoRA folder (removed after the job was "
                        f"queued); create the video again with a LoRA it has (GET /v1/models lists them)")
        return None

    def _on_event(self, event: ProgressEvent) -> None:
        with self._lock:
            self._event = event

    def run(self, job_id: str, job: dict[str, Any], previews: bool = False) -> dict[str, Any]:
        """-> {"status": "completed", "files": {relative name: bytes}, "previews": {variant: JPEG bytes},
        "result": {...}} | cancelled | failed. previews: also a thumbnail and a sprite sheet (previews.py)."""
        request = JobRequest.from_dict(job)
        gone = self._missing_lora(request)
        if gone is not None:
            return {"status": "failed", "error": gone, "code": "lora_not_found"}
        out = self.scratch / f"{job_id}{request.suffix}"
        with self._lock:
            self._current, self._event = job_id, None
        try:
            result = execute_job(self.pipe, request, out, on_event=self._on_event, overwrite=True,
                                 should_stop=lambda: job_id in self._stop, lora_label=self.lora_label,
                                 spelling=self.spelling)
            files = _read_output(out)
            images = make_previews(out) if previews and out.is_file() else {}
        except Cancelled:
            return {"status": "cancelled"}
        except VidrtError as exc:
            return {"status": "failed", "error": str(exc), "code": error_code(exc)}
        except Exception as exc:  # ONNX Runtime / numpy failures: a failed job, not a dead worker
            return {"status": "failed", "error": f"{type(exc).__name__}: {_one_line(exc)}", "code": "internal_error"}
        finally:
            with self._lock:
                self._current = None
                self._stop.discard(job_id)
            _remove(out)
        self.jobs_done += 1
        record = result.to_dict()
        record.pop("output")
        return {"status": "completed", "files": files, "previews": images, "result": record}


def not_in_lora_folder(name: str) -> str:
    """A queued job's LoRA outside this start's --lora-dir (restarted with another folder), by its bare name."""
    return (f"loras: {name!r} is not in this server's LoRA folder (the server was restarted with another one "
            f"after the job was queued); create the video again with a LoRA it has (GET /v1/models lists them)")


# what VideoAPI.keep_image writes in --out/inputs/ (input-<sha256[:32]>, and its temp); a restart removes
# only such files that no job uses, never an operator's own
KEPT_INPUT = re.compile(r"\.?input-[0-9a-f]{32}(\.[0-9]+\.tmp)?")

INPUT_LOST = ("input_reference: the server no longer has this job's start image (it was removed from the "
              "server's folder after the job was queued); create the video again, sending the image again")

# error.code of a failed job (the API's snake_case codes, docs/scale-out.md), never a Python class name
ERROR_CODES: dict[type[VidrtError], str] = {UsageError: "invalid_request", PackageError: "model_error",
                                            DeviceError: "device_error", OutputError: "output_error"}


def error_code(exc: VidrtError) -> str:
    return next((code for kind, code in ERROR_CODES.items() if isinstance(exc, kind)), "internal_error")


SCRATCH_PREFIX = "vidrt-worker-"
_SCRATCH_RE = re.compile(re.escape(SCRATCH_PREFIX) + r"(?P<pid>[0-9]+)-")


def sweep_scratch(root: str | os.PathLike[str] | None = None) -> list[Path]:
    """Remove worker scratch folders whose process is gone (on this machine); returns what was removed."""
    removed = []
    base = Path(root or tempfile.gettempdir())
    for entry in base.glob(SCRATCH_PREFIX + "*"):
        m = _SCRATCH_RE.match(entry.name)
        if m is not None and entry.is_dir() and not _pid_alive(int(m["pid"])):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def _read_output(path: Path) -> dict[str, bytes]:
    if path.is_dir():
        return {p.name: p.read_bytes() for p in sorted(path.iterdir())}
    return {"": path.read_bytes()}


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():  # a link is removed, never what it points to
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def publish(files: dict[str, bytes], final: Path) -> None:
    """Write to `.<name>.vidrt-<pid>.tmp` beside `final`, then rename: readers never see half a clip."""
    from vidrt.video import temp_path

    tmp = temp_path(final)
    _remove(tmp)
    try:
        if set(files) == {""}:
            tmp.write_bytes(files[""])
        else:
            tmp.mkdir()
            for name, data in files.items():
                (tmp / Path(name).name).write_bytes(data)
            if final.is_dir():
                shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        _remove(tmp)
        raise


def write_json_atomic(path: Path, record: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def check_out_dir(out: Path) -> None:
    """--out (vidrt batch / serve) created if needed and writable (tried by creating a file there: access()
    says nothing of a read-only mount for root); OutputError (exit 5) naming the system's reason, before
    Ray starts."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out, prefix=".vidrt-probe-"):
            pass
    except OSError as exc:
        raise OutputError(f"cannot write in --out {out} ({exc.strerror or exc}); give a folder you can write "
                          f"to") from None


# ---- the manager -------------------------------------------------------------------------------


@dataclass
class Job:
    id: str
    request: JobRequest
    settings: Settings
    output: Path  # where the finished clip is published
    created_at: float = field(default_factory=time.time)
    status: str = "queued"  # queued | in_progress | completed | failed | cancelled
    started_at: float | None = None
    completed_at: float | None = None
    expires_at: float | None = None  # when --keep removes it (None: kept)
    event: ProgressEvent | None = None
    attempts: int = 0
    restarts: int = 0  # times a server restart found it running and queued it again
    worker: int | None = None
    error: str | None = None
    error_code: str | None = None
    result: dict[str, Any] | None = None
    previews: dict[str, str] = field(default_factory=dict)  # variant -> file, once completed
    cancel_requested: bool = False
    deleted: bool = False
    seq: int = 0  # submission order (list paging)
    api: dict[str, Any] = field(default_factory=dict)  # what the client asked for, as it asked (seconds, size)
    tag: Any = None  # the caller's (batch: the line number)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def percent(self) -> float:
        if self.status == "completed":
            return 100.0
        return self.event.percent if self.event is not None and self.status == "in_progress" else 0.0

    @property
    def stats_path(self) -> Path:
        return self.output.with_name(self.output.stem + ".json") if self.output.suffix else \
            self.output.with_name(self.output.name + ".json")

    def preview_path(self, variant: str) -> Path:
        return self.output.with_name(f"{self.output.stem}.{variant}{PREVIEW_SUFFIX}")

    def files(self) -> list[Path]:
        """Everything this job has (or will have) in the output folder."""
        return [self.output, self.stats_path, *(self.preview_path(v) for v in VARIANTS)]

    def to_record(self) -> dict[str, Any]:
        """The row of the job table (store.py): everything but live progress."""
        return {"id": self.id, "seq": self.seq, "request": self.request.to_dict(), "settings": asdict(self.settings),
                "output": str(self.output), "created_at": self.created_at, "status": self.status,
                "started_at": self.started_at, "completed_at": self.completed_at, "expires_at": self.expires_at,
                "attempts": self.attempts, "restarts": self.restarts, "error": self.error,
                "error_code": self.error_code, "result": self.result, "previews": self.previews,
                "cancel_requested": self.cancel_requested, "api": self.api}

    @classmethod
    def from_record(cls, r: dict[str, Any]) -> Job:
        known = {f.name for f in fields(Settings)}
        job = cls(id=r["id"], request=JobRequest.from_dict(r["request"], where=f"job {r['id']}"),
                  settings=Settings(**{k: v for k, v in r["settings"].items() if k in known}), output=Path(r["output"]))
        for name in ("seq", "created_at", "status", "started_at", "completed_at", "expires_at", "attempts", "restarts",
                     "error", "error_code", "result", "previews", "cancel_requested", "api"):
            setattr(job, name, r[name])
        if job.status not in ACTIVE:
            job.done.set()
        return job


@dataclass
class Slot:
    index: int
    actor: Any
    info: dict[str, Any] = field(default_factory=dict)
    job: str | None = None
    completed: int = 0
    deaths: int = 0
    alive: bool = True
    ready: bool = False  # the model is loaded
    error: str | None = None  # why it could not start


class JobManager:
    """Queue + dispatch over worker actors. Every method runs on one asyncio loop (not thread-safe)."""

    def __init__(self, package: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                 workers: int | None = None, threads: int | None = None, backend: str = "auto",
                 use_gpu: bool | None = None, max_attempts: int = 3, poll_seconds: float = 0.25,
                 start_timeout: float = 600.0, store: Any = None, keep_seconds: float | None = None,
                 previews: bool = False, lora_dir: str | None = None, spelling: Spelling = JOB_FIELDS,
                 inputs_dir: str | os.PathLike[str] | None = None) -> None:
        """store: a JobStore (store.py) to persist the job table in, or None (batch: in memory only).
        inputs_dir: where the server keeps uploaded start images (VideoAPI's image_dir, `--out/inputs`): a
        job's image there is one of its files, removed with the last job that uses it, and at restore
        every file there that no job uses.
        lora_dir: the server's LoRA folder (Worker: its files are named by bare name in job errors).
        spelling: how the workers word job errors (Worker): a batch line's fields, or the API's (serve).
        keep_seconds: finished jobs and their files are removed this long after they finished (None: never).
        previews: completed clips also get a thumbnail and a sprite sheet (previews.py)."""
        self.package = str(Path(package).resolve())
        self.package_id = package_identity(self.package)  # in each clip's request_key (JobRequest.key)
        self.inputs_dir = Path(inputs_dir) if inputs_dir is not None else None
        self.out_dir = Path(out_dir)
        self.workers_wanted = workers
        self.threads = threads
        self.backend = backend
        self.use_gpu = use_gpu
        self.max_attempts = max_attempts
        self.poll_seconds = poll_seconds
        self.start_timeout = start_timeout
        self.store = store
        self.keep_seconds = keep_seconds
        self.previews = previews
        self.lora_dir = lora_dir
        self.spelling = spelling
        self.restore_report: dict[str, int] = {}
        self._seq = 0
        self.jobs: dict[str, Job] = {}
        # id -> seq of deleted jobs (this process's last 10000): a list cursor (`after`) may name one
        self.deleted_seq: collections.OrderedDict[str, int] = collections.OrderedDict()
        self.slots: list[Slot] = []
        self.retries = 0
        self.ready_at: float | None = None
        self._pending: collections.deque[Job] = collections.deque()
        self._wake: asyncio.Event | None = None
        self._ready: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle -------------------------------------------------------------------------------

    def plan_workers(self) -> tuple[int, dict[str, float]]:
        """How many workers and what each asks Ray for: one GPU each, else `threads` CPUs each."""
        import ray

        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
        gpu = self.use_gpu if self.use_gpu is not None else gpus > 0
        if gpu:
            if gpus == 0:
                raise UsageError("--gpu given but the Ray cluster has no GPUs; start workers with `ray start "
                                 "--num-gpus N`")
            return self.workers_wanted or gpus, {"num_gpus": 1, "num_cpus": 1}
        per = self.threads or 1
        return self.workers_wanted or max(1, cpus // per), {"num_cpus": per}

    def capacity_warning(self) -> str | None:
        """A line when the cluster cannot hold every worker at once (they would wait for resources)."""
        import ray

        count, per = self.plan_workers()
        have = ray.cluster_resources()
        short = [f"{count * per[k]:g} {name}" for k, name in (("num_gpus", "GPUs"), ("num_cpus", "CPUs"))
                 if count * per.get(k, 0) > have.get(name[:-1].upper() if name == "GPUs" else "CPU", 0)]
        if not short:
            return None
        return (f"{count} workers need {' and '.join(short)} but the cluster has {_resources_text()}: the rest "
                f"wait until nodes join (lower --workers or add nodes)")

    def create_actors(self) -> None:
        """Start the worker actors (they load the package in the background). Sync: no loop needed."""
        import ray

        count, resources = self.plan_workers()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        threads = self.threads if self.threads is not None else (None if "num_gpus" in resources else 1)
        cls = ray.remote(Worker).options(max_restarts=-1, max_task_retries=0, max_concurrency=4, **resources)
        self.slots = [Slot(i, cls.remote(self.package, self.backend, threads, self.lora_dir, self.spelling))
                      for i in range(count)]

    async def start(self) -> None:
        """Create the actors if needed and start one dispatch loop per worker. Returns once a worker
        has loaded the model (the others join as they come up, e.g. when nodes are added)."""
        if not self.slots:
            self.create_actors()
        self._wake = asyncio.Event()
        self._ready = asyncio.Event()
        self._tasks = [asyncio.create_task(self._dispatch(slot)) for slot in self.slots]
        if self.keep_seconds is not None:
            self._tasks.append(asyncio.create_task(self._expire_loop()))
        if self._pending:  # restored jobs
            self._wake.set()
        try:
            await asyncio.wait_for(self._ready.wait(), self.start_timeout)
        except asyncio.TimeoutError:
            raise VidrtError(f"no worker started within {self.start_timeout:.0f} s; the cluster has "
                             f"{_resources_text()} (each worker needs one GPU, or --threads CPUs in CPU "
                             f"mode)") from None
        if not any(s.ready for s in self.slots):
            errors = [s.error for s in self.slots if s.error]
            first = errors[0] if errors else "unknown error"
            kind = PackageError if first.startswith("PackageError") else VidrtError  # exit 3 for a bad package
            raise kind(f"no worker could load {self.package}: {first}")
        self.ready_at = time.monotonic()

    async def shutdown(self) -> None:
        """Stop dispatching, let each worker remove its scratch folder, end the actors. Jobs that were
        running stay "in_progress" in the store: the next start queues them again (restore)."""
        import ray

        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        live = [s for s in self.slots if s.alive]
        for slot in live:  # a running job is told to stop, so close() is answered promptly
            if slot.job is not None:
                slot.actor.cancel.remote(slot.job)
        closing = [asyncio.wait_for(_await(s.actor.close.remote()), 10.0) for s in live]
        await asyncio.gather(*closing, return_exceptions=True)
        for slot in self.slots:
            try:
                ray.kill(slot.actor, no_restart=True)
            except Exception:
                pass
        self._tasks, self.slots = [], []
        sweep_scratch()  # workers on this machine that were killed before they could clean up

    # -- the job table across restarts -----------------------------------------------------------

    def restore(self) -> dict[str, int]:
        """Load the store's jobs (before start()). Finished ones are listed and served again; queued ones
        run; ones a stopped server was running are queued once more (restarts), or failed if a restart
        already interrupted them once. Then expire, and remove from the output folder what no job owns
        (temps of dead processes, clips of jobs deleted while a server was stopping)."""
        from vidrt.video import clean_stale_temps

        report = {"completed": 0, "queued": 0, "requeued": 0, "failed": 0, "orphans": 0}
        if self.store is None:
            return report
        for record in self.store.load():
            job = Job.from_record(record)
            was = job.status
            self.jobs[job.id] = job
            self._seq = max(self._seq, job.seq)
            if job.cancel_requested and job.status in ("in_progress", "cancelled") and job.completed_at is None:
                self._finish(job, "cancelled")  # cancelled while its worker ran; the server stopped before it ended
            elif job.status == "in_progress" and job.restarts >= 1:
                self._finish(job, "failed", "the server stopped while this job ran, twice; submit it again",
                             "interrupted")
                report["failed"] += 1
            elif job.status == "in_progress":
                job.status, job.restarts = "queued", job.restarts + 1
                self._save(job)
                report["requeued"] += 1
            elif job.status == "completed" and not job.output.exists():
                self._finish(job, "failed", f"its file {job.output.name} is gone from the output folder",
                             "file_missing")
                report["failed"] += 1
            elif job.status == "completed":
                report["completed"] += 1
            outside = self._outside_lora_dir(job.request) if job.status == "queued" else None
            if outside is not None:  # queued under another --lora-dir (or with one, now none): not read now
                self._finish(job, "failed", outside, "lora_not_found")
                report["failed"] += 1
                report["requeued"] -= was == "in_progress"
            elif job.status == "queued" and self._input_lost(job):
                report["failed"] += 1
                report["requeued"] -= was == "in_progress"
            elif job.status == "queued":
                self._enqueue(job)
                report["queued"] += was == "queued"
            elif job.completed_at is not None:  # this start's --keep applies to every finished job
                expires = None if self.keep_seconds is None else job.completed_at + self.keep_seconds
                if expires != job.expires_at:
                    job.expires_at = expires
                    self._save(job)
        self.expire()
        clean_stale_temps(self.out_dir)
        owned = {p.name for j in self.jobs.values() for p in j.files()}
        for entry in self.out_dir.iterdir():
            if entry.name.startswith("video_") and entry.name not in owned:
                _remove(entry)
                report["orphans"] += 1
        if self.inputs_dir is not None and self.inputs_dir.is_dir():  # images of jobs deleted while stopped
            used = {self._input_of(j) for j in self.jobs.values()}
            for entry in self.inputs_dir.iterdir():  # only what the server keeps there (VideoAPI.keep_image)
                if KEPT_INPUT.fullmatch(entry.name) and entry not in used:
                    _remove(entry)
                    report["orphans"] += 1
        self.restore_report = report
        return report

    def _outside_lora_dir(self, request: JobRequest) -> str | None:
        """A restored job's LoRA that is not a file of this start's --lora-dir (the server was restarted with
        another folder, or none): its refusal, naming the file by its bare name only (never the old path)."""
        folder = Path(self.lora_dir).resolve() if self.lora_dir is not None else None
        for value in request.loras or ():
            p = Path(lora_ref(value).path)
            if folder is None:
                return (f"loras: {p.name!r}: this server was restarted without a LoRA folder after the job was "
                        f"queued, so it takes no LoRAs now; create the video again without loras")
            if p.parent != folder:
                return not_in_lora_folder(p.name)
        return None

    def expire(self, now: float | None = None) -> int:
        """Delete finished jobs whose expires_at has passed, with their files; returns how many."""
        now = time.time() if now is None else now
        old = [j.id for j in self.jobs.values() if j.expires_at is not None and j.expires_at <= now
               and j.status not in ACTIVE]
        for job_id in old:
            self.delete(job_id)
        return len(old)

    async def _expire_loop(self) -> None:
        assert self.keep_seconds is not None
        while True:
            await asyncio.sleep(min(60.0, max(self.keep_seconds / 4, 0.2)))
            self.expire()

    def _save(self, job: Job) -> None:
        if self.store is not None and not job.deleted:
            self.store.save(job.id, job.seq, job.status, job.to_record())

    # -- the job API -----------------------------------------------------------------------------

    def submit(self, request: JobRequest, settings: Settings, output: Path | None = None,
               job_id: str | None = None, tag: Any = None, api: dict[str, Any] | None = None) -> Job:
        job_id = job_id or f"video_{uuid.uuid4().hex}"
        output = output or self.out_dir / f"{job_id}{request.suffix}"
        self._seq += 1
        job = Job(id=job_id, request=request, settings=settings, output=output, tag=tag, seq=self._seq,
                  api=dict(api or {}))
        self.jobs[job_id] = job
        self._save(job)
        self._enqueue(job)
        return job

    def cancel(self, job_id: str) -> Job | None:
        """Stop a queued or running job: it never completes; its worker stops at the next step or frame."""
        job = self.jobs.get(job_id)
        if job is None or job.status not in ACTIVE:
            return job
        job.cancel_requested = True
        if job.worker is None:
            self._finish(job, "cancelled")
        else:  # the dispatch loop tells the worker and finishes the job when the worker returns
            job.status = "cancelled"
            self._save(job)
        return job

    def delete(self, job_id: str) -> bool:
        """Forget a job (cancelling it first if it is queued or running) and remove its files and row.
        A running job's worker stops at its next step; its result is dropped when it returns."""
        job = self.jobs.get(job_id)
        if job is None:
            return False
        if job.status in ACTIVE:
            self.cancel(job_id)
        del self.jobs[job_id]
        self.deleted_seq[job_id] = job.seq
        while len(self.deleted_seq) > 10000:
            self.deleted_seq.popitem(last=False)
        job.deleted = True
        if self.store is not None:
            self.store.delete(job_id)
        for path in job.files():
            _remove(path)
        self.release_input(self._input_of(job))
        return True

    def _input_of(self, job: Job) -> Path | None:
        """The job's start image when it is one the server keeps (in inputs_dir), else None."""
        if self.inputs_dir is None or job.request.image is None:
            return None
        path = Path(job.request.image)
        return path if path.parent == self.inputs_dir else None

    def _input_lost(self, job: Job) -> bool:
        """Fail a queued job (input_lost: the server's doing, not the client's) whose kept start image left
        --out/inputs/ (removed while the server was stopped, or by hand); True when it did. The message names
        no server path: the client sends the image again."""
        kept = self._input_of(job)
        if kept is None or kept.is_file():
            return False
        self._finish(job, "failed", INPUT_LOST, "input_lost")
        return True

    def release_input(self, path: Path | None) -> None:
        """Remove a kept start image that no job uses any more (images are stored once per content, so
        two jobs may share one). The server calls it too for a request refused after its image was kept."""
        if path is not None and not any(self._input_of(j) == path for j in self.jobs.values()):
            _remove(path)

    def queued(self) -> int:
        return sum(1 for j in self._pending if j.status == "queued")

    def workers(self) -> list[dict[str, Any]]:
        return [{"index": s.index, "pid": s.info.get("pid"), "host": s.info.get("host"),
                 "backend": s.info.get("backend"), "ready": s.ready, "alive": s.alive, "job": s.job,
                 "completed": s.completed, "deaths": s.deaths, "error": s.error} for s in self.slots]

    # -- dispatch --------------------------------------------------------------------------------

    def _enqueue(self, job: Job, front: bool = False) -> None:
        if front:
            self._pending.appendleft(job)
        else:
            self._pending.append(job)
        if self._wake is not None:
            self._wake.set()

    async def _take(self) -> Job | None:
        """The next queued job; None after IDLE_CHECK_SECONDS without one (the caller checks its worker)."""
        assert self._wake is not None
        while True:
            while self._pending:
                job = self._pending.popleft()
                if job.status == "queued" and not self._input_lost(job):
                    return job
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), IDLE_CHECK_SECONDS)
            except asyncio.TimeoutError:
                return None

    async def _dispatch(self, slot: Slot) -> None:
        import ray

        try:  # the actor loads the model first
            slot.info = await _await(slot.actor.info.remote())
            slot.error = slot.info.get("error")
            slot.ready = slot.error is None
        except Exception as exc:
            slot.error = _one_line(_cause(exc))
        if not slot.ready:
            slot.alive = False
            ray.kill(slot.actor, no_restart=True)
        if self._ready is not None and (slot.ready or not any(s.alive for s in self.slots)):
            self._ready.set()
        if not slot.ready:
            return
        while True:
            job = await self._take()
            if job is None:  # idle: a worker that died between jobs is noticed here, not by the next job
                if await self._check_idle(slot, ray):
                    continue
                slot.alive = False
                return
            if not await self._run(slot, job, ray):
                slot.alive = False
                if not any(s.alive for s in self.slots):
                    for j in list(self._pending):
                        if j.status == "queued":
                            self._finish(j, "failed", "no worker is left: every worker failed to restart", "no_worker")
                return

    async def _run(self, slot: Slot, job: Job, ray: Any) -> bool:
        """Run `job` on `slot`. Returns False when the slot's worker is gone for good."""
        job.status, job.worker, job.event = "in_progress", slot.index, None
        job.attempts += 1
        job.started_at = job.started_at or time.time()
        self._save(job)
        slot.job = job.id
        request = {k: v for k, v in job.request.to_dict().items() if k != "model"}
        reply_task = asyncio.ensure_future(_await(slot.actor.run.remote(job.id, request, self.previews)))
        cancel_sent = False
        try:
            while not reply_task.done():
                await asyncio.wait({reply_task}, timeout=self.poll_seconds)
                if reply_task.done():
                    break
                if job.cancel_requested and not cancel_sent:
                    slot.actor.cancel.remote(job.id)
                    cancel_sent = True
                try:
                    event = await asyncio.wait_for(_await(slot.actor.progress.remote(job.id)), 10.0)
                except Exception:  # a dying worker: the reply says what happened
                    event = None
                if event is not None and job.status == "in_progress":
                    job.event = ProgressEvent(**event)
            try:
                reply = reply_task.result()
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                    ray.exceptions.ObjectLostError, ray.exceptions.OutOfMemoryError,
                    ray.exceptions.LocalRayletDiedError) as exc:
                slot.deaths += 1
                slot.job = None
                self._worker_died(job, exc)
                return await self._wait_restart(slot)
            except Exception as exc:  # e.g. the reply could not be unpickled
                self._finish(job, "failed", _one_line(_cause(exc)), "internal_error")
                return True
            if job.cancel_requested:
                self._finish(job, "cancelled")
            elif reply["status"] == "completed":
                try:
                    await asyncio.to_thread(self._publish, job, reply, slot)
                except OSError as exc:
                    self._finish(job, "failed", f"cannot write {job.output}: {exc.strerror or exc}", "output_error")
                else:
                    slot.completed += 1
                    self._finish(job, "completed")
            elif reply["status"] == "cancelled":
                self._finish(job, "cancelled")
            else:
                self._finish(job, "failed", reply.get("error", "failed"), reply.get("code"))
            return True
        finally:
            if not reply_task.done():  # shutting down: the actor is about to be ended
                reply_task.add_done_callback(lambda t: t.cancelled() or t.exception())
            slot.job = None
            if job.worker == slot.index:
                job.worker = None

    def _worker_died(self, job: Job, exc: BaseException) -> None:
        job.worker, job.event = None, None
        if job.cancel_requested:
            self._finish(job, "cancelled")
        elif job.attempts < self.max_attempts:
            self.retries += 1
            job.status = "queued"
            self._save(job)
            self._enqueue(job, front=True)  # the next free worker takes it
        else:
            self._finish(job, "failed", f"the worker died {job.attempts} times running this job "
                                        f"(last: {_one_line(exc)[:160]})", "worker_died")

    async def _check_idle(self, slot: Slot, ray: Any) -> bool:
        """Ask an idle worker who it is: a new pid means Ray restarted it (max_restarts) since we last
        asked, and one that cannot answer is waited for like a worker that died mid-job. False: gone."""
        try:
            info = await asyncio.wait_for(_await(slot.actor.info.remote()), self.start_timeout)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ray.exceptions.WorkerCrashedError):
            slot.deaths += 1
            return await self._wait_restart(slot)
        except Exception:
            return False
        if info.get("pid") != slot.info.get("pid"):
            slot.deaths += 1
        slot.info = info
        return True

    async def _wait_restart(self, slot: Slot) -> bool:
        """Ray restarts a dead worker (max_restarts); wait until it has loaded the model again."""
        import ray

        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            try:
                slot.info = await asyncio.wait_for(_await(slot.actor.info.remote()), self.start_timeout)
                return True
            except ray.exceptions.ActorUnavailableError:  # restarting: ask again
                await asyncio.sleep(0.5)
            except Exception:
                return False
        return False

    def _publish(self, job: Job, reply: dict[str, Any], slot: Slot) -> None:
        job.result = {"id": job.id, **reply["result"], "output": str(job.output),
                      "request_key": job.request.key(self.package_id), "attempts": job.attempts,
                      "worker": {"index": slot.index, "pid": slot.info.get("pid"), "host": slot.info.get("host")}}
        if job.tag is not None:
            job.result["tag"] = job.tag
        write_json_atomic(job.stats_path, job.result)  # first: the clip is the "done" marker
        for variant, data in reply.get("previews", {}).items():
            publish({"": data}, job.preview_path(variant))
            job.previews[variant] = str(job.preview_path(variant))
        publish(reply["files"], job.output)

    def _finish(self, job: Job, status: str, error: str | None = None, code: str | None = None) -> None:
        job.status, job.error, job.error_code = status, error, code
        job.completed_at = time.time()
        if self.keep_seconds is not None:
            job.expires_at = job.completed_at + self.keep_seconds
        if job.deleted:  # deleted while its worker ran: whatever it made goes too
            for path in job.files():
                _remove(path)
        self._save(job)
        job.done.set()


async def _await(ref: Any) -> Any:
    return await ref


def _cause(exc: BaseException) -> BaseException:
    """The user exception inside a RayTaskError / actor creation error."""
    for _ in range(5):
        inner = getattr(exc, "cause", None)
        if not isinstance(inner, BaseException) or inner is exc:
            break
        exc = inner
    return exc


def _resources_text() -> str:
    import ray

    r = ray.cluster_resources()
    return f"{int(r.get('CPU', 0))} CPUs and {int(r.get('GPU', 0))} GPUs"
