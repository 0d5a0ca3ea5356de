"""Train the embedded tiny Wan ("moving shapes") on a CPU: VAE first, then umT5 + DiT.

    python -m vidrt.export.train_tiny --out checkpoints/tiny-shapes [--stage vae|dit|all] [--seed 0]

Real architecture, small configurations: diffusers `AutoencoderKLWan` and `WanTransformer3DModel`,
transformers `UMT5EncoderModel`, a word-level tokenizer (export/tiny_tokenizer.py). The output
folder is a diffusers-format Wan pipeline folder (model_index.json, vae/, text_encoder/,
tokenizer/, transformer/, scheduler/) plus sampling_defaults.json, train_log.jsonl and
TRAINING.md. Everything is seeded; step counts are fixed (not time-based).

VAE (see /work/shared/reference/tiny_shapes_probe.md): object-weighted L1+L2 + tiny KL,
trained through a raw decode without diffusers' final clamp, 9-frame windows, 32x32 crops
around the object, then full 64x64 frames. Latents are standardised per channel with the
mean/std stored in the VAE config (latents_mean / latents_std): z_norm = (z - mean) / std.

DiT + text encoder: rectified flow (x_t = (1-s) x0 + s noise, target noise - x0, timestep
s*1000), logit-normal s, 10 % unconditional prompts for CFG. The DiT always sees the context
the runtime feeds: the encoder's rows at real length, zero rows up to 512. Training uses an
exactly equivalent compressed form of that context (a few zero rows whose attention logits
carry log(#zero rows they stand for)); evaluation uses the plain 512-row context and the
runtime's numpy UniPC sampler.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from vidrt.export import shapes_data as sd

TEXT_LEN = 512
WINDOW = 9  # frames per VAE training window (3 latent frames)


# --------------------------------------------------------------------------------------------
# logging

class Log:
    def __init__(self, out: Path) -> None:
        self.path = out / "train_log.jsonl"
        self.t0 = time.time()

    def __call__(self, **rec: object) -> None:
        rec = {"wall_s": round(time.time() - self.t0, 1), **rec}
        with self.path.open("a") as fh:
            fh.write(json.dumps(rec) + "\n")
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()), flush=True)


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float = 0.05) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


# --------------------------------------------------------------------------------------------
# VAE

VAE_CONFIG = dict(base_dim=8, z_dim=8, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
                  temperal_downsample=[False, True, True], dropout=0.0)


def make_vae():
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan(**VAE_CONFIG, latents_mean=[0.0] * 8, latents_std=[1.0] * 8)
    with torch.no_grad():  # posterior log-variance starts at -6: an almost deterministic latent
        vae.quant_conv.bias[vae.config.z_dim:] = -6.0
    return vae


def vae_encode_stats(vae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h = vae._encode(x)
    mean, logvar = h.chunk(2, dim=1)
    return mean, torch.clamp(logvar, -30.0, 20.0)


def vae_decode_raw(vae, z: torch.Tensor) -> torch.Tensor:
    """diffusers' AutoencoderKLWan._decode loop without the final clamp (keeps gradients alive)."""
    vae.clear_cache()
    x = vae.post_quant_conv(z)
    outs = []
    for i in range(z.shape[2]):
        vae._conv_idx = [0]
        outs.append(vae.decoder(x[:, :, i:i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                                first_chunk=(i == 0)))
    vae.clear_cache()
    return torch.cat(outs, 2)


def vae_batch(rng: np.random.Generator, n: int, crop: int | None, frames: int = WINDOW) -> torch.Tensor:
    """[n, 3, frames, S, S] in [-1, 1]: random windows of random clips, optionally cropped around the object."""
    out = []
    for _ in range(n):
        spec = sd.random_spec(rng)
        start = int(rng.integers(0, sd.NUM_FRAMES - frames + 1))
        clip = sd.render(spec)[start:start + frames]  # [F, 64, 64, 3]
        if crop:
            cx = np.mean([spec.centre(start + f)[0] for f in (0, frames - 1)]) + rng.uniform(-4, 4)
            cy = np.mean([spec.centre(start + f)[1] for f in (0, frames - 1)]) + rng.uniform(-4, 4)
            x0 = int(np.clip(round(cx - crop / 2), 0, sd.SIZE - crop))
            y0 = int(np.clip(round(cy - crop / 2), 0, sd.SIZE - crop))
            clip = clip[:, y0:y0 + crop, x0:x0 + crop]
        out.append(sd.to_model(clip))
    return torch.from_numpy(np.stack(out))


def vae_loss(vae, x: torch.Tensor, kl_weight: float = 1e-4, latent_noise: float = 0.0) -> tuple[torch.Tensor, dict]:
    mean, logvar = vae_encode_stats(vae, x)
    if latent_noise > 0:  # decoder-only cycle: posterior mean + noise of latent_noise x the latent std per channel
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
        z = mean.detach() + latent_noise * std * torch.randn_like(mean)
    else:
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
    rec = vae_decode_raw(vae, z)
    weight = 1.0 + 4.0 * ((x + 1.0).abs().amax(dim=1, keepdim=True) > 0.05).float()  # object x5
    err = rec - x
    l1 = (weight * err.abs()).mean()
    l2 = (weight * err.square()).mean()
    kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()
    return l1 + l2 + kl_weight * kl, {"l1": l1.item(), "l2": l2.item(), "kl": kl.item()}


@torch.no_grad()
def vae_check(vae, seed: int, n: int = 48, batch: int = 16) -> dict:
    """Reconstruct held-out full clips (posterior mode, decode WITH the clamp, as the runtime does)."""
    rng = np.random.default_rng(seed)
    combos = sd.grid()
    rng.shuffle(combos)
    combos = combos[:n]
    clips = [sd.render(sd.random_spec(rng, c, s, d)) for c, s, d in combos]
    results, psnrs = [], []
    for i in range(0, len(combos), batch):
        x = torch.from_numpy(np.stack([sd.to_model(c) for c in clips[i:i + batch]]))
        rec = vae.decode(vae_encode_stats(vae, x)[0]).sample.numpy()
        for j, r in enumerate(rec):
            frames, clip = sd.to_uint8(r), clips[i + j]
            c, _, d = combos[i + j]
            results.append((sd.classify_clip(frames), (c, d)))
            mse = np.mean((frames.astype(np.float32) - clip.astype(np.float32)) ** 2)
            psnrs.append(10 * np.log10(255.0 ** 2 / max(mse, 1e-6)))
    return {**sd.score(results), "psnr_db": float(np.mean(psnrs))}


@torch.no_grad()
def latent_stats(vae, seed: int, n: int = 96) -> tuple[list[float], list[float]]:
    rng = np.random.default_rng(seed)
    zs = []
    for _ in range(0, n, 32):
        x = torch.from_numpy(np.stack([sd.to_model(sd.render(sd.random_spec(rng))) for _ in range(32)]))
        zs.append(vae_encode_stats(vae, x)[0])
    z = torch.cat(zs).transpose(0, 1).reshape(vae.config.z_dim, -1)
    return z.mean(1).tolist(), z.std(1).tolist()


# (crop steps on 32x32 crops at batch 8, full-frame steps at batch 4, peak lr, warmup, decoder-only
# latent noise): one cosine schedule and a fresh AdamW per cycle, the RNGs reseeded per cycle (so a
# run resumed at a cycle boundary from the saved vae/ is the same as an uninterrupted one).
# Cycle 0 alone learned direction (48/48) but washed colours out (17/48); cycle 1 is the same
# recipe continued (44/48). Cycle 2 trains only post_quant_conv + decoder (latent noise > 0: on
# posterior means plus noise; encoder, latents and their statistics unchanged, so the DiT trained on
# them still fits) on whole 17-frame clips: colour 47/48, PSNR 22.6 -> 27.0 dB, and no colour drift
# in the last latent frames. (A third DiT cycle at lr 4e-4 was tried and made the grid worse.)
VAE_CYCLES = ((400, 60, 2e-3, 50, 0.0), (350, 60, 1.5e-3, 20, 0.0), (150, 60, 7e-4, 20, 0.05))


def vae_cycle(vae, seed: int, log: Log, cycle: int, crop_steps: int, full_steps: int, peak: float,
              warmup: int, latent_noise: float = 0.0) -> None:
    if cycle > 0:  # cycle 0 goes on from torch.manual_seed(seed) + the model's initialisation
        torch.manual_seed(seed + 10 * cycle)
    rng = np.random.default_rng(seed + 10 * cycle)
    decoder_only = latent_noise > 0
    for name, p in vae.named_parameters():
        p.requires_grad_(not decoder_only or name.startswith(("decoder.", "post_quant_conv.")))
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=peak, betas=(0.9, 0.99), weight_decay=1e-4)
    total = crop_steps + full_steps
    t0 = time.time()
    vae.train()
    # The decoder-only cycle trains on whole 17-frame clips (5 latent frames, what inference decodes):
    # 9-frame windows never exercise the causal caches past latent frame 2, and later frames drift.
    frames, crop_px = (sd.NUM_FRAMES, 48) if decoder_only else (WINDOW, 32)
    for step in range(total):
        crop, bs = (crop_px, 8) if step < crop_steps else (None, 4)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, peak, warmup)
        loss, parts = vae_loss(vae, vae_batch(rng, bs, crop, frames), latent_noise=latent_noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 10 == 0 or step == total - 1:
            log(stage="vae", cycle=cycle, step=step, loss=loss.item(), **parts,
                s_per_step=(time.time() - t0) / (step + 1))
    vae.eval()


def train_vae(out: Path, seed: int, log: Log, first_cycle: int = 0) -> None:
    """Cycles VAE_CYCLES[first_cycle:]; first_cycle > 0 resumes from the vae/ saved after the cycle before."""
    if first_cycle > 0:
        vae, _, _ = load_vae(out)
    else:
        torch.manual_seed(seed)
        vae = make_vae()
    log(stage="vae", event="start", params=sum(p.numel() for p in vae.parameters()), cycles=VAE_CYCLES,
        first_cycle=first_cycle)
    for cycle in range(first_cycle, len(VAE_CYCLES)):
        t0 = time.time()
        vae_cycle(vae, seed, log, cycle, *VAE_CYCLES[cycle])
        if VAE_CYCLES[cycle][4] == 0.0:  # the encoder changed: new latent statistics
            mean, std = latent_stats(vae, seed + 2000)
            vae.register_to_config(latents_mean=[round(v, 5) for v in mean], latents_std=[round(v, 5) for v in std])
        vae.save_pretrained(out / "vae")
        check = vae_check(vae, seed + 1000)
        log(stage="vae", event="cycle_done", cycle=cycle, train_s=round(time.time() - t0, 1), check=check,
            latents_mean=vae.config.latents_mean, latents_std=vae.config.latents_std)


# --------------------------------------------------------------------------------------------
# text encoder + DiT

T5_CONFIG = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
                 relative_attention_num_buckets=32, relative_attention_max_distance=128,
                 dropout_rate=0.0, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                 pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
DIT_CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=8,
                  out_channels=8, text_dim=64, freq_dim=256, ffn_dim=256, num_layers=4,
                  cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None,
                  added_kv_proj_dim=None, rope_max_seq_len=1024)
CTX_ROWS = 12  # compressed context rows in training: real tokens, then zero rows standing for the rest
TRAIN_SHIFT = 3.0  # training sigmas: shifted uniform, the spacing the sampler uses at shift 3
UNCOND_P = 0.1


def make_text_encoder(vocab_size: int):
    from transformers import UMT5Config, UMT5EncoderModel

    return UMT5EncoderModel(UMT5Config(vocab_size=vocab_size, **T5_CONFIG))


def make_dit(qk_gain: float = 2.0):
    """WanTransformer3DModel with its text path initialised for zero-padded contexts.

    The runtime feeds 512 context rows, almost all zeros. With the text projection's biases and
    the cross-attention key/value biases at zero (and kept there: they are frozen), a zero row
    gives key 0 and value 0: an attention sink with logit 0 that adds nothing. Real tokens then
    win the attention as soon as their logits pass log(#zero rows) ~ 6, so cross-attention
    q/k norm gains start at `qk_gain` (logit scale x qk_gain^2) to get there early. Same
    architecture and weights layout: only the initial values differ.
    """
    from diffusers import WanTransformer3DModel

    dit = WanTransformer3DModel(**DIT_CONFIG)
    te = dit.condition_embedder.text_embedder
    frozen = [te.linear_1.bias, te.linear_2.bias]
    with torch.no_grad():
        for blk in dit.blocks:
            frozen += [blk.attn2.to_k.bias, blk.attn2.to_v.bias]
            blk.attn2.norm_q.weight.fill_(qk_gain)
            blk.attn2.norm_k.weight.fill_(qk_gain)
        for p in frozen:
            p.zero_()
            p.requires_grad_(False)
    return dit


class PadCompressedCrossAttn:
    """Cross-attention over a compressed context, exactly equal to attention over the runtime's
    512-row context: each zero row here stands for `count` identical zero rows there, which is
    the same as adding log(count) to its attention logit. Set `bias` [B, 1, 1, rows] before use."""

    bias: torch.Tensor | None = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        q = attn.norm_q(attn.to_q(hidden_states))
        k = attn.norm_k(attn.to_k(encoder_hidden_states))
        v = attn.to_v(encoder_hidden_states)
        q, k, v = (t.unflatten(2, (attn.heads, -1)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias)
        out = out.transpose(1, 2).flatten(2, 3).type_as(hidden_states)
        return attn.to_out[1](attn.to_out[0](out))


def set_cross_attn(dit, processor) -> list:
    old = [blk.attn2.processor for blk in dit.blocks]
    for i, blk in enumerate(dit.blocks):
        blk.attn2.processor = processor[i] if isinstance(processor, list) else processor
    return old


def token_ids(tok, prompts: list[str], rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    enc = [tok.encode(p).ids for p in prompts]
    n = rows or max(len(e) for e in enc)
    ids = torch.zeros(len(enc), n, dtype=torch.long)
    mask = torch.zeros(len(enc), n, dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, :len(e)] = torch.tensor(e[:n])
        mask[i, :len(e)] = 1
    return ids, mask


def encode_text(t5, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Real-length rows (pads masked, then zeroed), as the runtime does; [B, rows, d]."""
    hidden = t5(input_ids=ids, attention_mask=mask).last_hidden_state
    return hidden * mask[..., None].to(hidden.dtype)


def pad_bias(mask: torch.Tensor) -> torch.Tensor:
    """[B, 1, 1, rows]: 0 on real rows, log(#runtime zero rows / #zero rows here) on zero rows."""
    n = mask.sum(1, keepdim=True).float()
    rows = mask.shape[1]
    per = torch.log((TEXT_LEN - n) / (rows - n))
    return torch.where(mask.bool(), torch.zeros(()), per)[:, None, None, :]


def full_context(t5, tok, prompts: list[str]) -> torch.Tensor:
    """The runtime's context: each prompt encoded at its real length, zero rows up to 512."""
    out = torch.zeros(len(prompts), TEXT_LEN, t5.config.d_model)
    for i, p in enumerate(prompts):
        ids, mask = token_ids(tok, [p])
        out[i, :ids.shape[1]] = encode_text(t5, ids, mask)[0]
    return out


def load_vae(out: Path):
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(out / "vae").eval()
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    return vae, mean, std


@torch.no_grad()
def latent_bank(vae, mean, std, seed: int, per_prompt: int) -> tuple[torch.Tensor, list[str]]:
    """Normalised posterior means of `per_prompt` random clips for each of the 72 prompts."""
    rng = np.random.default_rng(seed)
    specs = [sd.random_spec(rng, c, s, d) for _ in range(per_prompt) for c, s, d in sd.grid()]
    zs = []
    for i in range(0, len(specs), 32):
        x = torch.from_numpy(np.stack([sd.to_model(sd.render(sp)) for sp in specs[i:i + 32]]))
        zs.append((vae_encode_stats(vae, x)[0] - mean) / std)
    return torch.cat(zs), [sp.prompt for sp in specs]


def uncond_prompt(rng: np.random.Generator) -> str:
    """Mostly the empty prompt; sometimes words the tokenizer does not know (a foreign negative prompt)."""
    if rng.random() < 0.7:
        return ""
    return " ".join(rng.choice(["ugly", "blurry", "static", "worst", "quality", "nsfw"], int(rng.integers(1, 9))))


@torch.no_grad()
def sample_latents(dit, t5, tok, prompts: list[str], seeds: list[int], steps: int, shift: float,
                   guidance: float, negative: str = "", chunk: int = 72, compressed: bool = True) -> np.ndarray:
    """The runtime's loop: numpy noise per seed, official UniPC plan, t = Step.timestep, CFG u + g(c - u)."""
    from vidrt.schedulers import make_schedule, make_solver

    lat = (DIT_CONFIG["in_channels"], (sd.NUM_FRAMES - 1) // 4 + 1, sd.SIZE // 8, sd.SIZE // 8)
    outs = []
    proc = PadCompressedCrossAttn()
    full_procs = set_cross_attn(dit, proc) if compressed else None
    for i in range(0, len(prompts), chunk):
        ps, ss = prompts[i:i + chunk], seeds[i:i + chunk]
        if compressed:  # exactly equal to the 512-row context, much cheaper
            ids, mask = token_ids(tok, ps + [negative] * len(ps), CTX_ROWS)
            ctx = encode_text(t5, ids, mask)
            proc.bias = pad_bias(mask)
        else:
            ctx = torch.cat([full_context(t5, tok, ps), full_context(t5, tok, [negative]).expand(len(ps), -1, -1)])
        x = np.stack([np.random.default_rng(s).standard_normal(lat, dtype=np.float32) for s in ss])
        schedule = make_schedule("unipc", steps, shift)
        solver = make_solver("unipc", schedule)
        for st in schedule:
            xt = torch.from_numpy(x)
            t = torch.full((2 * len(ps),), float(st.timestep))
            v = dit(hidden_states=torch.cat([xt, xt]), timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]
            vc, vu = v.chunk(2)
            x = solver.step((vu + guidance * (vc - vu)).numpy(), x)
        outs.append(x)
    if full_procs is not None:
        set_cross_attn(dit, full_procs)
    return np.concatenate(outs)


@torch.no_grad()
def judge(vae, mean, std, latents: np.ndarray, wants: list[tuple[str, str]], batch: int = 24) -> dict:
    results = []
    for i in range(0, len(latents), batch):
        z = torch.from_numpy(latents[i:i + batch]) * std + mean
        video = vae.decode(z).sample.numpy()  # clamped, as the runtime decodes
        results += [(sd.classify_clip(sd.to_uint8(v)), w) for v, w in zip(video, wants[i:i + batch], strict=True)]
    return sd.score(results)


def grid_eval(vae, mean, std, dit, t5, tok, seeds: tuple[int, ...], steps: int, shift: float,
              guidance: float, combos=None, compressed: bool = True) -> dict:
    combos = combos or sd.grid()
    prompts, seed_list, wants = [], [], []
    for s in seeds:
        for c, sh, d in combos:
            prompts.append(sd.prompt_for(c, sh, d))
            seed_list.append(s)
            wants.append((c, d))
    lat = sample_latents(dit, t5, tok, prompts, seed_list, steps, shift, guidance, compressed=compressed)
    return judge(vae, mean, std, lat, wants)


def save_dit(out: Path, dit, t5) -> None:
    dit.save_pretrained(out / "transformer")
    t5.save_pretrained(out / "text_encoder")


# (planned steps, peak lr, warmup, steps actually run) per cycle: one cosine schedule over the planned
# steps and a fresh AdamW per cycle, RNGs reseeded per cycle, so resuming at a cycle boundary from the
# saved transformer/ + text_encoder/ equals an uninterrupted run. Cycle 0 was sized for a busy CPU;
# cycle 1 continued it and was cut at step 1500 of its 2500-step schedule for the time budget.
DIT_CYCLES = ((1700, 1.5e-3, 200, 1700), (2500, 1e-3, 100, 1500))


def frozen_text_path(dit) -> None:
    """Keep the zero biases of make_dit's text path frozen (also after loading a saved DiT)."""
    te = dit.condition_embedder.text_embedder
    for p in [te.linear_1.bias, te.linear_2.bias] + [b for blk in dit.blocks for b in (blk.attn2.to_k.bias,
                                                                                         blk.attn2.to_v.bias)]:
        assert float(p.detach().abs().max()) == 0.0
        p.requires_grad_(False)


def train_dit(out: Path, seed: int, log: Log, first_cycle: int = 0, per_prompt: int = 12, batch: int = 32,
              eval_every: int = 500, cycles=DIT_CYCLES) -> None:
    from vidrt.export.tiny_tokenizer import build_tokenizer, save_tokenizer

    torch.manual_seed(seed + 1)
    rng = np.random.default_rng(seed + 1)
    t_start = time.time()
    vae, mean, std = load_vae(out)
    for p in vae.parameters():
        p.requires_grad_(False)
    save_tokenizer(out / "tokenizer")
    tok = build_tokenizer()
    bank, bank_prompts = latent_bank(vae, mean, std, seed + 3000, per_prompt)
    log(stage="dit", event="bank", clips=len(bank), shape=list(bank.shape[1:]), s=round(time.time() - t_start, 1),
        bank_mean=round(bank.mean().item(), 4), bank_std=round(bank.std().item(), 4))
    bank_ids, bank_mask = token_ids(tok, bank_prompts, CTX_ROWS)

    if first_cycle > 0:
        dit, t5, _ = load_dit_t5(out)
        frozen_text_path(dit)
    else:
        t5 = make_text_encoder(tok.get_vocab_size())
        dit = make_dit()
    log(stage="dit", event="start", dit_params=sum(p.numel() for p in dit.parameters()),
        t5_params=sum(p.numel() for p in t5.parameters()), cycles=cycles, first_cycle=first_cycle, batch=batch)
    proc = PadCompressedCrossAttn()

    for cycle in range(first_cycle, len(cycles)):
        steps, lr, warmup, stop = cycles[cycle]
        if cycle > 0:
            torch.manual_seed(seed + 1 + 10 * cycle)
            rng = np.random.default_rng(seed + 1 + 10 * cycle)
        params = [p for p in list(dit.parameters()) + list(t5.parameters()) if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
        full_procs = set_cross_attn(dit, proc)
        dit.train()
        t5.train()
        t0 = time.time()
        ema = None
        for step in range(stop):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, steps, lr, warmup)
            idx = torch.from_numpy(rng.integers(0, len(bank), batch))
            x0 = bank[idx]
            ids, mask = bank_ids[idx].clone(), bank_mask[idx].clone()
            drop = rng.random(batch) < UNCOND_P
            if drop.any():
                u_ids, u_mask = token_ids(tok, [uncond_prompt(rng) for _ in range(int(drop.sum()))], CTX_ROWS)
                ids[torch.from_numpy(drop)], mask[torch.from_numpy(drop)] = u_ids, u_mask
            noise = torch.from_numpy(rng.standard_normal(x0.shape, dtype=np.float32))
            u = torch.from_numpy(rng.random(batch, dtype=np.float32))
            sigma = TRAIN_SHIFT * u / (1 + (TRAIN_SHIFT - 1) * u)
            s5 = sigma.view(-1, 1, 1, 1, 1)
            xt = (1 - s5) * x0 + s5 * noise
            ctx = encode_text(t5, ids, mask)
            proc.bias = pad_bias(mask)
            pred = dit(hidden_states=xt, timestep=sigma * 1000, encoder_hidden_states=ctx, return_dict=False)[0]
            loss = F.mse_loss(pred, noise - x0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
            if step % 50 == 0 or step == stop - 1:
                log(stage="dit", cycle=cycle, step=step, loss=loss.item(), loss_ema=ema, lr=opt.param_groups[0]["lr"],
                    s_per_step=(time.time() - t0) / (step + 1))
            if (step + 1) % eval_every == 0 or step == stop - 1:
                save_dit(out, dit, t5)
                set_cross_attn(dit, full_procs)
                dit.eval()
                te = time.time()
                half = sd.grid()[step // eval_every % 2::2]  # alternate halves of the grid, one seed
                res = grid_eval(vae, mean, std, dit, t5, tok, (step,), 20, 3.0, 5.0, half)
                log(stage="dit", cycle=cycle, step=step, eval=res, eval_s=round(time.time() - te, 1))
                dit.train()
                set_cross_attn(dit, proc)
        set_cross_attn(dit, full_procs)
        dit.eval()
        t5.eval()
        save_dit(out, dit, t5)
        log(stage="dit", event="cycle_done", cycle=cycle, train_s=round(time.time() - t0, 1), loss_ema=ema)


# --------------------------------------------------------------------------------------------
# choose sampling defaults, measure the grid, write the pipeline folder's metadata

SWEEP_STEPS = 25


def load_dit_t5(out: Path):
    from diffusers import WanTransformer3DModel

    # from config + state dict: from_pretrained needs `accelerate` for this class (keep_in_fp32_modules)
    from safetensors.torch import load_file
    from tokenizers import Tokenizer
    from transformers import UMT5EncoderModel

    dit = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(out / "transformer"))
    dit.load_state_dict(load_file(out / "transformer" / "diffusion_pytorch_model.safetensors"))
    dit.eval()
    t5 = UMT5EncoderModel.from_pretrained(out / "text_encoder").eval()
    tok = Tokenizer.from_file(str(out / "tokenizer" / "tokenizer.json"))
    return dit, t5, tok


def write_pipeline_metadata(out: Path, defaults: dict) -> None:
    import diffusers
    from diffusers import UniPCMultistepScheduler

    UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000,
                            flow_shift=defaults["shift"]).save_pretrained(out / "scheduler")
    index = {
        "_class_name": "WanPipeline",
        "_diffusers_version": diffusers.__version__,
        "boundary_ratio": None,
        "expand_timesteps": False,
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "transformer_2": [None, None],
        "vae": ["diffusers", "AutoencoderKLWan"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "sampling_defaults.json").write_text(json.dumps(defaults, indent=2) + "\n")


def finalize(out: Path, seed: int, log: Log, guidances=(1.5, 2.0, 3.0, 5.0, 8.0), shifts=(2.0, 5.0)) -> dict:
    """Sweep guidance (shift 3), then shift (best guidance), on all 72 prompts x 1 seed; then judge the
    chosen defaults on all 72 prompts x 2 other seeds with the plain 512-row context."""
    torch.manual_seed(seed)
    vae, mean, std = load_vae(out)
    dit, t5, tok = load_dit_t5(out)
    t0 = time.time()
    sweep = {}

    def run(g: float, sh: float) -> float:
        te = time.time()
        res = grid_eval(vae, mean, std, dit, t5, tok, (seed + 7,), SWEEP_STEPS, sh, g)
        sweep[f"g{g}_s{sh}"] = res
        log(stage="sweep", guidance=g, shift=sh, steps=SWEEP_STEPS, eval=res, s=round(time.time() - te, 1))
        return res["both"]

    best_g = max(guidances, key=lambda g: (run(g, 3.0), -abs(g - 5.0)))
    best_s = max((3.0, *shifts), key=lambda sh: (run(best_g, sh) if sh != 3.0 else sweep[f"g{best_g}_s3.0"]["both"],
                                                 -abs(sh - 3.0)))
    defaults = {"height": sd.SIZE, "width": sd.SIZE, "num_frames": sd.NUM_FRAMES, "fps": sd.FPS,
                "sampler": "unipc", "steps": SWEEP_STEPS, "guidance_scale": best_g, "shift": best_s,
                "negative_prompt": "", "text_len": TEXT_LEN}
    te = time.time()
    final = grid_eval(vae, mean, std, dit, t5, tok, (seed + 100, seed + 101), SWEEP_STEPS, best_s, best_g,
                      compressed=False)
    log(stage="final", defaults=defaults, eval=final, s=round(time.time() - te, 1))
    write_pipeline_metadata(out, defaults)
    log(stage="final", event="done", total_s=round(time.time() - t0, 1))
    return {"sweep": sweep, "final": final, "defaults": defaults}


# --------------------------------------------------------------------------------------------
# entry point

def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("checkpoints/tiny-shapes"))
    ap.add_argument("--stage", choices=["vae", "dit", "eval", "all"], default="all",
                    help="vae, then dit (text encoder + DiT), then eval (sampling sweep + metadata); all = the three")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)  # 1 beats 2 on a busy 2-core CPU (no barrier waits)
    ap.add_argument("--vae-from-cycle", type=int, default=0, help="resume the VAE at this cycle from OUT/vae")
    ap.add_argument("--dit-from-cycle", type=int, default=0, help="resume the DiT at this cycle from OUT")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    log = Log(args.out)
    if args.stage in ("vae", "all"):
        train_vae(args.out, args.seed, log, args.vae_from_cycle)
    if args.stage in ("dit", "all"):
        train_dit(args.out, args.seed, log, args.dit_from_cycle)
    if args.stage in ("eval", "dit", "all"):
        finalize(args.out, args.seed, log)


if __name__ == "__main__":
    main()
