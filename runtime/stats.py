"""Per-stage wall-clock timings of one run, printable as a table and serialisable as JSON."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from vidrt.caching import CacheStats

STAGES = ("load", "text", "denoise", "decode", "write")


@dataclass
class RunStats:
    seconds: dict[str, float] = field(default_factory=lambda: {s: 0.0 for s in STAGES})
    denoise_step_seconds: list[float] = field(default_factory=list)
    num_tokens: int = 0
    vae_tiles: int = 0
    backend: str = ""
    lora_merge_seconds: float = 0.0  # LoRA merges this run made (inside "denoise": engines open on first use)
    lora_merge_bytes: int = 0  # the largest set of merged tensors one merge held (its peak extra memory)
    dit_calls: int = 0  # DiT evaluations for the clip, one per batch row (a batch-2 CFG call is two)
    gpu: dict[str, object] = field(default_factory=dict)  # TensorRT: GPU seconds per stage, peak memory
    cache: CacheStats = field(default_factory=CacheStats)  # block-stack runs/skips, residual memory

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    @property
    def total_seconds(self) -> float:
        return sum(v for k, v in self.seconds.items() if k != "load")

    def table(self) -> str:
        """Stage | seconds | share of the clip's time (load is shown but not counted in the share)."""
        total = self.total_seconds or 1e-12
        rows = [f"{'stage':<10}{'seconds':>10}{'share':>8}"]
        for name, sec in self.seconds.items():
            share = "" if name == "load" else f"{100 * sec / total:6.1f}%"
            rows.append(f"{name:<10}{sec:>10.3f}{share:>8}")
        rows.append(f"{'total':<10}{self.total_seconds:>10.3f}{'100.0%':>8}")
        if self.denoise_step_seconds:
            steps = sorted(self.denoise_step_seconds)
            rows.append(f"denoise step median {steps[len(steps) // 2]:.3f} s over {len(steps)} steps, "
                        f"{self.num_tokens} tokens, {self.dit_calls} DiT calls")
        if self.lora_merge_bytes:
            refit = self.gpu.get("lora_refit_seconds")  # TensorRT: the merged weights refitted into the engines
            rows.append(f"LoRA merge {self.lora_merge_seconds:.3f} s, {self.lora_merge_bytes / 2**20:.1f} MiB merged"
                        + (f"; refit {refit:.3f} s, {int(self.gpu.get('lora_refit_bytes', 0)) / 2**20:.1f} MiB"
                           if isinstance(refit, float) else ""))
        if self.cache.method != "none":
            c = self.cache
            rows.append(f"cache {c.method}: block stack ran {c.block_stack_runs} times, skipped "
                        f"{c.block_stack_skips} ({c.residual_bytes / 2**20:.1f} MiB residuals)")
        return "\n".join(rows)

    def to_dict(self) -> dict[str, object]:
        return {"seconds": dict(self.seconds), "total_seconds": self.total_seconds,
                "denoise_step_seconds": list(self.denoise_step_seconds),
                "num_tokens": self.num_tokens, "vae_tiles": self.vae_tiles, "backend": self.backend,
                "dit_calls": self.dit_calls, "lora_merge_seconds": self.lora_merge_seconds,
                "lora_merge_bytes": self.lora_merge_bytes, "cache": self.cache.method,
                "block_stack_runs": self.cache.block_stack_runs, "block_stack_skips": self.cache.block_stack_skips,
                "residual_bytes": self.cache.residual_bytes, "cache_mask": self.cache.mask} | \
            ({"gpu": dict(self.gpu)} if self.gpu else {})
