"""Metrics of `latentddpm.eval`: Frechet distance and KID against closed forms, streaming statistics, the reference
cache, PSNR/SSIM against direct computations, the latent likelihood bound, feature extractors and training curves."""

import math
import os

import numpy as np
import pytest
import torch
from datasets import ClassLabel
from diffusers import AutoencoderKL

from latentddpm.config import ConfigError
from latentddpm.data import COLORS, make_shapes_dataset
from latentddpm.eval.classifier import ReferenceClassifier, caption_labels
from latentddpm.eval.curves import load_scalars, plot_training_curves
from latentddpm.eval.features import (
    CLASSIFIER_DESCRIPTION,
    ClassifierFeatureExtractor,
    FeatureExtractor,
    find_inception_weights,
    iter_pixel_batches,
    load_feature_extractor,
)
from latentddpm.eval.fid import (
    FeatureStatistics,
    compute_statistics,
    fid_from_statistics,
    frechet_distance,
    kernel_inception_distance,
    reference_statistics,
)
from latentddpm.eval.likelihood import latent_bits_per_dim
from latentddpm.eval.reconstruction import evaluate_reconstruction, gaussian_window, psnr, ssim
from latentddpm.eval.train_classifier import TrainClassifierConfig, train_reference_classifier
from latentddpm.latents import encode_images
from latentddpm.schedulers import DDPMNoiseScheduler

CIFAR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "datasets", "cifar10", "train.parquet")


def random_gaussian_features(n: int, dim: int, shift: float = 0.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(100).normal(size=(dim, dim)) / np.sqrt(dim)  # one covariance for every call
    return rng.normal(size=(n, dim)) @ mixing + shift


# Frechet distance and streaming statistics


def test_frechet_distance_of_diagonal_gaussians_matches_closed_form():
    rng = np.random.default_rng(0)
    mean1, mean2 = rng.normal(size=6), rng.normal(size=6)
    var1, var2 = rng.uniform(0.1, 3, size=6), rng.uniform(0.1, 3, size=6)
    expected = ((mean1 - mean2) ** 2).sum() + (var1 + var2 - 2 * np.sqrt(var1 * var2)).sum()
    assert frechet_distance(mean1, np.diag(var1), mean2, np.diag(var2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_of_full_covariances_matches_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(8, 8)), rng.normal(size=(8, 8))
    cov1, cov2 = a @ a.T, b @ b.T + 0.1 * np.eye(8)
    mean1, mean2 = rng.normal(size=8), rng.normal(size=8)
    expected = ((mean1 - mean2) ** 2).sum() + np.trace(cov1 + cov2 - 2 * linalg.sqrtm(cov1 @ cov2).real)
    assert frechet_distance(mean1, cov1, mean2, cov2) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"mean1 \(3,\)"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_streaming_statistics_over_batches_equal_statistics_at_once():
    features = random_gaussian_features(203, 5, shift=1e3)  # a large mean: the naive sum of squares would lose digits
    statistics = FeatureStatistics(max_kept_features=150)
    for start, stop in [(0, 1), (1, 64), (64, 200), (200, 203)]:
        statistics.update(torch.from_numpy(features[start:stop]))
    assert statistics.count == 203
    np.testing.assert_allclose(statistics.mean, features.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(statistics.covariance, np.cov(features, rowvar=False), rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(statistics.features, features[:150].astype(np.float32))


def test_statistics_save_load_round_trip(tmp_path):
    statistics = FeatureStatistics(max_kept_features=10)
    statistics.update(random_gaussian_features(30, 4))
    statistics.save(tmp_path / "stats.safetensors", metadata={"note": "x"})
    loaded = FeatureStatistics.load(tmp_path / "stats.safetensors")
    assert loaded.count == 30 and loaded.max_kept_features == 10
    np.testing.assert_array_equal(loaded.mean, statistics.mean)
    np.testing.assert_array_equal(loaded.covariance, statistics.covariance)
    np.testing.assert_array_equal(loaded.features, statistics.features)


def statistics_of(features: np.ndarray) -> FeatureStatistics:
    statistics = FeatureStatistics()
    statistics.update(features)
    return statistics


def test_fid_of_a_set_against_itself_is_zero():
    statistics = statistics_of(random_gaussian_features(500, 16))
    assert abs(fid_from_statistics(statistics, statistics)) < 1e-8


def test_fid_grows_monotonically_with_the_shift_of_the_set():
    reference = statistics_of(random_gaussian_features(500, 16, seed=0))
    shifts = (0.0, 0.25, 0.5, 1.0, 2.0)
    fids = [fid_from_statistics(statistics_of(random_gaussian_features(500, 16, s, 1)), reference) for s in shifts]
    assert all(a < b for a, b in zip(fids, fids[1:])), fids
    # the mean term dominates: a shift s of all 16 coordinates adds about 16 s^2
    assert fids[-1] - fids[0] == pytest.approx(16 * 2.0**2, rel=0.1)


# KID


def test_kid_with_one_full_subset_equals_the_unbiased_mmd_formula():
    x, y = random_gaussian_features(12, 3, seed=0), random_gaussian_features(12, 3, shift=0.5, seed=1)

    def k(a, b):
        return (a @ b / 3 + 1) ** 3

    m = len(x)
    within = sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    across = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m**2
    kid, std = kernel_inception_distance(x, y, num_subsets=1, subset_size=m)
    assert kid == pytest.approx(within - 2 * across, rel=1e-10) and std == 0


def test_kid_is_near_zero_for_one_distribution_and_grows_with_the_shift():
    reference = random_gaussian_features(400, 16, seed=0)
    same = kernel_inception_distance(random_gaussian_features(400, 16, seed=1), reference, 20, 200)
    shifted = [
        kernel_inception_distance(random_gaussian_features(400, 16, s, seed=1), reference, 20, 200)[0]
        for s in (0.5, 1.0)
    ]
    assert abs(same[0]) < 3 * same[1]  # unbiased: zero within its spread over subsets
    assert 0 < shifted[0] < shifted[1] and shifted[0] > 10 * abs(same[0])


# Reference statistics cache


class MeanColorFeatures(FeatureExtractor):
    """Per-channel mean and std of the image (6 features), counting how many batches it saw."""

    extractor_id = "mean-color"
    description = "mean colour"

    def __init__(self):
        self.batches_seen = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.batches_seen += 1
        return torch.cat([images.mean(dim=(2, 3)), images.std(dim=(2, 3))], dim=1)


def test_reference_statistics_are_cached_per_extractor_and_fingerprint(tmp_path):
    dataset = make_shapes_dataset(24, size=16)
    extractor = MeanColorFeatures()

    def batches():
        return iter_pixel_batches(dataset, 16, batch_size=10)

    first = reference_statistics(extractor, batches, "shapes-24", tmp_path)
    (path,) = tmp_path.glob("*.safetensors")
    assert "mean-color" in path.name and "shapes-24" in path.name
    assert extractor.batches_seen == 3 and first.count == 24
    mtime = path.stat().st_mtime_ns

    again = reference_statistics(extractor, batches, "shapes-24", tmp_path)
    assert extractor.batches_seen == 3 and path.stat().st_mtime_ns == mtime  # read, not recomputed
    np.testing.assert_array_equal(again.covariance, first.covariance)
    np.testing.assert_allclose(first.mean, compute_statistics(MeanColorFeatures(), batches()).mean)

    reference_statistics(extractor, batches, "shapes-24-other", tmp_path)
    assert extractor.batches_seen == 6 and len(list(tmp_path.glob("*.safetensors"))) == 2


# PSNR and SSIM


def test_psnr_matches_its_closed_form():
    reference = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    noisy = reference + 0.1 * torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    mse = ((noisy.double() - reference.double()) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(psnr(noisy, reference), 10 * torch.log10(1 / mse))
    # a constant offset d on [-1, 1] data (range 2): 10 log10(4 / d^2)
    assert psnr(reference + 0.05, reference, data_range=2.0)[0].item() == pytest.approx(10 * math.log10(4 / 0.0025))


def direct_ssim(x: np.ndarray, y: np.ndarray, window: np.ndarray, c1: float, c2: float) -> float:
    """SSIM of two (H, W) images, window by window with explicit weighted sums (Wang et al. 2004, eq. 13-16)."""
    size = len(window)
    weights = np.outer(window, window)
    values = []
    for top in range(x.shape[0] - size + 1):
        for left in range(x.shape[1] - size + 1):
            a, b = x[top : top + size, left : left + size], y[top : top + size, left : left + size]
            mu_a, mu_b = (weights * a).sum(), (weights * b).sum()
            var_a, var_b = (weights * (a - mu_a) ** 2).sum(), (weights * (b - mu_b) ** 2).sum()
            cov = (weights * (a - mu_a) * (b - mu_b)).sum()
            values.append((2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)))
    return float(np.mean(values))


def test_ssim_matches_a_direct_window_by_window_computation():
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 14, 15, generator=generator)
    y = (x + 0.2 * torch.randn(2, 3, 14, 15, generator=generator)).clamp(0, 1)
    window = gaussian_window(11, 1.5).numpy()
    c1, c2 = (0.01 * 1.0) ** 2, (0.03 * 1.0) ** 2
    expected = [
        np.mean([direct_ssim(x[b, c].double().numpy(), y[b, c].double().numpy(), window, c1, c2) for c in range(3)])
        for b in range(2)
    ]
    np.testing.assert_allclose(ssim(x, y).numpy(), expected, rtol=1e-10)


def test_ssim_of_an_image_with_itself_is_one_and_drops_with_noise():
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 16, 16, generator=generator)
    noise = torch.randn(1, 3, 16, 16, generator=generator)
    assert ssim(image, image).item() == pytest.approx(1.0, abs=1e-12)
    scores = [ssim((image + s * noise).clamp(0, 1), image).item() for s in (0.02, 0.1, 0.3)]
    assert 1 > scores[0] > scores[1] > scores[2]


def test_ssim_rejects_images_smaller_than_the_window():
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))


def tiny_vae(scaling_factor: float = 0.5) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
        scaling_factor=scaling_factor,
    ).eval()


def test_evaluate_reconstruction_reports_psnr_ssim_and_the_latent_statistics_in_use():
    vae = tiny_vae(scaling_factor=0.5)
    images = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    metrics = evaluate_reconstruction(vae, images.split(4), generator=torch.Generator().manual_seed(1))

    with torch.no_grad():
        reconstructions = (vae(images * 2 - 1).sample.clamp(-1, 1) + 1) / 2  # the posterior mean, decoded
        generator = torch.Generator().manual_seed(1)  # the same draws, batch by batch
        latents = torch.cat([encode_images(vae, batch * 2 - 1, generator) for batch in images.split(4)]).double()
    assert metrics["n"] == 6 and metrics["scaling_factor"] == 0.5
    assert metrics["psnr"] == pytest.approx(psnr(reconstructions, images).mean().item(), rel=1e-5)
    assert metrics["ssim"] == pytest.approx(ssim(reconstructions, images).mean().item(), rel=1e-5)
    assert metrics["latent_mean"] == pytest.approx(latents.mean().item(), rel=1e-6)
    assert metrics["latent_std"] == pytest.approx(latents.std(unbiased=False).item(), rel=1e-6)
    assert metrics["raw_latent_std"] == pytest.approx(metrics["latent_std"] / 0.5, rel=1e-9)
    assert metrics["suggested_scaling_factor"] == pytest.approx(1 / metrics["raw_latent_std"])


# Likelihood


class GaussianDataDenoiser(torch.nn.Module):
    """The exact noise prediction E[eps | x_t] for data z_0 ~ N(0, s^2 I): sqrt(1 - a) x_t / (a s^2 + 1 - a), with
    a = alpha_bar_t. Called like `UNet2DConditionModel`; counts its calls."""

    def __init__(self, scheduler: DDPMNoiseScheduler, data_std: float):
        super().__init__()
        self.alphas_cumprod = scheduler.alphas_cumprod.float()
        self.data_std = data_std
        self.calls = 0

    def forward(self, sample, timestep, encoder_hidden_states=None, encoder_attention_mask=None, return_dict=True):
        self.calls += 1
        alpha_bar = self.alphas_cumprod[timestep].view(-1, 1, 1, 1)
        return ((1 - alpha_bar).sqrt() * sample / (alpha_bar * self.data_std**2 + 1 - alpha_bar),)


def test_strided_likelihood_bound_is_close_to_the_full_sum_for_a_small_T():
    # Stratified over blocks of `stride` timesteps, the strided bound is unbiased; one draw is close to the full sum.
    scheduler = DDPMNoiseScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2")
    denoiser = GaussianDataDenoiser(scheduler, data_std=0.5)
    latents = 0.5 * torch.randn(16, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    hidden_states = torch.zeros(16, 3, 32)

    def bound(stride: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(1)
        return latent_bits_per_dim(denoiser, scheduler, latents, hidden_states, stride=stride, generator=generator)

    full = bound(1)
    assert full.shape == (16,) and torch.isfinite(full).all() and (full > 0).all()
    assert denoiser.calls == 100
    by_two, by_five = bound(2).mean().item(), bound(5).mean().item()
    # one t per block of 2 (5) from 99 down to 3 (6), then each of t = 2, 1 (5 ... 1), then L_0
    assert denoiser.calls == 100 + (49 + 2 + 1) + (19 + 5 + 1)
    assert by_two == pytest.approx(full.mean().item(), rel=0.1)
    assert by_five == pytest.approx(full.mean().item(), rel=0.1)
    torch.testing.assert_close(bound(1), full)  # deterministic for a seed


# Feature extractors


def test_caption_labels_find_the_one_class_each_caption_names():
    names = ["airplane", "automobile", "cat"]
    assert caption_labels(["a photo of a cat", "A photo of an Automobile", "an airplane"], names) == [2, 1, 0]
    with pytest.raises(ValueError, match="names 0 classes"):
        caption_labels(["a photo of a dog"], names)
    with pytest.raises(ValueError, match=r"names 2 classes \['airplane', 'cat'\]"):
        caption_labels(["a cat on an airplane"], names)


def test_reference_classifier_save_load_round_trip_keeps_features_and_extractor_id(tmp_path):
    torch.manual_seed(0)
    classifier = ReferenceClassifier(class_names=["a", "b"], resolution=16, block_out_channels=(8, 16), feature_dim=8)
    classifier.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file() and list(tmp_path.glob("*.safetensors"))
    original, loaded = ClassifierFeatureExtractor(classifier), ClassifierFeatureExtractor(tmp_path)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # resized to 16 inside
    features = original(images)
    assert features.shape == (3, 8)
    torch.testing.assert_close(loaded(images), features)
    assert loaded.extractor_id == original.extractor_id and loaded.description == CLASSIFIER_DESCRIPTION
    retrained = ReferenceClassifier(class_names=["a", "b"], resolution=16, block_out_channels=(8, 16), feature_dim=8)
    assert ClassifierFeatureExtractor(retrained).extractor_id != original.extractor_id


def colors_dataset(num_images: int, size: int = 16):
    """Shapes images labelled by colour: a class-captioned dataset that a classifier learns in a few steps."""
    dataset = make_shapes_dataset(num_images, size=size)
    dataset = dataset.map(lambda row: {"text": f"a photo of a {row['color']} thing"})
    return dataset.cast_column("color", ClassLabel(names=list(COLORS))).rename_column("color", "label")


def test_train_reference_classifier_learns_colours_and_saves(tmp_path):
    dataset = colors_dataset(240)
    config = TrainClassifierConfig(
        output_dir=str(tmp_path),
        resolution=16,
        max_train_steps=120,
        train_batch_size=32,
        learning_rate=5e-3,
        num_heldout=60,
        block_out_channels=(8, 16),
        feature_dim=16,
    )
    classifier, metrics = train_reference_classifier(dataset, config)
    assert metrics["steps"] == 120 and metrics["num_train"] == 180 and metrics["num_heldout"] == 60
    assert metrics["heldout_accuracy"] > 0.8  # chance is 1 / 6
    assert (tmp_path / "metrics.json").is_file()
    loaded = ReferenceClassifier.from_pretrained(tmp_path)
    assert loaded.config.class_names == list(COLORS)
    images = next(iter_pixel_batches(dataset, 16, batch_size=8)) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(images), classifier(images))


def test_train_reference_classifier_rejects_a_dataset_without_class_labels_or_too_few_rows(tmp_path):
    with pytest.raises(ConfigError, match="'label_column': 'label' must be a ClassLabel column"):
        train_reference_classifier(make_shapes_dataset(10, size=16), TrainClassifierConfig(output_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match="'num_heldout' must be at most half the dataset \\(5\\), got 6"):
        train_reference_classifier(colors_dataset(10), TrainClassifierConfig(num_heldout=6, output_dir=str(tmp_path)))
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(not os.path.exists(CIFAR), reason="CIFAR-10 is not in ../shared/datasets")
def test_train_reference_classifier_runs_on_cifar10(tmp_path):
    from latentddpm.data import load_image_caption_dataset

    dataset = load_image_caption_dataset(CIFAR)
    dataset = dataset.select(np.random.default_rng(0).choice(len(dataset), 300, replace=False).tolist())
    config = TrainClassifierConfig(
        output_dir=str(tmp_path),
        max_train_steps=5,
        train_batch_size=32,
        num_heldout=50,
        block_out_channels=(8, 16),
        feature_dim=16,
    )
    classifier, metrics = train_reference_classifier(dataset, config)
    assert metrics["steps"] == 5 and 0 <= metrics["heldout_accuracy"] <= 1
    loaded = ClassifierFeatureExtractor(tmp_path)
    assert loaded.classifier.config.class_names[0] == "airplane" and loaded.classifier.config.resolution == 32
    assert loaded.extractor_id == ClassifierFeatureExtractor(classifier).extractor_id


def test_feature_extractor_choice_and_missing_inception_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty torch hub cache
    assert find_inception_weights() is None
    assert load_feature_extractor("auto") is None
    with pytest.raises(ValueError, match="Feature extractor 'fid' is not supported"):
        load_feature_extractor("fid")
    with pytest.raises(ValueError, match="No Inception weights"):
        load_feature_extractor("inception")
    with pytest.raises(ValueError, match="do not exist"):
        find_inception_weights(tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="needs the folder of a trained reference classifier"):
        load_feature_extractor("classifier")

    cached = tmp_path / "hub" / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"not really weights")
    assert find_inception_weights() == cached
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        try:
            import pytorch_fid  # noqa: F401
        except ImportError:
            with pytest.raises(ImportError, match="torch-fidelity"):
                load_feature_extractor("auto")


# Training curves


def test_training_curves_merge_resumed_runs_and_plot_every_scalar(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    first = SummaryWriter(tmp_path / "logs" / "latentddpm")
    for step in range(1, 6):
        first.add_scalar("loss", 1.0 / step, step)
        first.add_scalar("lr", 1e-4, step)
        first.add_scalar("shapes_all_acc", 0.1 * step, step)
    first.close()
    os.utime(next((tmp_path / "logs").rglob("events.*")), (1, 1))  # older than the resumed run's file
    resumed = SummaryWriter(tmp_path / "logs" / "latentddpm")
    for step in range(4, 8):  # resumed from a checkpoint at step 3: steps 4 and 5 are logged again
        resumed.add_scalar("loss", 0.5 / step, step)
    resumed.close()

    scalars = load_scalars(tmp_path / "logs")
    assert set(scalars) == {"loss", "lr", "shapes_all_acc"}
    assert [step for step, _ in scalars["loss"]] == [1, 2, 3, 4, 5, 6, 7]
    assert scalars["loss"][3] == (4, pytest.approx(0.5 / 4)) and scalars["loss"][2] == (3, pytest.approx(1 / 3))
    path = plot_training_curves(tmp_path / "logs", tmp_path / "curves.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="No TensorBoard event files"):
        load_scalars(tmp_path / "empty")
