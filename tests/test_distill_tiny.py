"""The distillation's teacher bank (export/distill_tiny.py): per-clip seed groups give every clip its own noise
tensor (the runtime draws the noise from the seed alone), and banks round-trip with their seed groups."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
from vidrt.export import distill_tiny as dt  # noqa: E402
from vidrt.export import shapes_data as sd  # noqa: E402


def test_per_clip_groups_give_each_clip_its_own_noise() -> None:
    grid = sd.grid()
    per_seed = dt.grid_cases([2000, 2001], per_clip=False)
    per_clip = dt.grid_cases(list(range(100000, 100000 + 150)), per_clip=True)
    assert len(per_seed) == 2 * len(grid) and len({s for s, *_ in per_seed}) == 2  # 144 clips, 2 noise tensors
    assert len(per_clip) == 150 and len({s for s, *_ in per_clip}) == 150
    assert [tuple(c[1:]) for c in per_clip] == [grid[i % len(grid)] for i in range(150)]  # prompts in rotation
    noise = dt.noise_for([s for s, *_ in per_clip[:4]])
    assert noise.shape == (4, *dt.LATENT)
    assert min(float(np.abs(noise[i] - noise[j]).mean()) for i in range(4) for j in range(i)) > 0.5


def test_bank_round_trip_keeps_seed_groups(tmp_path) -> None:
    n = 3
    bank = dt.TeacherBank(noise=np.zeros((n, *dt.LATENT), np.float32), x0=np.ones((n, *dt.LATENT), np.float32),
                          prompts=["a", "b", "c"], images=np.zeros((n, dt.LATENT[0], 1, *dt.LATENT[2:]), np.float32),
                          image=np.array([False, False, True]), objects=np.zeros((n, 1, *dt.LATENT[1:]), np.float32),
                          right=np.array([True, False, True]), states=np.zeros((n, 2, *dt.LATENT), np.float32))
    groups = {"clip_seeds": [100000, 100001], "image_clip_seeds": [200000]}
    bank.save(tmp_path / "b.npz", "fp", groups)
    got, seeds = dt.TeacherBank.load(tmp_path / "b.npz", "fp")
    assert seeds == {"seeds": [], "image_seeds": [], **groups}
    assert got.prompts == bank.prompts and got.right.tolist() == [True, False, True]
    assert dt.TeacherBank.load(tmp_path / "b.npz", "another teacher") is None
    assert got.subset(got.right).prompts == ["a", "c"]
