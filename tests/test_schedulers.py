"""vidrt.schedulers against the official Wan schedulers (torch), configured as wan/text2video.py does."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # wan_ref, when conftest has not put tests/ on the path

from vidrt.schedulers import (  # noqa: E402
    SOLVERS,
    FlowDPMpp,
    FlowUniPC,
    Step,
    expert_for_timestep,
    make_schedule,
    make_solver,
)

torch = pytest.importorskip("torch")
wan_ref = pytest.importorskip("wan_ref")

TOL = 1e-6
# Step parity is judged relative to the latents' scale (max |x| ~ 3.3 for these N(0,1) latents): torch
# takes log() from MKL, which is off by 1 ulp for ~8% of inputs, and the solvers use differences of
# logs (h = lambda_t - lambda_s) where that ulp shows through. With torch's own lambdas substituted,
# dpm++ agrees bit for bit and unipc to 4e-7 absolute.
PLANS = [(50, 5.0), (40, 12.0), (40, 5.0), (20, 3.0), (4, 3.0), (2, 1.0), (1, 1.0)]


@pytest.fixture(scope="module")
def official():
    return wan_ref.load("utils.fm_solvers_unipc"), wan_ref.load("utils.fm_solvers")


def official_scheduler(official, kind: str, steps: int, shift: float):
    """The scheduler, after set_timesteps, exactly as the official generate() builds it."""
    unipc_mod, dpm_mod = official
    if kind == "unipc":
        sched = unipc_mod.FlowUniPCMultistepScheduler(num_train_timesteps=1000, shift=1, use_dynamic_shifting=False)
        sched.set_timesteps(steps, device="cpu", shift=shift)
    else:
        sched = dpm_mod.FlowDPMSolverMultistepScheduler(num_train_timesteps=1000, shift=1, use_dynamic_shifting=False)
        dpm_mod.retrieve_timesteps(sched, device="cpu", sigmas=dpm_mod.get_sampling_sigmas(steps, shift))
    return sched


@pytest.mark.parametrize("kind", ["unipc", "dpm++"])
@pytest.mark.parametrize(("steps", "shift"), PLANS)
def test_schedule_matches_official(official, kind, steps, shift):
    sched = official_scheduler(official, kind, steps, shift)
    plan = make_schedule(kind, steps, shift)
    assert len(plan) == steps == len(sched.timesteps)
    assert [s.index for s in plan] == list(range(steps))
    # the model is fed the official int64 timesteps: compare exactly
    assert sched.timesteps.dtype == torch.int64
    assert [s.timestep for s in plan] == [float(t) for t in sched.timesteps.tolist()]
    ref_sigmas = sched.sigmas.numpy()  # [steps + 1] float32
    sigmas = np.array([s.sigma for s in plan] + [plan[-1].sigma_next], dtype=np.float32)
    np.testing.assert_allclose(sigmas, ref_sigmas, rtol=0, atol=TOL)
    assert [s.sigma_next for s in plan[:-1]] == [s.sigma for s in plan[1:]]
    assert plan[-1].sigma_next == 0.0


def test_schedule_first_timestep_differs_between_solvers():
    # unipc starts at the last training sigma f32(0.999), dpm++ at exactly 1.0
    assert make_schedule("unipc", 50, 5.0)[0].timestep == 999.0
    assert make_schedule("dpm++", 50, 5.0)[0].timestep == 1000.0
    assert make_schedule("dpm++", 50, 5.0)[0].sigma == 1.0


def pseudo_velocity(x: np.ndarray, step: int) -> np.ndarray:
    """A deterministic stand-in for the DiT after CFG: smooth in x, different at every step, unit scale."""
    phase = np.float32(0.37 * step)
    grid = np.linspace(-1.0, 1.0, x.size, dtype=np.float32).reshape(x.shape)
    return (np.tanh(x) * np.float32(0.8) + np.sin(grid * np.float32(3.0) + phase) * np.float32(0.5)).astype(np.float32)


@pytest.mark.parametrize("kind", ["unipc", "dpm++"])
@pytest.mark.parametrize("shape", [(16, 3, 4, 4), (1, 48, 2, 4, 4)])
@pytest.mark.parametrize(("steps", "shift"), [(50, 5.0), (40, 12.0), (4, 3.0), (1, 1.0)])
def test_steps_match_official(official, kind, shape, steps, shift):
    sched = official_scheduler(official, kind, steps, shift)
    plan = make_schedule(kind, steps, shift)
    solver = make_solver(kind, plan)
    assert isinstance(solver, SOLVERS[kind])

    noise = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    ours, ref = noise.copy(), torch.from_numpy(noise.copy())
    for i, t in enumerate(sched.timesteps):
        # same model output for both, computed from the official trajectory
        v = pseudo_velocity(ref.numpy(), i)
        ref = sched.step(torch.from_numpy(v), t, ref, return_dict=False)[0]
        ours = solver.step(v, ours)
        assert ours.dtype == np.float32 and ours.shape == shape
        err = float(np.max(np.abs(ours - ref.numpy())))
        scale = max(1.0, float(np.max(np.abs(ref.numpy()))))
        assert err <= TOL * scale, f"step {i}: max abs diff {err:.3g} at latent scale {scale:.3g}"
    assert solver.step_index == steps
    with pytest.raises(RuntimeError):
        solver.step(v, ours)


def test_solver_restarts_cleanly():
    # two solvers on one plan are independent; a fresh one repeats a run bit for bit
    plan = make_schedule("unipc", 6, 5.0)
    x = np.random.default_rng(1).standard_normal((4, 2, 3, 3)).astype(np.float32)
    runs = []
    for _ in range(2):
        solver, y = FlowUniPC(plan), x
        for i in range(len(plan)):
            y = solver.step(pseudo_velocity(y, i), y)
        runs.append(y)
    np.testing.assert_array_equal(runs[0], runs[1])


def test_bad_arguments():
    with pytest.raises(ValueError, match="unipc"):
        make_schedule("ddim", 10, 5.0)
    with pytest.raises(ValueError, match="euler"):
        make_schedule("unipc", 2, 5.0, timesteps=(1000.0, 500.0))
    with pytest.raises(ValueError, match="decrease strictly"):
        make_schedule("euler", 2, 5.0, timesteps=(500.0, 1000.0))
    with pytest.raises(ValueError, match="dpm\\+\\+"):
        make_solver("ddim", make_schedule("unipc", 10, 5.0))
    for steps in (0, -3):
        with pytest.raises(ValueError):
            make_schedule("unipc", steps, 5.0)
    with pytest.raises(ValueError):
        make_schedule("dpm++", 10, 0.0)
    with pytest.raises(ValueError):
        FlowDPMpp(())
    solver = FlowDPMpp(make_schedule("dpm++", 3, 5.0))
    with pytest.raises(ValueError):
        solver.step(np.zeros((2, 3), np.float32), np.zeros((2, 4), np.float32))


def test_step_is_frozen():
    step = make_schedule("unipc", 3, 5.0)[0]
    assert isinstance(step, Step)
    with pytest.raises(AttributeError):
        step.sigma = 0.5  # type: ignore[misc]


@pytest.mark.parametrize("kind", ["unipc", "dpm++"])
@pytest.mark.parametrize(("steps", "shift", "boundary"), [(40, 12.0, 0.875), (40, 5.0, 0.900)])
def test_expert_switch_matches_official(official, kind, steps, shift, boundary):
    # A14B T2V (shift 12, boundary 0.875) and I2V (shift 5, boundary 0.9), as text2video.py decides:
    # the high-noise expert while t.item() >= boundary * num_train_timesteps
    sched = official_scheduler(official, kind, steps, shift)
    ref = ["high" if t.item() >= boundary * 1000 else "low" for t in sched.timesteps]
    ours = [expert_for_timestep(s.timestep, boundary) for s in make_schedule(kind, steps, shift)]
    assert ours == ref
    # experts never switch back
    assert ours == sorted(ours)  # "high" < "low"


def test_a14b_t2v_has_26_high_noise_steps():
    plan = make_schedule("unipc", 40, 12.0)
    assert sum(expert_for_timestep(s.timestep, 0.875) == "high" for s in plan) == 26
    assert expert_for_timestep(875.0, 0.875) == "high"
    assert expert_for_timestep(874.0, 0.875) == "low"
