"""DDPMNoiseScheduler against its oracles: diffusers' DDPMScheduler for sampling and the forward process, closed-form
Gaussian KLs and normal CDFs (float64, written out here) for the variational bound, save/load round trips."""

import itertools
import json
import math

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr
from diffusers.training_utils import compute_snr

from latentddpm.schedulers import DDPMNoiseScheduler, DDPMNoiseSchedulerOutput

BETA_SCHEDULES = ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"]
PREDICTION_TYPES = ["epsilon", "v_prediction", "sample"]
VARIANCE_TYPES = ["fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range"]
TIMESTEP_SPACINGS = ["leading", "linspace", "trailing"]
SHAPE = (2, 3, 4, 4)
T = 100  # num_train_timesteps of the toy schedules


def dummy_model(sample: torch.Tensor, t: int | torch.Tensor, variance_type: str) -> torch.Tensor:
    """A smooth deterministic stand-in for a U-Net; 2C channels for learned variances."""
    prediction = 0.8 * torch.sin(sample) + 0.01 * float(t)
    if variance_type == "learned":  # diffusers' "learned" takes the variance itself: keep it positive
        return torch.cat([prediction, 0.005 + 0.01 * torch.sigmoid(sample)], dim=1)
    if variance_type == "learned_range":  # v in [-1, 1]
        return torch.cat([prediction, torch.tanh(sample + 0.01 * float(t))], dim=1)
    return prediction


def oracle_config(config: dict) -> dict:
    """diffusers' "fixed_large_log" samples NaN (sqrt of log beta, https://github.com/huggingface/diffusers/issues/14569);
    ours samples with the intended std sqrt(beta_t), which is diffusers' "fixed_large"."""
    if config.get("variance_type") == "fixed_large_log":
        return {**config, "variance_type": "fixed_large"}
    return config


def assert_sampling_matches_diffusers(
    config: dict, num_inference_steps: int | None = 10, timesteps=None, float64_oracle: bool = False
) -> None:
    """Run our sampling loop and, at every step, diffusers' DDPMScheduler on the same x_t with an identically seeded
    generator; every prev_sample and pred_original_sample must agree to 1e-5.

    diffusers keeps alphas_cumprod as a float32 cumprod (~1e-6 relative off). Strided steps tolerate that, but the
    beta of a one-timestep step, 1 - alpha_bar_t / alpha_bar_{t-1} ~ 1e-4, loses three digits to cancellation, so
    full chains and consecutive custom timesteps differ from ours (float64) by up to ~3e-5. With `float64_oracle` the
    oracle gets the cumprod of its own betas (and zero-SNR rescale) in float64: its step math is then compared, not
    float32 rounding.
    Both get the same x_t at every step so that rounding does not compound along the chain."""
    ours, theirs = DDPMNoiseScheduler(**config), DDPMScheduler(**oracle_config(config))
    if float64_oracle:
        betas = DDPMScheduler(**{**oracle_config(config), "rescale_betas_zero_snr": False}).betas.double()
        if config.get("rescale_betas_zero_snr"):
            betas = rescale_zero_terminal_snr(betas)  # diffusers' function, which it runs in float32
        theirs.alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    if num_inference_steps is not None or timesteps is not None:
        ours.set_timesteps(num_inference_steps, timesteps=timesteps)
        theirs.set_timesteps(num_inference_steps, timesteps=timesteps)
    assert torch.equal(ours.timesteps, theirs.timesteps)

    variance_type = config.get("variance_type", "fixed_small")
    sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    ours_generator, theirs_generator = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for t in ours.timesteps:
        model_output = dummy_model(sample, t, variance_type)
        ours_out = ours.step(model_output, t, sample, generator=ours_generator)
        theirs_out = theirs.step(model_output, t, sample, generator=theirs_generator)
        torch.testing.assert_close(ours_out.prev_sample, theirs_out.prev_sample.float(), atol=1e-5, rtol=0)
        torch.testing.assert_close(
            ours_out.pred_original_sample, theirs_out.pred_original_sample.float(), atol=1e-5, rtol=0
        )
        sample = ours_out.prev_sample
    assert torch.isfinite(sample).all()


# --------------------------------------------------------------------------------------------------------------------
# Sampling against diffusers
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "beta_schedule,prediction_type,variance_type,timestep_spacing",
    list(itertools.product(BETA_SCHEDULES, PREDICTION_TYPES, VARIANCE_TYPES, TIMESTEP_SPACINGS)),
)
def test_sampling_loop_matches_diffusers(beta_schedule, prediction_type, variance_type, timestep_spacing):
    config = dict(
        num_train_timesteps=T,
        beta_schedule=beta_schedule,
        prediction_type=prediction_type,
        variance_type=variance_type,
        timestep_spacing=timestep_spacing,
    )
    assert_sampling_matches_diffusers(config, num_inference_steps=10)


@pytest.mark.parametrize("beta_schedule,variance_type", list(itertools.product(BETA_SCHEDULES, VARIANCE_TYPES)))
def test_full_chain_without_set_timesteps_matches_diffusers(beta_schedule, variance_type):
    config = dict(num_train_timesteps=T, beta_schedule=beta_schedule, variance_type=variance_type)
    assert_sampling_matches_diffusers(config, num_inference_steps=None, float64_oracle=True)


@pytest.mark.parametrize(
    "config",
    [
        dict(clip_sample=False),
        dict(clip_sample=True, clip_sample_range=0.5),
        dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5),
        dict(thresholding=True, prediction_type="v_prediction", variance_type="learned_range"),
        dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"),
        dict(rescale_betas_zero_snr=True, beta_schedule="scaled_linear", prediction_type="sample"),
        dict(trained_betas=np.linspace(2e-4, 4e-2, T).tolist(), variance_type="fixed_large"),
        dict(steps_offset=1, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        dict(steps_offset=3, variance_type="learned_range"),
    ],
    ids=[
        "no_clip",
        "clip_range",
        "thresholding",
        "thresholding_learned_range",
        "zero_snr_v_trailing",
        "zero_snr_sample",
        "trained_betas",
        "steps_offset_sd",
        "steps_offset_learned_range",
    ],
)
def test_options_match_diffusers(config):
    config = {"num_train_timesteps": T, **config}
    assert_sampling_matches_diffusers(config, num_inference_steps=10, float64_oracle=True)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "learned_range"])
def test_custom_timesteps_match_diffusers(variance_type):
    config = dict(num_train_timesteps=T, variance_type=variance_type)
    timesteps = [97, 80, 51, 50, 23, 7, 2, 0]
    assert_sampling_matches_diffusers(config, num_inference_steps=None, timesteps=timesteps, float64_oracle=True)


@pytest.mark.parametrize(
    "variance_type,num_inference_steps,from_config",
    list(itertools.product(VARIANCE_TYPES, [None, 10], [True, False])),
)
def test_get_variance_matches_diffusers(variance_type, num_inference_steps, from_config):
    # diffusers' value-guided pipeline calls `_get_variance(t)`; its units differ per variance type, and so do ours.
    # The type comes from the config, or is named in the call on a scheduler configured with another one.
    configured = variance_type if from_config else "fixed_small" if variance_type != "fixed_small" else "fixed_large"
    config = dict(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2", variance_type=configured)
    ours, theirs = DDPMNoiseScheduler(**config), DDPMScheduler(**config)
    theirs.alphas_cumprod = torch.cumprod(1 - theirs.betas.double(), dim=0)  # its math in float64, not its rounding
    if num_inference_steps is not None:
        ours.set_timesteps(num_inference_steps)
        theirs.set_timesteps(num_inference_steps)
    model_output = dummy_model(torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)), 0, variance_type)
    predicted_variance = model_output[:, SHAPE[1] :]
    called_type = None if from_config else variance_type
    for t in ours.timesteps:
        torch.testing.assert_close(
            ours._get_variance(t, predicted_variance, called_type),
            theirs._get_variance(t, predicted_variance, called_type),
        )


def test_drop_in_attributes_match_diffusers():
    ours, theirs = DDPMNoiseScheduler(num_train_timesteps=T), DDPMScheduler(num_train_timesteps=T)
    assert len(ours) == len(theirs) == T
    assert ours.order == theirs.order == 1
    assert ours.init_noise_sigma == theirs.init_noise_sigma == 1.0
    assert torch.equal(ours.timesteps, theirs.timesteps)  # the full reversed range before set_timesteps
    assert ours.previous_timestep(37) == theirs.previous_timestep(37) == 36
    assert sorted(ours.compatibles, key=str) == sorted(theirs.compatibles, key=str)
    ours.set_timesteps(7)
    theirs.set_timesteps(7)
    for t in ours.timesteps:
        assert int(ours.previous_timestep(t)) == int(theirs.previous_timestep(t))
    sample = torch.randn(SHAPE)
    assert ours.scale_model_input(sample, ours.timesteps[0]) is sample


def test_step_return_dict_false_gives_the_same_tuple():
    scheduler = DDPMNoiseScheduler(num_train_timesteps=T)
    sample = torch.randn(SHAPE)
    model_output = dummy_model(sample, 50, "fixed_small")
    output = scheduler.step(model_output, 50, sample, generator=torch.Generator().manual_seed(0))
    prev_sample, pred_original_sample = scheduler.step(
        model_output, 50, sample, generator=torch.Generator().manual_seed(0), return_dict=False
    )
    assert isinstance(output, DDPMNoiseSchedulerOutput)
    assert torch.equal(output.prev_sample, prev_sample)
    assert torch.equal(output.pred_original_sample, pred_original_sample)


# --------------------------------------------------------------------------------------------------------------------
# Forward process and training targets
# --------------------------------------------------------------------------------------------------------------------

TRAIN_TIMESTEPS = torch.tensor([0, 1, 10, 500, 998, 999])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_add_noise_and_velocity_match_diffusers(dtype):
    ours, theirs = DDPMNoiseScheduler(), DDPMScheduler()
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(6, 3, 4, 4, generator=generator).to(dtype)
    noise = torch.randn(6, 3, 4, 4, generator=generator).to(dtype)
    # diffusers' alphas_cumprod is a float32 cumprod, good to ~1e-6 relative
    for ours_fn, theirs_fn in [(ours.add_noise, theirs.add_noise), (ours.get_velocity, theirs.get_velocity)]:
        ours_out = ours_fn(sample, noise, TRAIN_TIMESTEPS)
        assert ours_out.dtype == dtype
        torch.testing.assert_close(ours_out, theirs_fn(sample, noise, TRAIN_TIMESTEPS), atol=1e-5, rtol=1e-5)


def test_add_noise_and_velocity_float64_equal_closed_form():
    scheduler = DDPMNoiseScheduler()
    alphas_cumprod = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[TRAIN_TIMESTEPS.numpy()][:, None, None, None]
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(6, 3, 4, 4, generator=generator, dtype=torch.float64)
    noise = torch.randn(6, 3, 4, 4, generator=generator, dtype=torch.float64)
    noisy = np.sqrt(alphas_cumprod) * sample.numpy() + np.sqrt(1 - alphas_cumprod) * noise.numpy()
    velocity = np.sqrt(alphas_cumprod) * noise.numpy() - np.sqrt(1 - alphas_cumprod) * sample.numpy()
    torch.testing.assert_close(
        scheduler.add_noise(sample, noise, TRAIN_TIMESTEPS), torch.from_numpy(noisy), atol=1e-14, rtol=0
    )
    torch.testing.assert_close(
        scheduler.get_velocity(sample, noise, TRAIN_TIMESTEPS), torch.from_numpy(velocity), atol=1e-14, rtol=0
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_add_noise_half_precision_is_the_rounded_float64_result(dtype):
    """Coefficients are cast from float64, so x_t keeps the sqrt(1 - alpha_bar_0) = 0.01 noise at t = 0, which
    diffusers loses by computing 1 - alpha_bar in half precision."""
    ours, theirs = DDPMNoiseScheduler(), DDPMScheduler()
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(6, 3, 4, 4, generator=generator).to(dtype)
    noise = torch.randn(6, 3, 4, 4, generator=generator).to(dtype)
    tolerance = {torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    for ours_fn, theirs_fn in [(ours.add_noise, theirs.add_noise), (ours.get_velocity, theirs.get_velocity)]:
        expected = theirs_fn(sample.double(), noise.double(), TRAIN_TIMESTEPS)
        ours_out = ours_fn(sample, noise, TRAIN_TIMESTEPS)
        assert ours_out.dtype == dtype
        torch.testing.assert_close(ours_out.double(), expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_get_target_is_the_configured_prediction(prediction_type):
    ours, theirs = DDPMNoiseScheduler(prediction_type=prediction_type), DDPMScheduler()
    generator = torch.Generator().manual_seed(0)
    sample, noise = torch.randn(6, 3, 4, 4, generator=generator), torch.randn(6, 3, 4, 4, generator=generator)
    expected = {
        "epsilon": noise,
        "v_prediction": theirs.get_velocity(sample, noise, TRAIN_TIMESTEPS),
        "sample": sample,
    }[prediction_type]
    torch.testing.assert_close(ours.get_target(sample, noise, TRAIN_TIMESTEPS), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_predict_original_sample_inverts_add_noise(prediction_type):
    scheduler = DDPMNoiseScheduler(prediction_type=prediction_type)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(6, 3, 4, 4, generator=generator, dtype=torch.float64)
    noise = torch.randn(6, 3, 4, 4, generator=generator, dtype=torch.float64)
    noisy = scheduler.add_noise(sample, noise, TRAIN_TIMESTEPS)
    target = scheduler.get_target(sample, noise, TRAIN_TIMESTEPS)
    recovered = scheduler.predict_original_sample(target, noisy, TRAIN_TIMESTEPS)
    # at t = 999, x_0 = (x_t - 0.99998 eps) / 0.0064: rounding is amplified ~150x
    torch.testing.assert_close(recovered, sample, atol=1e-12, rtol=0)


def closed_form_betas(beta_schedule: str, num_train_timesteps: int = 1000, start=1e-4, end=0.02) -> np.ndarray:
    """The four schedules written out in numpy float64."""
    if beta_schedule == "linear":
        return np.linspace(start, end, num_train_timesteps)
    if beta_schedule == "scaled_linear":
        return np.linspace(start**0.5, end**0.5, num_train_timesteps) ** 2
    if beta_schedule == "squaredcos_cap_v2":  # formula (17) of Nichol & Dhariwal 2021, s = 0.008
        alpha_bar = np.cos((np.arange(num_train_timesteps + 1) / num_train_timesteps + 0.008) / 1.008 * np.pi / 2) ** 2
        return np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], 0.999)
    return 1 / (1 + np.exp(-np.linspace(-6, 6, num_train_timesteps))) * (end - start) + start  # sigmoid


@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_betas_match_closed_form_and_diffusers(beta_schedule):
    ours = DDPMNoiseScheduler(beta_schedule=beta_schedule)
    expected = torch.from_numpy(closed_form_betas(beta_schedule))
    torch.testing.assert_close(ours.betas, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(ours.betas.float(), DDPMScheduler(beta_schedule=beta_schedule).betas)


@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_snr_matches_closed_form(beta_schedule):
    """alpha_bar / (1 - alpha_bar) from float64 constants. (diffusers' `compute_snr` works on the float32 cumprod
    and is ~1e-3 relative off at t = 0, where 1 - alpha_bar ~ 1e-4 cancels.)"""
    alphas_cumprod = np.cumprod(1 - closed_form_betas(beta_schedule))[TRAIN_TIMESTEPS.numpy()]
    snr = DDPMNoiseScheduler(beta_schedule=beta_schedule).snr(TRAIN_TIMESTEPS)
    assert snr.shape == (6,) and snr.dtype == torch.float32
    torch.testing.assert_close(snr, torch.from_numpy(alphas_cumprod / (1 - alphas_cumprod)).float(), rtol=1e-6, atol=0)
    theirs = compute_snr(DDPMScheduler(beta_schedule=beta_schedule), TRAIN_TIMESTEPS)
    torch.testing.assert_close(snr, theirs, rtol=2e-3, atol=0)


# --------------------------------------------------------------------------------------------------------------------
# Variational bound against closed forms (float64, written out independently of the library)
# --------------------------------------------------------------------------------------------------------------------

LINEAR_BETAS = np.linspace(1e-4, 0.02, T)
LINEAR_ALPHAS_CUMPROD = np.cumprod(1 - LINEAR_BETAS)


def gaussian_kl_bits_per_dim(mean1, std1, mean2, std2):
    """KL(N(m1, s1^2) || N(m2, s2^2)) = log(s2/s1) + (s1^2 + (m1-m2)^2) / (2 s2^2) - 1/2, averaged over C, H, W,
    in bits."""
    kl = np.log(std2 / std1) + (std1**2 + (mean1 - mean2) ** 2) / (2 * std2**2) - 0.5
    return kl.mean(axis=(1, 2, 3)) / np.log(2)


def posterior_and_model(t, sample, noisy, model_output, variance_type):
    """Mean and std of q(x_{t-1} | x_t, x_0) and of p(x_{t-1} | x_t) for epsilon prediction, one timestep per row."""
    alpha_bar = LINEAR_ALPHAS_CUMPROD[t][:, None, None, None]
    alpha_bar_prev = np.where(t > 0, LINEAR_ALPHAS_CUMPROD[t - 1], 1.0)[:, None, None, None]
    beta = LINEAR_BETAS[t][:, None, None, None]
    posterior_variance = beta * (1 - alpha_bar_prev) / (1 - alpha_bar)
    # beta~_0 = 0: Ho et al. and improved-diffusion use beta~_1 there
    beta_tilde_1 = LINEAR_BETAS[1] * (1 - LINEAR_ALPHAS_CUMPROD[0]) / (1 - LINEAR_ALPHAS_CUMPROD[1])
    posterior_variance = np.where(t[:, None, None, None] == 0, beta_tilde_1, posterior_variance)

    def posterior_mean(x0):
        return (
            np.sqrt(alpha_bar_prev) * beta / (1 - alpha_bar) * x0
            + np.sqrt(1 - beta) * (1 - alpha_bar_prev) / (1 - alpha_bar) * noisy
        )

    channels = sample.shape[1]
    eps = model_output[:, :channels]
    pred_x0 = (noisy - np.sqrt(1 - alpha_bar) * eps) / np.sqrt(alpha_bar)  # formula (15)
    if variance_type == "fixed_small":
        model_variance = posterior_variance
    elif variance_type == "fixed_large":
        model_variance = np.where(t[:, None, None, None] == 0, beta_tilde_1, beta)
    else:  # learned_range, formula (15) of Nichol & Dhariwal 2021
        frac = (model_output[:, channels:] + 1) / 2
        model_variance = np.exp(frac * np.log(beta) + (1 - frac) * np.log(posterior_variance))
    return posterior_mean(sample), np.sqrt(posterior_variance), posterior_mean(pred_x0), np.sqrt(model_variance)


def vlb_inputs(variance_type, timesteps, seed=0):
    generator = torch.Generator().manual_seed(seed)
    channels = SHAPE[1] * (2 if variance_type == "learned_range" else 1)
    # x_0 on the 8-bit grid k / 127.5 - 1, with both edge bins present
    sample = torch.randint(0, 256, SHAPE, generator=generator).double() / 127.5 - 1
    sample[0, 0, 0, 0], sample[1, 0, 0, 0] = -1.0, 1.0
    noise = torch.randn(SHAPE, generator=generator, dtype=torch.float64)
    model_output = torch.randn((SHAPE[0], channels, *SHAPE[2:]), generator=generator, dtype=torch.float64)
    if variance_type == "learned_range":
        model_output[:, SHAPE[1] :] = torch.tanh(model_output[:, SHAPE[1] :])
    scheduler = DDPMNoiseScheduler(num_train_timesteps=T, variance_type=variance_type)
    noisy = scheduler.add_noise(sample, noise, timesteps)
    return scheduler, sample, noise, noisy, model_output


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "learned_range"])
def test_vlb_kl_terms_match_closed_form_gaussian_kl(variance_type):
    timesteps = torch.tensor([1, 63])
    scheduler, sample, _, noisy, model_output = vlb_inputs(variance_type, timesteps)
    terms = scheduler.vlb_terms(model_output, sample, noisy, timesteps)
    true_mean, true_std, model_mean, model_std = posterior_and_model(
        timesteps.numpy(), sample.numpy(), noisy.numpy(), model_output.numpy(), variance_type
    )
    expected = gaussian_kl_bits_per_dim(true_mean, true_std, model_mean, model_std)
    assert terms.shape == (2,) and (terms > 0).all()
    torch.testing.assert_close(terms, torch.from_numpy(expected), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "learned_range"])
def test_vlb_decoder_term_matches_discretized_normal_cdf(variance_type):
    timesteps = torch.tensor([0, 0])
    scheduler, sample, _, noisy, model_output = vlb_inputs(variance_type, timesteps)
    terms = scheduler.vlb_terms(model_output, sample, noisy, timesteps)
    _, _, model_mean, model_std = posterior_and_model(
        timesteps.numpy(), sample.numpy(), noisy.numpy(), model_output.numpy(), variance_type
    )
    normal = torch.distributions.Normal(torch.from_numpy(model_mean), torch.from_numpy(model_std))
    upper = torch.where(sample > 0.999, torch.tensor(1.0, dtype=torch.float64), normal.cdf(sample + 1 / 255))
    lower = torch.where(sample < -0.999, torch.tensor(0.0, dtype=torch.float64), normal.cdf(sample - 1 / 255))
    expected = -torch.log(upper - lower).mean(dim=(1, 2, 3)) / math.log(2)
    assert (terms > 0).all()
    torch.testing.assert_close(terms, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("variance_type", ["fixed_small", "learned_range"])
def test_vlb_kl_is_zero_for_a_perfect_model(variance_type):
    """Predicting the true noise with the posterior variance (v = -1 for learned_range) makes p = q."""
    timesteps = torch.tensor([5, 99])
    scheduler, sample, noise, noisy, _ = vlb_inputs(variance_type, timesteps)
    model_output = noise if variance_type == "fixed_small" else torch.cat([noise, -torch.ones_like(noise)], dim=1)
    terms = scheduler.vlb_terms(model_output, sample, noisy, timesteps)
    torch.testing.assert_close(terms, torch.zeros(2, dtype=torch.float64), atol=1e-12, rtol=0)


def test_vlb_detach_mean_trains_only_the_variance():
    timesteps = torch.tensor([3, 70])
    scheduler, sample, _, noisy, model_output = vlb_inputs("learned_range", timesteps)
    gradients = {}
    for detach_mean in (False, True):
        output = model_output.clone().requires_grad_(True)
        scheduler.vlb_terms(output, sample, noisy, timesteps, detach_mean=detach_mean).sum().backward()
        gradients[detach_mean] = output.grad
    channels = SHAPE[1]
    assert gradients[False][:, :channels].abs().sum() > 0
    assert torch.equal(gradients[True][:, :channels], torch.zeros_like(gradients[True][:, :channels]))
    torch.testing.assert_close(gradients[True][:, channels:], gradients[False][:, channels:])


def test_prior_bpd_matches_closed_form():
    scheduler = DDPMNoiseScheduler(num_train_timesteps=T)
    sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    alpha_bar = LINEAR_ALPHAS_CUMPROD[-1]
    expected = gaussian_kl_bits_per_dim(np.sqrt(alpha_bar) * sample.numpy(), np.sqrt(1 - alpha_bar), 0.0, 1.0)
    torch.testing.assert_close(scheduler.prior_bpd(sample), torch.from_numpy(expected), rtol=1e-9, atol=1e-12)


def test_prior_bpd_vanishes_for_long_chains_and_zero_terminal_snr():
    zeros = torch.zeros(SHAPE, dtype=torch.float64)
    # T = 1000 linear: alpha_bar_T = 4e-5, KL(N(0, 1 - a) || N(0, 1)) ~ a^2 / 4 = 4e-10 nats
    assert (DDPMNoiseScheduler().prior_bpd(zeros) < 1e-9).all()
    assert (DDPMNoiseScheduler().prior_bpd(zeros) > 0).all()
    # zero terminal SNR: q(x_T | x_0) = N(0, I) exactly, whatever x_0
    sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    prior = DDPMNoiseScheduler(rescale_betas_zero_snr=True).prior_bpd(sample)
    torch.testing.assert_close(prior, torch.zeros(SHAPE[0], dtype=torch.float64), atol=1e-15, rtol=0)


@pytest.mark.parametrize("stride", [1, 7])
def test_calculate_bpd_of_an_exact_x0_model_is_prior_plus_decoder(stride):
    """A model that outputs x_0 ("sample" prediction) has p = q at every t > 0, so only L_T and L_0 remain; L_0 with
    mean x_0 and std sqrt(beta~_1) is closed form."""
    scheduler = DDPMNoiseScheduler(num_train_timesteps=T, prediction_type="sample")
    _, sample, _, _, _ = vlb_inputs("fixed_small", torch.tensor([0, 0]))
    generator = torch.Generator().manual_seed(0)
    bpd = scheduler.calculate_bpd(lambda noisy, timesteps: sample, sample, generator=generator, stride=stride)

    std = math.sqrt(LINEAR_BETAS[1] * (1 - LINEAR_ALPHAS_CUMPROD[0]) / (1 - LINEAR_ALPHAS_CUMPROD[1]))
    normal = torch.distributions.Normal(sample, std)
    upper = torch.where(sample > 0.999, torch.tensor(1.0, dtype=torch.float64), normal.cdf(sample + 1 / 255))
    lower = torch.where(sample < -0.999, torch.tensor(0.0, dtype=torch.float64), normal.cdf(sample - 1 / 255))
    decoder = -torch.log(upper - lower).mean(dim=(1, 2, 3)) / math.log(2)
    alpha_bar = LINEAR_ALPHAS_CUMPROD[-1]
    prior = gaussian_kl_bits_per_dim(np.sqrt(alpha_bar) * sample.numpy(), np.sqrt(1 - alpha_bar), 0.0, 1.0)
    torch.testing.assert_close(bpd, decoder + torch.from_numpy(prior), rtol=1e-9, atol=1e-9)


def test_calculate_bpd_with_stride_is_an_unbiased_estimate_of_the_full_sum():
    """A model predicting x_0 + 0.1 has a KL term at each t that does not depend on the noise draw (the means differ
    by coef1_t * 0.1, the variances are fixed), so the full sum is exact and the strided estimates, each a random
    timestep per block, must average to it."""
    scheduler = DDPMNoiseScheduler(num_train_timesteps=T, prediction_type="sample")
    _, sample, _, _, _ = vlb_inputs("fixed_small", torch.tensor([0, 0]))

    def bound(stride: int, seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return scheduler.calculate_bpd(
            lambda noisy, timesteps: sample + 0.1, sample, generator=generator, stride=stride
        )

    full = bound(1, 0)
    torch.testing.assert_close(bound(1, 1), full, rtol=1e-12, atol=0)  # nothing random left in the full sum
    # stride 7 with T - 1 - 7 terms above t = 7 leaves a partial block, weighted by its own length
    assert (T - 1 - 7) % 7
    estimates = torch.stack([bound(7, seed) for seed in range(400)])  # (400, B)
    assert estimates.std(dim=0).min() > 0  # the picks do vary
    sem = estimates.std(dim=0) / 400**0.5
    assert ((estimates.mean(dim=0) - full).abs() < 4 * sem).all()


# --------------------------------------------------------------------------------------------------------------------
# Config portability
# --------------------------------------------------------------------------------------------------------------------


def test_save_pretrained_round_trip(tmp_path):
    scheduler = DDPMNoiseScheduler(
        num_train_timesteps=T,
        beta_schedule="squaredcos_cap_v2",
        variance_type="learned_range",
        prediction_type="v_prediction",
        timestep_spacing="trailing",
    )
    scheduler.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "DDPMNoiseScheduler"
    loaded = DDPMNoiseScheduler.from_pretrained(tmp_path)
    # `_use_default_values` only records which arguments the first constructor call left at their defaults
    assert {k: v for k, v in loaded.config.items() if k != "_use_default_values"} == {
        k: v for k, v in scheduler.config.items() if k != "_use_default_values"
    }

    sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    for s in (scheduler, loaded):
        s.set_timesteps(5)
    t = scheduler.timesteps[1]
    model_output = dummy_model(sample, t, "learned_range")
    a = scheduler.step(model_output, t, sample, generator=torch.Generator().manual_seed(1))
    b = loaded.step(model_output, t, sample, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.prev_sample, b.prev_sample) and torch.equal(a.pred_original_sample, b.pred_original_sample)


SHARED_KEYS = ["num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type", "timestep_spacing"]
DIFFUSERS_SAMPLERS = [DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler]


@pytest.mark.parametrize("scheduler_class", DIFFUSERS_SAMPLERS)
def test_diffusers_samplers_load_our_config_and_sample(scheduler_class):
    ours = DDPMNoiseScheduler(
        num_train_timesteps=T,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        steps_offset=1,
    )
    theirs = scheduler_class.from_config(ours.config)
    for key in SHARED_KEYS + ["steps_offset"]:
        assert theirs.config[key] == ours.config[key], key
    torch.testing.assert_close(theirs.alphas_cumprod, ours.alphas_cumprod.float())

    theirs.set_timesteps(4)
    sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * theirs.init_noise_sigma
    for t in theirs.timesteps:
        model_input = theirs.scale_model_input(sample, t)
        sample = theirs.step(dummy_model(model_input, t, "fixed_small"), t, sample).prev_sample
    assert sample.shape == SHAPE and torch.isfinite(sample).all()


@pytest.mark.parametrize("scheduler_class", [DDPMScheduler, *DIFFUSERS_SAMPLERS])
def test_loads_from_diffusers_configs(scheduler_class):
    theirs = scheduler_class(
        num_train_timesteps=T,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="v_prediction",
        timestep_spacing="linspace",
    )
    ours = DDPMNoiseScheduler.from_config(theirs.config)
    assert isinstance(ours, DDPMNoiseScheduler)
    for key in SHARED_KEYS:
        assert ours.config[key] == theirs.config[key], key


def test_diffusers_ddpm_loads_our_config_and_samples_the_same():
    ours = DDPMNoiseScheduler(num_train_timesteps=T, variance_type="learned_range", clip_sample=False)
    theirs = DDPMScheduler.from_config(ours.config)
    assert {k: v for k, v in theirs.config.items() if not k.startswith("_")} == {
        k: v for k, v in ours.config.items() if not k.startswith("_")
    }
    ours.set_timesteps(6)
    theirs.set_timesteps(6)
    sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    model_output = dummy_model(sample, ours.timesteps[1], "learned_range")
    a = ours.step(model_output, ours.timesteps[1], sample, generator=torch.Generator().manual_seed(1))
    b = theirs.step(model_output, theirs.timesteps[1], sample, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a.prev_sample, b.prev_sample, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,allowed",
    [
        ("beta_schedule", BETA_SCHEDULES),
        ("prediction_type", PREDICTION_TYPES),
        ("variance_type", VARIANCE_TYPES),
        ("timestep_spacing", TIMESTEP_SPACINGS),
    ],
)
def test_unknown_option_names_the_value_and_the_choices(name, allowed):
    with pytest.raises(ValueError, match=rf"{name} 'bogus' is not supported; choose one of .*{allowed[-1]}"):
        DDPMNoiseScheduler(**{name: "bogus"})


def test_trained_betas_of_the_wrong_length_are_rejected():
    with pytest.raises(ValueError, match=r"trained_betas has shape \(10,\); expected \(100,\)"):
        DDPMNoiseScheduler(num_train_timesteps=T, trained_betas=[0.01] * 10)


def test_too_many_inference_steps_are_rejected():
    scheduler = DDPMNoiseScheduler(num_train_timesteps=T)
    with pytest.raises(ValueError, match=r"`num_inference_steps` 101 must be between 1 and num_train_timesteps 100"):
        scheduler.set_timesteps(101)
    with pytest.raises(ValueError, match="Pass exactly one of"):
        scheduler.set_timesteps()
    with pytest.raises(ValueError, match=r"strictly descending order, got \[5, 7\]"):
        scheduler.set_timesteps(timesteps=[5, 7])
    with pytest.raises(ValueError, match=r"must lie in \[0, 100\), got \[100, 3\]"):
        scheduler.set_timesteps(timesteps=[100, 3])


@pytest.mark.parametrize("timestep", [-1, T])
def test_out_of_range_timesteps_are_rejected(timestep):
    scheduler = DDPMNoiseScheduler(num_train_timesteps=T)
    sample = torch.zeros(SHAPE)
    match = rf"timesteps must lie in \[0, 100\), got .*{timestep}"
    with pytest.raises(ValueError, match=match):
        scheduler.step(sample, timestep, sample)
    with pytest.raises(ValueError, match=match):
        scheduler.add_noise(sample, sample, torch.tensor([3, timestep]))
    with pytest.raises(ValueError, match=match):
        scheduler.snr(torch.tensor([timestep]))


def test_timestep_outside_the_inference_schedule_is_rejected():
    scheduler = DDPMNoiseScheduler(num_train_timesteps=T)
    scheduler.set_timesteps(10)
    sample = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match=r"timestep 55 is not in the schedule set by `set_timesteps`: \[90, 80"):
        scheduler.step(sample, 55, sample)


@pytest.mark.parametrize("variance_type,channels", [("learned_range", SHAPE[1]), ("fixed_small", 2 * SHAPE[1])])
def test_model_output_with_the_wrong_channel_count_is_rejected(variance_type, channels):
    scheduler = DDPMNoiseScheduler(num_train_timesteps=T, variance_type=variance_type)
    sample = torch.zeros(SHAPE)
    model_output = torch.zeros(SHAPE[0], channels, *SHAPE[2:])
    with pytest.raises(ValueError, match=rf"model_output has {channels} channels; variance_type '{variance_type}'"):
        scheduler.step(model_output, 10, sample)


def test_get_variance_of_a_learned_type_needs_the_predicted_variance():
    scheduler = DDPMNoiseScheduler(num_train_timesteps=T, variance_type="learned_range")
    with pytest.raises(ValueError, match="variance_type 'learned_range' needs the model's `predicted_variance`"):
        scheduler._get_variance(10)
    with pytest.raises(ValueError, match="variance_type 'bogus' is not supported"):
        scheduler._get_variance(10, variance_type="bogus")
