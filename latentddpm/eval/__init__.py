"""Evaluation of generated images."""

from .clip_score import CLIPScorer
from .fid import FeatureStatistics, frechet_distance, kernel_inception_distance, reference_statistics
from .likelihood import evaluate_likelihood, latent_bits_per_dim
from .reconstruction import evaluate_reconstruction, psnr, ssim
from .shapes_judge import judge_image, score_shapes

__all__ = [
    "CLIPScorer",
    "FeatureStatistics",
    "evaluate_likelihood",
    "evaluate_reconstruction",
    "frechet_distance",
    "judge_image",
    "kernel_inception_distance",
    "latent_bits_per_dim",
    "psnr",
    "reference_statistics",
    "score_shapes",
    "ssim",
]
