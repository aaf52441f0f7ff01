"""`latentddpm evaluate`: sample a saved pipeline over schedulers x steps x guidance scales, measure every setting, and
write a table (CSV, JSON), plots, sample grids and one self-contained HTML report.

Usage:

    latentddpm evaluate --model outputs/ldm/pipeline --data shapes --guidance 1,2,3,5 --steps 10,20,50 \
        --schedulers ddpm,ddim,dpmsolver++ --num-samples 90 --seed 0 --out outputs/eval

    latentddpm evaluate --model outputs/cifar/pipeline --data ../shared/datasets/cifar10/train.parquet \
        --classifier outputs/cifar_classifier --num-samples 500 --out outputs/eval-cifar

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

import base64
import csv
import dataclasses
import html
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
from diffusers.image_processor import VaeImageProcessor
from tqdm.auto import tqdm

from ..config import ConfigError, parse_config, save_config
from ..data.shapes import shapes_prompts
from ..data.sources import load_image_caption_dataset
from ..data.transforms import pick_caption
from ..optional import import_optional
from ..validation import image_grid
from .clip_score import CLIPScorer
from .curves import plot_training_curves
from .features import ClassifierFeatureExtractor, caption_labels, iter_pixel_batches, load_feature_extractor
from .fid import compute_statistics, fid_from_statistics, kernel_inception_distance, reference_statistics
from .likelihood import evaluate_likelihood
from .reconstruction import evaluate_reconstruction
from .shapes_judge import score_shapes

Figure = import_optional("matplotlib.figure", extra="eval", feature="latentddpm evaluate's plots").Figure

logger = logging.getLogger(__name__)

# metric -> (what it is, whether higher is better); the order of the table's and the report's columns
METRICS: dict[str, tuple[str, bool]] = {
    "all_acc": ("shapes judge: colour, shape and position all right", True),
    "color_acc": ("shapes judge: colour right", True),
    "shape_acc": ("shapes judge: shape right", True),
    "position_acc": ("shapes judge: position right", True),
    "class_acc": ("reference classifier: prompted class recognised", True),
    "clip_score": ("CLIP score: 100 x cosine of image and prompt embeddings", True),
    "fid": ("FID", False),
    "kid": ("KID (unbiased, x1000 is the usual unit)", False),
    "seconds_per_image": ("seconds per image", False),
}


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
    num_samples: int = 100  # images generated per setting
    batch_size: int = 50  # images per pipeline call
    seed: int = 0  # seeds prompts, reference rows, noise and every random draw of the metrics
    out: str = "outputs/evaluate"  # output folder
    features: Literal["auto", "inception", "classifier", "none"] = "auto"  # FID/KID features; auto: Inception
    # when its weights are found, else the classifier when given, else no FID/KID
    inception_weights: str | None = None  # pt_inception-2015-12-05-6726825d.pth (default: the torch hub cache)
    classifier: str | None = None  # folder of a ReferenceClassifier (`python -m latentddpm.eval.features`)
    clip_model: str | None = None  # a CLIPModel folder with its tokenizer and image processor: adds "clip_score"
    num_reference: int = 10000  # reference images for the FID/KID statistics
    shapes_num_images: int = 2000  # shapes data: images generated as the reference set (seed 10000 + seed)
    cache_dir: str | None = None  # reference statistics cache (default ~/.cache/latentddpm/reference_statistics)
    reconstruction_samples: int = 256  # reference images for VAE PSNR/SSIM and latent statistics; 0 skips
    likelihood_samples: int = 0  # images for the bits/dim bound; 0 skips (each costs T U-Net calls at stride 1)
    # 1 sums all T terms; k > 1 draws one t per block of k above t = k (unbiased; ~T/k + k calls)
    likelihood_stride: int = 1
    grid_images: int = 64  # images shown in each setting's sample grid
    logs: str | None = None  # TensorBoard folder of the training run, to add training curves to the report
    device: str | None = None  # default: cuda when available, else cpu

    def validate(self) -> None:
        from ..cli import SCHEDULERS  # here, not at the top: the command line imports this module

        if not self.model:
            raise ConfigError("Config key 'model' is required: the folder of a saved LatentDDPMPipeline.")
        unknown = [name for name in self.schedulers if name not in SCHEDULERS]
        if unknown or not self.schedulers:
            raise ConfigError(f"Config key 'schedulers' has {unknown or 'none'}; choose from {sorted(SCHEDULERS)}.")
        for key in ("guidance", "steps"):
            if not getattr(self, key):
                raise ConfigError(f"Config key '{key}' needs at least one value.")
        if min(self.steps) < 1:
            raise ConfigError(f"Config key 'steps' must be positive integers, got {self.steps}.")
        for key in ("num_samples", "batch_size", "num_reference", "likelihood_stride", "grid_images"):
            if getattr(self, key) < 1:
                raise ConfigError(f"Config key '{key}' must be a positive integer, got {getattr(self, key)}.")


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
    from ..cli import SCHEDULERS
    from ..pipelines import LatentDDPMPipeline

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
        scheduler_class, overrides = SCHEDULERS[scheduler_name]
        pipeline.scheduler = scheduler_class.from_config(base_scheduler.config, **overrides)
        start = time.perf_counter()
        images = generate(pipeline, prompts, num_steps, guidance, config.seed, config.batch_size)
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
        _grid(images[: config.grid_images]).save(grid_path)
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
        "model_metrics": model_metrics,
        "rows": table,
    }
    metric_names = [m for m in METRICS if any(m in row for row in table)]
    _write_csv(out / "metrics.csv", table)
    (out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    plots = {m: _plot_metric(table, m, config, results["features"], out / "plots" / f"{m}.png") for m in metric_names}
    curves = plot_training_curves(config.logs, out / "plots" / "training_curves.png") if config.logs else None
    report = _write_report(out / "report.html", results, metric_names, plots, curves)
    return results | {"report": str(report), "csv": str(out / "metrics.csv"), "json": str(out / "metrics.json")}


@torch.no_grad()
def generate(
    pipeline, prompts: list[str], num_steps: int, guidance: float, seed: int, batch_size: int
) -> torch.Tensor:
    """Sample one image per prompt, in batches whose generators are seeded with `seed + index of the first prompt`.

    Returns:
        `torch.Tensor` of shape `(N, 3, H, W)`: images in `[0, 1]`, on the CPU.
    """
    images = []
    for start in range(0, len(prompts), batch_size):
        generator = torch.Generator(pipeline.device).manual_seed(seed + start)
        images.append(
            pipeline(
                prompts[start : start + batch_size],
                num_inference_steps=num_steps,
                guidance_scale=guidance,
                generator=generator,
                output_type="pt",
            )
            .images.float()
            .cpu()
        )
    return torch.cat(images)


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


def _grid(images: torch.Tensor):
    return image_grid(VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(images)))


def _write_csv(path: Path, table: list[dict]) -> None:
    fields = list(dict.fromkeys(key for row in table for key in row))
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=fields)
        writer.writeheader()
        writer.writerows(table)


def _plot_metric(table: list[dict], metric: str, config: EvaluateConfig, features: str | None, path: Path) -> Path:
    """Two panels: the metric against the guidance scale (a line per scheduler and step count) and against the step
    count (a line per scheduler and guidance scale). Colour marks the scheduler; the line is more opaque for more
    steps or stronger guidance."""
    figure = Figure(figsize=(11, 4))
    by_guidance, by_steps = figure.subplots(1, 2)
    colors = {name: f"C{i}" for i, name in enumerate(config.schedulers)}
    values = {(row["scheduler"], row["steps"], row["guidance"]): row.get(metric) for row in table}
    for scheduler in config.schedulers:
        for i, steps in enumerate(config.steps):
            ys = [values[(scheduler, steps, g)] for g in config.guidance]
            alpha = 0.35 + 0.65 * (i + 1) / len(config.steps)
            label = f"{scheduler}, {steps} steps"
            by_guidance.plot(config.guidance, ys, "o-", color=colors[scheduler], alpha=alpha, label=label)
        for i, guidance in enumerate(config.guidance):
            ys = [values[(scheduler, n, guidance)] for n in config.steps]
            alpha = 0.35 + 0.65 * (i + 1) / len(config.guidance)
            label = f"{scheduler}, cfg {guidance:g}"
            by_steps.plot(config.steps, ys, "o-", color=colors[scheduler], alpha=alpha, label=label)
    title, _ = METRICS[metric]
    if metric in ("fid", "kid") and features:
        title = f"{title} on {features}"
    for axis, xlabel in ((by_guidance, "guidance scale"), (by_steps, "denoising steps")):
        axis.set_xlabel(xlabel)
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=6, ncol=2)
    by_steps.set_xscale("log")
    by_steps.minorticks_off()
    by_steps.set_xticks(config.steps, [str(n) for n in config.steps])
    figure.suptitle(f"{title} ({config.num_samples} samples per point, seed {config.seed})", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path


def _image_tag(path: Path, alt: str, width: int | None = None) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    style = f' style="width:{width}px"' if width else ""
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}"{style}>'


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def _write_report(path: Path, results: dict, metrics: list[str], plots: dict, curves: Path | None) -> Path:
    """One HTML file with every image embedded (base64), readable offline and easy to share."""
    config, rows = results["config"], results["rows"]
    columns = ["scheduler", "steps", "guidance", *metrics] + (["kid_std"] if "kid" in metrics else [])
    best = {}
    for metric in metrics:
        values = [row[metric] for row in rows if metric in row]
        best[metric] = max(values) if METRICS[metric][1] else min(values)
    header = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = ""
    for row in rows:
        cells = ""
        for column in columns:
            value = row.get(column, "")
            bold = column in best and value == best[column]
            cells += f"<td>{'<b>' if bold else ''}{_format(value)}{'</b>' if bold else ''}</td>"
        body += f"<tr>{cells}</tr>\n"

    features = results["features"]
    if features is None:
        features_note = "<p>No feature network: FID and KID were not computed (see <code>--features</code>).</p>"
    else:
        warn = ' class="warn"' if "not comparable" in features else ""
        features_note = (
            f"<p{warn}>FID/KID features: <b>{html.escape(features)}</b>; reference: {results['num_reference']} "
            f"images of <code>{html.escape(config['data'])}</code>, generated: {config['num_samples']} per setting."
            "</p>"
        )
    model_sections = ""
    for name, values in results["model_metrics"].items():
        items = "".join(f"<tr><th>{html.escape(k)}</th><td>{_format(v)}</td></tr>" for k, v in values.items())
        model_sections += f"<h3>{html.escape(name)}</h3><table>{items}</table>"
    plot_tags = "".join(f"<h3>{html.escape(METRICS[m][0])}</h3>{_image_tag(p, m)}" for m, p in plots.items())
    curves_tag = f"<h2>Training curves</h2>{_image_tag(curves, 'training curves')}" if curves else ""
    grids = ""
    for row in rows:
        scores = ", ".join(f"{m} {_format(row[m])}" for m in metrics if m in row)
        title = f"{row['scheduler']}, {row['steps']} steps, guidance {row['guidance']:g}"
        grids += (
            f"<figure>{_image_tag(path.parent / row['grid'], title, width=256)}"
            f"<figcaption><b>{html.escape(title)}</b><br>{html.escape(scores)}</figcaption></figure>"
        )
    machine = ", ".join(f"{k}: {v}" for k, v in results["machine"].items())
    document = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>latentddpm evaluation: {html.escape(config["model"])}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 1200px; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }}
td, th {{ border: 1px solid #ccc; padding: 3px 8px; text-align: right; }}
.warn {{ background: #fff3cd; padding: 0.5em; border-left: 4px solid #e0a800; }}
figure {{ display: inline-block; margin: 0.5em; vertical-align: top; width: 260px; font-size: 0.8em; }}
figure img, h3 + img {{ image-rendering: pixelated; max-width: 100%; }}
</style></head><body>
<h1>Evaluation of <code>{html.escape(config["model"])}</code></h1>
<p>Data: <code>{html.escape(config["data"])}</code> ({results["data_kind"]}); seed {config["seed"]};
{config["num_samples"]} samples per setting. Machine: {html.escape(machine)}.</p>
{features_note}
<h2>Model</h2>{model_sections or "<p>No model-level metrics requested.</p>"}
<h2>Metrics per setting</h2><p>Best value of each column in bold.</p>
<table><tr>{header}</tr>
{body}</table>
<h2>Plots</h2>{plot_tags}
{curves_tag}
<h2>Samples</h2>{grids}
</body></html>
"""
    path.write_text(document)
    return path


if __name__ == "__main__":
    main()
