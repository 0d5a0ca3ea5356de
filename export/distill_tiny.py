"""Distil the bundled tiny model's 25-step CFG sampler into a 4-step CFG-free Euler LoRA (issue 12 item 4).

    nice -n 10 python -m vidrt.export.distill_tiny --model checkpoints/tiny-shapes \
        --out checkpoints/tiny-shapes/fast_lora.safetensors [--steps 800] [--rank 16]

Teacher: the bundled model as shipped, sampled as the runtime samples it (sampling_defaults.json:
official UniPC, 25 steps, CFG at its guidance and shift; `train_tiny_i2v.sample`), from seeded
noise, for every grid prompt x `--teacher-seeds` seeds (seeds 2000.., not the grid test's 1000/1001),
and in TI2V image mode x `--image-seeds` seeds (2100..; the picture is frame 0 of a random clip of the
prompt; frame 0 re-imposed after every step, its tokens at timestep 0); or with one seed per clip
(`--clip-seeds` 100000.., `--image-clip-seeds` 200000..: clip i gets seed A + i and grid prompt i mod 72, so
every clip starts from its own noise tensor; per-seed groups give 72 clips the same one). Only the samples the pixel
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


def student_schedule(timesteps: tuple[float, ...] = TIMESTEPS, shift: float = SHIFT
                     ) -> list[tuple[float, float, float]]:
    """(fed timestep, sigma, next sigma) of the runtime's Euler plan (vidrt.schedulers, same numbers)."""
    from vidrt.schedulers import make_schedule

    return [(s.timestep, s.sigma, s.sigma_next) for s in make_schedule("euler", len(timesteps), shift, 1000, timesteps)]


LATENT = (tt.DIT_CONFIG["in_channels"], (sd.NUM_FRAMES - 1) // 4 + 1, sd.SIZE // 8, sd.SIZE // 8)


def noise_for(seeds: list[int]) -> np.ndarray:
    """The runtime's initial latents: numpy standard normal per seed, [N, z, f, h, w] float32."""
    return np.stack([np.random.default_rng(s).standard_normal(LATENT, dtype=np.float32) for s in seeds])


def object_cells(clips: list[np.ndarray]) -> np.ndarray:
    """[N, 1, f, h, w] in [0, 1]: the share of object pixels (judge's threshold) in each latent cell's 8x8 patch,
    max over the frames that latent frame stands for (latent 0 = frame 0, latent k = frames 4k-3 .. 4k)."""
    out = np.zeros((len(clips), 1, *LATENT[1:]), np.float32)
    for n, v in enumerate(clips):
        obj = (np.abs(v.astype(np.float32) - v[0, :2, :2].reshape(-1, 3).mean(0)).max(-1) > 60.0).astype(np.float32)
        cells = obj.reshape(obj.shape[0], LATENT[2], 8, LATENT[3], 8).mean((2, 4))  # [F, h, w]
        out[n, 0, 0] = cells[0]
        for k in range(1, LATENT[1]):
            out[n, 0, k] = cells[4 * k - 3:4 * k + 1].max(0)
    return out


# The teacher's seed groups: (name, image mode, one noise seed per clip). Per-seed groups give every grid prompt
# the same seed (the runtime draws the noise from the seed alone, so 72 clips share one noise tensor); per-clip
# groups give clip i its own seed (start + i) and grid prompt i mod 72, so the student sees as many noise tensors
# as clips.
SEED_GROUPS = {"seeds": (False, False), "image_seeds": (True, False),
               "clip_seeds": (False, True), "image_clip_seeds": (True, True)}


def grid_cases(seeds: list[int], per_clip: bool) -> list[tuple[int, str, str, str]]:
    """(seed, colour, shape, direction) per clip: every grid prompt x every seed, or (per_clip) seed i with grid
    prompt i mod 72."""
    grid = sd.grid()
    if per_clip:
        return [(s, *grid[i % len(grid)]) for i, s in enumerate(seeds)]
    return [(s, c, sh, d) for s in seeds for c, sh, d in grid]


@dataclass
class TeacherBank:
    """What the student learns from: per example the noise, the teacher's final latents, the prompt, and (image
    examples) the normalised image latent [z, 1, h, w] (zeros and image False for text-only examples); the object
    share of each latent cell in the teacher's decoded clip, and whether the pixel judge reads that clip as right."""

    noise: np.ndarray
    x0: np.ndarray
    prompts: list[str]
    images: np.ndarray
    image: np.ndarray  # bool [N]
    objects: np.ndarray  # [N, 1, f, h, w]
    right: np.ndarray  # bool [N]
    states: np.ndarray  # [N, steps + 1, z, f, h, w]: the teacher's state entering each of its steps, then x0

    FIELDS = ("noise", "x0", "images", "image", "objects", "right", "states")

    def subset(self, keep: np.ndarray) -> TeacherBank:
        return TeacherBank(**{f: getattr(self, f)[keep] for f in self.FIELDS},
                           prompts=[p for p, k in zip(self.prompts, keep, strict=True) if k])

    def save(self, path: Path, fingerprint: str, groups: dict[str, list[int]]) -> None:
        """groups: which seeds made it, by SEED_GROUPS name."""
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, fingerprint=fingerprint, prompts=np.asarray(self.prompts),
                 **{g: np.asarray(groups.get(g, []), np.int64) for g in SEED_GROUPS},
                 **{f: getattr(self, f) for f in self.FIELDS})
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path, fingerprint: str) -> tuple[TeacherBank, dict[str, list[int]]] | None:
        """(bank, its seeds by SEED_GROUPS name), or None when the file is missing or was made by another teacher.
        Banks written before the per-clip groups existed read as having none of them."""
        if not path.exists():
            return None
        z = np.load(path)
        if str(z["fingerprint"]) != fingerprint:
            return None
        bank = cls(prompts=[str(p) for p in z["prompts"]], **{f: z[f] for f in cls.FIELDS})
        return bank, {g: [int(s) for s in z[g]] if g in z else [] for g in SEED_GROUPS}

    @classmethod
    def concat(cls, parts: list[TeacherBank]) -> TeacherBank:
        return cls(**{f: np.concatenate([getattr(p, f) for p in parts]) for f in cls.FIELDS},
                   prompts=[q for p in parts for q in p.prompts])


def fingerprint(model: Path, defaults: dict) -> str:
    """Which teacher made a bank: the DiT and text encoder bytes and the sampling defaults."""
    import hashlib

    h = hashlib.sha256(json.dumps(defaults, sort_keys=True).encode())
    for f in sorted([*(model / "transformer").iterdir(), *(model / "text_encoder").iterdir()]):
        h.update(f.read_bytes())
    return h.hexdigest()


def seed_list(spec: str, first: int) -> list[int]:
    """"N" -> first .. first + N - 1; "A-B" -> A .. B."""
    if "-" in spec:
        a, b = (int(v) for v in spec.split("-"))
        return list(range(a, b + 1))
    return [first + i for i in range(int(spec))]


def teacher_sample(dit, t5, tok, prompts: list[str], seeds: list[int], steps: int, shift: float, guidance: float,
                   images: torch.Tensor | None = None, negative: str = "", chunk: int = 72) -> np.ndarray:
    """train_tiny_i2v.sample (the runtime's loop: numpy noise per seed, official UniPC, CFG, image mode), keeping
    every state: [N, steps + 1, z, f, h, w], the state entering step k at [:, k] and the final sample at [:, -1]."""
    return ti.sample(dit, t5, tok, prompts, seeds, steps, shift, guidance, images, negative, chunk, keep_states=True)


def teacher_sigmas(steps: int, shift: float) -> np.ndarray:
    """[steps + 1] the sigmas of the teacher's states (its UniPC plan, final 0)."""
    from vidrt.schedulers import make_schedule

    plan = make_schedule("unipc", steps, shift)
    return np.asarray([st.sigma for st in plan] + [0.0])


def teacher_bank(vae, mean, std, dit, t5, tok, defaults: dict, groups: dict[str, list[int]]) -> TeacherBank:
    """The teacher's samples for each seed group (SEED_GROUPS: text only or image mode, every grid prompt x each
    seed or one seed per clip; image mode: the picture is frame 0 of a random clip of that prompt, so its
    position suits the motion); and which of them the pixel judge reads as right (colour of the prompt /
    picture, direction of the prompt)."""
    args = (defaults["steps"], defaults["shift"], defaults["guidance_scale"])
    neg = defaults.get("negative_prompt", "")
    parts = []
    for name, (with_image, per_clip) in SEED_GROUPS.items():
        group = groups.get(name, [])
        if not group:
            continue
        cases = grid_cases(group, per_clip)
        prompts = [sd.prompt_for(c, sh, d) for _, c, sh, d in cases]
        seed_list = [s for s, *_ in cases]
        images = np.zeros((len(cases), LATENT[0], 1, *LATENT[2:]), np.float32)
        if with_image:
            rng = np.random.default_rng(group[0])
            pics = np.stack([sd.render(sd.random_spec(rng, c, sh, d))[0] for _, c, sh, d in cases])
            images = ti.encode_pictures(vae, mean, std, pics).numpy()
        states = teacher_sample(dit, t5, tok, prompts, seed_list, *args,
                                images=torch.from_numpy(images) if with_image else None, negative=neg)
        x0 = states[:, -1]
        clips = ti.decode(vae, mean, std, x0)
        right = np.asarray([sd.classify_clip(v) == (c, d) for v, (_, c, _, d) in zip(clips, cases, strict=True)])
        parts.append(TeacherBank(noise_for(seed_list), x0, prompts, images, np.full(len(cases), with_image),
                                 object_cells(clips), right, states))
    return TeacherBank.concat(parts)


def timesteps(t: float, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """[B, tokens]: t on every token, 0 on the first latent frame's tokens of image examples (TI2V image mode)."""
    _, _, f, h, w = x.shape
    row = torch.full((len(x), f * (h // 2) * (w // 2)), t)
    row[image, :(h // 2) * (w // 2)] = 0.0
    return row


def student_sample(dit, proc, ctx, bias, noise: torch.Tensor, z: torch.Tensor, image: torch.Tensor,
                   sched: list[tuple[float, float, float]], grad: bool = False) -> list[torch.Tensor]:
    """The states entering each Euler step (and the final sample last); image examples start with frame 0 = z
    and get it re-imposed after every step, as the runtime's FirstFrame policy does. `grad`: keep the graph
    (the states are then functions of the LoRA)."""
    keep = torch.ones(len(noise), 1, noise.shape[2], 1, 1)
    keep[image, :, 0] = 0.0
    x = noise * keep + torch.nn.functional.pad(z, (0, 0, 0, 0, 0, noise.shape[2] - 1)) * (1 - keep)
    states = [x]
    proc.bias = bias
    for t, s, s_next in sched:
        with torch.set_grad_enabled(grad):
            v = dit(hidden_states=x, timestep=timesteps(t, x, image), encoder_hidden_states=ctx, return_dict=False)[0]
            x = x + (s_next - s) * v * keep  # the given frame stays as it is
        states.append(x)
    return states


@torch.no_grad()
def evaluate_student(dit, t5, tok, vae, mean, std, seeds: list[int], sched, chunk: int = 72,
                     per_clip: bool = False) -> dict:
    """The `fast` recipe in torch on all 72 grid prompts x `seeds` (text only), or (per_clip) seed i with grid
    prompt i mod 72 (grid_cases), judged from the decoded pixels."""
    proc = tt.PadCompressedCrossAttn()
    old = tt.set_cross_attn(dit, proc)
    cases = grid_cases(seeds, per_clip)
    results = []
    for i in range(0, len(cases), chunk):
        part = cases[i:i + chunk]
        ids, mask = tt.token_ids(tok, [sd.prompt_for(c, sh, d) for _, c, sh, d in part], tt.CTX_ROWS)
        ctx = tt.encode_text(t5, ids, mask)
        noise = torch.from_numpy(noise_for([s for s, *_ in part]))
        none, z = torch.zeros(len(part), dtype=torch.bool), torch.zeros(len(part), LATENT[0], 1, *LATENT[2:])
        x = student_sample(dit, proc, ctx, tt.pad_bias(mask), noise, z, none, sched)[-1]
        clips = ti.decode(vae, mean, std, x.numpy())
        results += [(sd.classify_clip(v), (c, d)) for v, (_, c, _, d) in zip(clips, part, strict=True)]
    tt.set_cross_attn(dit, old)
    return sd.score(results)


def load_lora(modules: dict[str, LoRALinear], path: Path) -> None:
    from safetensors.torch import load_file

    init = load_file(str(path))
    for p, m in modules.items():
        key = f"diffusion_model.blocks.{p.split('.', 2)[1]}.{TARGETS[p.split('.', 2)[2]]}"
        with torch.no_grad():
            m.down.copy_(init[f"{key}.lora_down.weight"])
            m.up.copy_(init[f"{key}.lora_up.weight"])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=Path("checkpoints/tiny-shapes"))
    ap.add_argument("--out", type=Path, default=Path("checkpoints/tiny-shapes/fast_lora.safetensors"))
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--shift", type=float, default=SHIFT, help="the student's Euler shift (the recipe's)")
    ap.add_argument("--timesteps", default=",".join(f"{t:g}" for t in TIMESTEPS), help="the student's timesteps")
    ap.add_argument("--teacher-seeds", default="6", help="text-only teacher seeds per grid prompt: N (2000..) or A-B")
    ap.add_argument("--image-seeds", default="0", help="image-mode teacher seeds per grid prompt: N (2100..) or A-B")
    ap.add_argument("--clip-seeds", default="0", help="text-only teacher clips with one seed each (clip i: seed "
                    "A + i, grid prompt i mod 72): N (100000..) or A-B")
    ap.add_argument("--image-clip-seeds", default="0", help="the same in image mode: N (200000..) or A-B")
    ap.add_argument("--bank", type=Path, action="append", default=[],
                    help="cache of the teacher's samples (.npz; reused when the model, sampling defaults and seeds are "
                    "the same); repeated: banks made beforehand, learned from together")
    ap.add_argument("--bank-only", action="store_true", help="make the --bank file and stop")
    ap.add_argument("--keep-all", action="store_true", help="also learn from teacher samples the judge reads wrong")
    ap.add_argument("--object-weight", type=float, default=0.0,
                    help="latent cells weigh 1 + W x (their object share in the teacher's clip) in the loss")
    ap.add_argument("--teacher-steps", default="", help="K0,K1,..: the student's sigmas are the teacher's before "
                    "its steps K0, K1, .. (shift and timesteps follow; overrides --shift/--timesteps)")
    ap.add_argument("--objective", choices=("x0", "segment", "both"), default="x0",
                    help="x0: on the student's own rollout, every step's x0 estimate = the teacher's final sample; "
                    "segment: from the teacher's state at sigma_i, the student's Euler step lands on the teacher's "
                    "state at sigma_i+1 (needs --teacher-steps); both: their mean")
    ap.add_argument("--init", type=Path, default=None, help="start from this LoRA file (same rank) instead of zero")
    ap.add_argument("--eval-seeds", default="", help="judge the student on the 72 prompts x these seeds")
    ap.add_argument("--eval-clip-seeds", default="", help="A-B: also judge it on one clip per seed (seed A + i, "
                    "grid prompt i mod 72): many noise tensors; --eval-seeds gives 72 clips one")
    ap.add_argument("--eval-every", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    from safetensors.torch import save_file

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    log_path = args.out.with_suffix(".log.jsonl")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.init is None or args.init.resolve() != args.out.resolve():  # continuing a LoRA in place: its log goes on
        log_path.unlink(missing_ok=True)
    t_start = time.time()

    def log(**rec: object) -> None:
        rec = {"wall_s": round(time.time() - t_start, 1), **rec}
        with log_path.open("a") as fh:
            fh.write(json.dumps(rec) + "\n")
        print(json.dumps(rec), flush=True)

    defaults = json.loads((args.model / "sampling_defaults.json").read_text())
    times = tuple(float(t) for t in args.timesteps.split(","))
    anchors = [int(k) for k in args.teacher_steps.split(",") if k]
    if anchors:  # u = sigma / (shift - (shift - 1) sigma) inverts the shift: the same sigmas as the teacher's states
        args.shift = float(defaults["shift"])
        sig = teacher_sigmas(defaults["steps"], args.shift)[anchors]
        times = tuple(round(float(1000 * q / (args.shift - (args.shift - 1) * q)), 2) for q in sig)
        anchors.append(defaults["steps"])
    if args.objective != "x0" and not anchors:
        raise SystemExit("--objective segment/both needs --teacher-steps")
    sched = student_schedule(times, args.shift)
    eval_seeds = [int(s) for s in args.eval_seeds.split(",") if s]
    eval_clip_seeds = seed_list(args.eval_clip_seeds, 900000) if args.eval_clip_seeds else []
    log(stage="args", **{k: str(v) for k, v in vars(args).items()}, schedule=sched, student_timesteps=times)
    dit, t5, tok = tt.load_dit_t5(args.model)
    vae, mean, std = tt.load_vae(args.model)
    for p in list(dit.parameters()) + list(t5.parameters()):
        p.requires_grad_(False)
    alpha = float(args.rank)  # scale alpha / rank = 1
    modules = add_lora(dit, args.rank, alpha)
    if args.init is not None:
        load_lora(modules, args.init)
        log(stage="init", lora=str(args.init))

    def check(step: int) -> None:
        if eval_seeds:
            te = time.time()
            log(stage="eval", step=step, seeds=eval_seeds, score=evaluate_student(dit, t5, tok, vae, mean, std,
                                                                                 eval_seeds, sched),
                s=round(time.time() - te, 1))
        if eval_clip_seeds:
            te = time.time()
            log(stage="eval", step=step, clip_seeds=f"{eval_clip_seeds[0]}-{eval_clip_seeds[-1]}",
                score=evaluate_student(dit, t5, tok, vae, mean, std, eval_clip_seeds, sched, per_clip=True),
                s=round(time.time() - te, 1))

    if args.steps == 0:
        check(0)
        return
    groups = {"seeds": seed_list(args.teacher_seeds, 2000), "image_seeds": seed_list(args.image_seeds, 2100),
              "clip_seeds": seed_list(args.clip_seeds, 100000),
              "image_clip_seeds": seed_list(args.image_clip_seeds, 200000)}
    fp = fingerprint(args.model, defaults)
    if len(args.bank) > 1:  # banks made beforehand (e.g. in parallel, --bank-only): all from this teacher
        loaded = [TeacherBank.load(b, fp) for b in args.bank]
        if any(b is None for b in loaded):
            bad = [str(b) for b, x in zip(args.bank, loaded, strict=True) if x is None]
            raise SystemExit(f"--bank: missing or made by another teacher: {', '.join(bad)}")
        bank = TeacherBank.concat([b[0] for b in loaded])
        groups = {g: [s for b in loaded for s in b[1][g]] for g in SEED_GROUPS}
    else:
        got = TeacherBank.load(args.bank[0], fp) if args.bank else None
        bank = None
        if got is not None and got[1] == groups:
            bank = got[0]
        if bank is None:
            with torch.no_grad():
                for m in modules.values():  # the teacher is the base: LoRA off while it samples
                    m.scale_saved, m.scale = m.scale, 0.0
                bank = teacher_bank(vae, mean, std, dit, t5, tok, defaults, groups)
                for m in modules.values():
                    m.scale = m.scale_saved
            if args.bank:
                bank.save(args.bank[0], fp, groups)
    seeds, image_seeds = groups["seeds"], groups["image_seeds"]
    ranges = {g: f"{min(v)}-{max(v)} ({len(v)})" for g, v in groups.items() if v and g.endswith("clip_seeds")}
    if args.bank_only:
        log(stage="bank", samples=len(bank.prompts), seeds=seeds, image_seeds=image_seeds, **ranges)
        return
    right = bank.right
    log(stage="teacher", samples=len(bank.prompts), seeds=seeds, image_seeds=image_seeds, **ranges,
        image_samples=int(bank.image.sum()), judged_right=int(right.sum()),
        judged_right_image=int(right[bank.image].sum()), defaults=defaults)
    if not args.keep_all:  # learn only where the teacher is right: its misses would be distilled too
        bank = bank.subset(right)
    prompts = bank.prompts

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
    weight_t = 1.0 + args.object_weight * torch.from_numpy(bank.objects)
    states_t = torch.from_numpy(bank.states)
    ema = None
    for step in range(args.steps):
        if args.eval_every and step % args.eval_every == 0 and step > 0:
            check(step)
        lr = tt.lr_at(step, args.steps, args.lr, warmup=args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.from_numpy(rng.choice(len(prompts), args.batch, replace=False))
        ctx, bias, target, image = ctx_all[idx], bias_all[idx], x0_t[idx], image_t[idx]
        w = weight_t[idx].clone()
        w[image, :, 0] = 0.0  # the given frame is re-imposed: no loss there
        loss = torch.zeros(())
        if args.objective != "segment":
            states = student_sample(dit, proc, ctx, bias, noise_t[idx], z_t[idx], image, sched)
            for i, (t, s, _) in enumerate(sched):
                x = states[i]
                v = dit(hidden_states=x, timestep=timesteps(t, x, image), encoder_hidden_states=ctx,
                        return_dict=False)[0]
                loss = loss + ((x - s * v - target) ** 2 * w).sum() / (w.sum() * x.shape[1])
        if args.objective != "x0":  # all steps in one batch: [4 B, ...] from the teacher's states
            tstates = states_t[idx][:, anchors]  # [B, 5, z, f, h, w]
            n = len(sched)
            x = tstates[:, :n].transpose(0, 1).flatten(0, 1)
            nxt = tstates[:, 1:].transpose(0, 1).flatten(0, 1)
            sig = torch.tensor([s for _, s, _ in sched]).repeat_interleave(len(idx)).view(-1, 1, 1, 1, 1)
            sig_next = torch.tensor([q for _, _, q in sched]).repeat_interleave(len(idx)).view(-1, 1, 1, 1, 1)
            tt_rows = torch.cat([timesteps(t, x[:len(idx)], image) for t, _, _ in sched])
            proc.bias = bias.repeat(n, 1, 1, 1)
            v = dit(hidden_states=x, timestep=tt_rows, encoder_hidden_states=ctx.repeat(n, 1, 1), return_dict=False)[0]
            target_x0 = x + (nxt - x) * sig / (sig - sig_next)  # the teacher's segment, extrapolated to sigma 0
            ww = w.repeat(n, 1, 1, 1, 1)
            seg = ((x - sig * v - target_x0) ** 2 * ww).sum() / (ww.sum() * x.shape[1])
            loss = loss + seg * n
            proc.bias = bias
        loss = loss / (len(sched) * (2 if args.objective == "both" else 1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % 50 == 0 or step == args.steps - 1:
            log(stage="train", step=step, loss=round(ema, 5), lr=lr)
        if (step + 1) % 200 == 0 or step == args.steps - 1:
            tmp = args.out.with_suffix(".tmp")
            save_file(lora_state_dict(modules, args.rank, alpha), str(tmp),
                      metadata={"format": "wan-original-lora", "rank": str(args.rank), "steps": str(step + 1),
                                "recipe": f"euler {','.join(f'{t:g}' for t in times)} shift {args.shift:g} guidance 1"})
            tmp.replace(args.out)
    check(args.steps)
    log(stage="done", steps=args.steps, out=str(args.out))


if __name__ == "__main__":
    main()
