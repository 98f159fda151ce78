"""Sampling schedulers of the DAMM latent sampler: the factory behind ``DAMMInferer.sampler`` and DPM-Solver++(2M).

``sampler`` names one of :data:`SAMPLERS`:

- ``"ddpm"``: MONAI's ``DDPMScheduler``, ancestral, every training step (the paper).
- ``"ddim"``: MONAI's ``DDIMScheduler`` on the evenly strided grid ``(N - 1) T / N, ..., T / N, 0`` ("leading"), its
  stochasticity ``eta``.
- ``"pndm"``: :class:`PLMSScheduler`, MONAI's ``PNDMScheduler`` in its pseudo linear multistep mode
  (``skip_prk_steps=True``, PLMS, deterministic) on the same leading grid. Its first step is a two-evaluation
  (Heun-like) step, so the denoiser runs ``N + 1`` times for ``N`` steps: the grid visits the second timestep twice
  (``(N - 1) T / N, (N - 2) T / N, (N - 2) T / N, ..., 0``), the layout MONAI's PLMS bookkeeping expects (its own
  ``set_timesteps`` lists each timestep once, so from the third evaluation on the denoiser would be told a timestep
  one step too low). A v-prediction is turned into eps before the multistep combination (MONAI combines the raw
  outputs, which for v mixes predictions whose meaning changes with the timestep).
- ``"dpm_solver"``: :class:`DPMSolverMultistepScheduler`, DPM-Solver++(2M) (below), ``N`` evaluations.

Every sampler gets the training scheduler's ``betas``/``alphas``/``alphas_cumprod`` and prediction type, and steps
from its last timestep to the clean sample (``alpha_cumprod = 1``).

DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models",
Algorithm 2) integrates the probability-flow ODE in its data-prediction form. With ``alpha_t = sqrt(alphas_cumprod
[t])``, ``sigma_t = sqrt(1 - alphas_cumprod[t])``, the half log-SNR ``lambda_t = log(alpha_t / sigma_t)`` and the
network's clean-sample estimate ``x0_t`` (from eps: ``(x_t - sigma_t eps) / alpha_t``; from v: ``alpha_t x_t -
sigma_t v``), a step from ``t`` to ``s < t`` with ``h = lambda_s - lambda_t`` is::

    x_s = (sigma_s / sigma_t) x_t - alpha_s (exp(-h) - 1) D
    D = x0_t                                                  (first order: the DDIM step with eta = 0)
    D = (1 + 1 / (2 r)) x0_t - 1 / (2 r) x0_u,  r = (lambda_t - lambda_u) / h   (second order; u: the step before)

The first step has no history and the last step lands on ``sigma = 0`` (``h`` infinite, ``x_0 = x0_t``): both are
first order ("lower order final"). The solver keeps the previous ``x0`` and ``lambda``, so whatever the caller passes
as ``model_output`` (in DAMM: the gated uni/multi prediction of that step) is what its history holds. Timesteps are
evenly spaced, "trailing" by default (``floor(T (N - i) / N) - 1``, ``i = 0..N-1``: from ``T - 1`` down to ``T / N -
1``; starts where the ``N(0, I)`` start is right, usually better at few steps) or "leading" (the DDIM grid above).
No noise is drawn. Trailing's last step jumps from ``T / N - 1`` to the clean sample in one first-order step (on the
bundle's schedule ``sigma^2 = 0.22`` at ``N = 10``): on Gaussian toy data with the exact denoiser, trailing had the
smaller error for unit-variance data and leading for narrow data (variance 0.1 or less), where that jump dominates.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, PNDMScheduler, Scheduler

__all__ = [
    "PREDICTION_TYPES",
    "SAMPLERS",
    "SAMPLER_SCHEDULERS",
    "TIMESTEP_SPACINGS",
    "DPMSolverMultistepScheduler",
    "PLMSScheduler",
    "check_sampler",
    "copy_schedule",
    "make_sampling_scheduler",
]

# sampler name -> the scheduler class that runs it (also the name sidecars record)
SAMPLER_SCHEDULERS = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "pndm": "PLMSScheduler",
    "dpm_solver": "DPMSolverMultistepScheduler",
}
SAMPLERS = tuple(SAMPLER_SCHEDULERS)
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("trailing", "leading")


def check_sampler(sampler: str, owner: str = "DAMMInferer") -> None:
    """Refuse an unknown sampler name.

    Args:
        sampler: the name to check.
        owner: prefix of the message (the class or tool that was given the name).

    Raises:
        ValueError: ``sampler`` is not in :data:`SAMPLERS` (one line naming ``sampler`` and the allowed values).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"{owner}: sampler must be one of {SAMPLERS}, got {sampler!r}")


class DPMSolverMultistepScheduler(Scheduler):
    """DPM-Solver++ (multistep, data prediction, first or second order), deterministic; see the module docstring.

    The interface is that of MONAI's ``DDIMScheduler``: :meth:`set_timesteps`, :meth:`step` returning
    ``(prev_sample, pred_original_sample)``, ``timesteps`` (decreasing), ``add_noise`` from ``Scheduler``. The
    solver is stateful: one instance per sampling run, :meth:`step` called once per timestep, in order.

    Args:
        num_train_timesteps: training diffusion steps ``T``.
        schedule: MONAI noise schedule name (the sampler replaces the schedule by the training scheduler's).
        prediction_type: what the model predicts: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.
        solver_order: 2 (DPM-Solver++(2M)) or 1 (DPM-Solver++(1), i.e. DDIM with eta = 0).
        timestep_spacing: ``"trailing"`` or ``"leading"`` (see the module docstring).
        schedule_args: arguments of the schedule function (``beta_start``, ``beta_end``).

    Raises:
        ValueError: unknown ``prediction_type``/``timestep_spacing`` or ``solver_order`` not 1 or 2.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        schedule: str = "linear_beta",
        prediction_type: str = "epsilon",
        solver_order: int = 2,
        timestep_spacing: str = "trailing",
        **schedule_args: Any,
    ) -> None:
        super().__init__(num_train_timesteps, schedule, **schedule_args)
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"DPMSolverMultistepScheduler: prediction_type must be one of {PREDICTION_TYPES}")
        if solver_order not in (1, 2):
            raise ValueError(f"DPMSolverMultistepScheduler: solver_order must be 1 or 2, got {solver_order}")
        if timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"DPMSolverMultistepScheduler: timestep_spacing must be one of {TIMESTEP_SPACINGS}")
        self.prediction_type = prediction_type
        self.solver_order = int(solver_order)
        self.timestep_spacing = timestep_spacing
        self.set_timesteps(num_train_timesteps)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Set ``N`` evenly spaced, strictly decreasing timesteps in ``[0, T)`` and clear the solver's history.

        Args:
            num_inference_steps: ``N``, in ``[1, T]``.
            device: device of ``timesteps``.

        Raises:
            ValueError: ``N`` outside ``[1, T]``.
        """
        n, t_max = int(num_inference_steps), int(self.num_train_timesteps)
        if not 1 <= n <= t_max:
            raise ValueError(f"DPMSolverMultistepScheduler: num_inference_steps must be in [1, {t_max}], got {n}")
        if self.timestep_spacing == "trailing":
            steps = [t_max * (n - i) // n - 1 for i in range(n)]
        else:
            steps = [(n - 1 - i) * (t_max // n) for i in range(n)]
        self.num_inference_steps = n
        self.timesteps = torch.tensor(steps, dtype=torch.long, device=device)
        self._index = 0
        self._last: tuple[float, torch.Tensor] | None = None  # (lambda, x0) of the previous step

    def _alpha_sigma(self, timestep: int) -> tuple[float, float]:
        """``(alpha, sigma)`` at ``timestep`` in float64; ``(1, 0)`` (clean) for a negative timestep."""
        if timestep < 0:
            return 1.0, 0.0
        a = float(self.alphas_cumprod[timestep].double())
        return math.sqrt(a), math.sqrt(1.0 - a)

    def data_prediction(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor) -> torch.Tensor:
        """The clean-sample estimate ``x0`` from the model output at ``timestep``.

        Args:
            model_output: eps, v or x0 (``prediction_type``).
            timestep: the sample's timestep.
            sample: ``x_t``.

        Returns:
            ``x0`` in the dtype of ``sample``.
        """
        alpha, sigma = self._alpha_sigma(int(timestep))
        out = model_output.to(sample.dtype)
        if self.prediction_type == "epsilon":
            return (sample - sigma * out) / alpha
        if self.prediction_type == "v_prediction":
            return alpha * sample - sigma * out
        return out

    def step(
        self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One solver step from ``timestep`` to the next timestep (after the last: to the clean sample).

        Args:
            model_output: the model's prediction at ``timestep`` (kept as the history of the next step).
            timestep: the current timestep, ``timesteps[k]`` at the ``k``-th call.
            sample: ``x_t``.
            generator: unused (deterministic; MONAI scheduler signature).

        Returns:
            ``(prev_sample, pred_original_sample)``.

        Raises:
            ValueError: more calls than timesteps, or ``timestep`` is not the expected one.
        """
        i, n = self._index, len(self.timesteps)
        if i >= n:
            raise ValueError(f"DPMSolverMultistepScheduler: all {n} steps done; call set_timesteps again")
        t = int(self.timesteps[i])
        if int(timestep) != t:
            raise ValueError(f"DPMSolverMultistepScheduler: step {i} expects timestep {t}, got {int(timestep)}")
        s = int(self.timesteps[i + 1]) if i + 1 < n else -1
        alpha_t, sigma_t = self._alpha_sigma(t)
        alpha_s, sigma_s = self._alpha_sigma(s)
        lam_t = math.log(alpha_t / sigma_t)
        x0 = self.data_prediction(model_output, t, sample)
        if sigma_s == 0.0:  # the final step (first order): exp(-h) = 0, x_0 = x0_t
            prev = x0
        else:
            h = math.log(alpha_s / sigma_s) - lam_t
            d = x0
            if self.solver_order == 2 and self._last is not None:
                lam_u, x0_u = self._last
                r = (lam_t - lam_u) / h
                d = (1.0 + 0.5 / r) * x0 - (0.5 / r) * x0_u
            prev = (sigma_s / sigma_t) * sample - (alpha_s * math.expm1(-h)) * d
        self._last = (lam_t, x0)
        self._index = i + 1
        return prev, x0


class PLMSScheduler(PNDMScheduler):
    """MONAI's ``PNDMScheduler`` with ``skip_prk_steps=True`` on the timestep layout its PLMS steps expect.

    See the module docstring: ``N + 1`` timesteps for ``N`` steps (the second one twice), and a v-prediction turned
    into eps (``sqrt(a) v + sqrt(1 - a) x``) before MONAI's multistep combination. Deterministic.

    Args:
        num_train_timesteps: training diffusion steps ``T``.
        schedule: MONAI noise schedule name (the sampler replaces the schedule by the training scheduler's).
        prediction_type: what the model predicts: ``"epsilon"`` or ``"v_prediction"``.
        schedule_args: arguments of the schedule function.

    Raises:
        ValueError: another ``prediction_type``.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        schedule: str = "linear_beta",
        prediction_type: str = "epsilon",
        **schedule_args: Any,
    ) -> None:
        if prediction_type not in PREDICTION_TYPES[:2]:
            raise ValueError(f"PLMSScheduler: prediction_type must be one of {PREDICTION_TYPES[:2]}")
        self.model_prediction_type = prediction_type
        super().__init__(
            num_train_timesteps,
            schedule,
            skip_prk_steps=True,
            set_alpha_to_one=True,
            prediction_type="epsilon",
            **schedule_args,
        )

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """MONAI's leading grid ``(N - 1) T / N, ..., 0`` with its second timestep repeated (``N + 1`` entries).

        Args:
            num_inference_steps: ``N``.
            device: device of ``timesteps``.
        """
        super().set_timesteps(num_inference_steps, device)
        if num_inference_steps > 1:
            self.timesteps = torch.cat([self.timesteps[:2], self.timesteps[1:]])

    def step(  # type: ignore[override]
        self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, Any]:
        """One PLMS step (MONAI's ``step``) on the eps the model output means.

        Args:
            model_output: eps or v at ``timestep`` (kept, as eps, in the multistep history).
            timestep: the current timestep.
            sample: ``x_t``.
            generator: unused (deterministic).

        Returns:
            ``(prev_sample, None)``.
        """
        if self.model_prediction_type == "v_prediction":
            a = self.alphas_cumprod[int(timestep)]
            model_output = a.sqrt() * model_output + (1 - a).sqrt() * sample
        return super().step(model_output, timestep, sample)


def copy_schedule(training: Scheduler, sched: Any) -> None:
    """Give ``sched`` the training scheduler's schedule; the step after the last timestep lands on the clean sample.

    Args:
        training: the training noise scheduler.
        sched: the sampling scheduler (changed in place).
    """
    sched.betas = training.betas.clone()
    sched.alphas = training.alphas.clone()
    sched.alphas_cumprod = training.alphas_cumprod.clone()
    if hasattr(sched, "final_alpha_cumprod"):
        sched.final_alpha_cumprod = torch.tensor(1.0)
    if hasattr(sched, "one"):
        sched.one = torch.tensor(1.0)


def make_sampling_scheduler(sampler: str, training: Any, num_inference_steps: int) -> Scheduler:
    """A fresh scheduler of ``sampler`` with the training schedule, its timesteps set (see the module docstring).

    Args:
        sampler: one of :data:`SAMPLERS`.
        training: the training ``DDPMScheduler`` (schedule, ``num_train_timesteps``, ``prediction_type``).
        num_inference_steps: ``N`` (DDPM: all training steps).

    Returns:
        The scheduler (fresh: concurrent runs and multistep histories are not shared).

    Raises:
        ValueError: unknown ``sampler``.
    """
    check_sampler(sampler)
    t_max, n = int(training.num_train_timesteps), int(num_inference_steps)
    common = {"num_train_timesteps": t_max, "schedule": "linear_beta", "prediction_type": training.prediction_type}
    sched: Any
    if sampler == "ddpm":
        variance = getattr(training, "variance_type", "fixed_small")
        sched = DDPMScheduler(clip_sample=False, variance_type=variance, **common)
    elif sampler == "ddim":
        sched = DDIMScheduler(clip_sample=False, **common)
    elif sampler == "pndm":
        sched = PLMSScheduler(**common)
    else:
        sched = DPMSolverMultistepScheduler(**common)
    copy_schedule(training, sched)
    sched.set_timesteps(n)
    if sampler == "ddim":
        # MONAI spaces DDIM timesteps with linspace(T - 1, 0) but steps back by T // N: use the evenly strided grid
        # (N - 1) * T // N, ..., T // N, 0 so that every step lands exactly on the next timestep
        sched.timesteps = torch.arange(n - 1, -1, -1, dtype=torch.long) * (t_max // n)
    return sched
