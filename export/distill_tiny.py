"""Distil the bundled tiny model's 25-step CFG sampler into a 4-step CFG-free Euler LoRA (issue 12 item 4).

    nice -n 10 python -m vidrt.export.distill_tiny --model checkpoints/tiny-shapes \
        --out checkpoints/tiny-shapes/fast_lora.safetensors [--steps 800] [--rank 16]

Teacher: the bundled model as shipped, sampled as the runtime samples it (sampling_defaults.json:
official UniPC, 25 steps, CFG at its guidance and shift; `train_tiny_i2v.sample`), from seeded
noise, for every grid prompt x `--teacher-seeds` seeds (seeds 2000.., not the grid test's 1000/1001),
and in TI2V image mode x `--image-seeds` seeds (2100..; the picture is frame 0 of a random clip of the
prompt; frame 0 re-imposed after every step, its tokens at timestep 0). Only the samples the pixel
judge reads as right are kept (`--keep-all` keeps every one): the student should not learn the
teacher's misses.
Student: the same DiT with rank-r LoRA pairs on every block Linear (self/cross-attention q, k, v, o and
the two FFN layers), sampled with the `fast` recipe: Euler over timesteps 1000, 750, 500, 250 shifted by
SHIFT, guidance 1 (one conditional pass). Objective, on the student's own trajectory (rolled out without
gradients from the teacher's noise): at every step i, the student's x0 estimate x_i - sigma_i * v equals
the teacher's final sample, i.e. each Euler step heads straight for where the teacher ends (image
examples: the same in image mode, no loss on the given frame). `--init` starts the LoRA from an
earlier one (a warm start; the teacher and base are still this model).

Output: a LoRA file in the original Wan / ComfyUI / LightX2V key format (fast_paths.md A.2:
`diffusion_model.blocks.N.self_attn.q.lora_down.weight`, `.lora_up.weight`, `.alpha`), float32,
plus a JSON log beside it. Seeded and step-counted.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from vidrt.export import shapes_data as sd
from vidrt.export import train_tiny as tt
from vidrt.export import train_tiny_i2v as ti

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


@dataclass
class TeacherBank:
    """What the student learns from: per example the noise, the teacher's final latents, the prompt, and (image
    examples) the normalised image latent [z, 1, h, w] (zeros and image False for text-only examples)."""

    noise: np.ndarray
    x0: np.ndarray
    prompts: list[str]
    images: np.ndarray
    image: np.ndarray  # bool [N]

    def subset(self, keep: np.ndarray) -> TeacherBank:
        return TeacherBank(self.noise[keep], self.x0[keep], [p for p, k in zip(self.prompts, keep, strict=True) if k],
                           self.images[keep], self.image[keep])


def teacher_bank(vae, mean, std, dit, t5, tok, defaults: dict, seeds: list[int], image_seeds: list[int]
                 ) -> tuple[TeacherBank, np.ndarray]:
    """The teacher's samples for every grid prompt x `seeds` (text only) and x `image_seeds` (image mode: the
    picture is frame 0 of a random clip of that prompt, so its position suits the motion); and which of them the
    pixel judge reads as right (colour of the prompt / picture, direction of the prompt)."""
    lat = (tt.DIT_CONFIG["in_channels"], (sd.NUM_FRAMES - 1) // 4 + 1, sd.SIZE // 8, sd.SIZE // 8)
    args = (defaults["steps"], defaults["shift"], defaults["guidance_scale"])
    neg = defaults.get("negative_prompt", "")
    parts, right = [], []
    for group, with_image in ((seeds, False), (image_seeds, True)):
        if not group:
            continue
        cases = [(s, c, sh, d) for s in group for c, sh, d in sd.grid()]
        prompts = [sd.prompt_for(c, sh, d) for _, c, sh, d in cases]
        seed_list = [s for s, *_ in cases]
        noise = np.stack([np.random.default_rng(s).standard_normal(lat, dtype=np.float32) for s in seed_list])
        images = np.zeros((len(cases), lat[0], 1, *lat[2:]), np.float32)
        if with_image:
            rng = np.random.default_rng(group[0])
            pics = np.stack([sd.render(sd.random_spec(rng, c, sh, d))[0] for _, c, sh, d in cases])
            images = ti.encode_pictures(vae, mean, std, pics).numpy()
        x0 = ti.sample(dit, t5, tok, prompts, seed_list, *args, images=torch.from_numpy(images) if with_image else None,
                       negative=neg)
        clips = ti.decode(vae, mean, std, x0)
        right += [sd.classify_clip(v) == (c, d) for v, (_, c, _, d) in zip(clips, cases, strict=True)]
        parts.append(TeacherBank(noise, x0, prompts, images, np.full(len(cases), with_image)))
    bank = TeacherBank(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("noise", "x0")),
                       [q for p in parts for q in p.prompts],
                       *(np.concatenate([getattr(p, f) for p in parts]) for f in ("images", "image")))
    return bank, np.asarray(right)


def timesteps(t: float, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """[B, tokens]: t on every token, 0 on the first latent frame's tokens of image examples (TI2V image mode)."""
    _, _, f, h, w = x.shape
    row = torch.full((len(x), f * (h // 2) * (w // 2)), t)
    row[image, :(h // 2) * (w // 2)] = 0.0
    return row


def student_sample(dit, proc, ctx, bias, noise: torch.Tensor, z: torch.Tensor, image: torch.Tensor
                   ) -> list[torch.Tensor]:
    """The states entering each Euler step (and the final sample last); image examples start with frame 0 = z
    and get it re-imposed after every step, as the runtime's FirstFrame policy does."""
    x = noise.clone()
    x[image, :, :1] = z[image]
    states = [x]
    proc.bias = bias
    for t, s, s_next in student_schedule():
        with torch.no_grad():
            v = dit(hidden_states=x, timestep=timesteps(t, x, image), encoder_hidden_states=ctx, return_dict=False)[0]
        x = x + (s_next - s) * v
        x[image, :, :1] = z[image]
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
    ap.add_argument("--teacher-seeds", type=int, default=6, help="text-only teacher seeds 2000.. per grid prompt")
    ap.add_argument("--image-seeds", type=int, default=0, help="image-mode teacher seeds 2100.. per grid prompt")
    ap.add_argument("--keep-all", action="store_true", help="also learn from teacher samples the judge reads wrong")
    ap.add_argument("--init", type=Path, default=None, help="start from this LoRA file (same rank) instead of zero")
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
    vae, mean, std = tt.load_vae(args.model)
    for p in list(dit.parameters()) + list(t5.parameters()):
        p.requires_grad_(False)
    bank, right = teacher_bank(vae, mean, std, dit, t5, tok, defaults, [2000 + i for i in range(args.teacher_seeds)],
                               [2100 + i for i in range(args.image_seeds)])
    log(stage="teacher", samples=len(bank.prompts), image_samples=int(bank.image.sum()), judged_right=int(right.sum()),
        judged_right_image=int(right[bank.image].sum()), defaults=defaults)
    if not args.keep_all:  # learn only where the teacher is right: its misses would be distilled too
        bank = bank.subset(right)
    prompts = bank.prompts

    alpha = float(args.rank)  # scale alpha / rank = 1
    modules = add_lora(dit, args.rank, alpha)
    if args.init is not None:
        from safetensors.torch import load_file

        init = load_file(str(args.init))
        for path, m in modules.items():
            key = f"diffusion_model.blocks.{path.split('.', 2)[1]}.{TARGETS[path.split('.', 2)[2]]}"
            with torch.no_grad():
                m.down.copy_(init[f"{key}.lora_down.weight"])
                m.up.copy_(init[f"{key}.lora_up.weight"])
        log(stage="init", lora=str(args.init))
    params = [p for m in modules.values() for p in (m.down, m.up)]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    proc = tt.PadCompressedCrossAttn()
    tt.set_cross_attn(dit, proc)
    ids, mask = tt.token_ids(tok, prompts, tt.CTX_ROWS)
    with torch.no_grad():
        ctx_all = tt.encode_text(t5, ids, mask)
    bias_all = tt.pad_bias(mask)
    noise_t, x0_t = torch.from_numpy(bank.noise), torch.from_numpy(bank.x0)
    z_t, image_t = torch.from_numpy(bank.images), torch.from_numpy(bank.image)
    sched = student_schedule()
    ema = None
    for step in range(args.steps):
        lr = tt.lr_at(step, args.steps, args.lr, warmup=50)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.from_numpy(rng.choice(len(prompts), args.batch, replace=False))
        ctx, bias, target, image = ctx_all[idx], bias_all[idx], x0_t[idx], image_t[idx]
        states = student_sample(dit, proc, ctx, bias, noise_t[idx], z_t[idx], image)
        keep = torch.ones(len(idx), 1, target.shape[2], 1, 1)
        keep[image, :, 0] = 0.0  # the given frame is re-imposed: no loss there
        loss = torch.zeros(())
        for (t, s, _), x in zip(sched, states, strict=False):
            v = dit(hidden_states=x, timestep=timesteps(t, x, image), encoder_hidden_states=ctx, return_dict=False)[0]
            loss = loss + ((x - s * v - target) ** 2 * keep).sum() / (keep.sum() * x[0, :, 0].numel())
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
