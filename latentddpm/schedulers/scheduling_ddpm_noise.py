"""Our DDPM noise scheduler: the forward process, ancestral sampling and the variational bound.

Configs are interchangeable with diffusers' `DDPMScheduler` (same argument names and defaults) so the
diffusers samplers (`DDIMScheduler`, `DPMSolverMultistepScheduler`, ...) load from ours with `.from_config`.
On top of sampling it holds the math a trainer needs: `get_target`, `snr`, `vlb_terms` (L_vlb of Ho et al. 2020
and the L_hybrid of Nichol & Dhariwal 2021), `prior_bpd` and `calculate_bpd`.

References:
    Ho et al. 2020, "Denoising Diffusion Probabilistic Models", https://arxiv.org/abs/2006.11239
    Nichol & Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models", https://arxiv.org/abs/2102.09672
    Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", https://arxiv.org/abs/2305.08891
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")


@dataclass
class DDPMNoiseSchedulerOutput(BaseOutput):
    """
    Output of [`DDPMNoiseScheduler.step`].

    Args:
        prev_sample (`torch.Tensor` of shape `(B, C, H, W)`):
            The sample x_{t'} of the previous timestep t' of the schedule; the next model input in the denoising loop.
        pred_original_sample (`torch.Tensor` of shape `(B, C, H, W)`):
            The (clipped or thresholded) prediction of x_0 at the current timestep, for previews or guidance.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


def betas_for_schedule(
    beta_schedule: str, num_train_timesteps: int, beta_start: float, beta_end: float
) -> torch.Tensor:
    """
    The betas of a named schedule, in float64.

    Args:
        beta_schedule (`str`): One of `BETA_SCHEDULES`.
        num_train_timesteps (`int`): Number of diffusion steps T.
        beta_start (`float`), beta_end (`float`): First and last beta (ignored by `"squaredcos_cap_v2"`).

    Returns:
        `torch.Tensor` of shape `(T,)`, dtype float64.
    """
    if beta_schedule == "linear":
        # Ho et al. 2020, sec. 4: linear from 1e-4 to 0.02
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    if beta_schedule == "scaled_linear":
        # linear in sqrt(beta), the latent diffusion (Stable Diffusion) schedule
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        # cosine schedule, formula (17) of Nichol & Dhariwal 2021: alpha_bar(t) = cos^2((t/T + s)/(1 + s) * pi/2),
        # s = 0.008, beta_t = 1 - alpha_bar(t+1)/alpha_bar(t) capped at 0.999 to avoid the singularity at t = T
        steps = torch.arange(num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
        alpha_bar = torch.cos((steps + 0.008) / 1.008 * math.pi / 2) ** 2
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    if beta_schedule == "sigmoid":
        # GeoDiff (Xu et al. 2022) sigmoid schedule, as diffusers: sigmoid of linspace(-6, 6) scaled to [start, end]
        ramp = torch.linspace(-6, 6, num_train_timesteps, dtype=torch.float64)
        return torch.sigmoid(ramp) * (beta_end - beta_start) + beta_start
    raise ValueError(f"beta_schedule {beta_schedule!r} is not supported; choose one of {list(BETA_SCHEDULES)}.")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """
    Rescale betas so that the last timestep has zero SNR (alpha_bar_T = 0), Algorithm 1 of Lin et al. 2023.

    Args:
        betas (`torch.Tensor` of shape `(T,)`): Betas to rescale.

    Returns:
        `torch.Tensor` of shape `(T,)`: Rescaled betas; the last one is 1.
    """
    alphas_bar_sqrt = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    # shift so the last timestep is zero, then scale so the first is back to its old value
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * first / (first - last)
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """
    Elementwise KL( N(mean1, exp(logvar1)) || N(mean2, exp(logvar2)) ) in nats; arguments broadcast.
    """
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(
    sample: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """
    Elementwise log-likelihood in nats of 8-bit data scaled to [-1, 1] under a Gaussian discretized into 256 bins of
    width 2/255, with the outer bins extended to -inf and +inf (formula (13) of Ho et al. 2020). Uses the exact normal
    CDF where improved-diffusion used a tanh approximation.

    Args:
        sample (`torch.Tensor` of shape `(B, C, H, W)`): Data on the grid k / 127.5 - 1, k = 0..255.
        means (`torch.Tensor` broadcastable to `sample`): Gaussian means.
        log_scales (`torch.Tensor` broadcastable to `sample`): Log standard deviations.

    Returns:
        `torch.Tensor` of shape `(B, C, H, W)`.
    """
    inv_stdv = torch.exp(-log_scales)
    upper = inv_stdv * (sample - means + 1.0 / 255.0)
    lower = inv_stdv * (sample - means - 1.0 / 255.0)
    log_cdf_upper = torch.special.log_ndtr(upper)  # lowest bin: log P(X < x + 1/255)
    log_survival_lower = torch.special.log_ndtr(-lower)  # highest bin: log P(X > x - 1/255)
    log_bin = torch.log((torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12))
    return torch.where(sample < -0.999, log_cdf_upper, torch.where(sample > 0.999, log_survival_lower, log_bin))


def _mean_flat(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over all but the batch dimension: (B, ...) -> (B,)."""
    return tensor.mean(dim=tuple(range(1, tensor.ndim)))


def _posterior_coefficients(
    alpha_prod_t: torch.Tensor, alpha_prod_t_prev: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    Mean coefficients and variance of q(x_{t'} | x_t, x_0) for a step from t to t' < t, formulas (6)-(7) of Ho et al.
    2020 with beta_t replaced by the beta of the (possibly strided) step, 1 - alpha_bar_t / alpha_bar_{t'}.

    Args:
        alpha_prod_t (`torch.Tensor`): alpha_bar_t, float64, any shape.
        alpha_prod_t_prev (`torch.Tensor`): alpha_bar_{t'} (1 for t' = -1), same shape.

    Returns:
        `(coef_x0, coef_xt, variance, current_beta_t)`: posterior mean = coef_x0 * x_0 + coef_xt * x_t.
    """
    beta_prod_t = 1 - alpha_prod_t
    beta_prod_t_prev = 1 - alpha_prod_t_prev
    current_alpha_t = alpha_prod_t / alpha_prod_t_prev
    current_beta_t = 1 - current_alpha_t
    coef_x0 = alpha_prod_t_prev.sqrt() * current_beta_t / beta_prod_t
    coef_xt = current_alpha_t.sqrt() * beta_prod_t_prev / beta_prod_t
    variance = beta_prod_t_prev / beta_prod_t * current_beta_t
    return coef_x0, coef_xt, variance, current_beta_t


def _learned_range_log_variance(
    predicted_variance: torch.Tensor, posterior_log_variance: torch.Tensor, log_beta: torch.Tensor
) -> torch.Tensor:
    """
    log Sigma = v log beta + (1 - v) log beta~ with v = (output + 1) / 2, formula (15) of Nichol & Dhariwal 2021.

    Args:
        predicted_variance (`torch.Tensor`): The model's variance channels, in [-1, 1].
        posterior_log_variance (`torch.Tensor`): log beta~ of the step, broadcastable to `predicted_variance`.
        log_beta (`torch.Tensor`): log beta of the step, likewise.
    """
    frac = (predicted_variance + 1) / 2
    return frac * log_beta + (1 - frac) * posterior_log_variance


class DDPMNoiseScheduler(SchedulerMixin, ConfigMixin):
    """
    Denoising diffusion probabilistic model scheduler (Ho et al. 2020) with the learned variances of Nichol & Dhariwal
    2021. Configs are interchangeable with diffusers' `DDPMScheduler`, and `step` agrees with its `step` up to the
    float32 rounding of diffusers' constants, except for `"fixed_large_log"`: it samples like `"fixed_large"` here,
    where diffusers takes the square root of log beta and returns NaN
    (https://github.com/huggingface/diffusers/issues/14569).

    All schedule constants are computed once in float64 on the CPU; each is cast once to every dtype and device it is
    used with, so float32 and half-precision callers get correctly rounded coefficients.

    Deliberate differences from `DDPMScheduler` (diffusers' own DDPM scheduler tests, run on this class, fail only
    on these):

    - Float64 constants: a 1000-step loop drifts ~5e-5 (relative) from diffusers' float32 reference sums.
    - Stricter config validation, each a `ValueError` naming the value: betas must lie in (0, 1] (diffusers
      accepts `beta_end=2`), `num_train_timesteps` must be at least 2, `trained_betas` must have
      `num_train_timesteps` entries, and unknown `variance_type`, `beta_schedule`, `prediction_type` or
      `timestep_spacing` values are refused (diffusers samples an unknown variance type as `"fixed_small"`).
    - Timesteps outside `[0, num_train_timesteps)` or outside the schedule set by `set_timesteps` are refused.
    - `_get_variance` of a learned type without `predicted_variance` is refused (diffusers returns `None` or fails).

    This class inherits from [`SchedulerMixin`] and [`ConfigMixin`] (loading, saving, `from_config`).

    Args:
        num_train_timesteps (`int`, defaults to 1000):
            Number of diffusion steps T the model is trained with.
        beta_start (`float`, defaults to 0.0001):
            First beta of the `"linear"`, `"scaled_linear"` and `"sigmoid"` schedules.
        beta_end (`float`, defaults to 0.02):
            Last beta of those schedules.
        beta_schedule (`"linear"`, `"scaled_linear"`, `"squaredcos_cap_v2"` or `"sigmoid"`, defaults to `"linear"`):
            The beta schedule; `"squaredcos_cap_v2"` is the cosine schedule of Nichol & Dhariwal 2021.
        trained_betas (`np.ndarray` or `list[float]`, *optional*):
            Explicit betas of length `num_train_timesteps`; overrides `beta_schedule`.
        variance_type (`str`, defaults to `"fixed_small"`):
            Variance of p(x_{t-1} | x_t). `"fixed_small"`: the posterior variance beta~_t of formula (7);
            `"fixed_large"`: beta_t (both from sec. 3.2 of Ho et al. 2020). The `"_log"` variants give the same
            distribution and exist so diffusers configs load. `"learned"`: the model's extra C output channels are
            the variance itself (diffusers' convention) and must be positive. `"learned_range"`: they are v in
            [-1, 1] interpolating log beta~_t and log beta_t, formula (15) of Nichol & Dhariwal 2021.
        clip_sample (`bool`, defaults to `True`):
            Clip the predicted x_0 to `[-clip_sample_range, clip_sample_range]` when sampling.
        prediction_type (`"epsilon"`, `"v_prediction"` or `"sample"`, defaults to `"epsilon"`):
            What the model predicts: the noise, the velocity v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0
            (Salimans & Ho 2022), or x_0.
        thresholding (`bool`, defaults to `False`):
            Dynamic thresholding of the predicted x_0 (Saharia et al. 2022, Imagen); takes precedence over
            `clip_sample`. Unsuitable for latents.
        dynamic_thresholding_ratio (`float`, defaults to 0.995):
            Percentile of |x_0| used as the threshold.
        clip_sample_range (`float`, defaults to 1.0):
            Clipping range of `clip_sample`.
        sample_max_value (`float`, defaults to 1.0):
            Upper bound of the dynamic threshold.
        timestep_spacing (`"leading"`, `"linspace"` or `"trailing"`, defaults to `"leading"`):
            How `set_timesteps` picks inference timesteps, Table 2 of Lin et al. 2023.
        steps_offset (`int`, defaults to 0):
            Offset added to `"leading"` inference timesteps (Stable Diffusion uses 1).
        rescale_betas_zero_snr (`bool`, defaults to `False`):
            Rescale betas to zero terminal SNR (Lin et al. 2023); pair it with `"v_prediction"` and `"trailing"`.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"] = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        variance_type: Literal[
            "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range"
        ] = "fixed_small",
        clip_sample: bool = True,
        prediction_type: Literal["epsilon", "sample", "v_prediction"] = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: Literal["linspace", "leading", "trailing"] = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        for name, value, allowed in (
            ("beta_schedule", beta_schedule, BETA_SCHEDULES),
            ("variance_type", variance_type, VARIANCE_TYPES),
            ("prediction_type", prediction_type, PREDICTION_TYPES),
            ("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS),
        ):
            if value not in allowed:
                raise ValueError(f"{name} {value!r} is not supported; choose one of {list(allowed)}.")
        if num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be at least 2, got {num_train_timesteps}.")

        if trained_betas is not None:
            betas = torch.as_tensor(np.asarray(trained_betas, dtype=np.float64))
            if betas.shape != (num_train_timesteps,):
                raise ValueError(
                    f"trained_betas has shape {tuple(betas.shape)}; expected ({num_train_timesteps},) to match"
                    " num_train_timesteps."
                )
        else:
            betas = betas_for_schedule(beta_schedule, num_train_timesteps, beta_start, beta_end)
        if rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError(f"betas must lie in (0, 1]; got min {betas.min().item()}, max {betas.max().item()}.")

        # Schedule constants, float64 on the CPU (improved-diffusion gaussian_diffusion.py keeps them in float64 too).
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.posterior_mean_coef1, self.posterior_mean_coef2, self.posterior_variance, _ = _posterior_coefficients(
            self.alphas_cumprod, alphas_cumprod_prev
        )
        # beta~_0 = 0, so the log is clipped to its value at t = 1 (Ho et al. / improved-diffusion)
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        )
        self.log_one_minus_alphas_cumprod = torch.log(1.0 - self.alphas_cumprod)
        self.signal_to_noise_ratio = self.alphas_cumprod / (1.0 - self.alphas_cumprod)
        self.log_betas = torch.log(betas)
        # "fixed_large" uses beta~_1 instead of beta_0 at t = 0 "to get a better decoder log likelihood"
        # (diffusion_utils_2.py of Ho et al., gaussian_diffusion.py of improved-diffusion)
        self.fixed_large_log_variance = torch.log(torch.cat([self.posterior_variance[1:2], betas[1:]]))
        self.one = torch.ones((), dtype=torch.float64)
        # (buffer name, device, dtype) -> the buffer cast there, so each cast and host-to-device copy happens once
        self._cast_buffers: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}

        # standard deviation of the initial noise x_T ~ N(0, I)
        self.init_noise_sigma = 1.0

        # settable by `set_timesteps`; by default every training timestep, T-1 down to 0
        self.custom_timesteps = False
        self.num_inference_steps = None
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.int64)

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        """
        Identity: DDPM does not scale the model input. Present for interchangeability with schedulers that do.

        Args:
            sample (`torch.Tensor` of shape `(B, C, H, W)`): The current sample x_t.
            timestep (`int`, *optional*): The current timestep.

        Returns:
            `torch.Tensor`: `sample` unchanged.
        """
        return sample

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[int] | None = None,
    ) -> None:
        """
        Set the timesteps of the sampling chain, as diffusers' `DDPMScheduler` does.

        Args:
            num_inference_steps (`int`, *optional*):
                Number of sampling steps, spaced by `config.timestep_spacing`. Exclusive with `timesteps`.
            device (`str` or `torch.device`, *optional*):
                Device to put `self.timesteps` on.
            timesteps (`list[int]`, *optional*):
                Custom timesteps in strictly descending order, each in `[0, num_train_timesteps)`.
        """
        num_train_timesteps = self.config.num_train_timesteps
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError(
                "Pass exactly one of `num_inference_steps` or `timesteps`; got"
                f" num_inference_steps={num_inference_steps}, timesteps={timesteps}."
            )

        if timesteps is not None:
            timesteps = np.array(timesteps, dtype=np.int64)
            if (np.diff(timesteps) >= 0).any():
                raise ValueError(f"Custom `timesteps` must be in strictly descending order, got {timesteps.tolist()}.")
            if timesteps[0] >= num_train_timesteps or timesteps[-1] < 0:
                raise ValueError(
                    f"Custom `timesteps` must lie in [0, {num_train_timesteps}), got {timesteps.tolist()}."
                )
            self.custom_timesteps = True
            self.num_inference_steps = len(timesteps)
        else:
            if not 1 <= num_inference_steps <= num_train_timesteps:
                raise ValueError(
                    f"`num_inference_steps` {num_inference_steps} must be between 1 and num_train_timesteps"
                    f" {num_train_timesteps}: the model only knows {num_train_timesteps} timesteps."
                )
            self.custom_timesteps = False
            self.num_inference_steps = num_inference_steps
            # "linspace", "leading", "trailing" of Table 2 in Lin et al. 2023; same numpy arithmetic as diffusers so
            # rounding picks the same integers
            spacing = self.config.timestep_spacing
            if spacing == "linspace":
                timesteps = np.linspace(0, num_train_timesteps - 1, num_inference_steps).round()[::-1].astype(np.int64)
            elif spacing == "leading":
                step_ratio = num_train_timesteps // num_inference_steps
                timesteps = (np.arange(0, num_inference_steps) * step_ratio).round()[::-1].astype(np.int64)
                timesteps += self.config.steps_offset
            else:  # "trailing"
                step_ratio = num_train_timesteps / num_inference_steps
                timesteps = np.round(np.arange(num_train_timesteps, 0, -step_ratio)).astype(np.int64) - 1

        self.timesteps = torch.from_numpy(timesteps).to(device)

    def previous_timestep(self, timestep: int | torch.Tensor) -> int | torch.Tensor:
        """
        The timestep after `timestep` in the sampling chain (-1 after the last one).

        Args:
            timestep (`int` or `torch.Tensor`): A timestep of `self.timesteps`.

        Returns:
            `int` or `torch.Tensor`: The previous timestep t' < t.
        """
        if self.custom_timesteps or self.num_inference_steps:
            index = (self.timesteps == timestep).nonzero(as_tuple=True)[0]
            if len(index) == 0:
                raise ValueError(
                    f"timestep {int(timestep)} is not in the schedule set by `set_timesteps`:"
                    f" {self.timesteps.tolist()}."
                )
            index = index[0]
            return torch.tensor(-1) if index == len(self.timesteps) - 1 else self.timesteps[index + 1]
        return timestep - 1

    def _check_timesteps(self, timesteps: torch.Tensor) -> None:
        """ValueError unless every timestep is an integer in [0, num_train_timesteps)."""
        num_train_timesteps = self.config.num_train_timesteps
        if timesteps.is_floating_point() or timesteps.is_complex():
            raise ValueError(f"timesteps must be integers, got dtype {timesteps.dtype}.")
        if bool(((timesteps < 0) | (timesteps >= num_train_timesteps)).any()):
            raise ValueError(f"timesteps must lie in [0, {num_train_timesteps}), got {timesteps.tolist()}.")

    def _cast(self, name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The float64 buffer `self.<name>` cast to `dtype` on `device`, cached (float64 is not on every device)."""
        key = (name, device, dtype)
        if key not in self._cast_buffers:
            self._cast_buffers[key] = getattr(self, name).to(device=device, dtype=dtype)
        return self._cast_buffers[key]

    def _extract(self, name: str, timesteps: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """`self.<name>[timesteps]` in the dtype and on the device of `sample`, shaped (B, 1, ..., 1) to broadcast."""
        gathered = self._cast(name, sample.device, sample.dtype)[timesteps.to(sample.device)]
        return gathered.reshape(-1, *([1] * (sample.ndim - 1)))

    def _split_model_output(
        self, model_output: torch.Tensor, sample: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Split a learned-variance model output (B, 2C, ...) into the prediction and the variance channels."""
        channels = sample.shape[1]
        learned = self.config.variance_type in ("learned", "learned_range")
        expected = 2 * channels if learned else channels
        if model_output.shape[1] != expected:
            raise ValueError(
                f"model_output has {model_output.shape[1]} channels; variance_type {self.config.variance_type!r}"
                f" expects {expected} for a sample with {channels} (2 * C for 'learned' and 'learned_range', C"
                " otherwise)."
            )
        if learned:
            prediction, predicted_variance = torch.split(model_output, channels, dim=1)
            return prediction, predicted_variance
        return model_output, None

    def _model_log_variance(
        self,
        predicted_variance: torch.Tensor | None,
        posterior_log_variance: torch.Tensor,
        log_beta: torch.Tensor,
    ) -> torch.Tensor:
        """
        log Sigma_theta of p(x_{t'} | x_t) for `config.variance_type`, given the step's log beta~ and log beta.
        """
        variance_type = self.config.variance_type
        if variance_type in ("fixed_small", "fixed_small_log"):
            return posterior_log_variance
        if variance_type in ("fixed_large", "fixed_large_log"):
            return log_beta
        if variance_type == "learned":
            return torch.log(predicted_variance)
        return _learned_range_log_variance(predicted_variance, posterior_log_variance, log_beta)

    def _get_variance(
        self,
        t: int | torch.Tensor,
        predicted_variance: torch.Tensor | None = None,
        variance_type: Literal[
            "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range"
        ]
        | None = None,
    ) -> torch.Tensor:
        """
        The variance of p(x_{t'} | x_t) for the step from `t`, in the units of diffusers' `DDPMScheduler._get_variance`
        (which pipelines such as the value-guided one call), and those differ per variance type: `"fixed_small"`
        gives beta~ of the step, `"fixed_small_log"` its square root (a standard deviation), `"fixed_large"` the
        step's beta, `"fixed_large_log"` log beta, `"learned"` the `predicted_variance` as given and `"learned_range"`
        the log variance of formula (15) of Nichol & Dhariwal 2021. beta~ is clamped to 1e-20 first, as in diffusers.

        Args:
            t (`int` or `torch.Tensor`): A timestep of `self.timesteps` (any training timestep without
                `set_timesteps`); the step goes to the timestep after it.
            predicted_variance (`torch.Tensor`, *optional*): The model's variance channels; only read by `"learned"`
                and `"learned_range"`.
            variance_type (`str`, *optional*): One of `VARIANCE_TYPES`; `config.variance_type` when `None`.

        Returns:
            `torch.Tensor`: float64 and 0-dim for the fixed types (it multiplies float32 tensors without
            promoting them), shaped like `predicted_variance` for the learned ones.
        """
        variance_type = self.config.variance_type if variance_type is None else variance_type
        if variance_type not in VARIANCE_TYPES:
            raise ValueError(
                f"variance_type {variance_type!r} is not supported; choose one of {list(VARIANCE_TYPES)}."
            )
        if variance_type in ("learned", "learned_range") and predicted_variance is None:
            raise ValueError(f"variance_type {variance_type!r} needs the model's `predicted_variance`.")
        t = int(t)
        self._check_timesteps(torch.tensor(t))
        prev_t = int(self.previous_timestep(t))
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        _, _, posterior_variance, current_beta_t = _posterior_coefficients(self.alphas_cumprod[t], alpha_prod_t_prev)
        posterior_variance = posterior_variance.clamp(min=1e-20)  # beta~ = 0 when t' = -1; its log must stay finite

        if variance_type == "fixed_small":
            return posterior_variance
        if variance_type == "fixed_small_log":
            return posterior_variance.sqrt()
        if variance_type == "fixed_large":
            return current_beta_t
        if variance_type == "fixed_large_log":
            return current_beta_t.log()
        if variance_type == "learned":
            return predicted_variance
        return _learned_range_log_variance(predicted_variance, posterior_variance.log(), current_beta_t.log())

    def _threshold_sample(self, sample: torch.Tensor) -> torch.Tensor:
        """
        Dynamic thresholding (Saharia et al. 2022, Imagen, https://arxiv.org/abs/2205.11487): per sample, s is the
        `dynamic_thresholding_ratio` percentile of |x_0| clamped to [1, sample_max_value]; x_0 is clipped to [-s, s]
        and divided by s.

        Args:
            sample (`torch.Tensor` of shape `(B, C, H, W)`): The predicted x_0.

        Returns:
            `torch.Tensor` of the same shape and dtype.
        """
        dtype = sample.dtype
        batch_size = sample.shape[0]
        flat = sample.reshape(batch_size, -1)
        if dtype not in (torch.float32, torch.float64):
            flat = flat.float()  # quantile needs float32/64, and clamp is not implemented for CPU half
        s = torch.quantile(flat.abs(), self.config.dynamic_thresholding_ratio, dim=1)
        s = torch.clamp(s, min=1, max=self.config.sample_max_value).unsqueeze(1)  # (B, 1); s = 1 is plain clipping
        flat = torch.clamp(flat, -s, s) / s
        return flat.reshape(sample.shape).to(dtype)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> DDPMNoiseSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """
        One ancestral sampling step x_t -> x_{t'} from p(x_{t'} | x_t) (Algorithm 2 of Ho et al. 2020), where t' is
        the next timestep of `self.timesteps` (t - 1 without `set_timesteps`).

        Args:
            model_output (`torch.Tensor` of shape `(B, C, H, W)`, or `(B, 2C, H, W)` for learned variances):
                The model output at `timestep`.
            timestep (`int` or `torch.Tensor`): The current timestep t.
            sample (`torch.Tensor` of shape `(B, C, H, W)`): The current sample x_t.
            generator (`torch.Generator` or list of them, *optional*): Random generator(s) for the step's noise.
            return_dict (`bool`, defaults to `True`): Return a `DDPMNoiseSchedulerOutput` rather than a tuple.

        Returns:
            `DDPMNoiseSchedulerOutput` or `(prev_sample, pred_original_sample)`.
        """
        t = int(timestep)
        self._check_timesteps(torch.tensor(t))
        prev_t = int(self.previous_timestep(t))
        model_output, predicted_variance = self._split_model_output(model_output, sample)

        # 1. alpha_bar of this step's ends and the posterior q(x_{t'} | x_t, x_0), formulas (6)-(7) of Ho et al. 2020
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        coef_x0, coef_xt, posterior_variance, current_beta_t = _posterior_coefficients(alpha_prod_t, alpha_prod_t_prev)

        # 2. predicted x_0, formula (15) of Ho et al. 2020 (or its v / x_0 counterpart)
        pred_original_sample = self.predict_original_sample(model_output, sample, torch.tensor(t))

        # 3. clip or threshold the predicted x_0
        if self.config.thresholding:
            pred_original_sample = self._threshold_sample(pred_original_sample)
        elif self.config.clip_sample:
            pred_original_sample = pred_original_sample.clamp(
                -self.config.clip_sample_range, self.config.clip_sample_range
            )

        # 4. mean mu~_t(x_t, x_0) of the posterior, formula (7) of Ho et al. 2020
        pred_prev_sample = coef_x0 * pred_original_sample + coef_xt * sample

        # 5. add noise sigma_t z, z ~ N(0, I), at every t > 0 (as diffusers: also when the schedule's last step
        # starts above t = 0). beta~ is clamped so its log stays finite when t' = -1.
        if t > 0:
            log_variance = self._model_log_variance(
                predicted_variance, posterior_variance.clamp(min=1e-20).log(), current_beta_t.log()
            )
            variance_noise = randn_tensor(
                sample.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
            )
            pred_prev_sample = pred_prev_sample + torch.exp(0.5 * log_variance) * variance_noise

        if not return_dict:
            return pred_prev_sample, pred_original_sample
        return DDPMNoiseSchedulerOutput(prev_sample=pred_prev_sample, pred_original_sample=pred_original_sample)

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor
    ) -> torch.Tensor:
        """
        Sample q(x_t | x_0): x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, formula (4) of Ho et al. 2020.

        Args:
            original_samples (`torch.Tensor` of shape `(B, C, H, W)`): Clean samples x_0.
            noise (`torch.Tensor` of shape `(B, C, H, W)`): eps ~ N(0, I).
            timesteps (`torch.IntTensor` of shape `(B,)`): One timestep per sample.

        Returns:
            `torch.Tensor` of shape `(B, C, H, W)`: The noisy samples x_t.
        """
        self._check_timesteps(timesteps)
        sqrt_alpha_prod = self._extract("sqrt_alphas_cumprod", timesteps, original_samples)
        sqrt_one_minus_alpha_prod = self._extract("sqrt_one_minus_alphas_cumprod", timesteps, original_samples)
        return sqrt_alpha_prod * original_samples + sqrt_one_minus_alpha_prod * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor) -> torch.Tensor:
        """
        The velocity v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0 (Salimans & Ho 2022, sec. 4).

        Args:
            sample (`torch.Tensor` of shape `(B, C, H, W)`): Clean samples x_0.
            noise (`torch.Tensor` of shape `(B, C, H, W)`): The noise eps.
            timesteps (`torch.IntTensor` of shape `(B,)`): One timestep per sample.

        Returns:
            `torch.Tensor` of shape `(B, C, H, W)`.
        """
        self._check_timesteps(timesteps)
        sqrt_alpha_prod = self._extract("sqrt_alphas_cumprod", timesteps, sample)
        sqrt_one_minus_alpha_prod = self._extract("sqrt_one_minus_alphas_cumprod", timesteps, sample)
        return sqrt_alpha_prod * noise - sqrt_one_minus_alpha_prod * sample

    def get_target(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor) -> torch.Tensor:
        """
        The training target for `config.prediction_type`: the noise, the velocity or x_0.

        Args:
            sample (`torch.Tensor` of shape `(B, C, H, W)`): Clean samples x_0.
            noise (`torch.Tensor` of shape `(B, C, H, W)`): The noise eps used to make x_t.
            timesteps (`torch.IntTensor` of shape `(B,)`): One timestep per sample.

        Returns:
            `torch.Tensor` of shape `(B, C, H, W)`.
        """
        prediction_type = self.config.prediction_type
        if prediction_type == "epsilon":
            return noise
        if prediction_type == "v_prediction":
            return self.get_velocity(sample, noise, timesteps)
        return sample

    def snr(self, timesteps: torch.IntTensor) -> torch.Tensor:
        """
        Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t), e.g. for min-SNR loss weighting (Hang et al. 2023).

        Args:
            timesteps (`torch.IntTensor` of shape `(B,)`): One timestep per sample.

        Returns:
            `torch.Tensor` of shape `(B,)`, float32, on the device of `timesteps`.
        """
        self._check_timesteps(timesteps)
        # from float64, where 1 - alpha_bar ~ 1e-4 at t = 0 keeps its digits
        return self._cast("signal_to_noise_ratio", timesteps.device, torch.float32)[timesteps]

    def predict_original_sample(
        self, model_output: torch.Tensor, sample: torch.Tensor, timesteps: torch.IntTensor
    ) -> torch.Tensor:
        """
        The x_0 implied by the model output at x_t, for `config.prediction_type`: formula (15) of Ho et al. 2020
        x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t) for `"epsilon"`,
        x_0 = sqrt(alpha_bar_t) x_t - sqrt(1 - alpha_bar_t) v for `"v_prediction"`, the output itself for `"sample"`.
        No clipping.

        Args:
            model_output (`torch.Tensor` of shape `(B, C, H, W)`): The prediction, without variance channels.
            sample (`torch.Tensor` of shape `(B, C, H, W)`): The noisy sample x_t.
            timesteps (`torch.IntTensor` of shape `(B,)` or `()`): The timestep(s) t.

        Returns:
            `torch.Tensor` of shape `(B, C, H, W)`.
        """
        self._check_timesteps(timesteps)
        prediction_type = self.config.prediction_type
        if prediction_type == "sample":
            return model_output
        sqrt_alpha_prod = self._extract("sqrt_alphas_cumprod", timesteps, sample)
        sqrt_one_minus_alpha_prod = self._extract("sqrt_one_minus_alphas_cumprod", timesteps, sample)
        if prediction_type == "epsilon":
            return (sample - sqrt_one_minus_alpha_prod * model_output) / sqrt_alpha_prod
        return sqrt_alpha_prod * sample - sqrt_one_minus_alpha_prod * model_output

    def vlb_terms(
        self,
        model_output: torch.Tensor,
        sample: torch.Tensor,
        noisy_sample: torch.Tensor,
        timesteps: torch.IntTensor,
        detach_mean: bool = False,
    ) -> torch.Tensor:
        """
        Per-sample terms of the variational bound, formula (5) of Ho et al. 2020, in bits/dim:
        L_{t-1} = KL( q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t) ) for t > 0 and the discretized-Gaussian decoder
        L_0 = -log p(x_0 | x_1) for t = 0 (improved-diffusion `_vb_terms_bpd`). The model mean comes from its
        unclipped x_0 prediction.

        The decoder assumes 8-bit data scaled to [-1, 1] (formula (13) of Ho et al. 2020). For latents the sum of
        the terms is a bound in latent space, on latents discretized to that grid: not comparable with pixel bits/dim.

        Args:
            model_output (`torch.Tensor` of shape `(B, C, H, W)`, or `(B, 2C, H, W)` for learned variances):
                The model output at (x_t, t).
            sample (`torch.Tensor` of shape `(B, C, H, W)`): The clean samples x_0.
            noisy_sample (`torch.Tensor` of shape `(B, C, H, W)`): x_t = `add_noise(sample, noise, timesteps)`.
            timesteps (`torch.IntTensor` of shape `(B,)`): One timestep per sample.
            detach_mean (`bool`, defaults to `False`):
                Stop the gradient through the mean part of the output, so the bound only trains the variance:
                L_hybrid = L_simple + lambda L_vlb of Nichol & Dhariwal 2021, sec. 3.1.

        Returns:
            `torch.Tensor` of shape `(B,)`: L_{t-1} (or L_0 where t = 0) in bits per dimension.
        """
        self._check_timesteps(timesteps)
        model_output, predicted_variance = self._split_model_output(model_output, sample)
        if detach_mean:
            model_output = model_output.detach()

        # 1. true posterior q(x_{t-1} | x_t, x_0), formulas (6)-(7) of Ho et al. 2020
        coef_x0 = self._extract("posterior_mean_coef1", timesteps, sample)
        coef_xt = self._extract("posterior_mean_coef2", timesteps, sample)
        true_mean = coef_x0 * sample + coef_xt * noisy_sample
        true_log_variance = self._extract("posterior_log_variance_clipped", timesteps, sample)

        # 2. model p(x_{t-1} | x_t): the posterior mean at the predicted x_0 and the configured variance
        pred_original_sample = self.predict_original_sample(model_output, noisy_sample, timesteps)
        model_mean = coef_x0 * pred_original_sample + coef_xt * noisy_sample
        fixed_large = self.config.variance_type in ("fixed_large", "fixed_large_log")
        log_beta = self._extract("fixed_large_log_variance" if fixed_large else "log_betas", timesteps, sample)
        model_log_variance = self._model_log_variance(predicted_variance, true_log_variance, log_beta)

        # 3. KL terms L_{t-1} for t > 0 and the decoder L_0 for t = 0, nats -> bits/dim
        kl = _mean_flat(normal_kl(true_mean, true_log_variance, model_mean, model_log_variance)) / math.log(2.0)
        decoder_nll = -_mean_flat(
            discretized_gaussian_log_likelihood(sample, model_mean, 0.5 * model_log_variance)
        ) / math.log(2.0)
        return torch.where(timesteps.to(kl.device) == 0, decoder_nll, kl)

    def prior_bpd(self, sample: torch.Tensor) -> torch.Tensor:
        """
        The prior term L_T = KL( q(x_T | x_0) || N(0, I) ) of formula (5) of Ho et al. 2020, in bits/dim. It has no
        parameters; it is ~0 for a well-designed schedule and exactly 0 with `rescale_betas_zero_snr`.

        Args:
            sample (`torch.Tensor` of shape `(B, C, H, W)`): The clean samples x_0.

        Returns:
            `torch.Tensor` of shape `(B,)`.
        """
        last = torch.full((sample.shape[0],), self.config.num_train_timesteps - 1, dtype=torch.int64)
        mean = self._extract("sqrt_alphas_cumprod", last, sample) * sample
        log_variance = self._extract("log_one_minus_alphas_cumprod", last, sample)
        zero = torch.zeros((), dtype=sample.dtype, device=sample.device)
        return _mean_flat(normal_kl(mean, log_variance, zero, zero)) / math.log(2.0)

    @torch.no_grad()
    def calculate_bpd(
        self,
        model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        stride: int = 1,
    ) -> torch.Tensor:
        """
        The negative variational bound -ELBO >= -log p(x_0) in bits/dim, L_T + sum_{t>1} L_{t-1} + L_0 (formula (5)
        of Ho et al. 2020; improved-diffusion `calc_bpd_loop`), one noise draw per evaluated timestep, from T-1 down
        to 0.

        Args:
            model_fn (`Callable`): `model_fn(x_t, timesteps) -> model_output`, with `timesteps` of shape `(B,)`; bind
                any conditioning with a closure.
            sample (`torch.Tensor` of shape `(B, C, H, W)`): The clean samples x_0 (see `vlb_terms` for latents).
            generator (`torch.Generator`, *optional*): Generator for the noise.
            stride (`int`, defaults to 1):
                With `stride > 1` the KL terms of t = T-1 ... stride + 1 are split into blocks of `stride`
                consecutive timesteps, one t is drawn uniformly in each block (with `generator`, the first one of a
                list) and its term counts for the whole block: stratified sampling, an unbiased estimate. The terms
                of t = stride ... 1, which grow like 1 / t and would dominate the variance, are each evaluated, as
                are L_0 and L_T: about (T - 1 - stride) / stride + stride + 1 model calls instead of T (T = 1000:
                110 for stride 10, 64 for stride 30).

        Returns:
            `torch.Tensor` of shape `(B,)`.
        """
        if stride < 1:
            raise ValueError(f"stride must be a positive integer, got {stride}.")
        num_train_timesteps = self.config.num_train_timesteps
        batch_size = sample.shape[0]
        kl_timesteps = torch.arange(num_train_timesteps - 1, 0, -1)  # from t = T-1 down to 1
        exact = min(stride, len(kl_timesteps))
        blocks = [*kl_timesteps[:-exact].split(stride), *kl_timesteps[-exact:].split(1)]
        pick_generator = generator[0] if isinstance(generator, list) else generator
        device = pick_generator.device if pick_generator is not None else "cpu"
        picks = [
            int(block[torch.randint(len(block), (), generator=pick_generator, device=device).item()])
            if len(block) > 1
            else int(block[0])
            for block in blocks
        ]
        weights = [len(block) for block in blocks]

        terms = []
        for t in [*picks, 0]:
            timesteps = torch.full((batch_size,), t, dtype=torch.int64, device=sample.device)
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            noisy_sample = self.add_noise(sample, noise, timesteps)
            terms.append(self.vlb_terms(model_fn(noisy_sample, timesteps), sample, noisy_sample, timesteps))
        kl_sum = sum(weight * term for weight, term in zip(weights, terms[:-1]))
        return kl_sum + terms[-1] + self.prior_bpd(sample)
