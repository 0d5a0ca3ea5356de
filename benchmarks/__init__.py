"""vidrt benchmark suite: seconds per clip, per-stage split, peak memory, side by side with diffusers.

    python -m benchmarks.run [--quick] [--workloads tiny,wan1.3b] [--runs N] [--out benchmarks/results]
    vidrt bench ...            (same options; lazily imports this package)
    make bench                 (= python -m benchmarks.run --quick)

Modules: workloads (the checkpoints and their exported packages), workers (one process per side,
driven alternately, A B then B A), machine (CPU/GPU/library versions), memory (peak RSS / device memory),
flops (dit_flops + measured GEMM peak), scaling (cost growth of the DiT step and the VAE decode),
report (table + JSON + plot).
"""
