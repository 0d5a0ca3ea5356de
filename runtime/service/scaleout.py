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

`vidrt batch` (batch.py) and `vidrt serve` (server.py) both drive a JobManager. ray is
imported inside functions only: the runtime core never needs it (DESIGN.md §1).
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vidrt.errors import Cancelled, UsageError, VidrtError
from vidrt.request import Settings
from vidrt.service.jobs import JobRequest, ProgressEvent, execute_job

ACTIVE = ("queued", "in_progress")
LOCAL_OBJECT_STORE_BYTES = 512 * 2**20  # a local Ray's shared memory: finished clips pass through it


def require_ray(command: str) -> Any:
    try:
        import ray
    except ImportError:
        raise UsageError(f"vidrt {command} needs Ray: pip install 'vidrt[serve]'") from None
    return ray


def connect_ray(address: str | None, command: str, num_cpus: int | None = None) -> bool:
    """Join the cluster at `address` ("auto" = the local `ray start` cluster), or start a private
    local Ray when None. Returns True when this call started the connection (so it should end it)."""
    ray = require_ray(command)
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
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False,
                 object_store_memory=LOCAL_OBJECT_STORE_BYTES, logging_level=logging.WARNING, log_to_driver=False)
    return True


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:300] + "...") if len(text) > 300 else text or type(exc).__name__


# ---- the worker (wrapped with ray.remote at run time) ------------------------------------------


class Worker:
    """A model package loaded once; one job at a time (the JobManager never sends two)."""

    def __init__(self, package: str, backend: str = "auto", threads: int | None = None) -> None:
        from vidrt.pipeline import Pipeline

        self.warnings: list[str] = []
        self.load_error: str | None = None
        try:
            self.pipe = Pipeline.load(package, backend=backend, threads=threads, warn=self.warnings.append)
        except VidrtError as exc:  # reported by info(): a one-line reason beats an actor-creation traceback
            self.load_error = f"{type(exc).__name__}: {exc}"
        self.scratch = Path(tempfile.mkdtemp(prefix="vidrt-worker-"))
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

    def progress(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            event = self._event if self._current == job_id else None
        return None if event is None else event.to_dict()

    def cancel(self, job_id: str) -> None:
        with self._lock:
            self._stop.add(job_id)

    def _on_event(self, event: ProgressEvent) -> None:
        with self._lock:
            self._event = event

    def run(self, job_id: str, job: dict[str, Any]) -> dict[str, Any]:
        """-> {"status": "completed", "files": {relative name: bytes}, "result": {...}} | cancelled | failed."""
        request = JobRequest.from_dict(job)
        out = self.scratch / f"{job_id}{request.suffix}"
        with self._lock:
            self._current, self._event = job_id, None
        try:
            result = execute_job(self.pipe, request, out, on_event=self._on_event, overwrite=True,
                                 should_stop=lambda: job_id in self._stop)
            files = _read_output(out)
        except Cancelled:
            return {"status": "cancelled"}
        except VidrtError as exc:
            return {"status": "failed", "error": str(exc), "code": type(exc).__name__}
        except Exception as exc:  # ONNX Runtime / numpy failures: a failed job, not a dead worker
            return {"status": "failed", "error": f"{type(exc).__name__}: {_one_line(exc)}", "code": "internal"}
        finally:
            with self._lock:
                self._current = None
                self._stop.discard(job_id)
            _remove(out)
        self.jobs_done += 1
        record = result.to_dict()
        record.pop("output")
        return {"status": "completed", "files": files, "result": record}


def _read_output(path: Path) -> dict[str, bytes]:
    if path.is_dir():
        return {p.name: p.read_bytes() for p in sorted(path.iterdir())}
    return {"": path.read_bytes()}


def _remove(path: Path) -> None:
    if path.is_dir():
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
    event: ProgressEvent | None = None
    attempts: int = 0
    worker: int | None = None
    error: str | None = None
    error_code: str | None = None
    result: dict[str, Any] | None = None
    cancel_requested: bool = False
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
                 start_timeout: float = 600.0) -> None:
        self.package = str(Path(package).resolve())
        self.out_dir = Path(out_dir)
        self.workers_wanted = workers
        self.threads = threads
        self.backend = backend
        self.use_gpu = use_gpu
        self.max_attempts = max_attempts
        self.poll_seconds = poll_seconds
        self.start_timeout = start_timeout
        self.jobs: dict[str, Job] = {}
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
        self.slots = [Slot(i, cls.remote(self.package, self.backend, threads)) for i in range(count)]

    async def start(self) -> None:
        """Create the actors if needed and start one dispatch loop per worker. Returns once a worker
        has loaded the model (the others join as they come up, e.g. when nodes are added)."""
        if not self.slots:
            self.create_actors()
        self._wake = asyncio.Event()
        self._ready = asyncio.Event()
        self._tasks = [asyncio.create_task(self._dispatch(slot)) for slot in self.slots]
        try:
            await asyncio.wait_for(self._ready.wait(), self.start_timeout)
        except asyncio.TimeoutError:
            raise VidrtError(f"no worker started within {self.start_timeout:.0f} s; the cluster has "
                             f"{_resources_text()} (each worker needs one GPU, or --threads CPUs in CPU "
                             f"mode)") from None
        if not any(s.ready for s in self.slots):
            errors = [s.error for s in self.slots if s.error]
            raise VidrtError(f"no worker could load {self.package}: {errors[0] if errors else 'unknown error'}")
        self.ready_at = time.monotonic()

    async def shutdown(self) -> None:
        import ray

        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for slot in self.slots:
            try:
                ray.kill(slot.actor, no_restart=True)
            except Exception:
                pass
        self._tasks, self.slots = [], []

    # -- the job API -----------------------------------------------------------------------------

    def submit(self, request: JobRequest, settings: Settings, output: Path | None = None,
               job_id: str | None = None, tag: Any = None) -> Job:
        job_id = job_id or f"video_{uuid.uuid4().hex}"
        output = output or self.out_dir / f"{job_id}{request.suffix}"
        job = Job(id=job_id, request=request, settings=settings, output=output, tag=tag)
        self.jobs[job_id] = job
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
        return job

    def delete(self, job_id: str) -> bool:
        """Forget a finished job and remove its files."""
        job = self.jobs.get(job_id)
        if job is None:
            return False
        if job.status in ACTIVE:
            self.cancel(job_id)
        if job.worker is None:
            del self.jobs[job_id]
        for path in (job.output, job.stats_path):
            _remove(path)
        return True

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

    async def _take(self) -> Job:
        assert self._wake is not None
        while True:
            while self._pending:
                job = self._pending.popleft()
                if job.status == "queued":
                    return job
            self._wake.clear()
            await self._wake.wait()

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
        slot.job = job.id
        request = {k: v for k, v in job.request.to_dict().items() if k != "model"}
        reply_task = asyncio.ensure_future(_await(slot.actor.run.remote(job.id, request)))
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
                self._finish(job, "failed", _one_line(_cause(exc)), "internal")
                return True
            if job.cancel_requested:
                self._finish(job, "cancelled")
            elif reply["status"] == "completed":
                try:
                    await asyncio.to_thread(self._publish, job, reply, slot)
                except OSError as exc:
                    self._finish(job, "failed", f"cannot write {job.output}: {exc.strerror or exc}", "output")
                else:
                    slot.completed += 1
                    self._finish(job, "completed")
            elif reply["status"] == "cancelled":
                self._finish(job, "cancelled")
            else:
                self._finish(job, "failed", reply.get("error", "failed"), reply.get("code"))
            return True
        finally:
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
            self._enqueue(job, front=True)  # the next free worker takes it
        else:
            self._finish(job, "failed", f"the worker died {job.attempts} times running this job "
                                        f"(last: {_one_line(exc)[:160]})", "worker_died")

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
        job.result = {"id": job.id, **reply["result"], "output": str(job.output), "attempts": job.attempts,
                      "worker": {"index": slot.index, "pid": slot.info.get("pid"), "host": slot.info.get("host")}}
        if job.tag is not None:
            job.result["tag"] = job.tag
        write_json_atomic(job.stats_path, job.result)  # first: the clip is the "done" marker
        publish(reply["files"], job.output)

    def _finish(self, job: Job, status: str, error: str | None = None, code: str | None = None) -> None:
        job.status, job.error, job.error_code = status, error, code
        job.completed_at = time.time()
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
