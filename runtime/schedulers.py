"""Flow-matching samplers for Wan2.1 / Wan2.2, in numpy only (the runtime never imports torch).

Three solvers. Two ported from the official Wan code (PyPI `wan22`, `wan/utils/fm_solvers*.py`) in the
configuration its pipelines use (`text2video.py`, `image2video.py`, `textimage2video.py`):

* "unipc": FlowUniPCMultistepScheduler(shift=1), then set_timesteps(steps, shift=sample_shift).
  UniP predictor + UniC corrector, bh2, data (x0) prediction, order 2, lower order on the last step.
* "dpm++": FlowDPMSolverMultistepScheduler(shift=1) fed get_sampling_sigmas(steps, shift).
  DPM-Solver++ (2M, midpoint), first order on the first and on the last step.

* "euler": plain flow-matching Euler over an explicit timestep list, the sampler the step-distilled
  recipes were trained with (LightX2V `WanStepDistillScheduler`, Wan2.2-Lightning `EulerScheduler`;
  shared/reference/fast_paths.md B.1-B.4): sigma_i = shift(t_i / 1000), the DiT is fed sigma_i * 1000
  as it is (fractional, e.g. 937.5: never truncated), x <- x + (sigma_{i+1} - sigma_i) * v, sigma after
  the last step 0. Numerics as diffusers `FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=...)`:
  the shift in float32, timesteps = float32 sigma * 1000.

All three work on the flow-matching path x_sigma = (1 - sigma) * x0 + sigma * noise, so alpha = 1 - sigma,
and the DiT predicts the velocity v = noise - x0, hence x0 = x - sigma * v.

Numerics follow the official code so results agree to float32 rounding:
* The plan (sigmas, timesteps) is built in float64 like the official numpy code; sigmas are then
  rounded to float32 (the official torch tensors), timesteps are truncated to integers (int64 there).
* Every update is float32 arithmetic, scalars included, in the official order of operations. Scalars
  are explicit np.float32 so numpy 1.x (value-based casting) and 2.x (NEP 50) give the same dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_F32 = np.float32
_ZERO = _F32(0.0)
_HALF = _F32(0.5)
_ONE = _F32(1.0)


@dataclass(frozen=True)
class Step:
    """One denoising step of the plan.

    timestep:   the value the DiT is fed at this step, exactly as the official loop feeds it: an integer for
                unipc/dpm++ (the official tensor is int64; Wan2.2 TI2V-5B multiplies it per token by a 0/1
                mask), a float32 value for euler (937.5: the distilled recipes feed it fractional).
    sigma:      float32 noise level of the sample entering this step (held here as a Python float).
    sigma_next: float32 noise level after the update; 0.0 after the last step.
    """

    index: int
    timestep: float
    sigma: float
    sigma_next: float


def _shift(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """Timestep shift s*sigma / (1 + (s-1)*sigma), float64 (the official code shifts numpy arrays)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def make_schedule(kind: str, num_steps: int, shift: float, num_train_timesteps: int = 1000,
                  timesteps: Sequence[float] | None = None) -> tuple[Step, ...]:
    """The host-side plan of all `num_steps` steps for solver `kind` ("unipc", "dpm++" or "euler").

    timesteps: "euler" only, the unshifted timestep list in [0, num_train_timesteps] (e.g. LightX2V's
    1000, 750, 500, 250), one per step, strictly decreasing; None = linspace(N, 0, num_steps + 1)[:-1]
    (Wan2.2-Lightning's EulerScheduler).

    The two official solvers build slightly different plans:
    * unipc starts from the last training sigma, 1 - 1/num_train_timesteps rounded to float32
      (0.999000012... for 1000), so its first timestep is 999.
    * dpm++ starts from sigma = 1.0 exactly, so its first timestep is num_train_timesteps (1000).
    """
    if kind not in SOLVERS:
        raise ValueError(f"unknown sampler kind {kind!r}; valid kinds: {sorted(SOLVERS)}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    if not (math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift must be a finite number > 0, got {shift!r}")
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps!r}")
    n, n_train, shift = int(num_steps), int(num_train_timesteps), float(shift)
    if kind == "euler":
        return _euler_schedule(n, shift, n_train, timesteps)
    if timesteps is not None:
        raise ValueError(f"an explicit timestep list is for the euler sampler, not {kind!r}")

    if kind == "unipc":
        # Training sigmas 1 - linspace(1, 1/N, N) reversed, stored as float32; the plan spans
        # [sigma_max, sigma_min] = [train[0], train[-1]] = [f32(1 - 1/N), 0] in float64.
        train = (1.0 - np.linspace(1, 1 / n_train, n_train)[::-1]).astype(np.float32)
        sigma_max, sigma_min = float(train[0]), float(train[-1])
        sigmas64 = _shift(np.linspace(sigma_max, sigma_min, n + 1)[:-1], shift)
    else:
        # get_sampling_sigmas: linspace(1, 0) without the final 0. The scheduler's own shift is 1
        # there, an exact identity in float64, so it is not applied again.
        sigmas64 = _shift(np.linspace(1, 0, n + 1)[:n], shift)

    # [n] int, truncated toward zero from the float64 sigmas (official: .to(torch.int64))
    timesteps = (sigmas64 * n_train).astype(np.int64)
    # [n + 1] float32, final sigma 0 ("zero" final_sigmas_type)
    sigmas = np.concatenate([sigmas64, [0.0]]).astype(np.float32)
    return tuple(
        Step(index=i, timestep=float(timesteps[i]), sigma=float(sigmas[i]), sigma_next=float(sigmas[i + 1]))
        for i in range(n)
    )


def _euler_schedule(n: int, shift: float, n_train: int, timesteps: Sequence[float] | None) -> tuple[Step, ...]:
    if timesteps is None:
        u = (np.linspace(n_train, 0, n + 1)[:n] / n_train).astype(np.float32)
    else:
        t = np.asarray(timesteps, dtype=np.float64)
        if t.ndim != 1 or len(t) != n:
            raise ValueError(f"{len(t)} timesteps for {n} steps: give one per step")
        if not (np.isfinite(t).all() and (t > 0).all() and (t <= n_train).all() and (np.diff(t) < 0).all()):
            raise ValueError(f"timesteps must decrease strictly within (0, {n_train}], got {list(timesteps)}")
        u = (t / n_train).astype(np.float32)  # diffusers: np.array(sigmas).astype(np.float32)
    f32_shift = _F32(shift)
    sigmas = f32_shift * u / (_ONE + (f32_shift - _ONE) * u)  # [n] float32, shifted like the training
    fed = sigmas * _F32(n_train)  # float32 timesteps, fractional (937.5), never truncated
    nxt = np.concatenate([sigmas[1:], np.zeros(1, np.float32)])
    return tuple(Step(index=i, timestep=float(fed[i]), sigma=float(sigmas[i]), sigma_next=float(nxt[i]))
                 for i in range(n))


def expert_for_timestep(timestep: float, boundary: float, num_train_timesteps: int = 1000) -> str:
    """Wan2.2 A14B two-expert switch: "high" (high-noise DiT) while timestep >= boundary * N, else "low".

    The guidance scale follows the same switch (official: guide_scale[1] for high, [0] for low).
    """
    return "high" if timestep >= boundary * num_train_timesteps else "low"


# Transcendentals of float32 values, computed in float64 and rounded once: a correctly rounded float32
# result (but for rare double roundings), the same on every CPU. numpy's own float32 log/exp loops are
# CPU-dispatched and off by up to ~1 ulp; torch (MKL VML) is closer to correct rounding. The lambdas
# feed differences h = lambda_t - lambda_s, which cancel, so a 1-ulp log error shows in the latents.
def _log32(x: np.ndarray) -> np.ndarray:
    return np.log(x.astype(np.float64)).astype(np.float32)


def _exp32(x: np.float32) -> np.float32:
    return _F32(np.exp(np.float64(x)))


def _expm1_32(x: np.float32) -> np.float32:
    return _F32(np.expm1(np.float64(x)))


class _FlowSolver:
    """Shared state of a multistep solver: the plan as float32 arrays and the step counter."""

    def __init__(self, schedule: Sequence[Step]) -> None:
        if len(schedule) == 0:
            raise ValueError("empty schedule")
        self.schedule: tuple[Step, ...] = tuple(schedule)
        # [n + 1] float32: sigma entering each step, then the final sigma
        self._sigmas = np.array([s.sigma for s in self.schedule] + [self.schedule[-1].sigma_next], dtype=np.float32)
        # [n + 1] float32 half log-SNR lambda = log(alpha) - log(sigma), alpha = 1 - sigma.
        # +inf at sigma = 0 and -inf at sigma = 1; the update formulas stay finite at both ends.
        alphas = _ONE - self._sigmas
        with np.errstate(divide="ignore"):
            self._lambdas = _log32(alphas) - _log32(self._sigmas)
        self._index = 0  # the step the next call to step() performs
        self._x0: list[np.ndarray] = []  # data predictions of the last <= 2 steps, oldest first

    @property
    def step_index(self) -> int:
        return self._index

    def _begin(self, model_output: np.ndarray, sample: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Check the call and convert the velocity into the data prediction x0 = x - sigma * v."""
        if self._index >= len(self.schedule):
            raise RuntimeError(f"all {len(self.schedule)} steps already taken")
        model_output = np.asarray(model_output, dtype=np.float32)
        sample = np.asarray(sample, dtype=np.float32)
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output {model_output.shape} and sample {sample.shape} differ in shape")
        x0 = sample - self._sigmas[self._index] * model_output
        return x0, sample

    def _remember(self, x0: np.ndarray) -> None:
        self._x0 = [*self._x0[-1:], x0]


class FlowUniPC(_FlowSolver):
    """UniPC (bh2, x0 prediction, order 2) for flow matching; one step() per plan step, in order."""

    def __init__(self, schedule: Sequence[Step]) -> None:
        super().__init__(schedule)
        self._last_sample: np.ndarray | None = None  # sample the last predictor started from
        self._last_order = 0  # order of the last predictor; the corrector reuses it

    def step(self, model_output: np.ndarray, sample: np.ndarray) -> np.ndarray:
        """model_output: flow velocity after CFG, same shape as sample (any, e.g. [C,F,H,W]). -> next sample."""
        x0, sample = self._begin(model_output, sample)
        i, n = self._index, len(self.schedule)
        if self._last_sample is not None:
            # UniC: refine the sample the last predictor produced, now that x0 at its sigma is known
            sample = self._correct(x0)
        self._remember(x0)
        # order 2 needs two x0 in memory (warm-up), and the last step drops to order 1
        order = min(2, n - i, i + 1)
        self._last_sample, self._last_order = sample, order
        out = self._predict(sample, order)
        self._index += 1
        return out

    def _predict(self, x: np.ndarray, order: int) -> np.ndarray:
        """UniP-`order` from sigma[i] to sigma[i+1], using x0 of steps i (and i-1)."""
        i, lam = self._index, self._lambdas
        sigma_t, sigma_s0 = self._sigmas[i + 1], self._sigmas[i]
        alpha_t = _ONE - sigma_t
        h = lam[i + 1] - lam[i]
        hh = -h  # x0 prediction integrates in -lambda
        h_phi_1 = _expm1_32(hh)
        b_h = _expm1_32(hh)  # bh2: B(h) = e^hh - 1
        m0 = self._x0[-1]
        x_t = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0
        if order == 2:
            rk = (lam[i - 1] - lam[i]) / h
            d1 = (self._x0[-2] - m0) / rk
            # rho_p = 0.5 for order 2 (the official shortcut instead of solving the 1x1 system)
            x_t = x_t - alpha_t * b_h * (_HALF * d1)
        return x_t

    def _correct(self, x0_t: np.ndarray) -> np.ndarray:
        """UniC-`order` redo of the step i-1 -> i, given x0_t (x0 at sigma[i]); replaces the predicted sample."""
        i, lam, order, x = self._index, self._lambdas, self._last_order, self._last_sample
        assert x is not None
        sigma_t, sigma_s0 = self._sigmas[i], self._sigmas[i - 1]
        alpha_t = _ONE - sigma_t
        h = lam[i] - lam[i - 1]
        hh = -h
        h_phi_1 = _expm1_32(hh)
        b_h = _expm1_32(hh)
        m0 = self._x0[-1]  # x0 at sigma[i-1]
        rks: list[np.float32] = []
        d1s: list[np.ndarray] = []
        if order == 2:
            rk = (lam[i - 2] - lam[i - 1]) / h
            rks.append(rk)
            d1s.append((self._x0[-2] - m0) / rk)
        rks.append(_ONE)
        # right-hand side b_k = k! * h*phi_(k+1)(hh) / B(h), k = 1..order (float32 recursion)
        b: list[np.float32] = []
        h_phi_k = h_phi_1 / hh - _ONE
        factorial = 1
        for k in range(1, order + 1):
            b.append(h_phi_k * _F32(factorial) / b_h)
            factorial *= k + 1
            h_phi_k = h_phi_k / hh - _F32(1 / factorial)
        if order == 1:
            rhos = np.array([0.5], dtype=np.float32)
        else:
            # Vandermonde system R[k, j] = rks[j]**k; solved in float64 then rounded (torch solves in
            # float32: the two differ by float32 rounding only)
            r = np.stack([np.power(np.array(rks, dtype=np.float32), k) for k in range(order)])
            rhos = np.linalg.solve(r.astype(np.float64), np.array(b, dtype=np.float64)).astype(np.float32)
        x_lin = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0
        corr = rhos[0] * d1s[0] if d1s else _ZERO
        d1_t = x0_t - m0
        return x_lin - alpha_t * b_h * (corr + rhos[-1] * d1_t)


class FlowDPMpp(_FlowSolver):
    """DPM-Solver++(2M), midpoint, for flow matching; one step() per plan step, in order."""

    def step(self, model_output: np.ndarray, sample: np.ndarray) -> np.ndarray:
        """model_output: flow velocity after CFG, same shape as sample (any, e.g. [C,F,H,W]). -> next sample."""
        x0, sample = self._begin(model_output, sample)
        i, n, lam = self._index, len(self.schedule), self._lambdas
        self._remember(x0)
        sigma_t, sigma_s0 = self._sigmas[i + 1], self._sigmas[i]
        alpha_t = _ONE - sigma_t
        h = lam[i + 1] - lam[i]
        # e^-h - 1 as exp then subtract (not expm1), like the official code
        phi = alpha_t * (_exp32(-h) - _ONE)
        if i == 0 or i == n - 1:
            # first order (DDIM): warm-up, and always on the last step since the final sigma is 0
            out = sigma_t / sigma_s0 * sample - phi * x0
        else:
            # at i == 1 lambda[0] = -inf (sigma = 1): r0 = inf, d1 = 0, i.e. first order again
            r0 = (lam[i] - lam[i - 1]) / h
            d1 = (_ONE / r0) * (x0 - self._x0[-2])
            out = sigma_t / sigma_s0 * sample - phi * x0 - _HALF * phi * d1
        self._index += 1
        return out


class FlowEuler(_FlowSolver):
    """Flow-matching Euler: x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v_i, float32, no fresh noise
    (diffusers FlowMatchEulerDiscreteScheduler.step with stochastic_sampling=False)."""

    def step(self, model_output: np.ndarray, sample: np.ndarray) -> np.ndarray:
        """model_output: flow velocity after CFG, same shape as sample. -> next sample."""
        self._begin(model_output, sample)  # checks only; Euler needs no x0
        i = self._index
        dt = self._sigmas[i + 1] - self._sigmas[i]  # float32, negative
        self._index += 1
        return np.asarray(sample, dtype=np.float32) + dt * np.asarray(model_output, dtype=np.float32)


SOLVERS: dict[str, type[FlowUniPC] | type[FlowDPMpp] | type[FlowEuler]] = {
    "unipc": FlowUniPC, "dpm++": FlowDPMpp, "euler": FlowEuler}


def make_solver(kind: str, schedule: Sequence[Step]) -> FlowUniPC | FlowDPMpp | FlowEuler:
    """A fresh solver of `kind` for one sampling run over `schedule`."""
    if kind not in SOLVERS:
        raise ValueError(f"unknown sampler kind {kind!r}; valid kinds: {sorted(SOLVERS)}")
    return SOLVERS[kind](schedule)
