"""FP8 quality on the CPU: the bundled tiny model's DiT quantised with ModelOpt (E4M3, per tensor),
exported with standard ONNX Q/DQ nodes and run by ONNX Runtime, against the fp32 package.

    .venv/bin/python -m benchmarks.fp8_quality [--scope linear ffn] [--keep-blocks 0] [--grid-seeds 1000 1001]

Steps, per scope:
  1. calibration: the DiT inputs of the fp32 package recorded at every denoising step (cond and
     uncond in one batch) for a few prompts at a calibration seed the evaluation does not use;
  2. `quantize_dit` (ModelOpt `max` calibration) on the checkpoint's DiT;
  3. `vidrt.export.quantize_fp8.export_fp8_dit` (what `vidrt export --precision fp8` uses): the
     TorchScript exporter at opset 19, ModelOpt's `trt::TRT_FP8*` ops rewritten to standard ONNX
     QuantizeLinear / DequantizeLinear with a FLOAT8E4M3FN zero point (ONNX Runtime's CPU runs it);
  4. a copy of the package with that dit.onnx (manifest re-hashed, precision "fp8");
  5. the same requests (prompt, seed, hence the same noise) through both packages: PSNR of the
     frames, and the 72-prompt grid judged from pixels (tests/test_default_model.py).

The tiny DiT has 4 blocks: ModelOpt's Wan default (keep the first and last 3 blocks high precision)
would quantise nothing, so the blocks kept here are an option (default 0: every block).
Writes benchmarks/results/fp8-quality.json and .txt.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from vidrt.export.shapes_data import classify_clip, grid, prompt_for, score
from vidrt.models import default_package
from vidrt.package.manifest import load_manifest, make_artifact, write_manifest
from vidrt.pipeline import Pipeline
from vidrt.request import Request

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "checkpoints" / "tiny-shapes"
RESULTS = Path(__file__).resolve().parent / "results"
OPSET = 19  # vidrt.export.quantize_fp8.FP8_OPSET (imported lazily: it needs torch)
CALIBRATION_SEED = 7
CALIBRATION_PROMPTS = ("a red circle moving left", "a green square moving up", "a blue triangle moving right",
                       "a yellow circle moving down")


def record_dit_inputs(pipe: Pipeline, prompts: tuple[str, ...], seed: int) -> list[dict[str, Any]]:
    """The DiT feeds of every denoising step of `prompts` (vidrt.export.quantize_fp8's recorder)."""
    from vidrt.export.quantize_fp8 import record_dit_inputs as record

    return record(pipe, prompts, seed)["dit"]


def fp8_package(source: Path, dit_onnx: Path, dest: Path) -> Path:
    """A copy of `source` whose dit.onnx is the FP8 graph (manifest re-hashed, precision fp8)."""
    shutil.copytree(source, dest)
    manifest = load_manifest(dest)
    comp = manifest.components["dit"]
    shutil.copyfile(dit_onnx, dest / comp.artifact.file)
    comp = dataclasses.replace(comp, artifact=make_artifact(dest, comp.artifact.file), precision="fp8", opset=OPSET)
    write_manifest(dest, dataclasses.replace(manifest, components={**manifest.components, "dit": comp}))
    return dest


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def compare(ref: Pipeline, test: Pipeline, seeds: tuple[int, ...], psnr_prompts: int) -> dict[str, Any]:
    """The grid through both pipelines, same requests. PSNR on the first `psnr_prompts` grid cells."""
    cells = list(grid())
    judged: dict[str, list[Any]] = {"fp32": [], "fp8": []}
    psnrs = []
    seconds = {"fp32": 0.0, "fp8": 0.0}
    for seed in seeds:
        for i, (colour, shape, direction) in enumerate(cells):
            req = Request(prompt=prompt_for(colour, shape, direction), seed=seed)
            frames = {}
            for name, pipe in (("fp32", ref), ("fp8", test)):
                t0 = time.perf_counter()
                frames[name] = pipe.run(req).frames
                seconds[name] += time.perf_counter() - t0
                judged[name].append((classify_clip(frames[name]), (colour, direction)))
            if seed == seeds[0] and i < psnr_prompts:
                psnrs.append(psnr(frames["fp32"], frames["fp8"]))
    finite = [p for p in psnrs if np.isfinite(p)]
    clips = len(judged["fp32"])
    return {
        "psnr_db": {"clips": len(psnrs), "seed": seeds[0], "mean": float(np.mean(finite)) if finite else None,
                    "min": min(psnrs), "max": max(psnrs), "identical_clips": len(psnrs) - len(finite),
                    "per_clip": [round(p, 2) if np.isfinite(p) else None for p in psnrs]},
        "grid": {name: score(r) for name, r in judged.items()} | {"seeds": list(seeds), "clips": clips},
        "seconds_per_clip": {k: v / clips for k, v in seconds.items()},
    }


def dit_error(ref: Pipeline, test: Pipeline, batches: list[dict[str, Any]]) -> float:
    """Relative L2 error of the FP8 DiT graph against the fp32 one on recorded (held-out) inputs."""
    num = den = 0.0
    for b in batches:
        feeds = {k: v.numpy() for k, v in b.items() if k != "return_dict"}
        a = ref.engine("dit").run(feeds)["noise_pred"]
        q = test.engine("dit").run(feeds)["noise_pred"]
        num += float(np.sum((a - q) ** 2))
        den += float(np.sum(a ** 2))
    return (num / den) ** 0.5


def run_scope(scope: str, keep_blocks: int, ref: Pipeline, calib: list[dict[str, Any]],
              held_out: list[dict[str, Any]], args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import modelopt
    from vidrt.export.checkpoints import open_checkpoint
    from vidrt.export.quantize_fp8 import export_fp8_dit, quantize_dit, quantized_layers

    ck = open_checkpoint(CHECKPOINT)
    model = ck.transformer("dit").eval()
    layers = model.config.num_layers
    t0 = time.perf_counter()
    quantize_dit(model, calib, num_layers=layers, scope=scope, keep_blocks=keep_blocks)
    quant_s = time.perf_counter() - t0
    onnx_path = work / f"dit-fp8-{scope}.onnx"
    t0 = time.perf_counter()
    export = export_fp8_dit(model, ck.spec, onnx_path)
    export["seconds"] = time.perf_counter() - t0
    package = fp8_package(ref.package, onnx_path, work / f"tiny-shapes-fp8-{scope}")
    test = Pipeline.load(package)
    out = {"scope": scope, "keep_blocks": keep_blocks, "num_layers": layers, "modelopt": modelopt.__version__,
           "quantized_layers": len(quantized_layers(model)), "calibration_seconds": quant_s, "export": export,
           "dit_relative_l2_error": dit_error(ref, test, held_out)}
    out |= compare(ref, test, tuple(args.grid_seeds), args.psnr_prompts)
    return out


def summary(res: dict[str, Any]) -> str:
    lines = [f"FP8 (E4M3 per tensor, ModelOpt {res['scopes'][0]['modelopt']}) vs fp32, tiny-shapes DiT on "
             f"ONNX Runtime {res['onnxruntime']} CPU; calibration: {res['calibration']['batches']} DiT batches "
             f"({len(CALIBRATION_PROMPTS)} prompts x {res['calibration']['steps']} steps, seed {CALIBRATION_SEED})"]
    for s in res["scopes"]:
        p, g = s["psnr_db"], s["grid"]
        lines.append(f"scope {s['scope']}, keep_blocks {s['keep_blocks']}: {s['quantized_layers']} Linear layers FP8, "
                     f"{s['export']['qdq_pairs']} Q/DQ pairs, opset {s['export']['opset']}")
        lines.append(f"  DiT relative L2 error (held-out step inputs): {s['dit_relative_l2_error']:.4f}")
        lines.append(f"  frame PSNR fp8 vs fp32 over {p['clips']} clips (seed {p['seed']}): mean {p['mean']:.2f} dB, "
                     f"min {p['min']:.2f}, max {p['max']:.2f}")
        for name in ("fp32", "fp8"):
            lines.append(f"  grid {name}: {g['clips']} clips, colour {g[name]['colour']:.1%}, direction "
                         f"{g[name]['direction']:.1%}, both {g[name]['both']:.1%}")
        sp = s["seconds_per_clip"]
        lines.append(f"  seconds per clip: fp32 {sp['fp32']:.3f}, fp8 {sp['fp8']:.3f} (Q/DQ is simulated on the CPU)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import onnxruntime

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scope", nargs="+", default=["linear", "ffn"], choices=["linear", "ffn"])
    ap.add_argument("--keep-blocks", type=int, default=0)
    ap.add_argument("--grid-seeds", type=int, nargs="+", default=[1000, 1001])
    ap.add_argument("--psnr-prompts", type=int, default=12)
    ap.add_argument("--out", type=Path, default=RESULTS / "fp8-quality.json")
    args = ap.parse_args(argv)

    source = default_package()
    assert source is not None, "runtime/models/tiny-shapes is missing: run `make default-model`"
    ref = Pipeline.load(source)
    calib = record_dit_inputs(ref, CALIBRATION_PROMPTS, CALIBRATION_SEED)
    held_out = record_dit_inputs(ref, ("a purple square moving left",), CALIBRATION_SEED + 1)[::5]
    res: dict[str, Any] = {"onnxruntime": onnxruntime.__version__, "package": str(source.relative_to(ROOT)),
                           "calibration": {"batches": len(calib), "steps": ref.manifest.model.sampling.steps,
                                           "seed": CALIBRATION_SEED, "prompts": list(CALIBRATION_PROMPTS)},
                           "scopes": []}
    with tempfile.TemporaryDirectory(prefix="vidrt-fp8-") as tmp:
        for scope in args.scope:
            res["scopes"].append(run_scope(scope, args.keep_blocks, ref, calib, held_out, args, Path(tmp)))
            print(summary(res), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    args.out.with_suffix(".txt").write_text(summary(res))
    print(f"wrote {args.out} and {args.out.with_suffix('.txt')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
