"""One worker process per side, each loading its model once, driven alternately by the parent (A B, B A, ...).

Separate processes because (1) peak RSS must be each side's own, not the sum of both models, and
(2) the vidrt side must never import torch (it would change thread pools and memory). The parent
sends ("run", clip, noise), the worker answers with uint8 frames [F, H, W, 3], wall seconds, the
per-stage split and the run's peak memory.

vidrt     vidrt.pipeline.Pipeline on the exported package (ONNX Runtime CPU, or TensorRT).
diffusers diffusers.WanPipeline on the same checkpoint folder, with the official Wan FlowUniPC
          scheduler (wan22's wan/utils/fm_solvers_unipc.py, configured as Wan's text2video.py does),
          eager umT5 attention (what the export traces), fp32, torch.set_num_threads(threads).
"""

from __future__ import annotations

import importlib
import importlib.util
import multiprocessing as mp
import os
import sys
import time
import traceback
import types
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.memory import PeakGPU, PeakRSS, rss_bytes
from benchmarks.workloads import Clip

SIDES = ("vidrt", "diffusers")


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """[0, 1] float -> uint8, as tests/test_pipeline.py converts diffusers' output."""
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


# ---- vidrt -----------------------------------------------------------------------------------------


class VidrtSide:
    def __init__(self, package: str, threads: int | None, backend: str, device: str, open_all: bool = True) -> None:
        from vidrt.package import contracts as C
        from vidrt.pipeline import Pipeline

        # verify=True: the package's sha256 check is part of vidrt's load (and of `load` seconds)
        self.pipe = Pipeline.load(package, backend=backend, device=device, threads=threads, warn=lambda m: None)
        pieces = {C.dit_piece(e, p) for e in self.pipe.manifest.model.experts for p in C.DIT_PIECES}
        for name in self.pipe.manifest.components if open_all else ():
            # sessions open lazily; open them now so `load` is comparable. The step-caching pieces are not
            # opened: a run without --cache never uses them (they would double the DiT's weights in memory)
            if name not in pieces:
                self.pipe.engine(name)
        self.gpu = backend == "tensorrt" or device == "cuda"

    def run(self, clip: Clip, noise: np.ndarray) -> dict[str, Any]:
        from vidrt.package.recipes import LoraRef
        from vidrt.request import Request

        req = Request(prompt=clip.prompt, negative_prompt=clip.negative_prompt, width=clip.width, height=clip.height,
                      num_frames=clip.frames, steps=clip.steps, guidance=clip.guidance, shift=clip.shift,
                      scheduler=clip.scheduler, recipe=clip.recipe, cache=clip.cache,
                      timesteps=tuple(1000.0 * s for s in clip.sigmas) if clip.sigmas else None,
                      loras=tuple(LoraRef(path, strength) for path, strength in clip.loras))
        gpu = PeakGPU() if self.gpu else None
        with PeakRSS() as mem:
            if gpu:
                gpu.__enter__()
            t0 = time.perf_counter()
            res = self.pipe.run(req, noise=noise)
            wall = time.perf_counter() - t0
            if gpu:
                gpu.__exit__()
        st = res.stats
        stages = {k: v for k, v in st.seconds.items() if k != "load"}
        return {"frames": res.frames, "seconds": wall, "stages": stages,
                "step_seconds": list(st.denoise_step_seconds), "num_tokens": st.num_tokens,
                "vae_tiles": st.vae_tiles, "peak_rss": mem.peak_bytes,
                "peak_device": gpu.peak_bytes if gpu else None, "dit_calls": st.dit_calls,
                "block_stack_runs": st.cache.block_stack_runs, "block_stack_skips": st.cache.block_stack_skips,
                "cache_mask": st.cache.mask, "lora_seconds": st.lora_merge_seconds,
                "lora_bytes": st.lora_merge_bytes}


# ---- diffusers -------------------------------------------------------------------------------------


def official_unipc(shift: float) -> Any:
    """wan22's FlowUniPCMultistepScheduler, as Wan's text2video.py configures it (shift=1 at
    construction, the real shift in set_timesteps). The `wan` package's __init__ imports every
    pipeline (flash_attn, CUDA), so only the leaf module is imported, under stub parent packages."""
    if "wan" not in sys.modules:
        spec = importlib.util.find_spec("wan")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("the official `wan` package is missing: pip install --no-deps wan22")
        root = Path(list(spec.submodule_search_locations)[0])
        for name, path in (("wan", root), ("wan.utils", root / "utils")):
            mod = types.ModuleType(name)
            mod.__path__ = [str(path)]
            sys.modules[name] = mod
    base = importlib.import_module("wan.utils.fm_solvers_unipc").FlowUniPCMultistepScheduler

    class OfficialUniPC(base):  # type: ignore[misc, valid-type]
        def set_timesteps(self, num_inference_steps: int, device: Any = None, **_: Any) -> Any:
            return super().set_timesteps(num_inference_steps, device=device, shift=shift)

    return OfficialUniPC(num_train_timesteps=1000, shift=1, use_dynamic_shifting=False)


def distill_euler(shift: float, sigmas: tuple[float, ...]) -> Any:
    """diffusers' FlowMatchEulerDiscreteScheduler over an explicit sigma list (shifted by `shift` inside
    set_timesteps, as LightX2V shifts its timestep list: fast_paths.md B.1). WanPipeline calls
    set_timesteps(num_inference_steps) only, so the list is bound here."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    class DistillEuler(FlowMatchEulerDiscreteScheduler):  # type: ignore[misc]
        def set_timesteps(self, num_inference_steps: int | None = None, device: Any = None, **_: Any) -> Any:
            return super().set_timesteps(sigmas=list(sigmas), device=device)

    return DistillEuler(num_train_timesteps=1000, shift=shift)


def reference_cache_config(spec: dict[str, Any]) -> Any:
    """{"kind": "magcache"|"fbcache", ...} -> diffusers' MagCacheConfig / FirstBlockCacheConfig."""
    from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig

    cfg = {k: v for k, v in spec.items() if k != "kind"}
    return MagCacheConfig(**cfg) if spec["kind"] == "magcache" else FirstBlockCacheConfig(**cfg)


class DiffusersSide:
    def __init__(self, checkpoint: str, threads: int | None, device: str) -> None:
        import torch
        from diffusers import WanPipeline

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.device = device
        self.pipe = WanPipeline.from_pretrained(checkpoint, scheduler=official_unipc(5.0))  # fp32 (the default)
        self.pipe.text_encoder.config._attn_implementation = "eager"
        self.pipe.set_progress_bar_config(disable=True)
        self.pipe.to(device)
        # stage clocks: wrap the pipeline's own text encoding and VAE decode
        self.marks: dict[str, float] = {}
        encode, decode = self.pipe.encode_prompt, self.pipe.vae.decode

        def timed_encode(*a: Any, **k: Any) -> Any:
            self._sync()
            t0 = time.perf_counter()
            out = encode(*a, **k)
            self._sync()
            self.marks["text"] = self.marks.get("text", 0.0) + time.perf_counter() - t0
            self.marks["text_end"] = time.perf_counter()
            return out

        def timed_decode(*a: Any, **k: Any) -> Any:
            self._sync()
            t0 = time.perf_counter()
            self.marks["denoise_end"] = t0
            out = decode(*a, **k)
            self._sync()
            self.marks["decode"] = time.perf_counter() - t0
            return out

        self.pipe.encode_prompt = timed_encode
        self.pipe.vae.decode = timed_decode
        # counters: DiT forwards (diffusers runs cond and uncond as two batch-1 calls) and real runs of the
        # last block (its FFN is called only when the block computes, not when a cache hook skips it)
        self.counts = {"forwards": 0, "last_block": 0}
        tr = self.pipe.transformer
        tr.register_forward_pre_hook(lambda *_: self._count("forwards"))
        tr.blocks[-1].ffn.register_forward_pre_hook(lambda *_: self._count("last_block"))
        self._sched_key: tuple[Any, ...] | None = None
        self._loras: tuple[tuple[str, float], ...] = ()
        self._cache: dict[str, Any] | None = None

    def _count(self, what: str) -> None:
        self.counts[what] += 1

    def _prepare(self, clip: Clip) -> float:
        """Scheduler, LoRAs and cache hook for this clip; returns the seconds spent loading LoRAs."""
        key = (clip.scheduler, clip.shift, clip.sigmas)
        if self._sched_key != key:
            self.pipe.scheduler = (official_unipc(clip.shift) if clip.scheduler == "unipc"
                                   else distill_euler(clip.shift, tuple(clip.sigmas or ())))
            self._sched_key = key
        lora_s = 0.0
        want = tuple((str(p), float(w)) for p, w in clip.reference_loras)
        if want != self._loras:
            t0 = time.perf_counter()
            if self._loras:
                self.pipe.unload_lora_weights()
            names = [f"lora{i}" for i in range(len(want))]
            for name, (path, _) in zip(names, want, strict=True):
                # low_cpu_mem_usage=False: with diff_b on some modules only, the default path leaves biases
                # on the meta device (tests/test_lora.py)
                self.pipe.load_lora_weights(path, adapter_name=name, low_cpu_mem_usage=False)
            if want:
                self.pipe.set_adapters(names, [w for _, w in want])
            self._loras = want
            lora_s = time.perf_counter() - t0
        if clip.reference_cache != self._cache:
            if self._cache is not None:
                self.pipe.transformer.disable_cache()
            if clip.reference_cache is not None:
                self.pipe.transformer.enable_cache(reference_cache_config(clip.reference_cache))
            self._cache = clip.reference_cache
        return lora_s

    def _sync(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def run(self, clip: Clip, noise: np.ndarray) -> dict[str, Any]:
        torch = self.torch
        t_prep = time.perf_counter()
        lora_s = self._prepare(clip)
        prep_s = time.perf_counter() - t_prep
        self.marks = {}
        self.counts = {k: 0 for k in self.counts}
        steps: list[float] = []

        def on_step(pipe: Any, i: int, t: Any, kw: dict[str, Any]) -> dict[str, Any]:
            self._sync()
            steps.append(time.perf_counter())
            return {}

        latents = torch.from_numpy(noise)[None].to(self.device)
        gpu = PeakGPU() if self.device == "cuda" else None
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        with PeakRSS() as mem, torch.inference_mode():
            if gpu:
                gpu.__enter__()
            t0 = time.perf_counter()
            out = self.pipe(prompt=clip.prompt, negative_prompt=clip.negative_prompt, height=clip.height,
                            width=clip.width, num_frames=clip.frames, num_inference_steps=clip.steps,
                            guidance_scale=clip.guidance, latents=latents, output_type="np",
                            callback_on_step_end=on_step).frames[0]
            frames = _to_uint8(out)
            self._sync()
            wall = time.perf_counter() - t0
            if gpu:
                gpu.__exit__()
        text_end = self.marks.get("text_end", t0)
        bounds = [text_end, *steps]
        step_s = [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        denoise = self.marks.get("denoise_end", bounds[-1]) - text_end
        stages = {"text": self.marks.get("text", 0.0), "denoise": denoise, "decode": self.marks.get("decode", 0.0)}
        stages["write"] = max(0.0, wall - sum(stages.values()))  # prompt checks, latents->frames postprocess, uint8
        dev = None
        if gpu:
            dev = max(gpu.peak_bytes, int(torch.cuda.max_memory_reserved()))
        fwd = self.counts["forwards"]
        per_step = fwd / len(steps) if steps else 1.0  # 2 with CFG (cond + uncond), 1 without
        # loading a LoRA (first clip after a change) counts in this clip's seconds, as vidrt's merge does
        return {"frames": frames, "seconds": wall + (prep_s if lora_s else 0.0), "stages": stages,
                "step_seconds": step_s, "peak_rss": mem.peak_bytes, "peak_device": dev, "dit_calls": fwd,
                "block_stack_runs": self.counts["last_block"] / per_step, "lora_seconds": lora_s}


# ---- the process loop ------------------------------------------------------------------------------


def _serve(conn: Any, side: str, target: str, threads: int | None, backend: str, device: str,
           open_all: bool = True) -> None:
    try:
        t0 = time.perf_counter()
        with PeakRSS() as mem:
            obj: Any = (VidrtSide(target, threads, backend, device, open_all) if side == "vidrt"
                        else DiffusersSide(target, threads, device))
        conn.send({"ok": True, "load_seconds": time.perf_counter() - t0, "load_peak_rss": mem.peak_bytes,
                   "rss_after_load": rss_bytes(), "torch_imported": "torch" in sys.modules})
        while True:
            msg = conn.recv()
            if msg[0] == "quit":
                return
            _, clip_d, noise = msg
            c0 = time.process_time()
            out = obj.run(Clip(**clip_d), noise)
            # CPU seconds of the process (all its threads): on a shared machine, where the two sides may
            # run at different loads, the figure the other tenants disturb least
            out["cpu_seconds"] = time.process_time() - c0
            out["torch_imported"] = "torch" in sys.modules
            out["rss_after"] = rss_bytes()  # sessions, weights, arenas as they stay between clips
            conn.send({"ok": True, **out})
    except Exception as exc:  # report, do not hang the parent
        conn.send({"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})


class Worker:
    """A side in its own (spawned, not forked) process."""

    def __init__(self, side: str, target: Path, threads: int | None, backend: str = "auto",
                 device: str = "cpu", open_all: bool = True) -> None:
        ctx = mp.get_context("spawn")
        self.side = side
        self.conn, child = ctx.Pipe()
        env_threads = str(threads) if threads else None
        if env_threads:  # OpenMP / MKL pools of torch size themselves from these at import
            os.environ.setdefault("OMP_NUM_THREADS", env_threads)
        self.proc = ctx.Process(target=_serve, args=(child, side, str(target), threads, backend, device, open_all),
                                daemon=True, name=f"bench-{side}")
        self.proc.start()
        self.info = self._recv()

    def _recv(self) -> dict[str, Any]:
        while not self.conn.poll(1.0):
            if not self.proc.is_alive():
                raise RuntimeError(f"{self.side} worker died (exit code {self.proc.exitcode}); out of memory?")
        msg: dict[str, Any] = self.conn.recv()
        if not msg.pop("ok"):
            raise RuntimeError(f"{self.side} worker failed: {msg['error']}\n{msg['traceback']}")
        return msg

    def run(self, clip: Clip, noise: np.ndarray) -> dict[str, Any]:
        self.conn.send(("run", asdict(clip), noise))
        return self._recv()

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send(("quit",))
            except OSError:
                pass
            self.proc.join(timeout=30)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(timeout=10)
