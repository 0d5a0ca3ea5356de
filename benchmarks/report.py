"""Summaries, the on-screen tables and the scaling plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

STAGE_ORDER = ("text", "denoise", "decode", "write")


def _med(xs: list[float]) -> float:
    return float(np.median(xs)) if xs else float("nan")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def summarize(runs: list[dict[str, Any]], info: dict[str, Any]) -> dict[str, Any]:
    """Timed runs of one side -> median/min/max seconds, median stages, step seconds, peak memory."""
    secs = [r["seconds"] for r in runs]
    steps = [s for r in runs for s in r["step_seconds"]]
    stages = {k: _med([r["stages"].get(k, 0.0) for r in runs]) for k in STAGE_ORDER}
    dev = [r["peak_device"] for r in runs if r.get("peak_device") is not None]
    return {
        "runs": len(runs), "seconds_median": _med(secs), "seconds_min": min(secs), "seconds_max": max(secs),
        "seconds_all": secs, "stages_median": stages, "denoise_step_median": _med(steps),
        "denoise_step_min": min(steps) if steps else None, "peak_rss_bytes": max(r["peak_rss"] for r in runs),
        "peak_device_bytes": max(dev) if dev else None, "load_seconds": info.get("load_seconds"),
        "rss_after_load_bytes": info.get("rss_after_load"), "rss_between_clips_bytes": runs[-1].get("rss_after"),
        "torch_imported": any(r.get("torch_imported") for r in runs),
    }


def _mib(b: float | None) -> str:
    return "-" if b is None else f"{b / 2**20:,.0f} MiB"


def _s(x: float | None) -> str:
    if x is None or x != x:
        return "-"
    return f"{x:.3f} s" if x < 10 else f"{x:.1f} s"


def _gflops(x: float | None) -> str:
    return "-" if not x else f"{x / 1e9:,.1f} GFLOP/s"


def workload_table(w: dict[str, Any]) -> str:
    c = w["clip"]
    sides = [s for s in ("vidrt", "diffusers") if s in w["sides"]]
    head = (f"== {w['name']}: {w['note']}\n   {c['width']}x{c['height']}, {c['frames']} frames, {c['steps']} steps, "
            f"guidance {c['guidance']}, shift {c['shift']}, {w['tokens']} tokens; threads {w['threads']}; "
            f"warm-up then {w['pairs']} pair(s), alternating which side runs first")
    col = 24
    rows = [f"{'':<22}" + "".join(f"{w['labels'][s]:>{col}}" for s in sides)]

    def line(label: str, fn: Any) -> None:
        rows.append(f"{label:<22}" + "".join(f"{fn(w['sides'][s]):>{col}}" for s in sides))

    line("seconds/clip median", lambda s: _s(s["seconds_median"]))
    line("  min .. max", lambda s: f"{_s(s['seconds_min'])} .. {_s(s['seconds_max'])}")
    line("  text", lambda s: _s(s["stages_median"]["text"]))
    line("  denoise", lambda s: _s(s["stages_median"]["denoise"]))
    line("    per step (median)", lambda s: _s(s["denoise_step_median"]))
    line("  decode", lambda s: _s(s["stages_median"]["decode"]))
    line("  write/postprocess", lambda s: _s(s["stages_median"]["write"]))
    line("peak RSS (run)", lambda s: _mib(s["peak_rss_bytes"]))
    if any(w["sides"][s].get("peak_device_bytes") for s in sides):
        line("peak device memory", lambda s: _mib(s["peak_device_bytes"]))
    line("RSS between clips", lambda s: _mib(s["rss_between_clips_bytes"]))
    line("load (before warm-up)", lambda s: _s(s["load_seconds"]))
    if "flops" in w:
        line("DiT step achieved", lambda s: _gflops(s.get("achieved_flops")))
        line("  of measured peak", lambda s: f"{100 * s['peak_fraction']:.0f} %" if s.get("peak_fraction") else "-")
    out = [head, *rows]
    if "ratios" in w:
        r = w["ratios"]
        out.append(f"diffusers / vidrt seconds per pair: {', '.join(f'{x:.2f}' for x in r['per_pair'])}"
                   f"  -> median {r['median']:.2f}x (denoise step {r['step_median']:.2f}x, "
                   f"decode {r['decode_median']:.2f}x)")
    if "psnr_db" in w:
        out.append(f"output agreement: PSNR vidrt vs diffusers {w['psnr_db']:.1f} dB (min over pairs; "
                   f"frame std {w['frame_std']:.1f} of 255)")
    if "flops" in w:
        f = w["flops"]
        out.append(f"DiT step = {f['step']:.3g} FLOP ({f['tokens']} tokens, CFG x2; "
                   f"attention {100 * f['attention_share']:.1f} %, "
                   f"text K/V projection {100 * f['text_kv_share']:.0f} %)")
    return "\n".join(out)


def scaling_table(rows: list[dict[str, Any]]) -> str:
    out = [f"{'what':<12}{'size':>14}{'tokens':>8}{'seconds':>10}{'tiles':>7}{'tile':>9}"
           f"{'peak RSS':>12}{'over load':>12}"]
    for r in rows:
        size = f"{r['width']}x{r['height']}x{r['frames']}"
        tiles = str(r.get("tiles", "")) if r["what"] != "dit_step" else ""
        tile = "x".join(map(str, r["tile_shape"])) if r["what"] != "dit_step" else ""
        out.append(f"{r['what']:<12}{size:>14}{r['tokens']:>8}{r['seconds']:>10.3f}{tiles:>7}{tile:>9}"
                   f"{r['peak_rss'] / 2**20:>8,.0f} MiB{r['above_load'] / 2**20:>8,.0f} MiB")
    return "\n".join(out)


def flops_table(rows: list[dict[str, Any]], peak: dict[str, float] | None) -> str:
    out = [f"{'model':<18}{'size':>16}{'tokens':>8}{'FLOP/forward':>14}{'FLOP/step (CFG)':>17}{'steps':>6}"
           f"{'FLOP/clip':>11}{'attn':>6}{'  hours at peak':>16}"]
    for r in rows:
        hours = f"{r['clip_flops'] / peak['peak_flops'] / 3600:>16,.0f}" if peak else f"{'-':>16}"
        size = f"{r['width']}x{r['height']}x{r['frames']}"
        out.append(f"{r['model']:<18}{size:>16}{r['tokens']:>8}{r['forward_flops']:>14.3g}"
                   f"{r['step_flops']:>17.3g}{r['steps']:>6}{r['clip_flops']:>11.3g}"
                   f"{100 * r['attention_share']:>5.0f}%{hours}")
    if peak:
        out.append(f"measured fp32 GEMM peak ({int(peak['gemm_n'])}^3): numpy {peak['numpy_gemm_flops'] / 1e9:.1f}, "
                   f"ONNX Runtime {peak['ort_gemm_flops'] / 1e9:.1f} GFLOP/s")
    return "\n".join(out)


def plot_scaling(rows: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"dit_step": ("DiT step (batch 2)", "o-"), "vae_untiled": ("VAE decode, untiled", "s-"),
              "vae_tiled": ("VAE decode, tiled (2x2 budget)", "^--")}
    for what, (label, style) in styles.items():
        pts = sorted((r["tokens"], r["seconds"], r["peak_rss"], r["above_load"]) for r in rows if r["what"] == what)
        if not pts:
            continue
        x = [p[0] for p in pts]
        ax_t.plot(x, [p[1] for p in pts], style, label=label)
        ax_m.plot(x, [p[3] / 2**20 for p in pts], style, label=label)
    ax_t.set(xlabel="tokens (latent F x H/2 x W/2)", ylabel="seconds", title="time", xscale="log", yscale="log")
    ax_m.set(xlabel="tokens (latent F x H/2 x W/2)", ylabel="MiB", title="peak RSS above the loaded session",
             xscale="log")
    for ax in (ax_t, ax_m):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
