"""Named sampling recipes: typed data, one registry (DESIGN.md §9 "Recipes are data").

A recipe is what people type five numbers for: the sampler, the steps or the explicit timestep list,
the shift, the guidance per expert, and which LoRA(s) it was distilled for. `vidrt run --recipe NAME`
fills the request from it; any flag given as well overrides that field. The built-in ones below come
from shared/reference/fast_paths.md B.3 (sources there); a model package can ship its own in its
manifest (`recipes`, e.g. the bundled model's `fast`, whose LoRA is a file of the package).

    recipe = find_recipe("lightx2v-4step", manifest.recipes)   # KeyError-free: UsageError naming the choices
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from vidrt.errors import UsageError, catalog


@dataclass(frozen=True)
class LoraSlot:
    """A LoRA a recipe expects. `file`: a package-relative LoRA file the package ships (loaded with the
    recipe), or None when the user supplies it (`--lora FILE`); `expert`: "dit_high"/"dit_low" on two-expert
    models, None = every expert. `source`: where the published file comes from."""

    strength: float = 1.0
    file: str | None = None
    expert: str | None = None
    source: str = ""


@dataclass(frozen=True)
class LoraRef:
    """A LoRA to apply: a file (safetensors, any key format of fast_paths.md A.2), its strength, and on
    two-expert models the expert it is for ("dit_high" / "dit_low"; None = every expert). `label`: how
    error messages name it, as its caller gave it ("--lora PATH" on the command line, "loras: 'NAME'" for
    a client of `vidrt serve`, which must not see the server's paths); None: "LoRA PATH". Not part of
    equality: two refs to the same file and strength are the same LoRA. `baked`: a record, not a file to
    merge: a LoRA `vidrt export --lora` merged into the package's DiT weights (`path` is then the file's
    name, from the manifest's baked_loras); Settings.loras lists these first so the records reproduce
    the clip, and nothing merges them again (vidrt.lora.LoraMerger)."""

    path: str
    strength: float = 1.0
    expert: str | None = None
    label: str | None = field(default=None, compare=False)
    baked: bool = False

    @property
    def named(self) -> str:
        return self.label or f"LoRA {self.path}"


@dataclass(frozen=True)
class Recipe:
    """One way to sample. Any field left None keeps the model's default."""

    name: str
    description: str
    scheduler: str  # "unipc" | "dpm++" | "euler"
    steps: int | None = None
    timesteps: tuple[float, ...] | None = None  # euler: unshifted, in [0, 1000]; steps = its length
    shift: float | None = None
    guidance: float | None = None  # both experts
    guidance_low_noise: float | None = None  # two-expert models: the low-noise expert, when it differs
    loras: tuple[LoraSlot, ...] = ()
    source: str = ""

    def expert_ok(self, experts: tuple[str, ...]) -> bool:
        return all(s.expert is None or s.expert in experts for s in self.loras)


DISTILL_4_STEPS = (1000.0, 750.0, 500.0, 250.0)

BUILTIN_RECIPES: tuple[Recipe, ...] = (
    Recipe("lightx2v-4step", "LightX2V step/CFG-distilled Wan2.1 / Wan2.2 A14B: 4 Euler steps, no CFG",
           scheduler="euler", steps=4, timesteps=DISTILL_4_STEPS, shift=5.0, guidance=1.0,
           loras=(LoraSlot(1.0, source="lightx2v/Wan2.1-Distill-Loras *_lightx2v_4step.safetensors; A14B: "
                                       "lightx2v/Wan2.2-Distill-Loras high_noise (--lora-high-noise) and "
                                       "low_noise (--lora-low-noise)"),),
           source="ModelTC/LightX2V configs/distill/wan21/wan_t2v_distill_lora_4step_cfg.json, "
                  "configs/distill/wan22/wan_moe_t2v_distill_lora.json"),
    Recipe("lightning-4step", "Wan2.2-Lightning: 4 Euler steps over linspace(1000, 0) shifted by 5, no CFG",
           scheduler="euler", steps=4, shift=5.0, guidance=1.0,
           loras=(LoraSlot(1.0, source="lightx2v/Wan2.2-Lightning high_noise_model / low_noise_model"),),
           source="ModelTC/Wan2.2-Lightning wan/configs/wan_t2v_A14B.py (sample_shift 5, 4 steps, guide 1.0)"),
    Recipe("causvid-4step", "CausVid 1.3B LoRA: timesteps 1000, 750, 500, 250 unshifted, no CFG",
           scheduler="euler", steps=4, timesteps=DISTILL_4_STEPS, shift=1.0, guidance=1.0,
           loras=(LoraSlot(0.5, source="Kijai Wan21_CausVid_bidirect2_T2V_1_3B_lora_rank32"),),
           source="kijai/ComfyUI-WanVideoWrapper wanvideo/schedulers get_scheduler flowmatch_causvid (1.3B)"),
)


def all_recipes(package_recipes: Iterable[Recipe] = ()) -> dict[str, Recipe]:
    """Built-in recipes, then the package's own (a package recipe of the same name wins)."""
    table = {r.name: r for r in BUILTIN_RECIPES}
    table.update({r.name: r for r in package_recipes})
    return table


def find_recipe(name: str, recipes: Mapping[str, Recipe]) -> Recipe:
    if name not in recipes:
        raise UsageError(f"unknown recipe {name!r}; use one of {', '.join(sorted(recipes))} ({catalog()} lists them)")
    return recipes[name]


def describe(r: Recipe) -> str:
    """One line for `vidrt info`."""
    steps = ", ".join(f"{t:g}" for t in r.timesteps) if r.timesteps else f"{r.steps} steps"
    g = "" if r.guidance is None else f", guidance {r.guidance:g}" + (
        f"/{r.guidance_low_noise:g}" if r.guidance_low_noise is not None else "")
    shift = "" if r.shift is None else f", shift {r.shift:g}"
    lora = "".join(f", LoRA {s.file or 'yours'} x{s.strength:g}" for s in r.loras)
    return f"{r.name:<16}{r.scheduler} [{steps}]{shift}{g}{lora}: {r.description}"
