"""Distil the bundled tiny model's 25-step CFG sampler into a 4-step CFG-free Euler LoRA (issue 12 item 4).

    nice -n 10 python -m vidrt.export.distill_tiny --model checkpoints/tiny-shapes \
        --out checkpoints/tiny-shapes/fast_lora.safetensors [--steps 800] [--rank 16]

Teacher: the bundled model as shipped, sampled as the runtime samples it (sampling_defaults.json:
official UniPC, 25 steps, CFG at its guidance and shift; `train_tiny.sample_latents`), from seeded
noise, for every grid prompt x `--teacher-seeds` seeds (seeds 2000.., not the grid test's 1000/1001).
Student: the same DiT with rank-r LoRA pairs on every block Linear (self/cross-attention q, k, v, o and
the two FFN layers), sampled with the `fast` recipe: Euler over timesteps 1000, 750, 500, 250 shifted by
SHIFT, guidance 1 (one conditional pass). Objective, on the student's own trajectory (rolled out without
gradients from the teacher's noise): at every step i, the student's x0 estimate x_i - sigma_i * v equals
the teacher's final sample, i.e. each Euler step heads straight for where the teacher ends.

Output: a LoRA file in the original Wan / ComfyUI / LightX2V key format (fast_paths.md A.2:
`diffusion_model.blocks.N.self_attn.q.lora_down.weight`, `.lora_up.weight`, `.alpha`), float32,
plus a JSON log beside it. Seeded and step-counted.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from vidrt.export import shapes_data as sd
from vidrt.export import train_tiny as tt

TIMESTEPS = (1000.0, 750.0, 500.0, 250.0)
SHIFT = 3.0
# diffusers module path (inside a block) -> original Wan path: the LoRA targets (export/keymaps.py DIT)
TARGETS = {"attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
           "attn1.to_out.0": "self_attn.o", "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k",
           "attn2.to_v": "cross_attn.v", "attn2.to_out.0": "cross_attn.o", "ffn.net.0.proj": "ffn.0",
           "ffn.net.2": "ffn.2"}


class LoRALinear(nn.Module):
    """base(x) + (alpha / r) * B(A(x)); A [r, in] small random, B [out, r] zero (the base model at start)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base, self.scale = base, alpha / rank
        self.down = nn.Parameter(torch.randn(rank, base.in_features) / base.in_features**0.5)
        self.up = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.down.T @ self.up.T) * self.scale


def add_lora(dit: nn.Module, rank: int, alpha: float) -> dict[str, LoRALinear]:
    out = {}
    for b, block in enumerate(dit.blocks):
        for path in TARGETS:
            *parents, leaf = path.split(".")
            owner = block
            for p in parents:
                owner = owner[int(p)] if p.isdigit() else getattr(owner, p)
            base = owner[int(leaf)] if leaf.isdigit() else getattr(owner, leaf)
            wrapped = LoRALinear(base, rank, alpha)
            if leaf.isdigit():
                owner[int(leaf)] = wrapped
            else:
                setattr(owner, leaf, wrapped)
            out[f"blocks.{b}.{path}"] = wrapped
    return out


def lora_state_dict(modules: dict[str, LoRALinear], rank: int, alpha: float) -> dict[str, torch.Tensor]:
    """Original Wan key format with lora_down / lora_up / alpha (what ComfyUI and LightX2V read)."""
    sdict = {}
    for path, m in modules.items():
        b, rest = path.split(".", 2)[1], path.split(".", 2)[2]
        key = f"diffusion_model.blocks.{b}.{TARGETS[rest]}"
        sdict[f"{key}.lora_down.weight"] = m.down.detach().float().contiguous()
        sdict[f"{key}.lora_up.weight"] = m.up.detach().float().contiguous()
        sdict[f"{key}.alpha"] = torch.tensor(float(alpha))
    return sdict


def student_schedule() -> list[tuple[float, float, float]]:
    """(fed timestep, sigma, next sigma) of the runtime's Euler plan (vidrt.schedulers, same numbers)."""
    from vidrt.schedulers import make_schedule

    return [(s.timestep, s.sigma, s.sigma_next) for s in make_schedule("euler", len(TIMESTEPS), SHIFT, 1000, TIMESTEPS)]


def teacher_bank(dit, t5, tok, defaults: dict, seeds: list[int]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    prompts, seed_list = [], []
    for s in seeds:
        for c, sh, d in sd.grid():
            prompts.append(sd.prompt_for(c, sh, d))
            seed_list.append(s)
    lat = (tt.DIT_CONFIG["in_channels"], (sd.NUM_FRAMES - 1) // 4 + 1, sd.SIZE // 8, sd.SIZE // 8)
    noise = np.stack([np.random.default_rng(s).standard_normal(lat, dtype=np.float32) for s in seed_list])
    x0 = tt.sample_latents(dit, t5, tok, prompts, seed_list, defaults["steps"], defaults["shift"],
                           defaults["guidance_scale"], negative=defaults.get("negative_prompt", ""))
    return noise, x0, prompts


def student_sample(dit, proc, ctx, bias, noise: torch.Tensor) -> list[torch.Tensor]:
    """The states entering each Euler step (and the final sample last)."""
    states = [noise]
    x = noise
    proc.bias = bias
    for t, s, s_next in student_schedule():
        with torch.no_grad():
            v = dit(hidden_states=x, timestep=torch.full((len(x),), t), encoder_hidden_states=ctx,
                    return_dict=False)[0]
        x = x + (s_next - s) * v
        states.append(x)
    return states


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=Path("checkpoints/tiny-shapes"))
    ap.add_argument("--out", type=Path, default=Path("checkpoints/tiny-shapes/fast_lora.safetensors"))
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--teacher-seeds", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    from safetensors.torch import save_file

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    log_path = args.out.with_suffix(".log.jsonl")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    log_path.unlink(missing_ok=True)
    t_start = time.time()

    def log(**rec: object) -> None:
        rec = {"wall_s": round(time.time() - t_start, 1), **rec}
        with log_path.open("a") as fh:
            fh.write(json.dumps(rec) + "\n")
        print(json.dumps(rec), flush=True)

    defaults = json.loads((args.model / "sampling_defaults.json").read_text())
    dit, t5, tok = tt.load_dit_t5(args.model)
    for p in list(dit.parameters()) + list(t5.parameters()):
        p.requires_grad_(False)
    noise, x0, prompts = teacher_bank(dit, t5, tok, defaults, [2000 + i for i in range(args.teacher_seeds)])
    log(stage="teacher", samples=len(prompts), defaults=defaults)

    alpha = float(args.rank)  # scale alpha / rank = 1
    modules = add_lora(dit, args.rank, alpha)
    params = [p for m in modules.values() for p in (m.down, m.up)]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    proc = tt.PadCompressedCrossAttn()
    tt.set_cross_attn(dit, proc)
    ids, mask = tt.token_ids(tok, prompts, tt.CTX_ROWS)
    with torch.no_grad():
        ctx_all = tt.encode_text(t5, ids, mask)
    bias_all = tt.pad_bias(mask)
    noise_t, x0_t = torch.from_numpy(noise), torch.from_numpy(x0)
    sched = student_schedule()
    ema = None
    for step in range(args.steps):
        lr = tt.lr_at(step, args.steps, args.lr, warmup=50)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.from_numpy(rng.choice(len(prompts), args.batch, replace=False))
        ctx, bias, target = ctx_all[idx], bias_all[idx], x0_t[idx]
        states = student_sample(dit, proc, ctx, bias, noise_t[idx])
        loss = torch.zeros(())
        for (t, s, _), x in zip(sched, states, strict=False):
            v = dit(hidden_states=x, timestep=torch.full((len(x),), t), encoder_hidden_states=ctx,
                    return_dict=False)[0]
            loss = loss + torch.mean((x - s * v - target) ** 2)
        loss = loss / len(sched)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % 50 == 0 or step == args.steps - 1:
            final = torch.mean((states[-1] - target) ** 2).item()
            log(stage="train", step=step, loss=round(ema, 5), final_mse=round(final, 5), lr=lr)
        if (step + 1) % 200 == 0 or step == args.steps - 1:
            tmp = args.out.with_suffix(".tmp")
            save_file(lora_state_dict(modules, args.rank, alpha), str(tmp),
                      metadata={"format": "wan-original-lora", "rank": str(args.rank), "steps": str(step + 1),
                                "recipe": f"euler {','.join(f'{t:g}' for t in TIMESTEPS)} shift {SHIFT} guidance 1"})
            tmp.replace(args.out)
    log(stage="done", steps=args.steps, out=str(args.out))


if __name__ == "__main__":
    main()
