"""Frechet distance (FID) and kernel distance (KID) between feature sets, with streaming statistics and a cache.

FID (Heusel et al. 2017, https://arxiv.org/abs/1706.08500) fits a Gaussian to the features of each image set and
measures the Frechet (2-Wasserstein) distance between the two Gaussians. KID (Binkowski et al. 2018, "Demystifying
MMD GANs", https://arxiv.org/abs/1801.01401) is the unbiased squared MMD with a cubic polynomial kernel; unlike FID it
has no bias that depends on the sample count, so it suits the small sample counts of CPU runs.

Which network gives the features (Inception-v3 or our reference classifier) is up to the caller, see
`latentddpm.eval.features`; a number is comparable to published FID only with the Inception-v3 FID weights.
"""

import logging
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from tqdm.auto import tqdm

from .features import FeatureExtractor

logger = logging.getLogger(__name__)


class FeatureStatistics:
    """Running mean and covariance of feature vectors, accumulated in float64 batch by batch, plus the first
    `max_kept_features` vectors themselves (KID needs samples, not moments).

    Batches are merged with the pairwise update of Chan et al. 1979 ("Updating formulae and a pairwise algorithm
    for computing sample variances"): each batch's centred sum of outer products is added with a correction for the
    shift of the mean, which keeps the digits that the textbook sum(x x^T) - n mu mu^T loses.

    Args:
        max_kept_features (`int`, defaults to 10000): how many feature vectors to keep for KID; 0 keeps none.
    """

    def __init__(self, max_kept_features: int = 10_000):
        if max_kept_features < 0:
            raise ValueError(f"max_kept_features must be >= 0, got {max_kept_features}.")
        self.max_kept_features = max_kept_features
        self.count = 0
        self.mean: np.ndarray | None = None  # (D,)
        self._centered_sum: np.ndarray | None = None  # (D, D): sum over samples of (x - mean)(x - mean)^T
        self._kept: list[np.ndarray] = []

    def update(self, features: torch.Tensor | np.ndarray) -> None:
        """Add a batch of feature vectors.

        Args:
            features (`torch.Tensor` or `np.ndarray` of shape `(B, D)`): one feature vector per image.
        """
        if isinstance(features, torch.Tensor):
            features = features.detach().cpu().double().numpy()
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or (self.mean is not None and features.shape[1] != self.mean.shape[0]):
            expected = "(B, D)" if self.mean is None else f"(B, {self.mean.shape[0]})"
            raise ValueError(f"features must have shape {expected}, got {features.shape}.")
        batch_count = features.shape[0]
        if batch_count == 0:
            return
        batch_mean = features.mean(axis=0)
        centered = features - batch_mean
        batch_centered_sum = centered.T @ centered
        if self.mean is None:
            self.count, self.mean, self._centered_sum = batch_count, batch_mean, batch_centered_sum
        else:
            total = self.count + batch_count
            delta = batch_mean - self.mean
            self.mean = self.mean + delta * (batch_count / total)
            self._centered_sum = (
                self._centered_sum + batch_centered_sum + np.outer(delta, delta) * (self.count * batch_count / total)
            )
            self.count = total
        room = self.max_kept_features - sum(len(kept) for kept in self._kept)
        if room > 0:
            self._kept.append(features[:room].astype(np.float32))

    @property
    def covariance(self) -> np.ndarray:
        """Unbiased sample covariance of shape `(D, D)` (divides by n - 1, as `np.cov` and pytorch-fid do)."""
        if self.count < 2:
            raise ValueError(f"The covariance needs at least 2 feature vectors, got {self.count}.")
        return self._centered_sum / (self.count - 1)

    @property
    def features(self) -> np.ndarray:
        """The kept feature vectors, `np.ndarray` of shape `(min(count, max_kept_features), D)`, float32."""
        if not self._kept:
            return np.zeros((0, 0 if self.mean is None else self.mean.shape[0]), dtype=np.float32)
        return np.concatenate(self._kept)

    def save(self, path: str | Path, metadata: dict[str, str] | None = None) -> None:
        """Write the statistics to a safetensors file (with `metadata` as string key/values)."""
        if self.mean is None:
            raise ValueError("No features were added; there are no statistics to save.")
        tensors = {"mean": self.mean, "centered_sum": self._centered_sum, "features": self.features}
        header = {"count": str(self.count), "max_kept_features": str(self.max_kept_features), **(metadata or {})}
        save_file(tensors, str(path), metadata=header)

    @classmethod
    def load(cls, path: str | Path) -> "FeatureStatistics":
        """Read statistics written by [`save`]."""
        with safe_open(str(path), framework="numpy") as file:
            header = file.metadata()
        tensors = load_file(str(path))
        statistics = cls(max_kept_features=int(header["max_kept_features"]))
        statistics.count = int(header["count"])
        statistics.mean, statistics._centered_sum = tensors["mean"], tensors["centered_sum"]
        statistics._kept = [tensors["features"]]
        return statistics


def frechet_distance(mean1: np.ndarray, cov1: np.ndarray, mean2: np.ndarray, cov2: np.ndarray) -> float:
    """Frechet distance between N(mean1, cov1) and N(mean2, cov2) (Dowson & Landau 1982):
    ||mean1 - mean2||^2 + Tr(cov1) + Tr(cov2) - 2 Tr((cov1 cov2)^(1/2)).

    The matrix square root is taken without scipy: cov1 cov2 is similar to the symmetric positive semi-definite
    S = cov1^(1/2) cov2 cov1^(1/2), so Tr((cov1 cov2)^(1/2)) = sum of sqrt(eigenvalues of S), and both square roots
    come from symmetric eigen-decompositions (`np.linalg.eigh`), which are stable where the general `sqrtm` of a
    non-symmetric product may return complex parts. Eigenvalues that round-off makes slightly negative are set to 0.

    Args:
        mean1 (`np.ndarray` of shape `(D,)`), cov1 (`np.ndarray` of shape `(D, D)`): the first Gaussian.
        mean2 (`np.ndarray` of shape `(D,)`), cov2 (`np.ndarray` of shape `(D, D)`): the second Gaussian.

    Returns:
        `float`: the squared Frechet distance, the FID when the Gaussians are fitted to Inception features.
    """
    mean1, mean2 = np.asarray(mean1, dtype=np.float64), np.asarray(mean2, dtype=np.float64)
    cov1, cov2 = np.asarray(cov1, dtype=np.float64), np.asarray(cov2, dtype=np.float64)
    if mean1.shape != mean2.shape or cov1.shape != cov2.shape or cov1.shape != mean1.shape * 2:
        raise ValueError(
            f"Shapes do not match: mean1 {mean1.shape}, cov1 {cov1.shape}, mean2 {mean2.shape}, cov2 {cov2.shape};"
            " expected (D,) means and (D, D) covariances."
        )
    eigenvalues, eigenvectors = np.linalg.eigh((cov1 + cov1.T) / 2)
    sqrt_cov1 = (eigenvectors * np.sqrt(eigenvalues.clip(min=0))) @ eigenvectors.T
    product = sqrt_cov1 @ cov2 @ sqrt_cov1
    trace_sqrt_product = np.sqrt(np.linalg.eigvalsh((product + product.T) / 2).clip(min=0)).sum()
    difference = mean1 - mean2
    return float(difference @ difference + np.trace(cov1) + np.trace(cov2) - 2 * trace_sqrt_product)


def fid_from_statistics(statistics1: FeatureStatistics, statistics2: FeatureStatistics) -> float:
    """[`frechet_distance`] between the Gaussians fitted to two [`FeatureStatistics`]."""
    return frechet_distance(statistics1.mean, statistics1.covariance, statistics2.mean, statistics2.covariance)


def kernel_inception_distance(
    features1: np.ndarray | torch.Tensor,
    features2: np.ndarray | torch.Tensor,
    num_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """KID: the unbiased estimate of the squared MMD with the kernel k(x, y) = (x . y / D + 1)^3, averaged over
    random subsets (Binkowski et al. 2018, section 4 and appendix; as in their code and torch-fidelity).

    The estimator MMD^2_u = sum_{i!=j} k(x_i, x_j) / (m (m-1)) + sum_{i!=j} k(y_i, y_j) / (m (m-1))
    - 2 sum_{i,j} k(x_i, y_j) / m^2 is unbiased, so it is ~0 (and may be negative) for two samples of one
    distribution at any sample count.

    Args:
        features1 (`np.ndarray` or `torch.Tensor` of shape `(N1, D)`): features of the first image set.
        features2 (`np.ndarray` or `torch.Tensor` of shape `(N2, D)`): features of the second image set.
        num_subsets (`int`, defaults to 100): number of random subset pairs.
        subset_size (`int`, defaults to 1000): images per subset; capped at `min(N1, N2)`.
        seed (`int`, defaults to 0): seeds the subset draws.

    Returns:
        `(mean, std)` of the per-subset estimates.
    """
    features1 = np.asarray(features1.detach().cpu() if isinstance(features1, torch.Tensor) else features1, np.float64)
    features2 = np.asarray(features2.detach().cpu() if isinstance(features2, torch.Tensor) else features2, np.float64)
    if features1.ndim != 2 or features2.ndim != 2 or features1.shape[1] != features2.shape[1]:
        raise ValueError(f"features must be (N, D) arrays of one D, got {features1.shape} and {features2.shape}.")
    size = min(subset_size, len(features1), len(features2))
    if size < 2:
        raise ValueError(f"KID needs at least 2 feature vectors per set, got {len(features1)} and {len(features2)}.")
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be a positive integer, got {num_subsets}.")
    dim = features1.shape[1]
    rng = np.random.default_rng(seed)
    estimates = []
    for _ in range(num_subsets):
        x = features1[rng.choice(len(features1), size, replace=False)]
        y = features2[rng.choice(len(features2), size, replace=False)]
        k_xx, k_yy, k_xy = ((a @ b.T / dim + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        off_diagonal = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (size * (size - 1))
        estimates.append(off_diagonal - 2 * k_xy.sum() / size**2)
    return float(np.mean(estimates)), float(np.std(estimates))


@torch.no_grad()
def compute_statistics(
    extractor: FeatureExtractor,
    batches: Iterable[torch.Tensor],
    max_kept_features: int = 10_000,
    total: int | None = None,
    desc: str = "features",
) -> FeatureStatistics:
    """Run `extractor` over image batches and accumulate [`FeatureStatistics`], never holding all features.

    Args:
        extractor (`FeatureExtractor`): maps images to features.
        batches (iterable of `torch.Tensor` of shape `(B, 3, H, W)`): images in `[0, 1]`.
        max_kept_features (`int`, defaults to 10000): feature vectors kept for KID.
        total (`int`, *optional*): number of batches, for the progress bar.
        desc (`str`): progress bar label.
    """
    statistics = FeatureStatistics(max_kept_features)
    for images in tqdm(batches, total=total, desc=desc, leave=False):
        statistics.update(extractor(images))
    return statistics


def reference_statistics(
    extractor: FeatureExtractor,
    batches: Callable[[], Iterable[torch.Tensor]],
    fingerprint: str,
    cache_dir: str | Path,
    max_kept_features: int = 10_000,
    total: int | None = None,
) -> FeatureStatistics:
    """Statistics of a reference image set, read from the cache when this extractor has seen this data before.

    The cache file is `cache_dir/<extractor_id>--<fingerprint>.safetensors`, so a different dataset, selection,
    resolution (all folded into `fingerprint` by the caller) or feature network never reuses stale numbers. It is a
    safetensors file (arrays plus string metadata): nothing is unpickled.

    Args:
        extractor (`FeatureExtractor`): maps images to features; its `extractor_id` is half of the cache key.
        batches (`Callable` returning an iterable of `torch.Tensor` of shape `(B, 3, H, W)` in `[0, 1]`):
            called only on a cache miss, so the reference images are not even decoded on a hit.
        fingerprint (`str`): identifies the reference images, e.g. the `datasets` fingerprint of the selected rows
            plus the resolution they are transformed to.
        cache_dir (`str` or `Path`): folder of the cache files; created if missing.
        max_kept_features (`int`, defaults to 10000): feature vectors kept for KID.
        total (`int`, *optional*): number of batches, for the progress bar.

    Returns:
        [`FeatureStatistics`] of the reference set.
    """
    cache_dir = Path(cache_dir)
    path = cache_dir / f"{_file_safe(extractor.extractor_id)}--{_file_safe(fingerprint)}.safetensors"
    if path.exists():
        statistics = FeatureStatistics.load(path)
        if statistics.max_kept_features >= max_kept_features or statistics.count <= statistics.max_kept_features:
            logger.info(f"Reference statistics read from {path}")
            return statistics
    statistics = compute_statistics(extractor, batches(), max_kept_features, total=total, desc="reference features")
    cache_dir.mkdir(parents=True, exist_ok=True)
    statistics.save(path, metadata={"extractor_id": extractor.extractor_id, "fingerprint": fingerprint})
    logger.info(f"Reference statistics written to {path}")
    return statistics


def _file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name)
