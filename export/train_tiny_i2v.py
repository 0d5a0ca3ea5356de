"""Stage 4 of the tiny model: teach the trained DiT (+ text encoder) Wan2.2 TI2V-5B's image mode.

    python -m vidrt.export.train_tiny_i2v --out checkpoints/tiny-shapes [--steps N] [--seed 0]

Continues from the DiT and text encoder in OUT (never from scratch), on a fresh latent bank, with
mixed text-only and first-frame-conditioned examples as Wan2.2 TI2V-5B is sampled (i2v.md §2.4,
W22 wan/textimage2video.py WanTI2V.i2v; diffusers `expand_timesteps=True`):

- for a share of the batch (I2V_CYCLES), latent frame 0 of x_t is the clean latent of the clip's first
  frame (by the causal VAE, latent frame 0 of a clip is exactly the encoding of its frame 0 alone: the
  runtime's `vae_encode_first` graph) and its tokens get timestep 0, the other tokens s*1000
  (a [B, tokens] timestep); the loss is taken on the other latent frames only;
- the rest is the text-to-video objective of stage 2 (every token at s*1000, loss on all frames);
- prompt and picture disagreeing: for a share of the image examples the prompt names
  another colour and shape (same direction). The picture wins for what the object looks like (its first
  frame is re-imposed, so anything else would morph it); the prompt gives the motion.
- CFG dropout as in stage 2 (the image stays: the runtime feeds it to both passes).

Afterwards `evaluate` samples with the runtime's algorithm (numpy noise per seed, official UniPC,
CFG, frame 0 re-imposed after every step) and judges from the pixels: the text-only grid on seeds the
training never used, and a grid of pictures x directions (first-frame PSNR, colour of the picture,
direction of the prompt). Everything is logged to OUT/train_log.jsonl.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from vidrt.export import shapes_data as sd
from vidrt.export import train_tiny as tt

# (steps, peak lr, warmup, batch, clips per prompt in the cycle's fresh latent bank, bank seed offset,
#  share of first-frame-conditioned examples per batch, share of those whose prompt names another colour and
#  shape than the picture). Each cycle goes on from the DiT + text encoder the one before saved in OUT, with a
# fresh AdamW, its own cosine schedule and reseeded RNGs. Cycle 0 learned the image mode (image grid 57 -> 96 %)
# but text-only colour on held-out seeds dropped (93.1 -> 87.5 %); cycle 1 rebalances towards text on new clips.
I2V_CYCLES = ((1200, 5e-4, 50, 32, 12, 5000, 0.5, 0.2),
              (400, 2e-4, 20, 32, 8, 6000, 0.3, 0.1))
# Tried after shipping and not kept: a cycle 2 (350 steps, lr 1e-4, image share 0.2 / 0.1, bank seed 8000) scored
# 85.4 % text-only on sweep seeds 7/3000 against 86.1 % for cycle 1 (TRAINING.md stage 4b).
BLEND = 0.15  # share of the stage-2 (text-only) weights averaged back into the cycle-1 weights (TRAINING.md stage 4b)
HELDOUT_SEEDS = (5000, 5001)  # text-only evaluation seeds: never used by training, sweeps or the tests


def image_timesteps(sigma: torch.Tensor, cond: torch.Tensor, tokens: int, first: int) -> torch.Tensor:
    """[B, tokens] float: s*1000 everywhere, 0 on the first latent frame's `first` tokens where `cond`."""
    t = (sigma * 1000).view(-1, 1).expand(-1, tokens).clone()
    t[cond, :first] = 0.0
    return t


def mismatched_prompt(rng: np.random.Generator, prompt: str) -> str:
    _, colour, shape, _, direction = prompt.split()
    colours = [c for c in sd.COLOURS if c != colour]
    shapes = [s for s in sd.SHAPES if s != shape]
    return sd.prompt_for(str(rng.choice(colours)), str(rng.choice(shapes)), direction)


def train(out: Path, seed: int, log: tt.Log, cycle: int, steps: int | None = None) -> None:
    from vidrt.export.tiny_tokenizer import build_tokenizer

    total, lr, warmup, batch, per_prompt, bank_seed, image_p, mismatch_p = I2V_CYCLES[cycle]
    stop = steps or total
    torch.manual_seed(seed + 41 + 10 * cycle)
    rng = np.random.default_rng(seed + 41 + 10 * cycle)
    t_start = time.time()
    vae, mean, std = tt.load_vae(out)
    for p in vae.parameters():
        p.requires_grad_(False)
    tok = build_tokenizer()
    bank, bank_prompts = tt.latent_bank(vae, mean, std, seed + bank_seed, per_prompt)
    log(stage="i2v", event="bank", cycle=cycle, clips=len(bank), s=round(time.time() - t_start, 1))
    dit, t5, _ = tt.load_dit_t5(out)
    tt.frozen_text_path(dit)
    _, _, lat_f, lat_h, lat_w = bank.shape
    first = (lat_h // 2) * (lat_w // 2)  # tokens of one latent frame (patch 1x2x2)
    tokens = lat_f * first
    log(stage="i2v", event="start", cycle=cycle, config=I2V_CYCLES[cycle], stop=stop)
    params = [p for p in list(dit.parameters()) + list(t5.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
    proc = tt.PadCompressedCrossAttn()
    full_procs = tt.set_cross_attn(dit, proc)
    dit.train()
    t5.train()
    t0, ema = time.time(), {}
    for step in range(stop):
        for g in opt.param_groups:
            g["lr"] = tt.lr_at(step, total, lr, warmup)
        idx = rng.integers(0, len(bank), batch)
        x0 = bank[torch.from_numpy(idx)]
        cond = rng.random(batch) < image_p
        prompts = [bank_prompts[i] for i in idx]
        for j in np.flatnonzero(cond & (rng.random(batch) < mismatch_p)):
            prompts[j] = mismatched_prompt(rng, prompts[j])
        for j in np.flatnonzero(rng.random(batch) < tt.UNCOND_P):
            prompts[j] = tt.uncond_prompt(rng)
        ids, mask = tt.token_ids(tok, prompts, tt.CTX_ROWS)
        noise = torch.from_numpy(rng.standard_normal(x0.shape, dtype=np.float32))
        u = torch.from_numpy(rng.random(batch, dtype=np.float32))
        sigma = tt.TRAIN_SHIFT * u / (1 + (tt.TRAIN_SHIFT - 1) * u)
        s5 = sigma.view(-1, 1, 1, 1, 1)
        xt = (1 - s5) * x0 + s5 * noise
        c = torch.from_numpy(cond)
        xt[c, :, :1] = x0[c, :, :1]  # the clean image latent in frame 0
        proc.bias = tt.pad_bias(mask)
        pred = dit(hidden_states=xt, timestep=image_timesteps(sigma, c, tokens, first),
                   encoder_hidden_states=tt.encode_text(t5, ids, mask), return_dict=False)[0]
        err = (pred - (noise - x0)).square()
        keep = torch.ones(batch, 1, lat_f, 1, 1)
        keep[c, :, 0] = 0.0  # no loss on the given frame
        loss = (err * keep).sum() / (keep.sum() * err.shape[1] * lat_h * lat_w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():  # per-kind losses for the log (on the frames each kind is trained on)
            per = (err * keep).sum((1, 2, 3, 4)) / (keep.sum((1, 2, 3, 4)) * err.shape[1] * lat_h * lat_w)
        for kind, sel in (("loss", np.ones(batch, bool)), ("loss_image", cond), ("loss_text", ~cond)):
            if sel.any():
                v = float(per[torch.from_numpy(sel)].mean())
                ema[kind] = v if kind not in ema else 0.98 * ema[kind] + 0.02 * v
        if step % 50 == 0 or step == stop - 1:
            log(stage="i2v", cycle=cycle, step=step, loss=loss.item(), **{f"{k}_ema": v for k, v in ema.items()},
                lr=opt.param_groups[0]["lr"], s_per_step=(time.time() - t0) / (step + 1))
    tt.set_cross_attn(dit, full_procs)
    dit.eval()
    t5.eval()
    tt.save_dit(out, dit, t5)
    log(stage="i2v", event="done", cycle=cycle, steps=stop, train_s=round(time.time() - t0, 1),
        **{f"{k}_ema": v for k, v in ema.items()})


def blend(out: Path, before: Path, share: float) -> None:
    """Weight averaging (stage 4b): DiT and text encoder in OUT <- (1 - share) * OUT + share * BEFORE, where
    BEFORE holds the stage-2 (text-only) `transformer/` and `text_encoder/`. Same architecture, same keys."""
    from safetensors.torch import load_file, save_file

    for sub, name in (("transformer", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")):
        cur, old = load_file(out / sub / name), load_file(before / sub / name)
        if cur.keys() != old.keys():
            raise ValueError(f"{before / sub / name}: not the same parameters as {out / sub / name}")
        save_file({k: ((1 - share) * cur[k] + share * old[k]).contiguous() for k in cur}, out / sub / name,
                  metadata={"format": "pt"})


# --------------------------------------------------------------------------------------------
# evaluation: the runtime's sampling algorithm, judged from pixels

@torch.no_grad()
def encode_pictures(vae, mean, std, pictures: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> normalised image latents [N, z, 1, h, w] (posterior mean of frame 0 alone)."""
    x = torch.from_numpy(np.stack([sd.to_model(p[None]) for p in pictures]))
    return (tt.vae_encode_stats(vae, x)[0] - mean) / std


@torch.no_grad()
def sample(dit, t5, tok, prompts: list[str], seeds: list[int], steps: int, shift: float, guidance: float,
           images: torch.Tensor | None = None, negative: str = "", chunk: int = 72,
           keep_states: bool = False) -> np.ndarray:
    """tt.sample_latents plus TI2V image mode (images: [N, z, 1, h, w] or None): frame 0 of the initial
    latents is the image latent, its tokens get timestep 0, and it is re-imposed after every step.
    Returns the final latents [N, z, f, h, w], or with keep_states every state [N, steps + 1, z, f, h, w]
    (the state entering step k at [:, k], the final sample at [:, -1]; the distillation's teacher)."""
    from vidrt.schedulers import make_schedule, make_solver

    lat = (tt.DIT_CONFIG["in_channels"], (sd.NUM_FRAMES - 1) // 4 + 1, sd.SIZE // 8, sd.SIZE // 8)
    first = (lat[2] // 2) * (lat[3] // 2)
    tokens = lat[1] * first
    proc = tt.PadCompressedCrossAttn()
    full_procs = tt.set_cross_attn(dit, proc)
    outs = []
    for i in range(0, len(prompts), chunk):
        ps, ss = prompts[i:i + chunk], seeds[i:i + chunk]
        ids, mask = tt.token_ids(tok, ps + [negative] * len(ps), tt.CTX_ROWS)
        ctx = tt.encode_text(t5, ids, mask)
        proc.bias = tt.pad_bias(mask)
        x = np.stack([np.random.default_rng(s).standard_normal(lat, dtype=np.float32) for s in ss])
        z = None if images is None else images[i:i + chunk].numpy()
        if z is not None:
            x[:, :, :1] = z
        schedule = make_schedule("unipc", steps, shift)
        solver = make_solver("unipc", schedule)
        kept = [x]
        for st in schedule:
            t = torch.full((2 * len(ps), tokens), float(st.timestep))
            if z is not None:
                t[:, :first] = 0.0
            xt = torch.from_numpy(x)
            v = dit(hidden_states=torch.cat([xt, xt]), timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]
            vc, vu = v.chunk(2)
            x = solver.step((vu + guidance * (vc - vu)).numpy(), x)
            if z is not None:
                x[:, :, :1] = z
            if keep_states:
                kept.append(x)
        outs.append(np.stack(kept, 1) if keep_states else x)
    tt.set_cross_attn(dit, full_procs)
    return np.concatenate(outs)


@torch.no_grad()
def decode(vae, mean, std, latents: np.ndarray, batch: int = 24) -> list[np.ndarray]:
    out = []
    for i in range(0, len(latents), batch):
        z = torch.from_numpy(latents[i:i + batch]) * std + mean
        out += [sd.to_uint8(v) for v in vae.decode(z).sample.numpy()]  # clamped, as the runtime decodes
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float32) - b.astype(np.float32)) ** 2))
    return 10 * np.log10(255.0 ** 2 / max(mse, 1e-6))


def image_grid(vae, mean, std, dit, t5, tok, defaults: dict, seed: int, mismatch: bool = False) -> dict:
    """18 centred pictures (colour x shape) x 4 directions: prompt = the picture's colour and shape (or, with
    `mismatch`, another colour and shape) + the direction. Right = colour of the picture, direction of the prompt."""
    rng = np.random.default_rng(seed)
    cases = [(c, s, d) for c in sd.COLOURS for s in sd.SHAPES for d in sd.DIRECTIONS]
    pics = np.stack([sd.picture(c, s) for c, s, _ in cases])
    prompts = [mismatched_prompt(rng, sd.prompt_for(c, s, d)) if mismatch else sd.prompt_for(c, s, d)
               for c, s, d in cases]
    lat = sample(dit, t5, tok, prompts, [seed + i for i in range(len(cases))], defaults["steps"], defaults["shift"],
                 defaults["guidance_scale"], images=encode_pictures(vae, mean, std, pics))
    clips = decode(vae, mean, std, lat)
    results = [(sd.classify_clip(v), (c, d)) for v, (c, _, d) in zip(clips, cases, strict=True)]
    p = [psnr(v[0], pic) for v, pic in zip(clips, pics, strict=True)]
    return {**sd.score(results), "first_frame_psnr_min": round(float(min(p)), 2),
            "first_frame_psnr_mean": round(float(np.mean(p)), 2)}


def evaluate(out: Path, seed: int, log: tt.Log) -> dict:
    import json

    defaults = json.loads((out / "sampling_defaults.json").read_text())
    vae, mean, std = tt.load_vae(out)
    dit, t5, tok = tt.load_dit_t5(out)
    res = {}
    for name, fn in (
        ("text_heldout", lambda: tt.grid_eval(vae, mean, std, dit, t5, tok, HELDOUT_SEEDS, defaults["steps"],
                                              defaults["shift"], defaults["guidance_scale"])),
        ("image", lambda: image_grid(vae, mean, std, dit, t5, tok, defaults, seed + 7000)),
        ("image_mismatch", lambda: image_grid(vae, mean, std, dit, t5, tok, defaults, seed + 7100, mismatch=True)),
    ):
        te = time.time()
        res[name] = fn()
        log(stage="i2v_eval", grid=name, eval=res[name], s=round(time.time() - te, 1))
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("checkpoints/tiny-shapes"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help="stop after this many steps of each cycle's schedule")
    ap.add_argument("--from-cycle", type=int, default=0, help="resume at this cycle from the DiT saved in OUT")
    ap.add_argument("--stage", choices=["train", "eval", "all"], default="all")
    ap.add_argument("--blend-with", type=Path, default=None,
                    help="after training, average BLEND of this folder's stage-2 transformer/ + text_encoder/ in")
    ap.add_argument("--threads", type=int, default=1)  # 1 beats 2 on a busy 2-core CPU (TRAINING.md)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    log = tt.Log(args.out)
    if args.stage in ("train", "all"):
        for cycle in range(args.from_cycle, len(I2V_CYCLES)):
            train(args.out, args.seed, log, cycle, args.steps)
    if args.blend_with is not None and args.stage in ("train", "all"):
        blend(args.out, args.blend_with, BLEND)
        log(stage="i2v", event="blend", share=BLEND, before=str(args.blend_with))
    if args.stage in ("eval", "all"):
        evaluate(args.out, args.seed, log)


if __name__ == "__main__":
    main()
