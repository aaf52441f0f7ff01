"""`latentddpm evaluate`: sample a saved pipeline over schedulers x steps x guidance scales, measure every setting, and
write a table (CSV, JSON), plots, sample grids and one self-contained HTML report.

Usage:

    latentddpm evaluate --model outputs/ldm/pipeline --data shapes --guidance 1,2,3,5 --steps 10,20,50 \
        --schedulers ddpm,ddim,dpmsolver++ --num_samples 90 --seed 0 --out outputs/eval

    latentddpm evaluate --model outputs/cifar/pipeline --data ../shared/datasets/cifar10/train.parquet \
        --classifier outputs/cifar_classifier --num_samples 500 --out outputs/eval-cifar

Keys can also come from a YAML file (`--config eval.yaml`); `latentddpm evaluate --help` lists them all.

Metrics per setting:
- shapes data (`--data shapes`): the colour / shape / position accuracies of `latentddpm.eval.shapes_judge`;
- class-captioned data (a `ClassLabel` column, e.g. CIFAR-10 with "a photo of a cat"): the reference classifier's
  accuracy on the prompted class, and FID/KID on its features, labelled "classifier features (not comparable to
  published FID)"; with the Inception-v3 FID weights on disk, FID/KID on Inception features instead;
- with `--clip_model` (a CLIP folder on disk): the CLIP score of the images with their prompts;
- every setting: seconds per image.
Once per model: VAE reconstruction (PSNR, SSIM, latent statistics) and, when asked, the latent-space bits/dim bound.

Every setting draws the same initial noise (the generator of each batch is seeded with `seed + first index`), so
differences between settings come from the settings and not from the draw; a seed gives the same numbers every run.
"""

import dataclasses
import json
import logging
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from datasets import ClassLabel, Dataset
from diffusers.utils import make_image_grid
from tqdm.auto import tqdm

from ..config import ConfigError, non_negative, parse_config, positive, save_config
from ..data.shapes import shapes_prompts
from ..data.sources import load_image_caption_dataset
from ..data.transforms import pick_caption
from ..pipelines import LatentDDPMPipeline
from ..schedulers import SAMPLER_NAMES, make_sampler
from .classifier import caption_labels
from .clip_score import CLIPScorer
from .curves import plot_training_curves
from .features import ClassifierFeatureExtractor, iter_pixel_batches, load_feature_extractor
from .fid import compute_statistics, fid_from_statistics, kernel_inception_distance, reference_statistics
from .likelihood import evaluate_likelihood
from .reconstruction import evaluate_reconstruction
from .report import METRICS, plot_metric, write_csv, write_report
from .sampling import generate_images, grid_shape, to_pil
from .shapes_judge import score_shapes

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class EvaluateConfig:
    """Settings of `latentddpm evaluate`."""

    model: str = ""  # folder written by `LatentDDPMPipeline.save_pretrained`, or a Hub repo id (required)
    data: str = "shapes"  # "shapes", parquet file(s), a folder or a Hub dataset: reference images and prompts
    split: str = "train"  # split of `data`; slicing works, e.g. "train[-5000:]" for rows kept out of training
    image_column: str = "image"  # column holding the images
    caption_column: str = "text"  # column holding the captions (the prompts)
    label_column: str = "label"  # a ClassLabel column here marks class-captioned data (classifier accuracy)
    guidance: list[float] = dataclasses.field(default_factory=lambda: [1.0, 2.0, 3.0, 5.0])  # guidance scales
    steps: list[int] = dataclasses.field(default_factory=lambda: [10, 20, 50])  # numbers of denoising steps
    schedulers: list[str] = dataclasses.field(default_factory=lambda: ["ddpm", "ddim", "dpmsolver++"])  # samplers
    num_samples: int = positive(100)  # images generated per setting
    batch_size: int = positive(50)  # images per pipeline call
    seed: int = 0  # seeds prompts, reference rows, noise and every random draw of the metrics
    out: str = "outputs/evaluate"  # output folder
    features: Literal["auto", "inception", "classifier", "none"] = "auto"  # FID/KID features; auto: Inception
    # when its weights are found, else the classifier when given, else no FID/KID
    inception_weights: str | None = None  # pt_inception-2015-12-05-6726825d.pth (default: the torch hub cache)
    classifier: str | None = None  # folder of a ReferenceClassifier (`latentddpm train-classifier`)
    clip_model: str | None = None  # a CLIPModel folder with its tokenizer and image processor: adds "clip_score"
    num_reference: int = positive(10000)  # reference images for the FID/KID statistics
    shapes_num_images: int = 2000  # shapes data: images generated as the reference set (seed 10000 + seed)
    cache_dir: str | None = None  # reference statistics cache (default ~/.cache/latentddpm/reference_statistics)
    reconstruction_samples: int = non_negative(256)  # reference images for VAE PSNR/SSIM, latent statistics; 0 skips
    # images for the bits/dim bound; 0 skips (each costs T U-Net calls at stride 1)
    likelihood_samples: int = non_negative(0)
    # 1 sums all T terms; k > 1 draws one t per block of k above t = k (unbiased; ~T/k + k calls)
    likelihood_stride: int = positive(1)
    grid_images: int = positive(64)  # images shown in each setting's sample grid
    logs: str | None = None  # TensorBoard folder of the training run, to add training curves to the report
    device: str | None = None  # default: cuda when available, else cpu

    def validate(self) -> None:
        if not self.model:
            raise ConfigError("Config key 'model' is required: the folder of a saved LatentDDPMPipeline.")
        unknown = [name for name in self.schedulers if name not in SAMPLER_NAMES]
        if unknown or not self.schedulers:
            raise ConfigError(f"Config key 'schedulers' has {unknown or 'none'}; choose from {sorted(SAMPLER_NAMES)}.")
        for key in ("guidance", "steps"):
            if not getattr(self, key):
                raise ConfigError(f"Config key '{key}' needs at least one value.")
        if min(self.steps) < 1:
            raise ConfigError(f"Config key 'steps' must be positive integers, got {self.steps}.")


def main(argv: list[str] | None = None) -> None:
    """`latentddpm evaluate [--config eval.yaml] [--key value ...]`."""
    config = parse_config(EvaluateConfig, argv)
    results = evaluate(config)
    columns = [c for c in ("scheduler", "steps", "guidance", *METRICS) if any(c in row for row in results["rows"])]
    print(("features: " + results["features"]) if results["features"] else "features: none (no FID/KID)")
    print("  ".join(f"{c:>12}" for c in columns))
    for row in results["rows"]:
        print("  ".join(f"{row[c]:>12.4g}" if isinstance(row[c], float) else f"{row[c]!s:>12}" for c in columns))
    print(f"wrote {results['csv']}, {results['json']} and {results['report']}")


def evaluate(config: EvaluateConfig, pipeline=None) -> dict:
    """Run the sweep of `config` and write its outputs to `config.out`.

    Args:
        config (`EvaluateConfig`): what to run.
        pipeline (`LatentDDPMPipeline`, *optional*): the model, instead of loading `config.model` (e.g. from a
            training loop).

    Returns:
        `dict`: what `metrics.json` holds (`config`, `machine`, `features`, `model_metrics`, `rows`) plus the paths
        of the outputs.
    """
    out = Path(config.out)
    (out / "grids").mkdir(parents=True, exist_ok=True)
    (out / "plots").mkdir(exist_ok=True)
    save_config(config, out / "config.yaml")
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if pipeline is None:
        pipeline = LatentDDPMPipeline.from_pretrained(config.model).to(device)
    pipeline.set_progress_bar_config(disable=True)
    base_scheduler = pipeline.scheduler
    sample_size = pipeline.unet.config.sample_size
    resolution = (sample_size if isinstance(sample_size, int) else sample_size[0]) * pipeline.vae_scale_factor

    # 1. Data: reference rows in a seeded random order (datasets such as CIFAR-10 are stored sorted by class)
    dataset = _load_data(config, resolution)
    order = np.random.default_rng(config.seed).permutation(len(dataset)).tolist()
    kind = "shapes" if config.data == "shapes" else "class" if _is_class_labelled(dataset, config) else "captions"
    prompts = _prompts(kind, dataset, order, config)

    # 2. Feature network and reference statistics
    extractor = load_feature_extractor(config.features, config.inception_weights, config.classifier, device)
    classifier = labels = None
    if kind == "class" and config.classifier is not None:
        # the classifier scores classes even when Inception gives the FID features
        if isinstance(extractor, ClassifierFeatureExtractor):
            classifier = extractor
        else:
            classifier = ClassifierFeatureExtractor(config.classifier, device)
        labels = torch.tensor(caption_labels(prompts, classifier.classifier.config.class_names))
    elif kind == "class":
        logger.warning("Class-captioned data but no --classifier: class accuracy is not measured.")
    clip = CLIPScorer(config.clip_model, device) if config.clip_model else None
    reference = None
    if extractor is not None:
        if config.num_samples < 2:
            raise ConfigError(f"FID and KID need num_samples >= 2, got {config.num_samples}; or pass --features none.")
        reference_rows = dataset.select(order[: config.num_reference])
        reference = reference_statistics(
            extractor,
            lambda: iter_pixel_batches(reference_rows, resolution, config.batch_size, config.image_column),
            fingerprint=f"{reference_rows._fingerprint}-{resolution}px",  # datasets' hash of the selected rows
            cache_dir=config.cache_dir or _default_cache_dir(),
            total=-(-len(reference_rows) // config.batch_size),
        )

    # 3. Model-level metrics: VAE reconstruction and the likelihood bound
    model_metrics = {}
    if config.reconstruction_samples > 0:
        rows = dataset.select(order[: config.reconstruction_samples])
        model_metrics["reconstruction"] = evaluate_reconstruction(
            pipeline.vae,
            iter_pixel_batches(rows, resolution, config.batch_size, config.image_column),
            generator=torch.Generator(device).manual_seed(config.seed),
        )
    if config.likelihood_samples > 0:
        rows = dataset.select(order[: config.likelihood_samples])
        generator = torch.Generator().manual_seed(config.seed)
        captions = [pick_caption(caption, generator) for caption in rows[config.caption_column]]
        batches = zip(
            iter_pixel_batches(rows, resolution, config.batch_size, config.image_column),
            (captions[i : i + config.batch_size] for i in range(0, len(captions), config.batch_size)),
        )
        model_metrics["likelihood"] = evaluate_likelihood(
            pipeline, batches, stride=config.likelihood_stride, seed=config.seed
        )

    # 4. The sweep
    settings = [(s, n, g) for s in config.schedulers for n in config.steps for g in config.guidance]
    table = []
    for scheduler_name, num_steps, guidance in tqdm(settings, desc="settings"):
        pipeline.scheduler = make_sampler(scheduler_name, base_scheduler.config)
        start = time.perf_counter()
        images = generate_images(pipeline, prompts, num_steps, guidance, config.seed, config.batch_size)
        row = {"scheduler": scheduler_name, "steps": num_steps, "guidance": guidance}
        row["seconds_per_image"] = (time.perf_counter() - start) / len(images)
        if kind == "shapes":
            scores = score_shapes(images, prompts)
            row.update({key: scores[key] for key in ("all_acc", "color_acc", "shape_acc", "position_acc")})
        if labels is not None:
            row["class_acc"] = float((classifier.predict(images) == labels).double().mean())
        if clip is not None:
            row["clip_score"] = float(clip.scores(images, prompts, config.batch_size).double().mean())
        if reference is not None:
            generated = compute_statistics(extractor, images.split(config.batch_size), desc="generated features")
            row["fid"] = fid_from_statistics(generated, reference)
            row["kid"], row["kid_std"] = kernel_inception_distance(
                generated.features, reference.features, seed=config.seed
            )
        grid_path = out / "grids" / f"{scheduler_name}-steps{num_steps}-cfg{guidance:g}.png"
        grid_images = to_pil(images[: config.grid_images])
        make_image_grid(grid_images, *grid_shape(len(grid_images))).save(grid_path)
        row["grid"] = str(grid_path.relative_to(out))
        table.append(row)
        logger.info(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    pipeline.scheduler = base_scheduler

    # 5. Outputs
    results = {
        "config": dataclasses.asdict(config),
        "machine": _machine(device),
        "data_kind": kind,
        "features": None if extractor is None else extractor.description,
        "num_reference": None if reference is None else reference.count,
        "grid_prompts": prompts[: config.grid_images],  # the prompts of each grid's images, in reading order
        "model_metrics": model_metrics,
        "rows": table,
    }
    metric_names = [m for m in METRICS if any(m in row for row in table)]
    write_csv(out / "metrics.csv", table)
    (out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    plots = {m: plot_metric(results, m, out / "plots" / f"{m}.png") for m in metric_names}
    curves = plot_training_curves(config.logs, out / "plots" / "training_curves.png") if config.logs else None
    report = write_report(out / "report.html", results, metric_names, plots, curves)
    return results | {"report": str(report), "csv": str(out / "metrics.csv"), "json": str(out / "metrics.json")}


def _load_data(config: EvaluateConfig, resolution: int) -> Dataset:
    if config.data == "shapes":
        num_images = max(config.shapes_num_images, config.reconstruction_samples, config.likelihood_samples)
        # a seed that training configs do not use: images with new sizes and jitter
        return load_image_caption_dataset("shapes", num_images=num_images, size=resolution, seed=10_000 + config.seed)
    return load_image_caption_dataset(
        config.data, split=config.split, image_column=config.image_column, caption_column=config.caption_column
    )


def _is_class_labelled(dataset: Dataset, config: EvaluateConfig) -> bool:
    return isinstance(dataset.features.get(config.label_column), ClassLabel)


def _prompts(kind: str, dataset: Dataset, order: list[int], config: EvaluateConfig) -> list[str]:
    """`num_samples` prompts: the 90 shapes captions, or every distinct caption of class-captioned data (each class
    equally often), in a seeded order and repeated as needed; or the captions of seeded random rows."""
    generator = torch.Generator().manual_seed(config.seed)
    if kind == "shapes":
        candidates = shapes_prompts()
    elif kind == "class":
        candidates = sorted({pick_caption(c, generator) for c in dataset[config.caption_column]})
    else:
        rows = dataset.select(order[: config.num_samples])
        candidates = [pick_caption(c, generator) for c in rows[config.caption_column]]
    candidates = [candidates[i] for i in np.random.default_rng(config.seed).permutation(len(candidates))]
    return [candidates[i % len(candidates)] for i in range(config.num_samples)]


def _default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "latentddpm" / "reference_statistics"


def _machine(device: str) -> dict[str, str | int]:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "device": device,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info
